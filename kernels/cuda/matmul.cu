// The GPU GEMM: row-major products of kernels/matmul.h through cuBLASLt, with a per-shape cache of
// Lt descriptors and the heuristic's algorithm, and a small kernel for bias where Lt has no epilogue.
#include <cuda_bf16.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels/cuda/matmul_lt.cuh"
#include "kernels/cuda_check.h"
#include "runtime/device.h"

namespace deeplora::kernels::cuda {
namespace {

// ---- small bias / beta kernel (Lt fallback, and K == 0 where Lt has nothing to multiply) ----------

__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

// C[b][m][n] = (scale_c ? beta * Cin : C) + bias[n]; beta == 0 ignores Cin (it may hold NaN
// garbage). Cin is laid out like C and may be C.
template <class T, class S>
__global__ void scale_add_bias(T* C, const T* Cin, const T* bias, int64_t M, int64_t N, int64_t ldc,
                               int64_t sC, int64_t batch, S beta, bool scale_c) {
  const int64_t total = batch * M * N;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i % N, r = i / N, m = r % M, b = r / M;
    const int64_t at = b * sC + m * ldc + n;
    T* c = C + at;
    S v = S(0);
    if (!scale_c) v = load(c);
    else if (beta != S(0)) v = beta * S(load(Cin + at));
    if (bias) v += S(load(bias + n));
    store(c, v);
  }
}

template <class T>
void launch_scale_add_bias(const Gemm& g, bool scale_c, cudaStream_t s) {
  using S = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t total = g.batch * g.M * g.N;
  const int threads = 256;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((total + threads - 1) / threads, int64_t(1) << 20));
  const T* cin = static_cast<const T*>(g.Cin ? g.Cin : g.C);
  scale_add_bias<T, S><<<unsigned(blocks), threads, 0, s>>>(static_cast<T*>(g.C), cin, static_cast<const T*>(g.bias),
                                                           g.M, g.N, g.ldc, g.strideC, g.batch, S(g.beta), scale_c);
  CUDA_CHECK_LAUNCH();
}

void scale_add_bias_any(const Gemm& g, DType c_dt, bool scale_c, cudaStream_t s) {
  switch (c_dt) {
    case DType::f32: launch_scale_add_bias<float>(g, scale_c, s); return;
    case DType::bf16: launch_scale_add_bias<__nv_bfloat16>(g, scale_c, s); return;
    case DType::f64: launch_scale_add_bias<double>(g, scale_c, s); return;
    default: throw std::invalid_argument("gemm: bias/beta kernel: unsupported dtype");
  }
}

// ---- cuBLASLt plans ----------------------------------------------------------------------------------

cudaDataType_t lt_type(DType t) {
  switch (t) {
    case DType::f32: return CUDA_R_32F;
    case DType::bf16: return CUDA_R_16BF;
    case DType::f64: return CUDA_R_64F;
    default: throw std::invalid_argument(std::string("gemm: unsupported dtype ") + dtype_name(t));
  }
}

// Largest power of two (capped at 256, Lt's default requirement) dividing the address of every
// batch entry: Lt picks kernels by it, so it is part of a plan's identity.
uint32_t alignment(const void* p, int64_t stride, int64_t batch, size_t elem) {
  uint64_t x = uint64_t(reinterpret_cast<uintptr_t>(p)) | 256u;
  if (batch > 1) x |= uint64_t(stride) * elem;
  return uint32_t(x & (~x + 1));
}

// Everything of a Gemm but pointers' values and alpha/beta. out_of_place: Cin is not C, so the
// algorithm must write D apart from C (not every one can); al_cin is then Cin's alignment.
struct Key {
  DType dt, c_dt;
  bool ta, tb, bias, out_of_place;
  int64_t M, N, K, lda, ldb, ldc, sA, sB, sC, batch;
  uint32_t al_a, al_b, al_c, al_cin, al_bias;
  auto operator<=>(const Key&) const = default;
};

