// Element types and the host-side bf16 (bit-compatible with __nv_bfloat16), usable without CUDA.
#pragma once
#include <cstdint>
#include <cstring>

namespace deeplora {

enum class DType : uint8_t { f32, bf16, f64, i32 };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::bf16: return 2;
    case DType::f64: return 8;
    case DType::i32: return 4;
  }
  return 0;
}
const char* dtype_name(DType t);
DType dtype_from_name(const char* s);  // "f32" | "bf16" | "f64" | "i32"; throws otherwise
inline bool is_float(DType t) { return t != DType::i32; }

struct bf16 {
  uint16_t bits = 0;
  bf16() = default;
  explicit bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { bits = uint16_t((u >> 16) | 0x40); return; }  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    bits = uint16_t(u >> 16);
  }
  explicit operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

}  // namespace deeplora
