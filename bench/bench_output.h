// Where a benchmark writes its machine-readable results. The directory is made (and probed)
// before the run, so that a run of an hour cannot end unable to write; every file is checked
// after writing, so that a full disk is an error, not a "wrote ..." over empty files.
#pragma once

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

namespace icecache::bench {

inline void PrepareOutDir(const std::string& dir, const char* program) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    std::fprintf(stderr, "%s: cannot create the output directory %s: %s\n", program, dir.c_str(),
                 ec.message().c_str());
    std::exit(2);
  }
  const std::string probe = dir + "/.write-probe";
  std::ofstream f(probe);
  f << "probe";
  f.close();
  if (!f) {
    std::fprintf(stderr, "%s: cannot write into the output directory %s: %s\n", program,
                 dir.c_str(), std::strerror(errno));
    std::exit(2);
  }
  std::filesystem::remove(probe, ec);
}

// Closes a result file and exits with a message if anything written to it was lost.
inline void CloseResult(std::ofstream& f, const std::string& path, const char* program) {
  f.close();
  if (!f) {
    std::fprintf(stderr, "%s: writing %s failed: %s\n", program, path.c_str(),
                 std::strerror(errno));
    std::exit(1);
  }
}

}  // namespace icecache::bench
