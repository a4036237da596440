// The real icecached as a subprocess of a benchmark (the same binary users run), in a private
// temporary directory that goes away with it.
#pragma once

#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "icecache/attachment.h"

namespace icecache::bench {

struct BenchDaemon {
  pid_t pid = -1;
  std::string dir, socket;
  BenchDaemon() = default;
  BenchDaemon(const BenchDaemon&) = delete;
  BenchDaemon& operator=(const BenchDaemon&) = delete;
  ~BenchDaemon() {
    if (pid > 0) {
      ::kill(pid, SIGTERM);
      ::waitpid(pid, nullptr, 0);
    }
    std::system(("rm -rf '" + dir + "'").c_str());
  }
};

// `built` unless ICECACHE_ICECACHED_BIN names another binary (bench/gpu/run.sh runs a copied
// bundle on another machine).
inline const char* IcecachedPath(const char* built) {
  const char* v = std::getenv("ICECACHE_ICECACHED_BIN");
  return v != nullptr && *v != '\0' ? v : built;
}

// Starts `binary` with a socket in a fresh directory, metrics off, recall sampling off, plus
// `extra` flags; returns once a client can attach (exits the process if it never comes up).
inline std::unique_ptr<BenchDaemon> StartBenchDaemon(const char* binary,
                                                     std::vector<std::string> extra = {}) {
  auto d = std::make_unique<BenchDaemon>();
  char tmpl[] = "/tmp/icecache-bench-XXXXXX";
  d->dir = ::mkdtemp(tmpl);
  d->socket = d->dir + "/icecached.sock";
  std::vector<std::string> args = {"icecached", "--socket=" + d->socket, "--metrics-port=-1",
                                   "--recall-sample-every=0", "--log-level=warning"};
  args.insert(args.end(), extra.begin(), extra.end());
  d->pid = ::fork();
  if (d->pid == 0) {
    // The daemon goes when the benchmark goes, however it ends (an exit on error skips
    // destructors), so it never holds the benchmark's output pipe open.
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(IcecachedPath(binary), argv.data());
    _exit(127);
  }
  for (int i = 0; i < 1000; ++i) {
    Attachment::Options o;
    o.socket = d->socket;
    if (Attachment::Attach(o).ok()) return d;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::fprintf(stderr, "icecached did not come up at %s\n", d->socket.c_str());
  std::exit(1);
}

}  // namespace icecache::bench
