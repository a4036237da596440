#include "common/paths.h"

#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

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
  const char* argv[] = {"prog",       "--memory-limit=64GiB", "--tcp=a-b:1", "-v",
                        "positional-arg", "--",                "--not-a-flag"};
  std::vector<std::string> out = NormalizeFlagNames(7, const_cast<char**>(argv));
  EXPECT_THAT(out, ElementsAre("prog", "--memory_limit=64GiB", "--tcp=a-b:1", "-v",
                               "positional-arg", "--", "--not-a-flag"));
}

}  // namespace
}  // namespace icecache
