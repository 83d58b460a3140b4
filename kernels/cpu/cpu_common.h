// Shared by the CPU reference kernels: element load/store through double (each output rounded
// once, bf16 correctly rounded as on the GPU) and dispatch from a DType to a typed lambda.
#pragma once
#include <fmt/format.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <type_traits>

#include "kernels/dtype.h"

namespace deeplora::kernels::cpu {

template <class T> struct Tag { using type = T; };
// Statistics type (see stat_dtype): f64 for f64 tensors, f32 otherwise.
template <class T> using Stat = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline double ld(float v) { return v; }
inline double ld(double v) { return v; }
inline double ld(bf16 v) { return double(float(v)); }
inline double ld(int32_t v) { return v; }

// Correctly rounded double -> bf16, as __double2bfloat16 / cvt.rn.bf16.f64 on the GPU: round to
// odd into float first, so the second rounding (float -> bf16, nearest even) cannot double-round.
inline bf16 bf16_from_double(double x) {
  const float f = float(x);
  if (double(f) == x || std::isnan(x)) return bf16(f);
  uint32_t u = std::bit_cast<uint32_t>(f);
  if ((x > 0 && double(f) > x) || (x < 0 && double(f) < x)) u--;  // float neighbour toward zero
  return bf16(std::bit_cast<float>(u | 1u));
}

template <class T> T st(double v);
template <> inline float st<float>(double v) { return float(v); }
template <> inline double st<double>(double v) { return v; }
template <> inline bf16 st<bf16>(double v) { return bf16_from_double(v); }
// Truncation toward zero, saturating at the int32 range, NaN -> 0 (what cvt.rzi.s32 does on GPU).
template <> inline int32_t st<int32_t>(double v) {
  if (std::isnan(v)) return 0;
  if (v >= 2147483647.0) return std::numeric_limits<int32_t>::max();
  if (v <= -2147483648.0) return std::numeric_limits<int32_t>::min();
  return int32_t(v);
}

[[noreturn]] inline void bad_dtype(const char* op, DType dt, const char* allowed) {
  throw std::invalid_argument(
      fmt::format("kernels::cpu::{}: dtype {} is not supported ({})", op, dtype_name(dt), allowed));
}

template <class F> void float_dispatch(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::f32: f(Tag<float>{}); return;
    case DType::bf16: f(Tag<bf16>{}); return;
    case DType::f64: f(Tag<double>{}); return;
    default: bad_dtype(op, dt, "f32, bf16 or f64");
  }
}

template <class F> void any_dispatch(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::f32: f(Tag<float>{}); return;
    case DType::bf16: f(Tag<bf16>{}); return;
    case DType::f64: f(Tag<double>{}); return;
    case DType::i32: f(Tag<int32_t>{}); return;
  }
  bad_dtype(op, dt, "f32, bf16, f64 or i32");
}

}  // namespace deeplora::kernels::cpu
