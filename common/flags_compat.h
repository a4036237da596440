// Lets users spell multi-word flags with dashes (--memory-limit=64GiB, the documented form)
// although absl::Flags names are C++ identifiers (memory_limit).
#pragma once

#include <string>
#include <vector>

namespace icecache {

// Copies argv, turning '-' into '_' in the name part of every "--long-flag[=value]" argument
// before a bare "--". Values, single-dash arguments and positional arguments are untouched.
// "--flagfile=FILE" is replaced by the flags in FILE (one per line, '#' comments), spelled the
// same way, so flagfiles accept --memory-limit as the command line does.
std::vector<std::string> NormalizeFlagNames(int argc, char** argv);

// argv-style pointers into `args` (valid while `args` lives), terminated by nullptr.
std::vector<char*> ArgvPointers(std::vector<std::string>& args);

}  // namespace icecache
