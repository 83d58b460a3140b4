// llm.c token shard reader (validating) and atomic writer.
#include "runtime/io/token_shards.h"

#include <fmt/format.h>

#include <array>
#include <bit>
#include <stdexcept>

#include "runtime/io/atomic_file.h"
#include "runtime/io/read_file.h"

namespace deeplora {

static_assert(std::endian::native == std::endian::little, "token shard I/O assumes a little-endian host");

namespace {

int64_t validate_header(const ReadFile& f) {
  const std::string& path = f.path();
  if (f.size() < kShardHeaderBytes)
    throw std::runtime_error(fmt::format("{}: file is {} bytes, shorter than the {}-byte token shard header", path,
                                         f.size(), kShardHeaderBytes));
  std::array<int32_t, kShardHeaderInts> h{};
  f.read_at(h.data(), kShardHeaderBytes, 0);
  if (h[0] != kShardMagic)
    throw std::runtime_error(fmt::format("{}: bad magic {} (expected {}): not an llm.c token shard", path, h[0], kShardMagic));
  if (h[1] != kShardVersion)
    throw std::runtime_error(fmt::format("{}: token shard version {} is not supported (expected {}; version 2 "
                                         "is llm.c's uint32 Llama-3 format)", path, h[1], kShardVersion));
  if (h[2] < 0) throw std::runtime_error(fmt::format("{}: negative token count {} in header", path, h[2]));
  const uint64_t expect = kShardHeaderBytes + 2 * uint64_t(h[2]);
  if (f.size() != expect)
    throw std::runtime_error(fmt::format("{}: header says {} tokens ({} bytes) but the file is {} bytes (truncated or corrupt)",
                                         path, h[2], expect, f.size()));
  return h[2];
}

}  // namespace

int64_t read_token_shard_header(const std::string& path) {
  ReadFile f(path);
  return validate_header(f);
}

std::vector<uint16_t> read_token_shard(const std::string& path) {
  ReadFile f(path);
  std::vector<uint16_t> tokens(size_t(validate_header(f)));
  f.read_at(tokens.data(), tokens.size() * 2, kShardHeaderBytes);
  return tokens;
}

std::vector<uint16_t> read_token_shard_range(const std::string& path, int64_t begin, int64_t n) {
  ReadFile f(path);
  int64_t count = validate_header(f);
  if (begin < 0 || n < 0 || begin > count || n > count - begin)
    throw std::runtime_error(fmt::format("{}: tokens [{}, {}) out of range for a shard of {} tokens", path, begin, begin + n, count));
  std::vector<uint16_t> tokens(static_cast<size_t>(n));
  f.read_at(tokens.data(), uint64_t(n) * 2, kShardHeaderBytes + 2 * uint64_t(begin));
  return tokens;
}

void write_token_shard(const std::string& path, std::span<const uint16_t> tokens) {
  if (tokens.size() > size_t(INT32_MAX))
    throw std::invalid_argument(fmt::format("{}: {} tokens do not fit one shard (at most {})", path, tokens.size(), INT32_MAX));
  std::array<int32_t, kShardHeaderInts> h{};
  h[0] = kShardMagic;
  h[1] = kShardVersion;
  h[2] = int32_t(tokens.size());
  AtomicFile out(path);
  out.write(h.data(), kShardHeaderBytes);
  out.write(tokens.data(), tokens.size() * 2);
  out.commit();
}

void write_token_shard(const std::string& path, std::span<const int32_t> tokens) {
  std::vector<uint16_t> narrow(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] > 65535)
      throw std::invalid_argument(fmt::format("{}: token {} at index {} does not fit in uint16", path, tokens[i], i));
    narrow[i] = uint16_t(tokens[i]);
  }
  write_token_shard(path, std::span<const uint16_t>(narrow));
}

}  // namespace deeplora
