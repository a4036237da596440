#include "eval/local_daemon.h"

#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "icecache/attachment.h"

namespace icecache::eval {

std::string IcecachedPath(const char* built) {
  const char* v = std::getenv("ICECACHE_ICECACHED_BIN");
  return v != nullptr && *v != '\0' ? std::string(v) : std::string(built);
}

absl::StatusOr<std::unique_ptr<LocalDaemon>> LocalDaemon::Start(
    const std::string& binary, const std::vector<std::string>& extra_flags,
    absl::Duration timeout) {
  std::unique_ptr<LocalDaemon> d(new LocalDaemon());
  std::string tmpl = (std::filesystem::temp_directory_path() / "icecache-local-XXXXXX").string();
  if (::mkdtemp(tmpl.data()) == nullptr) {
    return absl::InternalError(absl::StrCat("mkdtemp: ", std::strerror(errno)));
  }
  d->dir_ = tmpl;
  d->socket_ = d->dir_ + "/icecached.sock";
  d->args_ = {binary, "--socket=" + d->socket_, "--metrics-port=-1", "--recall-sample-every=0",
              "--log-level=warning"};
  d->args_.insert(d->args_.end(), extra_flags.begin(), extra_flags.end());
  absl::Status st = d->Spawn(timeout);
  if (!st.ok()) return st;
  return d;
}

absl::Status LocalDaemon::Spawn(absl::Duration timeout) {
  std::vector<std::string> args = args_;
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t parent = ::getpid();
  pid_ = ::fork();
  if (pid_ < 0) return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
  if (pid_ == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) _exit(127);  // the parent died before prctl took effect
    ::execv(argv[0], argv.data());
    _exit(127);
  }
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    Attachment::Options o;
    o.socket = socket_;
    if (Attachment::Attach(o).ok()) return absl::OkStatus();
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return absl::UnavailableError(
          absl::StrCat(args_[0], " exited (status ", status, ") before serving at ", socket_));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return absl::UnavailableError(absl::StrCat(args_[0], " did not come up at ", socket_, " within ",
                                             absl::FormatDuration(timeout)));
}

absl::Status LocalDaemon::Restart(int signal, absl::Duration timeout) {
  if (pid_ > 0) {
    ::kill(pid_, signal);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  return Spawn(timeout);
}

LocalDaemon::~LocalDaemon() {
  if (pid_ > 0) {
    ::kill(pid_, SIGTERM);
    ::waitpid(pid_, nullptr, 0);
  }
  std::error_code ignored;
  std::filesystem::remove_all(dir_, ignored);
}

}  // namespace icecache::eval
