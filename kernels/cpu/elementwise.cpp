// CPU reference twins of kernels/elementwise.h: plain loops, every value computed in double and
// rounded once into the element type, reductions accumulated in double.
#include "kernels/elementwise.h"
#include "kernels/cpu/cpu_common.h"

#include <fmt/format.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "kernels/rng.h"

namespace deeplora::kernels::cpu {
namespace {


constexpr double kSqrt2OverPi = 0.79788456080286535587989211986876;
constexpr double kGeluC = 0.044715;

}  // namespace

void fill(DType dt, void* y, int64_t n, double v, cudaStream_t) {
  any_dispatch(dt, "fill", [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* py = static_cast<T*>(y);
    const T tv = st<T>(v);
    for (int64_t i = 0; i < n; ++i) py[i] = tv;
  });
}

void rand_normal(DType dt, void* y, int64_t n, uint64_t seed, double stddev, cudaStream_t) {
  float_dispatch(dt, "rand_normal", [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* py = static_cast<T*>(y);
    for (int64_t i = 0; i < n; ++i) py[i] = st<T>(rng::normal(seed, uint64_t(i), stddev));
  });
}

void rand_uniform(DType dt, void* y, int64_t n, uint64_t seed, double lo, double hi, cudaStream_t) {
  float_dispatch(dt, "rand_uniform", [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* py = static_cast<T*>(y);
    for (int64_t i = 0; i < n; ++i) py[i] = st<T>(rng::uniform(seed, uint64_t(i), lo, hi));
  });
}

// Every source value is exact in double, so each pair rounds exactly once. float -> i32 truncates
// toward zero (saturating, NaN -> 0).
void cast(DType src, const void* x, DType dst, void* y, int64_t n, cudaStream_t) {
  any_dispatch(src, "cast", [&](auto stag) {
    using S = typename decltype(stag)::type;
    any_dispatch(dst, "cast", [&](auto dtag) {
      using D = typename decltype(dtag)::type;
      const S* px = static_cast<const S*>(x);
      D* py = static_cast<D*>(y);
      for (int64_t i = 0; i < n; ++i) py[i] = st<D>(ld(px[i]));
    });
  });
}

void cast_acc(DType src, const void* x, DType dst, void* y, int64_t n, cudaStream_t) {
  float_dispatch(src, "cast_acc", [&](auto stag) {
    using S = typename decltype(stag)::type;
    float_dispatch(dst, "cast_acc", [&](auto dtag) {
      using D = typename decltype(dtag)::type;
      const S* px = static_cast<const S*>(x);
      D* py = static_cast<D*>(y);
      for (int64_t i = 0; i < n; ++i) py[i] = st<D>(ld(py[i]) + ld(st<D>(ld(px[i]))));
    });
  });
}

void cast_group(DType src, DType dst, const CastGroup& g, bool accumulate, cudaStream_t s) {
  for (int i = 0; i < g.count; ++i) {
    if (g.n[i] <= 0) continue;
    if (accumulate) cast_acc(src, g.src[i], dst, g.dst[i], g.n[i], s);
    else cast(src, g.src[i], dst, g.dst[i], g.n[i], s);
  }
}

void add(DType dt, const void* a, const void* b, void* y, int64_t n, cudaStream_t) {
  float_dispatch(dt, "add", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* pa = static_cast<const T*>(a);
    const T* pb = static_cast<const T*>(b);
    T* py = static_cast<T*>(y);
    for (int64_t i = 0; i < n; ++i) py[i] = st<T>(ld(pa[i]) + ld(pb[i]));
  });
}

void acc(DType dt, const void* x, void* y, int64_t n, double alpha, cudaStream_t) {
  float_dispatch(dt, "acc", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* px = static_cast<const T*>(x);
    T* py = static_cast<T*>(y);
    for (int64_t i = 0; i < n; ++i) py[i] = st<T>(ld(py[i]) + alpha * ld(px[i]));
  });
}

