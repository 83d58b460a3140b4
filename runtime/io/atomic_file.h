// Crash-safe file replacement: write a temp file beside the target, fsync it, rename it over the
// target, fsync the directory. A crash (or kill -9) at any point leaves either the old or the new file.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>

namespace deeplora {

// Streaming writer. Bytes go to a hidden temp file "<dir>/.<name>.tmp.XXXXXX"; commit() makes them
// the file at `path`. Destroying an uncommitted AtomicFile removes the temp file and leaves `path`
// untouched. A process killed before commit leaves at most a stale temp file, never a partial target.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t n);
  void write(std::string_view s) { write(s.data(), s.size()); }
  // fsync + close the temp file, rename it to `path`, fsync the directory. Throws on any failure
  // (the old file, if any, is then still in place).
  void commit();

  const std::string& path() const { return path_; }
  const std::string& temp_path() const { return tmp_; }
  size_t bytes_written() const { return written_; }

 private:
  void abandon() noexcept;
  std::string path_, tmp_;
  int fd_ = -1;
  size_t written_ = 0;
  bool committed_ = false;
};

// One-shot form: replace `path` by `contents` atomically.
void write_file_atomic(const std::string& path, std::string_view contents);

}  // namespace deeplora
