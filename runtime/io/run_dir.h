// A training run's output directory: one run at a time (an flock held for the run's lifetime), no
// run silently replacing another's files, metrics lines written whole, and SIGINT / SIGTERM turned
// into a request to stop after the current step.
#pragma once
#include <csignal>
#include <string>
#include <vector>

namespace deeplora {

// The entries of `dir` that belong to a training run (metrics.jsonl, latest, config.toml,
// summary.json, final/, adapter/, best/, ckpt-*), sorted; empty when dir is absent or holds none.
std::vector<std::string> run_files(const std::string& dir);
// Removes exactly those entries (what --overwrite replaces); other files stay.
void remove_run_files(const std::string& dir);

// flock(LOCK_EX | LOCK_NB) on <dir>/.lock, held until destruction (or process death: the kernel
// drops it, so a killed run never leaves a stale lock). Creates dir. Throws naming the directory
// when another process holds the lock. The lock file stays (unlinking it would race a waiter).
class RunDirLock {
 public:
  explicit RunDirLock(const std::string& dir);
  ~RunDirLock();
  RunDirLock(const RunDirLock&) = delete;
  RunDirLock& operator=(const RunDirLock&) = delete;

 private:
  int fd_ = -1;
};

// An append-only text file written one whole line per write(2) (O_APPEND), so a reader, a crash or
// a second writer never sees half a line. A default-constructed LineFile discards what it is given.
class LineFile {
 public:
  LineFile() = default;
  LineFile(const std::string& path, bool truncate);
  ~LineFile();
  LineFile(const LineFile&) = delete;
  LineFile& operator=(const LineFile&) = delete;
  LineFile(LineFile&& o) noexcept;
  LineFile& operator=(LineFile&& o) noexcept;
  void line(const std::string& text);  // appends text + '\n'

 private:
  int fd_ = -1;
  std::string path_;
};

// While alive, SIGINT and SIGTERM set a flag instead of killing the process (a second one kills it
// at once, as the default would); the previous handlers come back on destruction. A signal that the
// process inherited as ignored (nohup, a background job of a script) stays ignored. Not reentrant:
// one guard at a time per process (a nested guard is inert).
class StopSignals {
 public:
  StopSignals();
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
  int pending() const;  // the signal number received (SIGINT / SIGTERM), 0 if none
  static const char* name(int sig);

 private:
  bool active_ = false;
  struct sigaction old_int_ {}, old_term_ {};
  bool have_int_ = false, have_term_ = false;
};

}  // namespace deeplora
