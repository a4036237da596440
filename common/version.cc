#include "common/version.h"

#include <string>

#include "common/build_info.h"

namespace icecache {

const char* Version() { return ICECACHE_VERSION; }
const char* GitCommit() { return ICECACHE_GIT_COMMIT; }

std::string VersionString() {
  const std::string commit = ICECACHE_GIT_COMMIT;
  if (commit.empty() || commit == "unknown") return ICECACHE_VERSION;
  return std::string(ICECACHE_VERSION) + "+g" + commit;
}

}  // namespace icecache
