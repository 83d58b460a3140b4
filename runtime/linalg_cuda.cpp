// cuSOLVER paths of runtime/linalg.h. Plain C++ (no kernels of its own): layout changes go through
// cublasLtMatrixTransform, everything else through cuSOLVER on the context's stream, with
// workspaces from the caching allocator.
//
// Why these routines (measured on an H200, CUDA 13.0, top 32 of 768x3072, 768x2304, 768x768):
// - SVD: gesvdaStridedBatched. It takes the top k triplets from the eigenpairs of AᵀA: 8-13 ms for
//   one matrix and ~5 ms each in a batch of 12 (f32 and f64; ~9 ms / ~5 ms through this API,
//   host finishing included), with top-k singular values within ~3e-13 (f64) / ~3e-8 (f32,
//   relative to s0) of an f64 reference and residuals at the same level. The others, same test:
//   gesvdj 32-56 ms with loose f32 results (|UᵀU - I| ~ 4e-4, dS ~ 1e-4), and no gain from running
//   several on separate streams; Xgesvd 75-135 ms; Xgesvdp 20-35 ms, but in one of two runs it
//   returned wrong singular values with info = 0 (f32, 768x768); Xgesvdr needs many power
//   iterations on flat spectra (dS ~ 7e-3 after 8). gesvdjBatched only takes matrices up to 32x32,
//   which gesvda covers as well, so one path serves every shape.
//   gesvda's limits: a singular vector whose singular value is near zero (below ~sqrt(eps) * s0) is
//   inaccurate, so those columns are re-orthogonalized or completed on the host (finish_svd); it
//   fails outright on some inputs (info = 1 for a zero matrix), which then go to Xgesvd; and it
//   needs a tall column-major matrix: row-major A [m, n] read column-major is Aᵀ, which is tall
//   when m <= n, otherwise A is transposed first.
// - The host finishing (sign convention, null-column repair, row-major layout) moves only the
//   m x k and n x k results, which is also why it runs on the host: it needs no kernels here.
// - QR: geqrf, then ormqr applied to [diag(sign R_ii); 0], which gives the sign-fixed thin Q
//   directly (orgqr plus a column scaling would need a kernel of our own). 3-5 ms for the
//   768x3072 random orthonormal factor, ~0.5 ms to orthonormalize 3072x64.
#ifdef DEEPLORA_HAVE_CUDA

#include <fmt/format.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <map>
#include <memory>
#include <stdexcept>
#include <tuple>

#include "kernels/cuda_check.h"
#include "runtime/device.h"
#include "runtime/linalg.h"

