#include "common/flags_compat.h"

#include <fstream>

namespace icecache {

namespace {

// "--foo-bar=x" -> "--foo_bar=x" (the value is left alone).
std::string Normalize(std::string arg) {
  if (arg.size() > 2 && arg[0] == '-' && arg[1] == '-') {
    const size_t end = arg.find('=');
    for (size_t j = 2; j < arg.size() && j < end; ++j) {
      if (arg[j] == '-') arg[j] = '_';
    }
  }
  return arg;
}

// Appends the flags of a flagfile (one per line; blank lines and lines starting with '#'
// skipped, surrounding whitespace trimmed), expanding nested --flagfile lines. Returns false
// when the file cannot be read (the caller then leaves --flagfile for absl to report).
bool ExpandFlagfile(const std::string& path, int depth, std::vector<std::string>* out) {
  std::ifstream in(path);
  if (!in || depth > 8) return false;
  std::string line;
  std::vector<std::string> lines;
  while (std::getline(in, line)) {
    const size_t b = line.find_first_not_of(" \t\r");
    if (b == std::string::npos || line[b] == '#') continue;
    const size_t e = line.find_last_not_of(" \t\r");
    lines.push_back(line.substr(b, e - b + 1));
  }
  for (std::string& l : lines) {
    if (l.rfind("--flagfile=", 0) == 0 && ExpandFlagfile(l.substr(11), depth + 1, out)) continue;
    out->push_back(Normalize(std::move(l)));
  }
  return true;
}

}  // namespace

std::vector<std::string> NormalizeFlagNames(int argc, char** argv) {
  std::vector<std::string> out;
  out.reserve(argc);
  bool flags_done = false;
  for (int i = 0; i < argc; ++i) {
    std::string arg = argv[i];
    if (i > 0 && !flags_done) {
      if (arg == "--") {
        flags_done = true;
      } else if (arg.rfind("--flagfile=", 0) == 0 && ExpandFlagfile(arg.substr(11), 0, &out)) {
        continue;  // its flags are in place of it, spelled like the command line's
      } else {
        arg = Normalize(std::move(arg));
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