std::string describe(const Key& k) {
  auto s = [](int64_t v) { return std::to_string(v); };
  return std::string("gemm ") + dtype_name(k.dt) + (k.c_dt != k.dt ? std::string("->") + dtype_name(k.c_dt) : "") +
         " M=" + s(k.M) + " N=" + s(k.N) + " K=" + s(k.K) + " ta=" + s(k.ta) + " tb=" + s(k.tb) + " lda=" + s(k.lda) +
         " ldb=" + s(k.ldb) + " ldc=" + s(k.ldc) + " batch=" + s(k.batch) + " strides=" + s(k.sA) + "/" + s(k.sB) +
         "/" + s(k.sC) + " align=" + s(k.al_a) + "/" + s(k.al_b) + "/" + s(k.al_c) +
         (k.out_of_place ? " Cin align=" + s(k.al_cin) : std::string()) + (k.bias ? " +bias" : "");
}

// Lt is column-major: row-major C (M x N, ldc) is column-major C^T (N x M), and C^T = op(B)^T op(A)^T.
// So Lt's first operand is our B, its second our A, and the bias (length N) runs along Lt's rows.
// Lt's C is our Cin, its D our C: both have layout lt_c.
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t lt_a = nullptr, lt_b = nullptr, lt_c = nullptr;  // our B, our A, Cin and C
  cublasLtMatmulAlgo_t algo{};
  bool lt_bias = false;  // bias through the epilogue; otherwise scale_add_bias runs after the product
};

void destroy(Plan& p) {
  if (p.lt_c) cublasLtMatrixLayoutDestroy(p.lt_c);
  if (p.lt_b) cublasLtMatrixLayoutDestroy(p.lt_b);
  if (p.lt_a) cublasLtMatrixLayoutDestroy(p.lt_a);
  if (p.desc) cublasLtMatmulDescDestroy(p.desc);
  p = Plan{};
}

template <class V>
void set_desc(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t a, const V& v) {
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d, a, &v, sizeof(v)));
}
template <class V>
void set_layout(cublasLtMatrixLayout_t l, cublasLtMatrixLayoutAttribute_t a, const V& v) {
  CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, a, &v, sizeof(v)));
}

cublasLtMatrixLayout_t make_layout(DType t, int64_t rows, int64_t cols, int64_t ld, int64_t batch, int64_t stride) {
  cublasLtMatrixLayout_t l = nullptr;
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l, lt_type(t), uint64_t(rows), uint64_t(cols), ld));
  if (batch > 1) {
    set_layout(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, int32_t(batch));
    set_layout(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, int64_t(stride));
  }
  return l;
}