namespace deeplora::linalg::detail {
namespace {

cudaDataType cuda_type(DType dt) { return dt == DType::f64 ? CUDA_R_64F : CUDA_R_32F; }

template <class T> DType dt_of();
template <> DType dt_of<float>() { return DType::f32; }
template <> DType dt_of<double>() { return DType::f64; }

// Scratch device memory from the caching allocator. Frees are stream-ordered, so releasing a
// buffer right after enqueuing the work that uses it is safe.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : p_(bytes ? cuda_ctx().allocator.allocate(bytes) : nullptr) {}
  ~DeviceBuffer() {
    if (p_) cuda_ctx().allocator.deallocate(p_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <class T = void> T* get() const { return static_cast<T*>(p_); }

 private:
  void* p_;
};

int as_int(int64_t v, const char* op, const std::string& what) {
  if (v > INT_MAX) throw std::invalid_argument(fmt::format("{}: {} = {} exceeds cuSOLVER's 32-bit limit", op, what, v));
  return int(v);
}

// Reads back a device info array (count entries).
std::vector<int> read_info(const int* d_info, int count) {
  std::vector<int> h(count);
  CUDA_CHECK(cudaMemcpyAsync(h.data(), d_info, sizeof(int) * count, cudaMemcpyDeviceToHost, cuda_ctx().stream));
  CUDA_CHECK(cudaStreamSynchronize(cuda_ctx().stream));
  return h;
}

// A solver failed or returned non-finite values: blame the input if it has non-finite entries
// (std::invalid_argument), else report the solver (std::runtime_error).
bool all_finite(const Tensor& A) {
  std::vector<double> a = A.to_double();
  return std::all_of(a.begin(), a.end(), [](double x) { return std::isfinite(x); });
}

[[noreturn]] void solver_failure(const Tensor& A, const char* op, const std::string& what) {
  check(all_finite(A), op, fmt::format("{} has non-finite entries (NaN or Inf)", A.desc()));
  throw std::runtime_error(fmt::format("{}: {} on {}", op, what, A.desc()));
}

// dst = src with its layout changed between row-major and column-major (rows x cols either way).
void relayout(DType dt, const void* src, bool src_row_major, void* dst, bool dst_row_major, int64_t rows, int64_t cols) {
  cublasLtMatrixTransformDesc_t desc = nullptr;
  cublasLtMatrixLayout_t ls = nullptr, ld = nullptr;
  const cudaDataType t = cuda_type(dt);
  auto layout = [&](cublasLtMatrixLayout_t* l, bool row_major) {
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(l, t, uint64_t(rows), uint64_t(cols), row_major ? cols : rows));
    cublasLtOrder_t order = row_major ? CUBLASLT_ORDER_ROW : CUBLASLT_ORDER_COL;
    CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_ORDER, &order, sizeof(order)));
  };
  try {
    CUBLAS_CHECK(cublasLtMatrixTransformDescCreate(&desc, t));
    layout(&ls, src_row_major);
    layout(&ld, dst_row_major);
    const double one64 = 1.0, zero64 = 0.0;
    const float one32 = 1.0f, zero32 = 0.0f;
    const void* one = dt == DType::f64 ? static_cast<const void*>(&one64) : &one32;
    const void* zero = dt == DType::f64 ? static_cast<const void*>(&zero64) : &zero32;
    CUBLAS_CHECK(cublasLtMatrixTransform(cuda_ctx().cublaslt, desc, one, src, ls, zero, nullptr, nullptr, dst, ld,
                                         cuda_ctx().stream));
  } catch (...) {
    if (ls) cublasLtMatrixLayoutDestroy(ls);
    if (ld) cublasLtMatrixLayoutDestroy(ld);
    if (desc) cublasLtMatrixTransformDescDestroy(desc);
    throw;
  }
  cublasLtMatrixLayoutDestroy(ls);
  cublasLtMatrixLayoutDestroy(ld);
  cublasLtMatrixTransformDescDestroy(desc);
}

// Device column-major buffer (elements of dt) -> host f64.
std::vector<double> download(DType dt, const void* d, size_t count) {
  std::vector<double> out(count);
  cudaStream_t s = cuda_ctx().stream;
  if (dt == DType::f64) {
    CUDA_CHECK(cudaMemcpyAsync(out.data(), d, count * sizeof(double), cudaMemcpyDeviceToHost, s));
    CUDA_CHECK(cudaStreamSynchronize(s));
  } else {
    std::vector<float> f(count);
    CUDA_CHECK(cudaMemcpyAsync(f.data(), d, count * sizeof(float), cudaMemcpyDeviceToHost, s));
    CUDA_CHECK(cudaStreamSynchronize(s));
    std::copy(f.begin(), f.end(), out.begin());
  }
  return out;
}

// diag(R) of a geqrf result (column-major rows x cols, ld = rows), to the host.
std::vector<double> download_diag(DType dt, const void* a, int64_t rows, int64_t cols) {
  const size_t es = dtype_size(dt);
  std::vector<char> raw(size_t(cols) * es);
  cudaStream_t s = cuda_ctx().stream;
  CUDA_CHECK(cudaMemcpy2DAsync(raw.data(), es, a, size_t(rows + 1) * es, es, size_t(cols), cudaMemcpyDeviceToHost, s));
  CUDA_CHECK(cudaStreamSynchronize(s));
  std::vector<double> d(cols);
  for (int64_t i = 0; i < cols; ++i)
    d[i] = dt == DType::f64 ? reinterpret_cast<const double*>(raw.data())[i] : reinterpret_cast<const float*>(raw.data())[i];
  return d;
}

