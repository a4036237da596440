// What this binary is: version and commit, for logs, GetStats and the build-info metric.
#pragma once

#include <string>

namespace icecache {

// "0.1.0".
const char* Version();
// Short git commit the build was configured at, or "unknown".
const char* GitCommit();
// "0.1.0+g1a2b3c4d" (or just the version when the commit is unknown).
std::string VersionString();

}  // namespace icecache
