// safetensors reader (validates the header completely before reading data) and atomic writer.
#include "runtime/io/safetensors.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

#include "runtime/io/atomic_file.h"
#include "runtime/io/read_file.h"

namespace deeplora {

static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes a little-endian host");

namespace {

using json = nlohmann::json;
constexpr uint64_t kMaxHeaderBytes = 100u << 20;  // the reference implementation's limit

[[noreturn]] void fail(const std::string& path, const std::string& msg) {
  throw std::runtime_error(fmt::format("{}: {}", path, msg));
}

[[noreturn]] void fail_tensor(const std::string& path, const std::string& name, const std::string& msg) {
  throw std::runtime_error(fmt::format("{}: tensor '{}': {}", path, name, msg));
}

std::optional<SafeDType> parse_dtype(const std::string& s) {
  if (s == "F32") return SafeDType::f32;
  if (s == "BF16") return SafeDType::bf16;
  if (s == "F16") return SafeDType::f16;
  if (s == "F64") return SafeDType::f64;
  if (s == "I32") return SafeDType::i32;
  return std::nullopt;
}

bool is_known_unsupported(const std::string& s) {
  static const std::set<std::string> other{"BOOL", "U8", "I8", "U16", "I16", "U32", "I64", "U64",
                                           "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2",
                                           "C64", "C128"};
  return other.count(s) != 0;
}

uint64_t get_offset(const json& v, const std::string& path, const std::string& name) {
  if (!v.is_number_unsigned())
    fail_tensor(path, name, fmt::format("data_offsets must hold non-negative integers, got {}", v.dump()));
  return v.get<uint64_t>();
}

SafetensorsEntry parse_entry(const std::string& path, const std::string& name, const json& v) {
  if (!v.is_object()) fail_tensor(path, name, fmt::format("header entry is not an object: {}", v.dump()));
  SafetensorsEntry e;
  e.name = name;
  for (const char* key : {"dtype", "shape", "data_offsets"})
    if (!v.contains(key)) fail_tensor(path, name, fmt::format("header entry lacks '{}'", key));

  const json& dt = v["dtype"];
  if (!dt.is_string()) fail_tensor(path, name, fmt::format("dtype is not a string: {}", dt.dump()));
  auto parsed = parse_dtype(dt.get<std::string>());
  if (!parsed) {
    const auto s = dt.get<std::string>();
    fail_tensor(path, name, is_known_unsupported(s)
                                ? fmt::format("dtype {} is not supported (supported: F32, BF16, F16, F64, I32)", s)
                                : fmt::format("unknown dtype '{}'", s));
  }
  e.dtype = *parsed;

  const json& sh = v["shape"];
  if (!sh.is_array()) fail_tensor(path, name, fmt::format("shape is not an array: {}", sh.dump()));
  if (sh.size() > 4) fail_tensor(path, name, fmt::format("shape {} has {} dims, at most 4 are supported", sh.dump(), sh.size()));
  for (const json& d : sh) {
    if (!d.is_number_unsigned()) fail_tensor(path, name, fmt::format("shape {} has a non-integer or negative dim", sh.dump()));
    // A dim past int64 passes the byte count when another dim is 0 (fuzz/fuzz_safetensors).
    if (d.get<uint64_t>() > uint64_t(INT64_MAX)) fail_tensor(path, name, fmt::format("shape {} has a dim above 2^63 - 1", sh.dump()));
    e.shape.push_back(int64_t(d.get<uint64_t>()));
  }

  const json& off = v["data_offsets"];
  if (!off.is_array() || off.size() != 2)
    fail_tensor(path, name, fmt::format("data_offsets must be [begin, end], got {}", off.dump()));
  e.begin = get_offset(off[0], path, name);
  e.end = get_offset(off[1], path, name);
  if (e.end < e.begin) fail_tensor(path, name, fmt::format("data_offsets [{}, {}] end before begin", e.begin, e.end));

  // Expected size with overflow checks: a lying shape must not wrap around to a plausible number.
  uint64_t bytes = safe_dtype_size(e.dtype);
  for (int64_t d : e.shape)
    if (__builtin_mul_overflow(bytes, uint64_t(d), &bytes))
      fail_tensor(path, name, fmt::format("shape {} is too large", sh.dump()));
  if (e.end - e.begin != bytes)
    fail_tensor(path, name, fmt::format("data_offsets [{}, {}] hold {} bytes but {} {} needs {}", e.begin, e.end,
                                        e.end - e.begin, safe_dtype_name(e.dtype), sh.dump(), bytes));
  return e;
}

}  // namespace

const char* safe_dtype_name(SafeDType t) {
  switch (t) {
    case SafeDType::f32: return "F32";
    case SafeDType::bf16: return "BF16";
    case SafeDType::f16: return "F16";
    case SafeDType::f64: return "F64";
    case SafeDType::i32: return "I32";
  }
  return "?";
}

size_t safe_dtype_size(SafeDType t) {
  switch (t) {
    case SafeDType::f32: return 4;
    case SafeDType::bf16: return 2;
    case SafeDType::f16: return 2;
    case SafeDType::f64: return 8;
    case SafeDType::i32: return 4;
  }
  return 0;
}

SafeDType safe_dtype_of(DType t) {
  switch (t) {
    case DType::f32: return SafeDType::f32;
    case DType::bf16: return SafeDType::bf16;
    case DType::f64: return SafeDType::f64;
    case DType::i32: return SafeDType::i32;
  }
  return SafeDType::f32;
}

DType tensor_dtype_of(SafeDType t) {
  switch (t) {
    case SafeDType::f32: return DType::f32;
    case SafeDType::bf16: return DType::bf16;
    case SafeDType::f16: return DType::f32;
    case SafeDType::f64: return DType::f64;
    case SafeDType::i32: return DType::i32;
  }
  return DType::f32;
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = h & 0x7c00u, sig = h & 0x03ffu, bits;
  if (exp == 0x7c00u) {
    bits = sign | 0x7f800000u | (sig << 13);  // inf / NaN (payload kept)
  } else if (exp != 0) {
    bits = sign | ((uint32_t(h & 0x7fffu) + 0x1c000u) << 13);  // rebias 15 -> 127
  } else if (sig == 0) {
    bits = sign;
  } else {
    float v = float(sig) * (1.0f / 16777216.0f);  // subnormal: sig * 2^-24, exact in f32
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even, as numpy's npy_floatbits_to_halfbits.
uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  uint32_t fexp = x & 0x7f800000u, fsig = x & 0x007fffffu;
  if (fexp >= 0x47800000u) {  // overflow, inf or NaN
    if (fexp == 0x7f800000u && fsig != 0) {
      uint16_t r = uint16_t(0x7c00u + (fsig >> 13));
      return uint16_t(sign | (r == 0x7c00u ? 0x7e00u : r));  // keep NaN a NaN
    }
    return uint16_t(sign | 0x7c00u);
  }
  if (fexp <= 0x38000000u) {  // half subnormal or zero
    if (fexp < 0x33000000u) return sign;
    uint32_t e = fexp >> 23;
    uint32_t s = (0x00800000u + fsig) >> (113 - e);
    if ((s & 0x3fffu) != 0x1000u || (x & 0x7ffu)) s += 0x1000u;
    return uint16_t(sign | (s >> 13));
  }
  uint32_t hexp = (fexp - 0x38000000u) >> 13;
  if ((fsig & 0x3fffu) != 0x1000u) fsig += 0x1000u;
  return uint16_t(sign + hexp + (fsig >> 13));  // a carry out of the significand bumps the exponent
}

int64_t SafetensorsEntry::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

const SafetensorsEntry* SafetensorsHeader::find(const std::string& name) const {
  auto it = std::lower_bound(entries.begin(), entries.end(), name,
                             [](const SafetensorsEntry& e, const std::string& n) { return e.name < n; });
  return it != entries.end() && it->name == name ? &*it : nullptr;
}

const Tensor& SafetensorsFile::at(const std::string& name) const {
  auto it = tensors.find(name);
  if (it == tensors.end()) throw std::runtime_error(fmt::format("{}: no tensor named '{}'", header.path, name));
  return it->second;
}

static SafetensorsHeader read_header(const ReadFile& f) {
  const std::string& path = f.path();
  SafetensorsHeader h;
  h.path = path;
  h.file_size = f.size();
  if (h.file_size < 8)
    fail(path, fmt::format("file is {} bytes, shorter than the 8-byte header length (truncated or not safetensors)", h.file_size));
  uint64_t n = 0;
  f.read_at(&n, 8, 0);
  if (n > h.file_size - 8)
    fail(path, fmt::format("header length {} is larger than the {} bytes after it (truncated or corrupt file)", n, h.file_size - 8));
  if (n > kMaxHeaderBytes) fail(path, fmt::format("header length {} exceeds the {} byte limit", n, kMaxHeaderBytes));
  h.data_start = 8 + n;
  std::string text(n, '\0');
  f.read_at(text.data(), n, 8);

  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) fail(path, "header is not valid JSON (corrupt file or not safetensors)");
  if (!j.is_object()) fail(path, fmt::format("header is JSON but not an object (it is a {})", j.type_name()));

  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it.value().is_object()) fail(path, "__metadata__ is not an object");
      for (auto m = it.value().begin(); m != it.value().end(); ++m) {
        if (!m.value().is_string()) fail(path, fmt::format("__metadata__ value of '{}' is not a string", m.key()));
        h.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    h.entries.push_back(parse_entry(path, it.key(), it.value()));
  }
  std::sort(h.entries.begin(), h.entries.end(), [](auto& a, auto& b) { return a.name < b.name; });