// ---------------------------------------------------------------------------------------------
// QR: the sign-fixed thin Q of a column-major rows x cols matrix a (overwritten by geqrf), written
// column-major into q (rows x cols). Returns diag(R) before the sign fix.

struct Geqrf {
  static cusolverStatus_t buffer(cusolverDnHandle_t h, int m, int n, float* a, int lda, int* lw) { return cusolverDnSgeqrf_bufferSize(h, m, n, a, lda, lw); }
  static cusolverStatus_t buffer(cusolverDnHandle_t h, int m, int n, double* a, int lda, int* lw) { return cusolverDnDgeqrf_bufferSize(h, m, n, a, lda, lw); }
  static cusolverStatus_t run(cusolverDnHandle_t h, int m, int n, float* a, int lda, float* tau, float* w, int lw, int* info) { return cusolverDnSgeqrf(h, m, n, a, lda, tau, w, lw, info); }
  static cusolverStatus_t run(cusolverDnHandle_t h, int m, int n, double* a, int lda, double* tau, double* w, int lw, int* info) { return cusolverDnDgeqrf(h, m, n, a, lda, tau, w, lw, info); }
};
struct Ormqr {
  static cusolverStatus_t buffer(cusolverDnHandle_t h, int m, int n, int k, const float* a, int lda, const float* tau, const float* c, int ldc, int* lw) {
    return cusolverDnSormqr_bufferSize(h, CUBLAS_SIDE_LEFT, CUBLAS_OP_N, m, n, k, a, lda, tau, c, ldc, lw);
  }
  static cusolverStatus_t buffer(cusolverDnHandle_t h, int m, int n, int k, const double* a, int lda, const double* tau, const double* c, int ldc, int* lw) {
    return cusolverDnDormqr_bufferSize(h, CUBLAS_SIDE_LEFT, CUBLAS_OP_N, m, n, k, a, lda, tau, c, ldc, lw);
  }
  static cusolverStatus_t run(cusolverDnHandle_t h, int m, int n, int k, const float* a, int lda, const float* tau, float* c, int ldc, float* w, int lw, int* info) {
    return cusolverDnSormqr(h, CUBLAS_SIDE_LEFT, CUBLAS_OP_N, m, n, k, a, lda, tau, c, ldc, w, lw, info);
  }
  static cusolverStatus_t run(cusolverDnHandle_t h, int m, int n, int k, const double* a, int lda, const double* tau, double* c, int ldc, double* w, int lw, int* info) {
    return cusolverDnDormqr(h, CUBLAS_SIDE_LEFT, CUBLAS_OP_N, m, n, k, a, lda, tau, c, ldc, w, lw, info);
  }
};

