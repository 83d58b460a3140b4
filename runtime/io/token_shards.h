// Token shards in llm.c's format: a header of 256 int32 (magic 20240520, version 1, token count),
// then the tokens as uint16. Shards written by llm.c's data scripts load here and vice versa.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace deeplora {

inline constexpr int32_t kShardMagic = 20240520;
inline constexpr int32_t kShardVersion = 1;
inline constexpr int kShardHeaderInts = 256;
inline constexpr uint64_t kShardHeaderBytes = kShardHeaderInts * sizeof(int32_t);

// Validates the header against the file (magic, version, non-negative count, file size ==
// header + 2 * count) and returns the token count. Throws std::runtime_error naming the file.
int64_t read_token_shard_header(const std::string& path);

// Whole shard. Same validation as read_token_shard_header.
std::vector<uint16_t> read_token_shard(const std::string& path);

// Tokens [begin, begin + n) of a shard without reading the rest (for data loaders).
std::vector<uint16_t> read_token_shard_range(const std::string& path, int64_t begin, int64_t n);

// Writes a shard atomically. The int32 form checks every id fits in uint16 (naming file and index).
void write_token_shard(const std::string& path, std::span<const uint16_t> tokens);
void write_token_shard(const std::string& path, std::span<const int32_t> tokens);

}  // namespace deeplora
