// The real texts of model/texts.h: the Debian packages' own files load the same on every call
// and are what they claim (where the package is installed: scripts/test.sh installs them through
// scripts/bootstrap.sh --model), and a missing package is a NOT_FOUND that names it (checked
// under an empty root, so without uninstalling anything).
#include "model/texts.h"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"
#include "tests/support/subprocess.h"

namespace icecache::model {
namespace {

using ::icecache::testing::StatusIs;
using ::icecache::testing::TempDir;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::StartsWith;

const TextInfo* Find(const std::string& name) {
  for (const TextInfo& t : KnownTexts()) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

void WriteFile(const std::filesystem::path& path, const std::string& content) {
  std::filesystem::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << content;
}

// What a test of a real text checks, whatever the text.
struct Expected {
  std::string name;
  size_t min_bytes;
  std::string starts_with;
  std::string contains;
};

class RealTextTest : public ::testing::TestWithParam<Expected> {};

TEST_P(RealTextTest, LoadsTheSameBytesEveryTimeAndIsWhatItClaims) {
  const Expected& e = GetParam();
  const TextInfo* info = Find(e.name);
  ASSERT_NE(info, nullptr) << e.name << " is not in KnownTexts()";
  if (!std::filesystem::exists(info->path)) {
    GTEST_SKIP() << info->path << " is missing: the Debian package " << info->package
                 << " is not installed (scripts/bootstrap.sh --model installs it)";
  }
  absl::StatusOr<std::string> first = LoadText(e.name);
  ASSERT_TRUE(first.ok()) << first.status();
  absl::StatusOr<std::string> second = LoadText(e.name);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_TRUE(*first == *second) << "two loads of " << e.name << " differ";
  EXPECT_GT(first->size(), e.min_bytes);
  EXPECT_THAT(*first, StartsWith(e.starts_with));
  EXPECT_THAT(*first, HasSubstr(e.contains));
}

// Sizes on Debian 12: debian-policy 4.6.2.0 479,229 bytes, asyncio of python 3.11.2 487,857
// bytes (about 120k and 114k tokens of SmolLM2's tokenizer); the minimums leave room for point
// releases, and are far above what bench/model_quality reads (8,064 tokens).
INSTANTIATE_TEST_SUITE_P(
    NewTexts, RealTextTest,
    ::testing::Values(
        Expected{"debian-policy", 400000, "Debian Policy Manual\n********************\n",
                 "2.1. The Debian Free Software Guidelines"},
        Expected{"python-asyncio", 400000,
                 "# file: asyncio/__init__.py\n\"\"\"The asyncio package, tracking PEP 3156.\"\"\"",
                 "# file: asyncio/base_events.py\n"}),
    [](const ::testing::TestParamInfo<Expected>& p) {
      std::string n = p.param.name;
      std::replace(n.begin(), n.end(), '-', '_');
      return n;
    });

TEST(KnownTexts, NamesAreUniqueAndEachNamesItsPackageAndPath) {
  std::set<std::string> names;
  for (const TextInfo& t : KnownTexts()) {
    EXPECT_TRUE(names.insert(t.name).second) << t.name;
    EXPECT_FALSE(t.title.empty()) << t.name;
    EXPECT_FALSE(t.package.empty()) << t.name;
    EXPECT_THAT(t.path, StartsWith("/usr/")) << t.name;
  }
  for (const char* name :
       {"bible", "cpp-annotations", "jargon", "debian-policy", "python-asyncio"}) {
    EXPECT_NE(Find(name), nullptr) << name;
  }
}

TEST(KnownTexts, MissingPackageIsNotFoundNamingThePackage) {
  TempDir root;  // an empty root: no package installed under it
  for (const TextInfo& t : KnownTexts()) {
    EXPECT_THAT(LoadText(t.name, root.path()),
                StatusIs(absl::StatusCode::kNotFound,
                         AllOf(HasSubstr("install the Debian package " + t.package),
                               HasSubstr(root.path() + t.path))))
        << t.name;
  }
  // A directory that is there but holds no module is missing too.
  std::filesystem::create_directories(root.path() + Find("python-asyncio")->path);
  EXPECT_THAT(LoadText("python-asyncio", root.path()),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("libpython3.11-stdlib")));
  EXPECT_THAT(LoadText("/nonexistent/text.txt"), StatusIs(absl::StatusCode::kNotFound));
}

TEST(KnownTexts, PythonModulesAreConcatenatedInByteOrderOfTheirNames) {
  TempDir root;
  const std::filesystem::path dir = root.path() + Find("python-asyncio")->path;
  // Written out of order; a file without a final newline; what is no module is left out.
  WriteFile(dir / "tasks.py", "T = 1\n");
  WriteFile(dir / "__init__.py", "\"\"\"init\"\"\"\n");
  WriteFile(dir / "base_events.py", "B = 2");
  WriteFile(dir / "README.txt", "not a module\n");
  WriteFile(dir / "__pycache__" / "x.py", "cached\n");
  absl::StatusOr<std::string> text = LoadText("python-asyncio", root.path());
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text,
            "# file: asyncio/__init__.py\n\"\"\"init\"\"\"\n"
            "# file: asyncio/base_events.py\nB = 2\n"
            "# file: asyncio/tasks.py\nT = 1\n");
}

TEST(KnownTexts, GzippedTextsAreDecompressed) {
  TempDir root;
  const std::filesystem::path path = root.path() + Find("debian-policy")->path;
  const std::filesystem::path plain = path.parent_path() / "policy.txt";
  WriteFile(plain, "Debian Policy Manual\nline two\n");
  ASSERT_EQ(std::system(("gzip -n '" + plain.string() + "'").c_str()), 0);
  ASSERT_TRUE(std::filesystem::exists(path));
  absl::StatusOr<std::string> text = LoadText("debian-policy", root.path());
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "Debian Policy Manual\nline two\n");
}

}  // namespace
}  // namespace icecache::model