template <class T>
std::vector<double> qr_signfixed_t(T* a, T* q, int64_t rows64, int64_t cols64, const char* op, const Tensor& src) {
  DeviceContext& ctx = cuda_ctx();
  cusolverDnHandle_t h = ctx.cusolver;
  const std::string shape = fmt::format("a {}x{} column-major matrix (from {})", rows64, cols64, src.desc());
  const int rows = as_int(rows64, op, "rows"), cols = as_int(cols64, op, "columns");
  DeviceBuffer tau(sizeof(T) * cols), info(sizeof(int));
  int lw_qr = 0, lw_mq = 0;
  CUSOLVER_CHECK(Geqrf::buffer(h, rows, cols, a, rows, &lw_qr));
  CUSOLVER_CHECK(Ormqr::buffer(h, rows, cols, cols, a, rows, tau.get<T>(), q, rows, &lw_mq));
  DeviceBuffer work(sizeof(T) * size_t(std::max(lw_qr, lw_mq)));
  CUSOLVER_CHECK(Geqrf::run(h, rows, cols, a, rows, tau.get<T>(), work.get<T>(), lw_qr, info.get<int>()));
  if (int i = read_info(info.get<int>(), 1)[0]) solver_failure(src, op, fmt::format("geqrf failed on {} (info = {})", shape, i));
  std::vector<double> d = download_diag(dt_of<T>(), a, rows64, cols64);
  for (double x : d)
    if (!std::isfinite(x)) solver_failure(src, op, fmt::format("geqrf returned a non-finite R on {}", shape));
  // q = Q [D; 0] with D = diag(sign R_ii): the thin Q with diag(R) >= 0.
  CUDA_CHECK(cudaMemsetAsync(q, 0, sizeof(T) * size_t(rows64 * cols64), ctx.stream));
  std::vector<T> signs(cols);
  for (int i = 0; i < cols; ++i) signs[i] = d[i] < 0 ? T(-1) : T(1);
  CUDA_CHECK(cudaMemcpy2DAsync(q, sizeof(T) * size_t(rows64 + 1), signs.data(), sizeof(T), sizeof(T), size_t(cols),
                               cudaMemcpyHostToDevice, ctx.stream));
  CUSOLVER_CHECK(Ormqr::run(h, rows, cols, cols, a, rows, tau.get<T>(), q, rows, work.get<T>(), lw_mq, info.get<int>()));
  // (read_info also syncs, which keeps the pageable `signs` alive until its copy is done)
  if (int i = read_info(info.get<int>(), 1)[0]) solver_failure(src, op, fmt::format("ormqr failed on {} (info = {})", shape, i));
  return d;
}

std::vector<double> qr_signfixed(DType dt, void* a, void* q, int64_t rows, int64_t cols, const char* op, const Tensor& src) {
  if (dt == DType::f64) return qr_signfixed_t<double>(static_cast<double*>(a), static_cast<double*>(q), rows, cols, op, src);
  return qr_signfixed_t<float>(static_cast<float*>(a), static_cast<float*>(q), rows, cols, op, src);
}

// ---------------------------------------------------------------------------------------------
// SVD of a batch of same-shaped row-major matrices through gesvdaStridedBatched.

struct Gesvda {
  static cusolverStatus_t buffer(cusolverDnHandle_t h, int rank, int m, int n, const float* a, int lda, long long sa, const float* s, long long ss,
                                 const float* u, int ldu, long long su, const float* v, int ldv, long long sv, int* lw, int batch) {
    return cusolverDnSgesvdaStridedBatched_bufferSize(h, CUSOLVER_EIG_MODE_VECTOR, rank, m, n, a, lda, sa, s, ss, u, ldu, su, v, ldv, sv, lw, batch);
  }
  static cusolverStatus_t buffer(cusolverDnHandle_t h, int rank, int m, int n, const double* a, int lda, long long sa, const double* s, long long ss,
                                 const double* u, int ldu, long long su, const double* v, int ldv, long long sv, int* lw, int batch) {
    return cusolverDnDgesvdaStridedBatched_bufferSize(h, CUSOLVER_EIG_MODE_VECTOR, rank, m, n, a, lda, sa, s, ss, u, ldu, su, v, ldv, sv, lw, batch);
  }
  static cusolverStatus_t run(cusolverDnHandle_t h, int rank, int m, int n, const float* a, int lda, long long sa, float* s, long long ss, float* u,
                              int ldu, long long su, float* v, int ldv, long long sv, float* w, int lw, int* info, double* nrm, int batch) {
    return cusolverDnSgesvdaStridedBatched(h, CUSOLVER_EIG_MODE_VECTOR, rank, m, n, a, lda, sa, s, ss, u, ldu, su, v, ldv, sv, w, lw, info, nrm, batch);
  }
  static cusolverStatus_t run(cusolverDnHandle_t h, int rank, int m, int n, const double* a, int lda, long long sa, double* s, long long ss, double* u,
                              int ldu, long long su, double* v, int ldv, long long sv, double* w, int lw, int* info, double* nrm, int batch) {
    return cusolverDnDgesvdaStridedBatched(h, CUSOLVER_EIG_MODE_VECTOR, rank, m, n, a, lda, sa, s, ss, u, ldu, su, v, ldv, sv, w, lw, info, nrm, batch);
  }
};

