// How much host memory this process may use: physical memory, lowered by a cgroup limit
// (a Kubernetes container's memory limit) when one is set.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"

namespace icecache {

// MemTotal from /proc/meminfo, or the cgroup (v2 memory.max, v1 memory.limit_in_bytes)
// limit when that is lower. INTERNAL when /proc/meminfo cannot be read.
absl::StatusOr<uint64_t> AvailableMemoryBytes();

}  // namespace icecache
