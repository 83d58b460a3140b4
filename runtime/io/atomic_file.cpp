// AtomicFile: temp file in the target's directory + fsync + rename + directory fsync (POSIX).
#include "runtime/io/atomic_file.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace deeplora {

namespace {

std::runtime_error sys_error(const std::string& what, const std::string& path) {
  return std::runtime_error(fmt::format("{}: {} failed: {}", path, what, std::strerror(errno)));
}

// Directory and file name of `path` ("a/b.bin" -> "a", "b.bin"; "b.bin" -> ".", "b.bin").
std::pair<std::string, std::string> split_path(const std::string& path) {
  auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return {".", path};
  return {slash == 0 ? "/" : path.substr(0, slash), path.substr(slash + 1)};
}

}  // namespace

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  auto [dir, name] = split_path(path_);
  if (name.empty()) throw std::runtime_error(fmt::format("{}: cannot write a file to a directory path", path_));
  tmp_ = fmt::format("{}/.{}.tmp.XXXXXX", dir, name);
  std::vector<char> buf(tmp_.begin(), tmp_.end());
  buf.push_back('\0');
  fd_ = ::mkostemp(buf.data(), O_CLOEXEC);
  if (fd_ < 0) throw sys_error(fmt::format("creating a temp file in '{}'", dir), path_);
  tmp_ = buf.data();
  // mkstemp makes the file 0600; give the new file the old one's mode, else a plain 0644.
  struct stat st {};
  mode_t mode = ::stat(path_.c_str(), &st) == 0 ? (st.st_mode & 07777) : 0644;
  if (::fchmod(fd_, mode) != 0) {
    auto err = sys_error("fchmod of the temp file", path_);
    abandon();
    throw err;
  }
}

AtomicFile::~AtomicFile() {
  if (!committed_) abandon();
}

void AtomicFile::abandon() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  if (!tmp_.empty()) ::unlink(tmp_.c_str());
  tmp_.clear();
}

void AtomicFile::write(const void* data, size_t n) {
  if (fd_ < 0) throw std::runtime_error(fmt::format("{}: write after commit or failure", path_));
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t k = ::write(fd_, p, n > (size_t(1) << 30) ? (size_t(1) << 30) : n);
    if (k < 0) {
      if (errno == EINTR) continue;
      auto err = sys_error(fmt::format("writing {} bytes (temp file {})", n, tmp_), path_);
      abandon();
      throw err;
    }
    p += k;
    n -= size_t(k);
    written_ += size_t(k);
  }
}

void AtomicFile::commit() {
  if (fd_ < 0) throw std::runtime_error(fmt::format("{}: commit twice or after a failure", path_));
  if (::fsync(fd_) != 0) {
    auto err = sys_error("fsync of the temp file", path_);
    abandon();
    throw err;
  }
  int rc = ::close(fd_);
  fd_ = -1;
  if (rc != 0) {
    auto err = sys_error("close of the temp file", path_);
    abandon();
    throw err;
  }
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
    auto err = sys_error(fmt::format("rename of {}", tmp_), path_);
    abandon();
    throw err;
  }
  committed_ = true;
  // Make the rename itself durable: the directory entry lives in the directory's data.
  auto dir = split_path(path_).first;
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) throw sys_error(fmt::format("opening directory '{}' to fsync it", dir), path_);
  rc = ::fsync(dfd);
  int fsync_errno = errno;
  ::close(dfd);
  // Some file systems refuse fsync on directories (EINVAL); the rename is then as durable as it gets.
  if (rc != 0 && fsync_errno != EINVAL) {
    errno = fsync_errno;
    throw sys_error(fmt::format("fsync of directory '{}'", dir), path_);
  }
}

void write_file_atomic(const std::string& path, std::string_view contents) {
  AtomicFile f(path);
  f.write(contents);
  f.commit();
}

}  // namespace deeplora