// Top k of the QR-based SVD (Xgesvd) of one tall column-major rows x cols matrix x (left intact),
// into host f64 s (k), u (rows x k), v (cols x k).
template <class T>
void gesvd_fallback(const T* x, int64_t rows, int64_t cols, int64_t k, const char* op, const std::string& shape,
                    std::vector<double>& s, std::vector<double>& u, std::vector<double>& v) {
  DeviceContext& ctx = cuda_ctx();
  const DType dt = dt_of<T>();
  const cudaDataType t = cuda_type(dt);
  DeviceBuffer a(sizeof(T) * size_t(rows * cols)), ds(sizeof(T) * size_t(cols)), du(sizeof(T) * size_t(rows * cols)),
      dvt(sizeof(T) * size_t(cols * cols)), info(sizeof(int));
  CUDA_CHECK(cudaMemcpyAsync(a.get(), x, sizeof(T) * size_t(rows * cols), cudaMemcpyDeviceToDevice, ctx.stream));
  struct Params {
    cusolverDnParams_t p = nullptr;
    ~Params() { if (p) cusolverDnDestroyParams(p); }
  } params;
  CUSOLVER_CHECK(cusolverDnCreateParams(&params.p));
  size_t dbytes = 0, hbytes = 0;
  CUSOLVER_CHECK(cusolverDnXgesvd_bufferSize(ctx.cusolver, params.p, 'S', 'S', rows, cols, t, a.get(), rows, t, ds.get(), t,
                                             du.get(), rows, t, dvt.get(), cols, t, &dbytes, &hbytes));
  DeviceBuffer dwork(dbytes);
  std::vector<char> hwork(hbytes + 1);
  CUSOLVER_CHECK(cusolverDnXgesvd(ctx.cusolver, params.p, 'S', 'S', rows, cols, t, a.get(), rows, t, ds.get(), t, du.get(),
                                  rows, t, dvt.get(), cols, t, dwork.get(), dbytes, hwork.data(), hbytes, info.get<int>()));
  if (int i = read_info(info.get<int>(), 1)[0])  // (also syncs: hwork must outlive the call)
    throw std::runtime_error(fmt::format("{}: Xgesvd failed on {} (info = {})", op, shape, i));
  std::vector<double> hs = download(dt, ds.get(), size_t(k)), hu = download(dt, du.get(), size_t(rows * k)),
                      hvt = download(dt, dvt.get(), size_t(cols * cols));
  for (int64_t j = 0; j < k; ++j) {
    s[j] = hs[j];
    for (int64_t i = 0; i < cols; ++i) v[j * cols + i] = hvt[i * cols + j];  // V = VTᵀ
  }
  std::copy(hu.begin(), hu.end(), u.begin());
  if (!std::isfinite(s[0])) throw std::runtime_error(fmt::format("{}: Xgesvd returned non-finite values on {}", op, shape));
}

