#include "server/main/system_memory.h"

#include <algorithm>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/strip.h"

namespace icecache {
namespace {

// A cgroup limit file's value, or 0 when absent, "max" or unreasonably large (v1 reports
// "no limit" as a huge page-aligned number).
uint64_t ReadCgroupLimit(const char* path) {
  std::ifstream in(path);
  if (!in) return 0;
  std::string text;
  std::getline(in, text);
  uint64_t v = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(text), &v)) return 0;
  if (v >= (uint64_t{1} << 60)) return 0;
  return v;
}

}  // namespace

absl::StatusOr<uint64_t> AvailableMemoryBytes() {
  std::ifstream meminfo("/proc/meminfo");
  if (!meminfo) return absl::InternalError("cannot read /proc/meminfo");
  std::string line;
  uint64_t total = 0;
  while (std::getline(meminfo, line)) {
    std::istringstream fields(line);
    std::string key;
    uint64_t kib = 0;
    if (fields >> key >> kib && key == "MemTotal:") {
      total = kib * 1024;
      break;
    }
  }
  if (total == 0) return absl::InternalError("no MemTotal in /proc/meminfo");
  for (const char* path :
       {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    const uint64_t limit = ReadCgroupLimit(path);
    if (limit != 0) total = std::min(total, limit);
  }
  return total;
}

}  // namespace icecache
