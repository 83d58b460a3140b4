// Shared by the libFuzzer targets: the readers under test take paths, so each input is written to a
// per-process scratch file first (on /dev/shm when there is one: no disk I/O per execution).
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

namespace deeplora::fuzz {

// Removed when the process exits normally (libFuzzer exits through exit() after -max_total_time).
inline std::filesystem::path scratch_dir() {
  static const std::filesystem::path dir = [] {
    std::filesystem::path base = std::filesystem::exists("/dev/shm") ? "/dev/shm" : std::filesystem::temp_directory_path();
    std::filesystem::path d = base / ("deeplora-fuzz-" + std::to_string(getpid()));
    std::filesystem::create_directories(d);
    return d;
  }();
  static const bool cleanup = [] {
    return std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(scratch_dir(), ec);
    }) == 0;
  }();
  (void)cleanup;
  return dir;
}

// Writes bytes to <scratch>/name and returns the path.
inline std::string write_input(const std::string& name, std::string_view bytes) {
  const std::string p = (scratch_dir() / name).string();
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
  return p;
}

inline std::string_view as_view(const uint8_t* data, size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

}  // namespace deeplora::fuzz
