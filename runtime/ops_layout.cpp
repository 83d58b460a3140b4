// Layout ops: validation (errors name the op and the shapes), the copy kernels of kernels/llama.h,
// and their backward closures (gradients written on their first contribution, added after).
#include "runtime/ops_layout.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <string>

#include "runtime/dispatch.h"
#include "kernels/llama.h"
#include "runtime/op_checks.h"

namespace deeplora::ops {
namespace {

#define DL_LK(dev, fn, ...) DEEPLORA_DISPATCH(dev, fn, __VA_ARGS__)

using detail::wants;

std::string descs(const std::vector<Tensor>& xs) {
  std::string s;
  for (const Tensor& t : xs) s += (s.empty() ? "" : ", ") + (t.defined() ? t.desc() : std::string("<undefined>"));
  return s;
}

// dst (+)= src column block: rows x cols, leading dims in elements.
void copy_block(Device d, DType dt, const void* src, int64_t sld, void* dst, int64_t dld, int64_t rows, int64_t cols,
                bool accumulate) {
  DL_LK(d, copy_cols, dt, src, sld, dst, dld, rows, cols, accumulate, stream_for(d));
}

void* at_col(const Tensor& t, int64_t col) { return static_cast<char*>(t.data()) + col * int64_t(dtype_size(t.dtype())); }

}  // namespace

Tensor transpose(const Tensor& x) {
  check(x.defined(), "transpose", "undefined input tensor");
  check(x.ndim() >= 2 && x.ndim() <= 4, "transpose", fmt::format("input {} must be 2-D, 3-D or 4-D", x.desc()));
  const int64_t R = x.dim(-2), C = x.dim(-1), batch = R * C > 0 ? x.numel() / (R * C) : 0;
  Shape ys = x.shape();
  ys[-2] = C;
  ys[-1] = R;
  Device d = x.device();
  Tensor y = Tensor::empty(ys, x.dtype(), d);
  if (y.numel() > 0) DL_LK(d, transpose_last2, x.dtype(), x.data(), y.data(), batch, R, C, false, stream_for(d));
  if (is_float(x.dtype()) && needs_grad({&x})) {
    auto yi = y.impl_ptr();
    tape().record({yi}, [x, yi, d, batch, R, C] {
      GradTarget gx = grad_target(x);
      if (x.numel() == 0) return;
      // gy is [.., C, R]: its transpose (batch, C, R) -> (batch, R, C) is x's gradient.
      DL_LK(d, transpose_last2, x.dtype(), Tensor(yi->grad).data(), gx.g.data(), batch, C, R, !gx.fresh, stream_for(d));
    });
  }
  return y;
}

Tensor concat(const std::vector<Tensor>& xs) {
  check(!xs.empty(), "concat", "no input tensors");
  for (const Tensor& t : xs) check(t.defined(), "concat", fmt::format("undefined input among [{}]", descs(xs)));
  const Tensor& x0 = xs[0];
  check(x0.ndim() >= 1, "concat", fmt::format("inputs must have at least one dim, got [{}]", descs(xs)));
  int64_t Cout = 0;
  for (const Tensor& t : xs) {
    check(t.dtype() == x0.dtype() && t.device() == x0.device(), "concat",
          fmt::format("inputs differ in dtype or device: [{}]", descs(xs)));
    bool lead = t.ndim() == x0.ndim();
    for (int i = 0; lead && i < t.ndim() - 1; ++i) lead = t.dim(i) == x0.dim(i);
    check(lead, "concat", fmt::format("inputs must agree in every dim but the last: [{}]", descs(xs)));
    Cout += t.dim(-1);
  }
  Shape ys = x0.shape();
  ys[-1] = Cout;
  Device d = x0.device();
  Tensor y = Tensor::empty(ys, x0.dtype(), d);
  const int64_t rows = Cout > 0 ? y.numel() / Cout : 0;
  std::vector<int64_t> off;
  int64_t o = 0;
  for (const Tensor& t : xs) {
    off.push_back(o);
    if (rows > 0 && t.dim(-1) > 0) copy_block(d, t.dtype(), t.data(), t.dim(-1), at_col(y, o), Cout, rows, t.dim(-1), false);
    o += t.dim(-1);
  }
  bool any = false;
  if (is_float(x0.dtype()))
    for (const Tensor& t : xs) any |= needs_grad({&t});  // every call: needs_grad notes each leaf's use
  if (any) {
    auto yi = y.impl_ptr();
    tape().record({yi}, [xs, off, yi, d, rows, Cout] {
      Tensor gy(yi->grad);
      for (size_t i = 0; i < xs.size(); ++i) {
        if (!wants(xs[i])) continue;
        GradTarget g = grad_target(xs[i]);  // the same tensor twice: written, then added
        if (rows > 0 && xs[i].dim(-1) > 0)
          copy_block(d, gy.dtype(), at_col(gy, off[i]), Cout, g.g.data(), xs[i].dim(-1), rows, xs[i].dim(-1), !g.fresh);
      }
    });
  }
  return y;
}

std::vector<Tensor> split_last(const Tensor& x, const std::vector<int64_t>& sizes) {
  check(x.defined(), "split_last", "undefined input tensor");
  check(x.ndim() >= 1, "split_last", fmt::format("input {} must have at least one dim", x.desc()));
  check(!sizes.empty(), "split_last", fmt::format("no sizes given for {}", x.desc()));
  int64_t total = 0;
  for (int64_t s : sizes) {
    check(s >= 0, "split_last", fmt::format("negative size {} for {}", s, x.desc()));
    total += s;
  }
  check(total == x.dim(-1), "split_last",
        fmt::format("sizes {} sum to {}, not the last dim {} of {}", fmt::join(sizes, ", "), total, x.dim(-1), x.desc()));
  const int64_t C = x.dim(-1), rows = C > 0 ? x.numel() / C : 0;
  Device d = x.device();
  std::vector<Tensor> ys;
  std::vector<int64_t> off;
  int64_t o = 0;
  for (int64_t s : sizes) {
    Shape sh = x.shape();
    sh[-1] = s;
    Tensor y = Tensor::empty(sh, x.dtype(), d);
    if (rows > 0 && s > 0) copy_block(d, x.dtype(), at_col(x, o), C, y.data(), s, rows, s, false);
    ys.push_back(y);
    off.push_back(o);
    o += s;
  }
  if (is_float(x.dtype()) && needs_grad({&x})) {
    std::vector<std::shared_ptr<TensorImpl>> yis;
    for (const Tensor& y : ys) yis.push_back(y.impl_ptr());
    tape().record(yis, [x, yis, off, sizes, d, rows, C] {
      GradTarget gx = grad_target(x);
      if (rows == 0) return;
      for (size_t i = 0; i < yis.size(); ++i) {
        if (sizes[i] == 0) continue;
        if (yis[i]->grad) {
          copy_block(d, x.dtype(), Tensor(yis[i]->grad).data(), sizes[i], at_col(gx.g, off[i]), C, rows, sizes[i],
                     !gx.fresh);
        } else if (gx.fresh) {  // a piece nobody used: its part of a fresh gradient is zero
          copy_block(d, x.dtype(), nullptr, 0, at_col(gx.g, off[i]), C, rows, sizes[i], false);
        }
      }
    });
  }
  return ys;
}

Tensor slice_last(const Tensor& x, int64_t begin, int64_t end) {
  check(x.defined(), "slice_last", "undefined input tensor");
  check(x.ndim() >= 1, "slice_last", fmt::format("input {} must have at least one dim", x.desc()));
  check(0 <= begin && begin <= end && end <= x.dim(-1), "slice_last",
        fmt::format("range [{}, {}) is not inside the last dim {} of {}", begin, end, x.dim(-1), x.desc()));
  const int64_t C = x.dim(-1), rows = C > 0 ? x.numel() / C : 0, n = end - begin;
  Shape ys = x.shape();
  ys[-1] = n;
  Device d = x.device();
  Tensor y = Tensor::empty(ys, x.dtype(), d);
  if (rows > 0 && n > 0) copy_block(d, x.dtype(), at_col(x, begin), C, y.data(), n, rows, n, false);
  if (is_float(x.dtype()) && needs_grad({&x})) {
    auto yi = y.impl_ptr();
    tape().record({yi}, [x, yi, d, rows, C, begin, end, n] {
      GradTarget gx = grad_target(x);
      if (rows == 0) return;
      if (gx.fresh) {  // the columns outside the slice get zeros, the slice its gradient: one write each
        if (begin > 0) copy_block(d, x.dtype(), nullptr, 0, gx.g.data(), C, rows, begin, false);
        if (end < C) copy_block(d, x.dtype(), nullptr, 0, at_col(gx.g, end), C, rows, C - end, false);
      }
      if (n > 0) copy_block(d, x.dtype(), Tensor(yi->grad).data(), n, at_col(gx.g, begin), C, rows, n, !gx.fresh);
    });
  }
  return y;
}

}  // namespace deeplora::ops
