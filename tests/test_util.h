// Helpers shared by the test suites: error messages, relative errors, temporary directories and
// small random token shards.
#pragma once
#include <fmt/format.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>

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

// GPT-2's byte-to-unicode spelling of one byte, as UTF-8.
inline std::string byte_token(int b) {
  bool direct = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
  int cp = b;
  if (!direct) {
    int n = 0;
    for (int x = 0; x < b; ++x)
      if (!((x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF))) ++n;
    cp = 256 + n;
  }
  std::string s;
  if (cp < 0x80) s += char(cp);
  else {
    s += char(0xC0 | (cp >> 6));
    s += char(0x80 | (cp & 0x3F));
  }
  return s;
}

inline std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    o += c;
  }
  return o;
}

// A byte-level vocabulary in dir (vocab.json + merges.txt): token id = byte value, <|endoftext|> =
// 256, no merges. The smallest tokenizer a tiny test model (vocab 512) can read text with.
inline std::string write_byte_vocab(const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir);
  std::string v = "{";
  for (int b = 0; b < 256; ++b) v += fmt::format("\"{}\": {}, ", json_escape(byte_token(b)), b);
  v += "\"<|endoftext|>\": 256}";
  std::ofstream(dir / "vocab.json", std::ios::binary) << v;
  std::ofstream(dir / "merges.txt", std::ios::binary) << "#version: 0.2\n";
  return dir.string();
}

struct Run {
  int status = -1;  // exit status (128 + signal if killed)
  std::string output;  // stdout and stderr
  double seconds = 0;
};

// Runs a shell command, collecting its stdout and stderr.
inline Run run_command(const std::string& cmd) {
  Run r;
  const auto t0 = std::chrono::steady_clock::now();
  FILE* f = popen((cmd + " 2>&1").c_str(), "r");
  if (!f) throw std::runtime_error("popen failed: " + cmd);
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, f)) > 0) r.output.append(buf, n);
  const int st = pclose(f);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : WIFSIGNALED(st) ? 128 + WTERMSIG(st) : -1;
  return r;
}

}  // namespace deeplora::test
