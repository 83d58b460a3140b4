// libFuzzer target: llm.c token shards (header, whole read, ranged read).
#include <exception>

#include "fuzz/fuzz_util.h"
#include "runtime/io/token_shards.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string p = deeplora::fuzz::write_input("x.bin", deeplora::fuzz::as_view(data, size));
  try {
    const int64_t n = deeplora::read_token_shard_header(p);
    (void)deeplora::read_token_shard(p);
    (void)deeplora::read_token_shard_range(p, n / 3, n / 3);
  } catch (const std::exception&) {
  }
  return 0;
}
