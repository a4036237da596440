// A scripted client workload against a real daemon, and the same work done on the index
// alone: used by integration tests in process and by the icecache_test_client binary (real
// client processes), so that their selections can be compared token by token.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "eval/trace.h"
#include "icecache/attachment.h"
#include "icecache/v1/icecache.grpc.pb.h"

namespace icecache::testing {

struct WorkloadOptions {
  uint32_t tokens = 3000;  // prompt tokens (all offloaded) + appended tokens
  uint32_t appends = 3;    // pages of 16 appended after the prompt
  uint32_t layers = 2;
  uint32_t kv_heads = 2;
  uint32_t group = 2;
  uint32_t head_dim = 64;
  uint64_t seed = 1;
  uint32_t k = 12;
};

// The synthetic trace a workload runs on (deterministic in the options).
eval::Trace WorkloadTrace(const WorkloadOptions& options);

// Selections, as the positions of the selected tokens: [layer][step][kv head] -> positions,
// each sorted. Step 0 is after the prefill, step i after the i-th append.
using Selections = std::vector<std::vector<std::vector<std::vector<uint32_t>>>>;
std::string FormatSelections(const Selections& s);

// Runs the workload through the daemon: creates a sequence (gRPC, with the attachment's
// token), stages and prefills every layer, selects, appends pages and selects again.
// Page contents are read back from the arena and mapped to positions by their key rows.
absl::StatusOr<Selections> RunWorkload(Attachment& attachment, icecache::v1::IceCache::Stub& stub,
                                       const WorkloadOptions& options,
                                       std::string* handle_out = nullptr);

// The same work on DciTree instances in this process (the paper configuration).
Selections RunWorkloadInProcess(const WorkloadOptions& options);

// The geometry a workload declares.
icecache::v1::SequenceGeometry WorkloadGeometry(const WorkloadOptions& options);

}  // namespace icecache::testing
