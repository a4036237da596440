// Shared pieces of the libFuzzer targets: an in-process data plane (the daemon's real core,
// attach socket in a private directory) and a silent observer.
#pragma once

#include <stdlib.h>
#include <unistd.h>

#include <memory>
#include <string>

#include "common/thread_pool.h"
#include "selection/index_factory.h"
#include "server/core/clock.h"
#include "server/core/data_plane.h"
#include "server/core/memory_accountant.h"
#include "server/core/sequence_registry.h"
#include "tests/support/null_observer.h"

namespace icecache::fuzz {

using NullObserver = ::icecache::testing::NullDataPlaneObserver;

// A private directory under /tmp, for the sockets of one fuzzing process.
inline std::string PrivateDir() {
  char tmpl[] = "/tmp/icecache-fuzz-XXXXXX";
  const char* dir = ::mkdtemp(tmpl);
  if (dir == nullptr) ::abort();
  return dir;
}

// The daemon's core without gRPC: registry, accountant, pool and data plane.
struct Core {
  explicit Core(DataPlaneOptions options, uint64_t memory = uint64_t{1} << 30)
      : dir(PrivateDir()), accountant(memory), registry(&accountant, RealClock::Get()), pool(1) {
    options.attach_socket = dir + "/icecached.attach.sock";
    options.index_spec = *selection::Preset("paper");
    plane = std::make_unique<DataPlane>(options, &registry, &accountant, &pool, &observer);
    if (!plane->Start().ok()) ::abort();
  }
  std::string dir;
  MemoryAccountant accountant;
  SequenceRegistry registry;
  ThreadPool pool;
  NullObserver observer;
  std::unique_ptr<DataPlane> plane;
};

}  // namespace icecache::fuzz