  const uint64_t data_size = h.file_size - h.data_start;
  for (const auto& e : h.entries)
    if (e.end > data_size)
      fail_tensor(path, e.name, fmt::format("data_offsets [{}, {}] run past the end of the {}-byte data region (truncated file?)",
                                            e.begin, e.end, data_size));
  // The entries must tile the data region exactly: no overlap, no gap, nothing left over.
  std::vector<const SafetensorsEntry*> by_offset;
  for (const auto& e : h.entries) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(),
            [](auto* a, auto* b) { return a->begin != b->begin ? a->begin < b->begin : a->end < b->end; });
  uint64_t pos = 0;
  std::string prev;
  for (const auto* e : by_offset) {
    if (e->begin < pos)
      fail_tensor(path, e->name, fmt::format("data_offsets [{}, {}] overlap tensor '{}' (which ends at {})", e->begin, e->end, prev, pos));
    if (e->begin > pos)
      fail_tensor(path, e->name, fmt::format("bytes [{}, {}) of the data region before it belong to no tensor", pos, e->begin));
    pos = e->end;
    prev = e->name;
  }
  if (pos != data_size)
    fail(path, fmt::format("bytes [{}, {}) of the data region belong to no tensor (corrupt header or trailing garbage)", pos, data_size));
  return h;
}

