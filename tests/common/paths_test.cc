#include "common/paths.h"

#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/flags_compat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"
#include "tests/support/subprocess.h"

namespace icecache {
namespace {

using ::icecache::testing::StatusIs;
using ::icecache::testing::TempDir;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(DefaultSocketPath, EnvironmentOverridesEverything) {
  ::setenv(kSocketEnvVar, "/custom/place.sock", 1);
  EXPECT_EQ(DefaultSocketPath(), "/custom/place.sock");
  ::unsetenv(kSocketEnvVar);
}

TEST(DefaultSocketPath, PerUserWithoutEnvironment) {
  ::unsetenv(kSocketEnvVar);
  const std::string path = DefaultSocketPath();
  if (::geteuid() == 0) {
    EXPECT_EQ(path, "/run/icecache/icecached.sock");
  } else {
    EXPECT_THAT(path, ::testing::EndsWith("/icecached.sock"));
  }
  EXPECT_LE(path.size(), MaxSocketPathLength());
}

TEST(PrepareSocketDirectory, CreatesMissingParents) {
  TempDir tmp;
  const std::string sock = tmp.path() + "/a/b/icecached.sock";
  ASSERT_OK(PrepareSocketDirectory(sock));
  struct stat st;
  ASSERT_EQ(::stat((tmp.path() + "/a/b").c_str(), &st), 0);
  EXPECT_TRUE(S_ISDIR(st.st_mode));
}

TEST(PrepareSocketDirectory, RejectsRelativeAndTooLongPaths) {
  EXPECT_THAT(PrepareSocketDirectory("relative.sock"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("absolute")));
  EXPECT_THAT(PrepareSocketDirectory("/tmp/" + std::string(200, 'x')),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("fit a unix socket")));
}

TEST(PrepareSocketDirectory, RefusesAWorldWritableTmpDirectory) {
  const std::string dir = absl::StrCat("/tmp/icecache-open-", ::getpid());
  ASSERT_EQ(::mkdir(dir.c_str(), 0777), 0);
  ASSERT_EQ(::chmod(dir.c_str(), 0777), 0);
  EXPECT_THAT(PrepareSocketDirectory(dir + "/icecached.sock"),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("not writable")));
  ::rmdir(dir.c_str());
}

TEST(NormalizeFlagNames, DashesBecomeUnderscoresInNamesOnly) {
  const char* argv[] = {"prog", "--memory-limit=64GiB", "--tcp=a-b:1", "-v", "positional-arg",
                        "--",   "--not-a-flag"};
  std::vector<std::string> out = NormalizeFlagNames(7, const_cast<char**>(argv));
  EXPECT_THAT(out, ElementsAre("prog", "--memory_limit=64GiB", "--tcp=a-b:1", "-v",
                               "positional-arg", "--", "--not-a-flag"));
}

TEST(NormalizeFlagNames, FlagfilesAreExpandedWithTheSameSpelling) {
  char tmpl[] = "/tmp/icecache-flags-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  {
    std::ofstream inner(dir + "/inner.flags");
    inner << "--segment-size=32MiB\n";
    std::ofstream outer(dir + "/outer.flags");
    outer << "# the daemon's settings\n\n  --recall-sample-every=8  \n--flagfile=" << dir
          << "/inner.flags\n--tcp=a-b:1\n";
  }
  const std::string flag = "--flagfile=" + dir + "/outer.flags";
  const std::string missing = "--flagfile=" + dir + "/missing.flags";
  const char* argv[] = {"prog", flag.c_str(), "--log-level=debug", missing.c_str()};
  std::vector<std::string> out = NormalizeFlagNames(4, const_cast<char**>(argv));
  // A file that cannot be read stays as it was, for absl to report.
  EXPECT_THAT(out, ElementsAre("prog", "--recall_sample_every=8", "--segment_size=32MiB",
                               "--tcp=a-b:1", "--log_level=debug", missing));
  std::remove((dir + "/inner.flags").c_str());
  std::remove((dir + "/outer.flags").c_str());
  ::rmdir(dir.c_str());
}

}  // namespace
}  // namespace icecache
