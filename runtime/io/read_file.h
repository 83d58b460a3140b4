// Read-only file handle for the loaders in runtime/io: size and positioned reads that either deliver
// every byte asked for or throw an error naming the file.
#pragma once
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace deeplora {

class ReadFile {
 public:
  explicit ReadFile(std::string path) : path_(std::move(path)) {
    fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw std::runtime_error(fmt::format("{}: cannot open: {}", path_, std::strerror(errno)));
    struct stat st {};
    if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd_);
      throw std::runtime_error(fmt::format("{}: not a regular file", path_));
    }
    size_ = uint64_t(st.st_size);
  }
  ~ReadFile() { ::close(fd_); }
  ReadFile(const ReadFile&) = delete;
  ReadFile& operator=(const ReadFile&) = delete;

  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }

  // Reads exactly n bytes at `offset` into dst.
  void read_at(void* dst, uint64_t n, uint64_t offset) const {
    char* p = static_cast<char*>(dst);
    while (n > 0) {
      size_t chunk = n > (uint64_t(1) << 30) ? (size_t(1) << 30) : size_t(n);
      ssize_t k = ::pread(fd_, p, chunk, off_t(offset));
      if (k < 0 && errno == EINTR) continue;
      if (k < 0)
        throw std::runtime_error(fmt::format("{}: read at byte {} failed: {}", path_, offset, std::strerror(errno)));
      if (k == 0) throw std::runtime_error(fmt::format("{}: unexpected end of file at byte {}", path_, offset));
      p += k;
      n -= uint64_t(k);
      offset += uint64_t(k);
    }
  }

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t size_ = 0;
};

}  // namespace deeplora