SafetensorsHeader read_safetensors_header(const std::string& path) {
  ReadFile f(path);
  return read_header(f);
}

SafetensorsFile load_safetensors(const std::string& path) {
  ReadFile f(path);
  SafetensorsFile out;
  out.header = read_header(f);
  std::vector<uint16_t> half;
  for (const auto& e : out.header.entries) {
    Tensor t = Tensor::empty(Shape::of(e.shape), tensor_dtype_of(e.dtype), Device::cpu);
    t.set_name(e.name);
    const uint64_t off = out.header.data_start + e.begin;
    if (e.dtype == SafeDType::f16) {
      half.resize(size_t(e.numel()));
      f.read_at(half.data(), e.end - e.begin, off);
      float* dst = t.data_as<float>();
      for (size_t i = 0; i < half.size(); ++i) dst[i] = f16_to_f32(half[i]);
    } else {
      f.read_at(t.data(), e.end - e.begin, off);
    }
    out.tensors.emplace(e.name, std::move(t));
  }
  return out;
}

namespace {

template <class T> double load_as_double(const void* p, int64_t i) { return double(static_cast<const T*>(p)[i]); }

double load_element(DType dt, const void* p, int64_t i) {
  switch (dt) {
    case DType::f32: return load_as_double<float>(p, i);
    case DType::f64: return load_as_double<double>(p, i);
    case DType::bf16: return double(float(static_cast<const bf16*>(p)[i]));
    case DType::i32: return load_as_double<int32_t>(p, i);
  }
  return 0;
}

// Converts n elements of a host buffer of dtype `src` into `dst` bytes of file dtype `to`.
void convert_chunk(DType src, const void* x, SafeDType to, void* y, int64_t n) {
  switch (to) {
    case SafeDType::f32:
      for (int64_t i = 0; i < n; ++i) static_cast<float*>(y)[i] = float(load_element(src, x, i));
      break;
    case SafeDType::bf16:
      for (int64_t i = 0; i < n; ++i) static_cast<bf16*>(y)[i] = bf16(float(load_element(src, x, i)));
      break;
    case SafeDType::f16:
      for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(y)[i] = f32_to_f16(float(load_element(src, x, i)));
      break;
    case SafeDType::f64:
      for (int64_t i = 0; i < n; ++i) static_cast<double*>(y)[i] = load_element(src, x, i);
      break;
    case SafeDType::i32:
      for (int64_t i = 0; i < n; ++i) static_cast<int32_t*>(y)[i] = int32_t(load_element(src, x, i));
      break;
  }
}

}  // namespace

