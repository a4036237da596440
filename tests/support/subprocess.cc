#include "tests/support/subprocess.h"

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

extern char** environ;

namespace icecache::testing {
namespace {

std::atomic<int> g_counter{0};

}  // namespace

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::StatusOr<Subprocess> Subprocess::Start(const std::vector<std::string>& argv,
                                             const std::string& output_dir,
                                             const std::vector<std::string>& env) {
  if (argv.empty()) return absl::InvalidArgumentError("empty argv");
  const int n = g_counter.fetch_add(1);
  const std::string out = absl::StrCat(output_dir, "/proc", n, ".out");
  const std::string err = absl::StrCat(output_dir, "/proc", n, ".err");

  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e) env_strings.emplace_back(*e);
  for (const std::string& e : env) env_strings.push_back(e);
  std::vector<char*> envp;
  for (std::string& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  std::vector<std::string> args = argv;
  std::vector<char*> argp;
  for (std::string& a : args) argp.push_back(a.data());
  argp.push_back(nullptr);

  const pid_t pid = ::fork();
  if (pid < 0) return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
  if (pid == 0) {
    // Child: fresh signal state, output to files, exec.
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    const int fo = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int fe = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fo < 0 || fe < 0) _exit(126);
    ::dup2(fo, STDOUT_FILENO);
    ::dup2(fe, STDERR_FILENO);
    ::close(fo);
    ::close(fe);
    ::execve(argp[0], argp.data(), envp.data());
    _exit(127);
  }
  return Subprocess(pid, out, err);
}

Subprocess::Subprocess(Subprocess&& other) noexcept
    : pid_(other.pid_),
      status_(other.status_),
      stdout_path_(std::move(other.stdout_path_)),
      stderr_path_(std::move(other.stderr_path_)) {
  other.pid_ = -1;
}

Subprocess& Subprocess::operator=(Subprocess&& other) noexcept {
  if (this != &other) {
    if (pid_ > 0 && !status_.has_value()) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    pid_ = other.pid_;
    status_ = other.status_;
    stdout_path_ = std::move(other.stdout_path_);
    stderr_path_ = std::move(other.stderr_path_);
    other.pid_ = -1;
  }
  return *this;
}

Subprocess::~Subprocess() {
  if (pid_ > 0 && !status_.has_value()) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
}

bool Subprocess::Signal(int sig) const { return pid_ > 0 && ::kill(pid_, sig) == 0; }

bool Subprocess::Stop(absl::Duration timeout) const {
  if (!Signal(SIGSTOP)) return false;
  const absl::Time deadline = absl::Now() + timeout;
  const std::string tasks = absl::StrCat("/proc/", pid_, "/task");
  while (true) {
    bool all_stopped = true;
    std::error_code ec;
    for (const auto& task : std::filesystem::directory_iterator(tasks, ec)) {
      std::ifstream in(task.path() / "stat");
      std::string line;
      std::getline(in, line);
      // "pid (comm) S ...": the state follows the last ')' (comm may hold one).
      const size_t close = line.rfind(')');
      const char state =
          close != std::string::npos && close + 2 < line.size() ? line[close + 2] : '?';
      if (state != 'T' && state != 't') {
        all_stopped = false;
        break;
      }
    }
    if (ec) return false;
    if (all_stopped) return true;
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(1));
  }
}

std::optional<int> Subprocess::Wait(absl::Duration timeout) {
  if (status_.has_value()) return status_;
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    int status = 0;
    const pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      status_ = status;
      return status_;
    }
    if (absl::Now() >= deadline) return std::nullopt;
    absl::SleepFor(absl::Milliseconds(5));
  }
}

bool Subprocess::Running() { return !Wait(absl::ZeroDuration()).has_value(); }

std::string Subprocess::Stdout() const { return ReadFile(stdout_path_); }
std::string Subprocess::Stderr() const { return ReadFile(stderr_path_); }

absl::StatusOr<RunResult> RunCommand(const std::vector<std::string>& argv,
                                     const std::string& output_dir, absl::Duration timeout,
                                     const std::vector<std::string>& env) {
  absl::StatusOr<Subprocess> p = Subprocess::Start(argv, output_dir, env);
  if (!p.ok()) return p.status();
  std::optional<int> status = p->Wait(timeout);
  RunResult r;
  if (status.has_value() && WIFEXITED(*status)) r.exit_code = WEXITSTATUS(*status);
  r.out = p->Stdout();
  r.err = p->Stderr();
  if (!status.has_value()) {
    return absl::DeadlineExceededError(absl::StrCat(
        argv[0], " did not finish in ", absl::FormatDuration(timeout), "; stderr: ", r.err));
  }
  return r;
}

TempDir::TempDir() {
  char tmpl[] = "/tmp/icecache-test-XXXXXX";
  const char* dir = ::mkdtemp(tmpl);
  path_ = dir != nullptr ? dir : "/tmp";
}

TempDir::~TempDir() {
  if (path_ != "/tmp") {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
}

}  // namespace icecache::testing
