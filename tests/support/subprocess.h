// A child process for integration tests: the real binaries, started with fork/exec, their
// stdout and stderr captured to files, signalled and reaped with a deadline.
#pragma once

#include <sys/types.h>

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace icecache::testing {

class Subprocess {
 public:
  // Starts argv[0] with `argv`; `env` entries ("K=V") are added to the environment.
  // Output goes to files under `output_dir`.
  static absl::StatusOr<Subprocess> Start(const std::vector<std::string>& argv,
                                          const std::string& output_dir,
                                          const std::vector<std::string>& env = {});
  Subprocess(Subprocess&& other) noexcept;
  Subprocess& operator=(Subprocess&& other) noexcept;
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;
  // Kills (SIGKILL) and reaps the child if it still runs.
  ~Subprocess();

  pid_t pid() const { return pid_; }
  bool Signal(int sig) const;
  // SIGSTOP, then waits (up to `timeout`) until every thread of the child is stopped: kill()
  // returns before they are, and a thread still running may yet answer a request. False on
  // timeout or when the signal could not be sent.
  bool Stop(absl::Duration timeout = absl::Seconds(5)) const;
  // Waits up to `timeout` for the child to exit. Returns the raw wait status, or nullopt
  // on timeout.
  std::optional<int> Wait(absl::Duration timeout);
  // True when the child has not exited yet (reaps it if it has).
  bool Running();

  std::string Stdout() const;
  std::string Stderr() const;

 private:
  Subprocess(pid_t pid, std::string out, std::string err)
      : pid_(pid), stdout_path_(std::move(out)), stderr_path_(std::move(err)) {}

  pid_t pid_ = -1;
  std::optional<int> status_;
  std::string stdout_path_;
  std::string stderr_path_;
};

// Runs a command to completion (up to `timeout`), returning exit code and output.
struct RunResult {
  int exit_code = -1;  // -1 when killed by a signal or timed out
  std::string out;
  std::string err;
};
absl::StatusOr<RunResult> RunCommand(const std::vector<std::string>& argv,
                                     const std::string& output_dir,
                                     absl::Duration timeout = absl::Seconds(30),
                                     const std::vector<std::string>& env = {});

// A fresh directory under /tmp (short, so that unix socket paths fit), removed with its
// contents on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::string ReadFile(const std::string& path);

}  // namespace icecache::testing
