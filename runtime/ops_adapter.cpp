// The Deep LoRA product op: validation, the fused kernels or the op-by-op fallback, the backward.
#include "runtime/ops_adapter.h"

#include <fmt/format.h>

#include "kernels/adapter.h"
#include "runtime/dispatch.h"
#include "runtime/op_checks.h"
#include "runtime/ops.h"

namespace deeplora::ops {

using detail::wants;

bool deeplora_product_fused(Device d, DType master, DType compute, int64_t k, int depth) {
  if (depth < 1 || depth > kernels::kDeepLoraMaxDepth) return false;
  if (d == Device::cpu) return true;
  return master == DType::f32 && (compute == DType::f32 || compute == DType::bf16) && k <= kernels::kDeepLoraMaxK;
}

Tensor deeplora_product(const std::vector<Tensor>& K, const Tensor& Bt, DType compute) {
  check(!K.empty() && Bt.defined(), "deeplora_product", "needs K_1..K_L and Bt");
  check(Bt.ndim() == 2 && is_float(Bt.dtype()), "deeplora_product", fmt::format("Bt must be a float [k, n], got {}", Bt.desc()));
  const int64_t k = Bt.dim(0), n = Bt.dim(1);
  for (const Tensor& Ki : K)
    check(Ki.defined() && Ki.ndim() == 2 && Ki.dim(0) == k && Ki.dim(1) == k && Ki.dtype() == Bt.dtype() &&
              Ki.device() == Bt.device(),
          "deeplora_product",
          fmt::format("every K_i must be [{}, {}] {} on the device of Bt {}, got {}", k, k, dtype_name(Bt.dtype()),
                      Bt.desc(), Ki.defined() ? Ki.desc() : std::string("undefined")));
  check(is_float(compute), "deeplora_product", fmt::format("compute dtype {} is not a float", dtype_name(compute)));
  const Device d = Bt.device();
  const DType master = Bt.dtype();
  const int depth = int(K.size());
  if (!deeplora_product_fused(d, master, compute, k, depth)) {
    Tensor P = K[0];
    for (int i = 1; i < depth; ++i) P = matmul(K[size_t(i)], P);
    Tensor W = matmul(P, Bt);
    return W.dtype() == compute ? W : cast(W, compute);
  }
  kernels::DeepLoraChain c;
  for (int i = 0; i < depth; ++i) c.K[i] = K[size_t(i)].data();
  Tensor P = Tensor::empty(Shape{k, k}, master, d);
  Tensor W = Tensor::empty(Shape{k, n}, compute, d);
  c.Bt = Bt.data();
  c.P = P.data();
  c.W = W.data();
  c.k = k;
  c.n = n;
  c.depth = depth;
  DEEPLORA_DISPATCH(d, deeplora_chain_fwd, master, compute, c, stream_for(d));
  bool grads = needs_grad({&Bt});
  for (const Tensor& Ki : K) grads = needs_grad({&Ki}) || grads;
  if (grads) {
    auto wi = W.impl_ptr();
    tape().record({wi}, [K, Bt, P, wi, c, d, master, compute] {
      if (!wi->grad) return;
      kernels::DeepLoraChain b = c;
      b.gW = Tensor(wi->grad).data();
      b.gBt = wants(Bt) ? grad_buffer(Bt).data() : nullptr;
      for (size_t i = 0; i < K.size(); ++i) b.gK[i] = wants(K[i]) ? grad_buffer(K[i]).data() : nullptr;
      Tensor scratch;
      if (d == Device::cuda) scratch = Tensor::empty(Shape{int64_t(kernels::deeplora_chain_scratch_elems(b))}, master, d);
      DEEPLORA_DISPATCH(d, deeplora_chain_bwd, master, compute, b, scratch.defined() ? scratch.data() : nullptr,
                        stream_for(d));
    });
  }
  return W;
}

}  // namespace deeplora::ops