void mul(DType dt, const void* a, const void* b, void* y, int64_t n, cudaStream_t) {
  float_dispatch(dt, "mul", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* pa = static_cast<const T*>(a);
    const T* pb = static_cast<const T*>(b);
    T* py = static_cast<T*>(y);
    for (int64_t i = 0; i < n; ++i) py[i] = st<T>(ld(pa[i]) * ld(pb[i]));
  });
}

void mul_acc(DType dt, const void* a, const void* b, void* y, int64_t n, cudaStream_t) {
  float_dispatch(dt, "mul_acc", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* pa = static_cast<const T*>(a);
    const T* pb = static_cast<const T*>(b);
    T* py = static_cast<T*>(y);
    for (int64_t i = 0; i < n; ++i) py[i] = st<T>(ld(py[i]) + ld(pa[i]) * ld(pb[i]));
  });
}

void scale(DType dt, const void* x, void* y, int64_t n, double alpha, cudaStream_t) {
  float_dispatch(dt, "scale", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* px = static_cast<const T*>(x);
    T* py = static_cast<T*>(y);
    for (int64_t i = 0; i < n; ++i) py[i] = st<T>(alpha * ld(px[i]));
  });
}

void acc_broadcast(DType dt, const void* g, void* y, int64_t n, double alpha, cudaStream_t) {
  float_dispatch(dt, "acc_broadcast", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const double v = alpha * ld(*static_cast<const T*>(g));
    T* py = static_cast<T*>(y);
    for (int64_t i = 0; i < n; ++i) py[i] = st<T>(ld(py[i]) + v);
  });
}

void gelu_fwd(DType dt, const void* x, void* y, int64_t n, cudaStream_t) {
  float_dispatch(dt, "gelu_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* px = static_cast<const T*>(x);
    T* py = static_cast<T*>(y);
    for (int64_t i = 0; i < n; ++i) {
      const double v = ld(px[i]);
      py[i] = st<T>(0.5 * v * (1.0 + std::tanh(kSqrt2OverPi * (v + kGeluC * v * v * v))));
    }
  });
}

// d/dx [0.5 x (1 + tanh u)] with u = k (x + c x^3):
//   0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) k (1 + 3 c x^2)
void gelu_bwd(DType dt, const void* x, const void* dy, void* dx, int64_t n, bool accumulate, cudaStream_t) {
  float_dispatch(dt, "gelu_bwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* px = static_cast<const T*>(x);
    const T* pdy = static_cast<const T*>(dy);
    T* pdx = static_cast<T*>(dx);
    for (int64_t i = 0; i < n; ++i) {
      const double v = ld(px[i]);
      const double th = std::tanh(kSqrt2OverPi * (v + kGeluC * v * v * v));
      const double d = 0.5 * (1.0 + th) +
                       0.5 * v * (1.0 - th * th) * kSqrt2OverPi * (1.0 + 3.0 * kGeluC * v * v);
      pdx[i] = st<T>((accumulate ? ld(pdx[i]) : 0.0) + d * ld(pdy[i]));
    }
  });
}

void sum(DType dt, const void* x, int64_t n, void* out, cudaStream_t) {
  float_dispatch(dt, "sum", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* px = static_cast<const T*>(x);
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += ld(px[i]);
    *static_cast<T*>(out) = st<T>(s);
  });
}

void colsum_acc(DType dt, const void* x, int64_t rows, int64_t cols, void* y, cudaStream_t) {
  float_dispatch(dt, "colsum_acc", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* px = static_cast<const T*>(x);
    T* py = static_cast<T*>(y);
    std::vector<double> s(size_t(cols), 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) s[c] += ld(px[r * cols + c]);
    for (int64_t c = 0; c < cols; ++c) py[c] = st<T>(ld(py[c]) + s[c]);
  });
}

void add_rowvec(DType dt, const void* b, void* y, int64_t rows, int64_t cols, cudaStream_t) {
  float_dispatch(dt, "add_rowvec", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* pb = static_cast<const T*>(b);
    T* py = static_cast<T*>(y);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) py[r * cols + c] = st<T>(ld(py[r * cols + c]) + ld(pb[c]));
  });
}

}  // namespace deeplora::kernels::cpu
