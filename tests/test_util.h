// Helpers shared by the test suites: error messages, relative errors, temporary directories and
// small random token shards.
#pragma once
#include <fmt/format.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <functional>
#include <fstream>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "runtime/io/token_shards.h"

namespace deeplora::test {

// The message of the exception f throws (any std::exception), "" if it returns.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

// The message of the std::runtime_error f throws, "<no error>" if it returns; any other exception
// propagates (for checks that the error is of that type).
inline std::string runtime_error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "<no error>";
}

inline bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// ‖a − b‖₂ / ‖b‖₂ (b's norm floored at 1e-30); infinity if either holds a non-finite value.
inline double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return INFINITY;
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

// A fresh directory under the system temp dir, removed when the object goes away.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& prefix = "deeplora") {
    std::string tmpl = (std::filesystem::temp_directory_path() / (prefix + "_XXXXXX")).string();
    if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path / name).string(); }
  std::string write(const std::string& name, const std::string& text) const {
    std::string p = file(name);
    std::ofstream(p, std::ios::binary) << text;
    return p;
  }
};

// A directory named after the test and the process, emptied first (kept afterwards for post-mortems).
inline std::filesystem::path fresh_dir(const std::string& name) {
  namespace fs = std::filesystem;
  fs::path d = fs::temp_directory_path() / fmt::format("deeplora-{}-{}", name, getpid());
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// n random tokens from a small alphabet (below the tiny preset's vocab of 512), as dir/train.bin in
// llm.c's shard format.
inline std::string random_shard(const std::filesystem::path& dir, int64_t n, uint64_t seed, int alphabet = 64) {
  std::vector<uint16_t> t(static_cast<size_t>(n));
  uint64_t s = seed;
  for (auto& x : t) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    x = uint16_t((s >> 33) % uint64_t(alphabet));
  }
  std::string p = (dir / "train.bin").string();
  write_token_shard(p, std::span<const uint16_t>(t));
  return p;
}

}  // namespace deeplora::test
