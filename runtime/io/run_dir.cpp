// Run directories: the lock, the list of a run's files, whole-line appends, the stop-signal guard.
#include "runtime/io/run_dir.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <stdexcept>

namespace deeplora {
namespace fs = std::filesystem;

namespace {

bool is_run_entry(const std::string& n) {
  static const char* const kNames[] = {"metrics.jsonl", "latest", "config.toml", "summary.json",
                                       "final",         "adapter", "best",        "best.tmp"};
  for (const char* k : kNames)
    if (n == k) return true;
  return n.rfind("ckpt-", 0) == 0;
}

}  // namespace

std::vector<std::string> run_files(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return out;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    if (is_run_entry(n)) out.push_back(n);
  }
  std::sort(out.begin(), out.end());
  return out;
}

void remove_run_files(const std::string& dir) {
  for (const std::string& n : run_files(dir)) fs::remove_all(fs::path(dir) / n);
}

RunDirLock::RunDirLock(const std::string& dir) {
  std::error_code ec;
  if (fs::exists(dir, ec) && !fs::is_directory(dir, ec))
    throw std::runtime_error(fmt::format("--out {}: exists and is not a directory", dir));
  fs::create_directories(dir, ec);
  if (ec) throw std::runtime_error(fmt::format("--out {}: cannot create the directory: {}", dir, ec.message()));
  const std::string path = (fs::path(dir) / ".lock").string();
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) throw std::runtime_error(fmt::format("{}: cannot open the run lock: {}", path, std::strerror(errno)));
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    ::close(fd_);
    fd_ = -1;
    if (err == EWOULDBLOCK)
      throw std::runtime_error(fmt::format("--out {}: another run is writing there (it holds {}; `fuser {}` names "
                                           "it): wait for it, stop it, or pick another --out",
                                           dir, path, path));
    throw std::runtime_error(fmt::format("{}: flock failed: {}", path, std::strerror(err)));
  }
}

RunDirLock::~RunDirLock() {
  if (fd_ >= 0) ::close(fd_);  // closing drops the flock
}

LineFile::LineFile(const std::string& path, bool truncate) : path_(path) {
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | (truncate ? O_TRUNC : 0), 0644);
  if (fd_ < 0) throw std::runtime_error(fmt::format("{}: cannot open for appending: {}", path, std::strerror(errno)));
}

LineFile::~LineFile() {
  if (fd_ >= 0) ::close(fd_);
}

LineFile::LineFile(LineFile&& o) noexcept : fd_(o.fd_), path_(std::move(o.path_)) { o.fd_ = -1; }

LineFile& LineFile::operator=(LineFile&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.fd_;
    path_ = std::move(o.path_);
    o.fd_ = -1;
  }
  return *this;
}

void LineFile::line(const std::string& text) {
  if (fd_ < 0) return;
  const std::string s = text + "\n";
  // One write(2) per line: with O_APPEND the kernel places it whole at the end of the file. A short
  // write (a full disk) is finished off; the line is then still contiguous (nobody else writes here).
  size_t done = 0;
  while (done < s.size()) {
    const ssize_t k = ::write(fd_, s.data() + done, s.size() - done);
    if (k < 0 && errno == EINTR) continue;
    if (k < 0) throw std::runtime_error(fmt::format("{}: write failed: {}", path_, std::strerror(errno)));
    done += size_t(k);
  }
}

namespace {

volatile std::sig_atomic_t g_signal = 0;
std::atomic<bool> g_guard_active{false};

extern "C" void on_stop_signal(int sig) {
  if (g_signal != 0) {  // the second one: die as the default action would (checkpoints are atomic)
    std::signal(sig, SIG_DFL);
    std::raise(sig);
    return;
  }
  g_signal = sig;
}

}  // namespace

StopSignals::StopSignals() {
  bool expected = false;
  if (!g_guard_active.compare_exchange_strong(expected, true)) return;  // nested: inert
  active_ = true;
  g_signal = 0;
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  auto install = [&](int sig, struct sigaction& old, bool& have) {
    if (::sigaction(sig, nullptr, &old) != 0) return;
    if (old.sa_handler == SIG_IGN) return;  // inherited as ignored: leave it so
    have = ::sigaction(sig, &sa, nullptr) == 0;
  };
  install(SIGINT, old_int_, have_int_);
  install(SIGTERM, old_term_, have_term_);
}

StopSignals::~StopSignals() {
  if (!active_) return;
  if (have_int_) ::sigaction(SIGINT, &old_int_, nullptr);
  if (have_term_) ::sigaction(SIGTERM, &old_term_, nullptr);
  g_signal = 0;
  g_guard_active.store(false);
}

int StopSignals::pending() const { return active_ ? int(g_signal) : 0; }

const char* StopSignals::name(int sig) {
  switch (sig) {
    case SIGINT: return "SIGINT";
    case SIGTERM: return "SIGTERM";
    default: return "a signal";
  }
}

}  // namespace deeplora