// Builds descriptors and asks the heuristic; false when Lt has no algorithm for this combination.
bool try_plan(const Key& k, const void* bias, bool with_bias, Plan& p) {
  DeviceContext& ctx = cuda_ctx();
  const bool f64 = k.dt == DType::f64;
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.desc, f64 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F,
                                        f64 ? CUDA_R_64F : CUDA_R_32F));
  try {
    set_desc(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, int32_t(k.tb ? CUBLAS_OP_T : CUBLAS_OP_N));
    set_desc(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, int32_t(k.ta ? CUBLAS_OP_T : CUBLAS_OP_N));
    if (with_bias) {
      set_desc(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, uint32_t(CUBLASLT_EPILOGUE_BIAS));
      set_desc(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias);
      set_desc(p.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, int32_t(lt_type(k.c_dt)));
    }
    // Stored (pre-op) shapes as column-major: our row-major R x C with ld is Lt's C x R with ld.
    p.lt_a = k.tb ? make_layout(k.dt, k.K, k.N, k.ldb, k.batch, k.sB) : make_layout(k.dt, k.N, k.K, k.ldb, k.batch, k.sB);
    p.lt_b = k.ta ? make_layout(k.dt, k.M, k.K, k.lda, k.batch, k.sA) : make_layout(k.dt, k.K, k.M, k.lda, k.batch, k.sA);
    p.lt_c = make_layout(k.c_dt, k.N, k.M, k.ldc, k.batch, k.sC);

    cublasLtMatmulPreference_t pref = nullptr;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    auto set_pref = [&](cublasLtMatmulPreferenceAttributes_t a, auto v) {
      return cublasLtMatmulPreferenceSetAttribute(pref, a, &v, sizeof(v));
    };
    cublasStatus_t st = set_pref(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, uint64_t(ctx.lt_workspace_bytes));
    if (st == CUBLAS_STATUS_SUCCESS) st = set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, k.al_b);
    if (st == CUBLAS_STATUS_SUCCESS) st = set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, k.al_a);
    if (st == CUBLAS_STATUS_SUCCESS) st = set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, k.al_cin);
    if (st == CUBLAS_STATUS_SUCCESS) st = set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, k.al_c);
    cublasLtMatmulHeuristicResult_t res[4] = {};
    int n = 0;
    if (st == CUBLAS_STATUS_SUCCESS)
      st = cublasLtMatmulAlgoGetHeuristic(ctx.cublaslt, p.desc, p.lt_a, p.lt_b, p.lt_c, p.lt_c, pref, 4, res, &n);
    cublasLtMatmulPreferenceDestroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS && st != CUBLAS_STATUS_NOT_SUPPORTED)
      throw std::runtime_error(describe(k) + ": cublasLtMatmulAlgoGetHeuristic failed: " + cublas_status_string(st));
    auto out_of_place_ok = [&](const cublasLtMatmulAlgo_t& a) {
      int32_t yes = 0;
      size_t got = 0;
      return cublasLtMatmulAlgoCapGetAttribute(&a, CUBLASLT_ALGO_CAP_OUT_OF_PLACE_RESULT_SUPPORT, &yes, sizeof(yes),
                                               &got) == CUBLAS_STATUS_SUCCESS && yes != 0;
    };
    int pick = -1;
    for (int i = 0; i < n && pick < 0; ++i)
      if (res[i].state == CUBLAS_STATUS_SUCCESS && (!k.out_of_place || out_of_place_ok(res[i].algo))) pick = i;
    if (st != CUBLAS_STATUS_SUCCESS || pick < 0) {
      destroy(p);
      return false;
    }
    p.algo = res[pick].algo;
    p.lt_bias = with_bias;
    return true;
  } catch (...) {
    destroy(p);
    throw;
  }
}

struct PlanCache {
  std::mutex mu;
  std::map<Key, Plan> plans;
};
PlanCache& plan_cache() {
  static PlanCache* c = new PlanCache();  // never destroyed, like the device context it serves
  return *c;
}

void check(bool ok, const Gemm& g, const char* what) {
  if (ok) return;
  auto s = [](int64_t v) { return std::to_string(v); };
  throw std::invalid_argument(std::string("gemm: ") + what + " (M=" + s(g.M) + " N=" + s(g.N) + " K=" + s(g.K) +
                              " ta=" + s(g.ta) + " tb=" + s(g.tb) + " lda=" + s(g.lda) + " ldb=" + s(g.ldb) +
                              " ldc=" + s(g.ldc) + " batch=" + s(g.batch) + ")");
}

}  // namespace

