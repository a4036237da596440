#include "common/flags_compat.h"

namespace icecache {

std::vector<std::string> NormalizeFlagNames(int argc, char** argv) {
  std::vector<std::string> out;
  out.reserve(argc);
  bool flags_done = false;
  for (int i = 0; i < argc; ++i) {
    std::string arg = argv[i];
    if (i > 0 && !flags_done) {
      if (arg == "--") {
        flags_done = true;
      } else if (arg.size() > 2 && arg[0] == '-' && arg[1] == '-') {
        const size_t end = arg.find('=');
        for (size_t j = 2; j < arg.size() && j < end; ++j) {
          if (arg[j] == '-') arg[j] = '_';
        }
      }
    }
    out.push_back(std::move(arg));
  }
  return out;
}

std::vector<char*> ArgvPointers(std::vector<std::string>& args) {
  std::vector<char*> ptrs;
  ptrs.reserve(args.size() + 1);
  for (std::string& a : args) ptrs.push_back(a.data());
  ptrs.push_back(nullptr);
  return ptrs;
}

}  // namespace icecache
