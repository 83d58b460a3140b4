// The counter-based RNG behind rand_uniform / rand_normal, shared verbatim by the CPU and CUDA
// kernels so both produce the same numbers for the same (seed, index).
//
// Definition (all arithmetic mod 2^64, G = 0x9E3779B97F4A7C15):
//   bits(seed, c)   = mix(seed + (c + 1) * G)   -- output c of the standard splitmix64 generator
//                                                  seeded with `seed` (c = 0 is its first output)
//   u01(seed, c)    = (bits >> 11) * 2^-53            in [0, 1)
//   u01_open(seed,c)= ((bits >> 11) + 1) * 2^-53      in (0, 1]   (safe for log)
//   uniform[i]      = lo + (hi - lo) * u01(seed, i)
//   normal[i]       = stddev * sqrt(-2 ln u01_open(seed, 2i)) * cos(2 pi u01(seed, 2i + 1))
// Values are computed in double and then rounded once, to nearest even, into the element type
// (f32: __double2float_rn; bf16: __double2bfloat16, i.e. correctly rounded from double, not via
// float). Only the cosine half of Box-Muller is used so that element i depends on i alone.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DL_HD __host__ __device__
#else
#define DL_HD
#endif

namespace deeplora::rng {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

// splitmix64's output function (Steele, Lea, Flood 2014; constants from Vigna's reference code).
DL_HD inline uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

DL_HD inline uint64_t bits(uint64_t seed, uint64_t counter) {
  return mix(seed + (counter + 1) * kGolden);
}

DL_HD inline double u01(uint64_t seed, uint64_t counter) {
  return double(bits(seed, counter) >> 11) * 0x1.0p-53;
}

DL_HD inline double u01_open(uint64_t seed, uint64_t counter) {
  return double((bits(seed, counter) >> 11) + 1) * 0x1.0p-53;
}

DL_HD inline double uniform(uint64_t seed, uint64_t i, double lo, double hi) {
  return lo + (hi - lo) * u01(seed, i);
}

// Standard normal (times stddev) for element i, from counters 2i and 2i+1.
DL_HD inline double normal(uint64_t seed, uint64_t i, double stddev) {
  const double two_pi = 6.283185307179586476925286766559;
  double u1 = u01_open(seed, 2 * i);
  double u2 = u01(seed, 2 * i + 1);
  return stddev * (std::sqrt(-2.0 * std::log(u1)) * std::cos(two_pi * u2));
}

}  // namespace deeplora::rng