template <class T>
void svd_group(const std::vector<Tensor>& As, const std::vector<size_t>& idx, int64_t k, const char* op, std::vector<Svd>& out) {
  DeviceContext& ctx = cuda_ctx();
  const Tensor& A0 = As[idx[0]];
  const DType dt = A0.dtype();
  const int64_t m = A0.dim(0), n = A0.dim(1);
  const int64_t rows64 = std::max(m, n), cols64 = std::min(m, n);  // the tall column-major problem
  const int batch = as_int(int64_t(idx.size()), op, "batch size");
  const int rows = as_int(rows64, op, "rows"), cols = as_int(cols64, op, "columns"), rank = int(k);
  const std::string shape = fmt::format("{} [{}, {}] x {} (k = {})", dtype_name(dt), m, n, batch, k);
  const long long sa = rows64 * cols64, su = rows64 * k, sv = cols64 * k;

  // Pack the batch as tall column-major matrices. Row-major A read column-major is Aᵀ (n x m), tall
  // when m <= n; otherwise transpose. A single tall matrix is used in place.
  const T* a = nullptr;
  std::unique_ptr<DeviceBuffer> packed;
  if (batch == 1 && m <= n) {
    a = static_cast<const T*>(A0.data());
  } else {
    packed = std::make_unique<DeviceBuffer>(sizeof(T) * size_t(sa) * size_t(batch));
    for (int b = 0; b < batch; ++b) {
      T* dst = packed->get<T>() + size_t(b) * size_t(sa);
      const Tensor& A = As[idx[b]];
      if (m <= n)
        CUDA_CHECK(cudaMemcpyAsync(dst, A.data(), A.nbytes(), cudaMemcpyDeviceToDevice, ctx.stream));
      else
        relayout(dt, A.data(), true, dst, false, m, n);
    }
    a = packed->get<T>();
  }

  DeviceBuffer S(sizeof(T) * size_t(k) * batch), U(sizeof(T) * size_t(su) * batch), V(sizeof(T) * size_t(sv) * batch),
      info(sizeof(int) * batch);
  int lwork = 0;
  CUSOLVER_CHECK(Gesvda::buffer(ctx.cusolver, rank, rows, cols, a, rows, sa, S.get<T>(), k, U.get<T>(), rows, su, V.get<T>(),
                                cols, sv, &lwork, batch));
  DeviceBuffer work(sizeof(T) * size_t(lwork));
  std::vector<double> resid(batch);
  CUSOLVER_CHECK(Gesvda::run(ctx.cusolver, rank, rows, cols, a, rows, sa, S.get<T>(), k, U.get<T>(), rows, su, V.get<T>(), cols,
                             sv, work.get<T>(), lwork, info.get<int>(), resid.data(), batch));
  std::vector<int> hinfo = read_info(info.get<int>(), batch);
  std::vector<double> hS = download(dt, S.get(), size_t(k) * batch);
  std::vector<double> hU = download(dt, U.get(), size_t(su) * batch);
  std::vector<double> hV = download(dt, V.get(), size_t(sv) * batch);
  // Singular vectors of singular values below ~sqrt(eps) * s0 come from an ill-conditioned
  // eigenproblem: re-orthogonalize (or complete) those.
  const double rel_tol = std::sqrt(dtype_eps(dt));
  for (int b = 0; b < batch; ++b) {
    std::vector<double> s(hS.begin() + b * k, hS.begin() + (b + 1) * k);
    std::vector<double> tu(hU.begin() + b * su, hU.begin() + (b + 1) * su);  // rows x k
    std::vector<double> tv(hV.begin() + b * sv, hV.begin() + (b + 1) * sv);  // cols x k
    if (hinfo[b] != 0 || !std::isfinite(s[0])) {
      // gesvda rejects some inputs (a zero matrix gives info = 1): bad input, or the QR-based
      // Xgesvd for this one.
      const Tensor& A = As[idx[b]];
      if (!all_finite(A)) check(false, op, fmt::format("{} has non-finite entries (NaN or Inf)", A.desc()));
      gesvd_fallback<T>(a + size_t(b) * size_t(sa), rows64, cols64, k, op, shape, s, tu, tv);
    }
    for (double& x : s) x = std::isfinite(x) && x > 0 ? x : 0.0;
    // Tall problem X = A (m > n) or X = Aᵀ (m <= n); X = tu S tvᵀ.
    std::vector<double>& u = m > n ? tu : tv;
    std::vector<double>& v = m > n ? tv : tu;
    finish_svd(u, s, v, m, n, k, rel_tol);
    out[idx[b]] = Svd{colmajor_to_tensor(u, m, k, dt, Device::cuda), Tensor::from_vector(s, Shape{k}, dt, Device::cuda),
                      colmajor_to_tensor(v, n, k, dt, Device::cuda)};
  }
}

}  // namespace