namespace detail {
void gemm_mixed(const Gemm& g, DType c_dt, cudaStream_t s) {
  const bool types_ok = (g.dt == c_dt && (g.dt == DType::f32 || g.dt == DType::bf16 || g.dt == DType::f64)) ||
                        (g.dt == DType::bf16 && c_dt == DType::f32);
  if (!types_ok)
    throw std::invalid_argument(std::string("gemm: unsupported dtypes A/B ") + dtype_name(g.dt) + ", C " +
                                dtype_name(c_dt));
  check(g.M >= 0 && g.N >= 0 && g.K >= 0 && g.batch >= 0, g, "negative size");
  if (g.M == 0 || g.N == 0 || g.batch == 0) return;
  check(g.batch <= INT32_MAX, g, "batch over 2^31-1");
  check(g.C != nullptr, g, "C is null");
  check(g.ldc >= g.N, g, "ldc < N");
  // beta == 0 reads no addend: such products stay in place (and share plans with C = Cin).
  const void* cin = g.Cin && g.beta != 0.0 ? g.Cin : g.C;
  check(g.workspace == nullptr || reinterpret_cast<uintptr_t>(g.workspace) % 256 == 0, g,
        "workspace not 256-byte aligned");
  if (g.K == 0) {  // op(A) op(B) is zero: C = beta Cin (+ bias)
    scale_add_bias_any(g, c_dt, true, s);
    return;
  }
  check(g.A != nullptr && g.B != nullptr, g, "A or B is null");
  check(g.lda >= (g.ta ? g.M : g.K), g, g.ta ? "lda < M (A is K x M)" : "lda < K (A is M x K)");
  check(g.ldb >= (g.tb ? g.K : g.N), g, g.tb ? "ldb < K (B is N x K)" : "ldb < N (B is K x N)");
  check(g.batch == 1 || (g.strideA >= 0 && g.strideB >= 0 && g.strideC >= 0), g, "negative batch stride");

  const size_t es = dtype_size(g.dt), ces = dtype_size(c_dt);
  // Strides mean nothing for one entry: leave them out of the key so such plans are shared.
  const bool batched = g.batch > 1;
  Key key{};
  key.dt = g.dt, key.c_dt = c_dt, key.ta = g.ta, key.tb = g.tb, key.bias = g.bias != nullptr;
  key.out_of_place = cin != g.C;
  key.M = g.M, key.N = g.N, key.K = g.K, key.lda = g.lda, key.ldb = g.ldb, key.ldc = g.ldc;
  key.sA = batched ? g.strideA : 0, key.sB = batched ? g.strideB : 0, key.sC = batched ? g.strideC : 0;
  key.batch = g.batch;
  key.al_a = alignment(g.A, g.strideA, g.batch, es);
  key.al_b = alignment(g.B, g.strideB, g.batch, es);
  key.al_c = alignment(g.C, g.strideC, g.batch, ces);
  key.al_cin = key.out_of_place ? alignment(cin, g.strideC, g.batch, ces) : key.al_c;
  key.al_bias = g.bias ? alignment(g.bias, 0, 1, ces) : 0u;

  DeviceContext& ctx = cuda_ctx();
  // A caller's workspace has the context's size, so plans asked for with that size hold for it.
  void* const ws = g.workspace ? g.workspace : ctx.lt_workspace;
  PlanCache& cache = plan_cache();
  bool bias_after = false;
  {
    std::lock_guard<std::mutex> lk(cache.mu);
    auto it = cache.plans.find(key);
    if (it == cache.plans.end()) {
      Plan p;
      // Lt has bias epilogues for bf16/f32 outputs but not every type (f64): then a kernel adds it.
      bool ok = key.bias && try_plan(key, g.bias, true, p);
      if (!ok) ok = try_plan(key, nullptr, false, p);
      if (!ok)
        throw std::runtime_error(describe(key) + ": cuBLASLt has no algorithm for this shape/type "
                                 "(check leading dimensions and alignment)");
      it = cache.plans.emplace(key, p).first;
    }
    Plan& p = it->second;
    if (p.lt_bias) set_desc(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, g.bias);
    bias_after = key.bias && !p.lt_bias;
    if (g.dt == DType::f64) {
      const double alpha = g.alpha, beta = g.beta;
      CUBLAS_CHECK(cublasLtMatmul(ctx.cublaslt, p.desc, &alpha, g.B, p.lt_a, g.A, p.lt_b, &beta, cin, p.lt_c, g.C,
                                  p.lt_c, &p.algo, ws, ctx.lt_workspace_bytes, s));
    } else {
      const float alpha = float(g.alpha), beta = float(g.beta);
      CUBLAS_CHECK(cublasLtMatmul(ctx.cublaslt, p.desc, &alpha, g.B, p.lt_a, g.A, p.lt_b, &beta, cin, p.lt_c, g.C,
                                  p.lt_c, &p.algo, ws, ctx.lt_workspace_bytes, s));
    }
  }
  if (bias_after) scale_add_bias_any(g, c_dt, false, s);  // onto C, which now holds the product
}
}  // namespace detail

void gemm(const Gemm& g, cudaStream_t s) { detail::gemm_mixed(g, g.dt, s); }

size_t gemm_workspace_bytes() { return cuda_ctx().lt_workspace_bytes; }

}  // namespace deeplora::kernels::cuda