void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata, std::optional<SafeDType> float_as) {
  if (float_as && *float_as != SafeDType::f32 && *float_as != SafeDType::bf16 && *float_as != SafeDType::f16)
    throw std::invalid_argument(fmt::format("{}: float tensors can be stored as F32, BF16 or F16, not {}", path,
                                            safe_dtype_name(*float_as)));
  struct Item {
    const std::string* name;
    const Tensor* tensor;
    SafeDType as;
  };
  std::vector<Item> items;
  for (const auto& [name, t] : tensors) {
    if (name.empty()) throw std::invalid_argument(fmt::format("{}: a tensor has an empty name", path));
    if (name == "__metadata__") throw std::invalid_argument(fmt::format("{}: '__metadata__' is reserved, not a tensor name", path));
    if (!t.defined()) throw std::invalid_argument(fmt::format("{}: tensor '{}' is undefined", path, name));
    SafeDType as = float_as && is_float(t.dtype()) ? *float_as : safe_dtype_of(t.dtype());
    items.push_back({&name, &t, as});
  }
  std::sort(items.begin(), items.end(), [](auto& a, auto& b) { return *a.name < *b.name; });
  for (size_t i = 1; i < items.size(); ++i)
    if (*items[i].name == *items[i - 1].name)
      throw std::invalid_argument(fmt::format("{}: tensor name '{}' appears twice", path, *items[i].name));
  // Data in order of element size, largest first (then by name), as the reference writer does: with
  // the data region 8-byte aligned, every tensor is then aligned to its element size for mmap readers.
  std::stable_sort(items.begin(), items.end(),
                   [](auto& a, auto& b) { return safe_dtype_size(a.as) > safe_dtype_size(b.as); });

  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t pos = 0;
  for (const auto& it : items) {
    uint64_t bytes = uint64_t(it.tensor->numel()) * safe_dtype_size(it.as);
    header[*it.name] = {{"dtype", safe_dtype_name(it.as)}, {"shape", it.tensor->shape().vec()}, {"data_offsets", {pos, pos + bytes}}};
    pos += bytes;
  }
  std::string text = header.dump();
  text.append((8 - (8 + text.size()) % 8) % 8, ' ');

  AtomicFile out(path);
  uint64_t n = text.size();
  out.write(&n, 8);
  out.write(text);
  std::vector<char> buf;
  for (const auto& it : items) {
    Tensor host = it.tensor->device() == Device::cpu ? *it.tensor : it.tensor->to(Device::cpu);
    if (it.as == safe_dtype_of(host.dtype())) {
      out.write(host.data(), host.nbytes());
      continue;
    }
    constexpr int64_t kChunk = 1 << 20;  // elements per conversion batch
    const int64_t total = host.numel();
    const size_t in_size = dtype_size(host.dtype()), out_size = safe_dtype_size(it.as);
    buf.resize(size_t(std::min(total, kChunk)) * out_size);
    for (int64_t i = 0; i < total; i += kChunk) {
      int64_t m = std::min(kChunk, total - i);
      convert_chunk(host.dtype(), static_cast<const char*>(host.data()) + size_t(i) * in_size, it.as, buf.data(), m);
      out.write(buf.data(), size_t(m) * out_size);
    }
  }
  out.commit();
}

}  // namespace deeplora