std::vector<Svd> svd_topk_batched_cuda(const std::vector<Tensor>& As, int64_t k) {
  // Group same (m, n, dtype); bound each gesvda call's packed input to ~1 GiB.
  std::map<std::tuple<int64_t, int64_t, int>, std::vector<size_t>> groups;
  for (size_t i = 0; i < As.size(); ++i) groups[{As[i].dim(0), As[i].dim(1), int(As[i].dtype())}].push_back(i);
  std::vector<Svd> out(As.size());
  for (auto& [key, idx] : groups) {
    const size_t per = As[idx[0]].nbytes();
    const size_t chunk = std::max<size_t>(1, (size_t(1) << 30) / std::max<size_t>(per, 1));
    for (size_t start = 0; start < idx.size(); start += chunk) {
      std::vector<size_t> part(idx.begin() + start, idx.begin() + std::min(idx.size(), start + chunk));
      if (As[part[0]].dtype() == DType::f64)
        svd_group<double>(As, part, k, "svd_topk_batched", out);
      else
        svd_group<float>(As, part, k, "svd_topk_batched", out);
    }
  }
  return out;
}

Svd svd_topk_cuda(const Tensor& A, int64_t k) {
  std::vector<Svd> out(1);
  if (A.dtype() == DType::f64)
    svd_group<double>({A}, {0}, k, "svd_topk", out);
  else
    svd_group<float>({A}, {0}, k, "svd_topk", out);
  return std::move(out[0]);
}

Tensor orthonormalize_cuda(const Tensor& A, int64_t* n_completed, double tol) {
  const char* op = "orthonormalize";
  const DType dt = A.dtype();
  const int64_t m = A.dim(0), k = A.dim(1);
  const size_t col_bytes = size_t(m) * dtype_size(dt);
  DeviceBuffer acm(A.nbytes()), a(A.nbytes()), q(A.nbytes());
  relayout(dt, A.data(), true, acm.get(), false, m, k);
  // As on the CPU: factor, drop the first negligible column, factor again (rare).
  std::vector<int64_t> good(k);
  for (int64_t j = 0; j < k; ++j) good[j] = j;
  while (!good.empty()) {
    const int64_t kk = int64_t(good.size());
    if (kk == k)
      CUDA_CHECK(cudaMemcpyAsync(a.get(), acm.get(), A.nbytes(), cudaMemcpyDeviceToDevice, cuda_ctx().stream));
    else
      for (int64_t c = 0; c < kk; ++c)
        CUDA_CHECK(cudaMemcpyAsync(a.get<char>() + c * col_bytes, acm.get<char>() + good[c] * col_bytes, col_bytes,
                                   cudaMemcpyDeviceToDevice, cuda_ctx().stream));
    int64_t drop = first_negligible(qr_signfixed(dt, a.get(), q.get(), m, kk, op, A), tol);
    if (drop < 0) break;
    if (drop == kk) good.clear();
    else good.erase(good.begin() + drop);
  }
  if (n_completed) *n_completed = k - int64_t(good.size());
  if (int64_t(good.size()) == k) {
    Tensor out = Tensor::empty(Shape{m, k}, dt, Device::cuda);
    relayout(dt, q.get(), false, out.data(), true, m, k);
    return out;
  }
  std::vector<double> hq = good.empty() ? std::vector<double>() : download(dt, q.get(), size_t(m) * good.size());
  return colmajor_to_tensor(place_columns(hq, good, m, k), m, k, dt, Device::cuda);
}

Tensor random_orthonormal_cuda(int64_t m, int64_t n, uint64_t seed, DType dt) {
  const char* op = "random_orthonormal";
  Tensor g = Tensor::randn(Shape{m, n}, seed, dt, Device::cuda);
  Tensor out = Tensor::empty(Shape{m, n}, dt, Device::cuda);
  if (m <= n) {
    // Row-major G read column-major is Gᵀ (n x m, tall); its Q read back row-major is O = Qᵀ.
    qr_signfixed(dt, g.data(), out.data(), n, m, op, g);
    return out;
  }
  DeviceBuffer a(g.nbytes()), q(g.nbytes());
  relayout(dt, g.data(), true, a.get(), false, m, n);
  qr_signfixed(dt, a.get(), q.get(), m, n, op, g);
  relayout(dt, q.get(), false, out.data(), true, m, n);
  return out;
}

}  // namespace deeplora::linalg::detail

#endif  // DEEPLORA_HAVE_CUDA
