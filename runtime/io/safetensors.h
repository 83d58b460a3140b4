// safetensors files (the Hugging Face weight format): a validating reader into CPU Tensors and an
// atomic writer. Layout: u64 little-endian header length N, N bytes of JSON header, raw data.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "runtime/tensor.h"

namespace deeplora {

// Element types a safetensors file may hold here. F16 has no Tensor dtype: it loads as f32.
enum class SafeDType : uint8_t { f32, bf16, f16, f64, i32 };
const char* safe_dtype_name(SafeDType t);  // "F32", "BF16", "F16", "F64", "I32"
size_t safe_dtype_size(SafeDType t);
SafeDType safe_dtype_of(DType t);     // Tensor dtype -> file dtype
DType tensor_dtype_of(SafeDType t);   // file dtype -> the dtype it loads as (F16 -> f32)

// IEEE half <-> float on the host, round to nearest even, NaN and infinities kept.
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

struct SafetensorsEntry {
  std::string name;
  SafeDType dtype = SafeDType::f32;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte range in the data region (which starts at data_start)
  int64_t numel() const;
};

struct SafetensorsHeader {
  std::string path;
  uint64_t file_size = 0;
  uint64_t data_start = 0;  // 8 + header length
  std::vector<SafetensorsEntry> entries;  // sorted by name
  std::map<std::string, std::string> metadata;  // "__metadata__"; empty when absent
  const SafetensorsEntry* find(const std::string& name) const;  // nullptr if absent
};

// Reads and validates the header only (cheap: no tensor data is read). Throws std::runtime_error
// naming the file (and the tensor) when the file is short, the header is not a JSON object, an entry
// lacks dtype/shape/data_offsets, a dtype is unknown or unsupported, a shape has more than 4 dims, or
// the offsets are out of range, overlap, disagree with shape x dtype, or leave part of the data
// region uncovered.
SafetensorsHeader read_safetensors_header(const std::string& path);

struct SafetensorsFile {
  SafetensorsHeader header;
  std::map<std::string, Tensor> tensors;  // CPU tensors, named; F16 entries converted to f32
  bool contains(const std::string& name) const { return tensors.count(name) != 0; }
  const Tensor& at(const std::string& name) const;  // throws naming file and tensor if absent
};

// Validates as read_safetensors_header, then reads every tensor.
SafetensorsFile load_safetensors(const std::string& path);

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

// Writes `tensors` (any device; copied to the host) atomically (see atomic_file.h): header keys sorted
// by name and padded with spaces so the data starts 8-byte aligned; data ordered by element size
// (largest first), then name, so every tensor is aligned to its element size. With `float_as`, every float tensor is
// stored in that dtype (f32, bf16 or f16; conversions round to nearest even); i32 tensors are kept.
// Throws on duplicate, empty or reserved ("__metadata__") names and undefined tensors.
// (A std::map<std::string, Tensor> m converts as NamedTensors(m.begin(), m.end()).)
void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {},
                      std::optional<SafeDType> float_as = std::nullopt);

}  // namespace deeplora
