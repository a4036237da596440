#include "model/texts.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

#include "absl/strings/str_cat.h"

namespace icecache::model {
namespace {

// Output of a fixed command (no user input reaches the shell).
absl::StatusOr<std::string> CommandOutput(const std::string& command) {
  FILE* p = ::popen(command.c_str(), "r");
  if (p == nullptr) return absl::InternalError(absl::StrCat("cannot run ", command));
  std::string out;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  const int rc = ::pclose(p);
  if (rc != 0) return absl::InternalError(absl::StrCat(command, " failed (status ", rc, ")"));
  return out;
}

bool FileExists(const std::string& path) { return std::ifstream(path).good(); }

absl::Status Missing(const TextInfo& info, const std::string& path) {
  return absl::NotFoundError(absl::StrCat(
      info.title, ": ", path, " is missing: install the Debian package ", info.package));
}

// The King James Bible from the `bible` program, one verse a line, the references dropped.
absl::StatusOr<std::string> LoadBible(const std::string& program) {
  absl::StatusOr<std::string> raw = CommandOutput(absl::StrCat(program, " -f 'Gen1:1-Rev22:21'"));
  if (!raw.ok()) return raw.status();
  // Lines are "Ge1:1 In the beginning ...": drop the references, keep the verses.
  std::string text;
  std::istringstream in(*raw);
  std::string line;
  while (std::getline(in, line)) {
    const size_t space = line.find(' ');
    if (space == std::string::npos) continue;
    text += line.substr(space + 1);
    text += '\n';
  }
  return text;
}

// Every regular *.py file of `dir`, in byte order of the names (independent of the file system's
// order and of the locale), each after a line naming it. NOT_FOUND when there is none.
absl::StatusOr<std::string> LoadPythonModules(const TextInfo& info, const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::vector<std::string> names;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const fs::path& p = it->path();
    if (it->is_regular_file() && p.extension() == ".py") names.push_back(p.filename().string());
  }
  if (names.empty()) return Missing(info, dir);
  std::sort(names.begin(), names.end());
  const std::string package_dir = fs::path(dir).filename().string();
  std::string text;
  for (const std::string& name : names) {
    std::ifstream f(fs::path(dir) / name, std::ios::binary);
    if (!f) return absl::InternalError(absl::StrCat("cannot read ", dir, "/", name));
    std::ostringstream s;
    s << f.rdbuf();
    absl::StrAppend(&text, "# file: ", package_dir, "/", name, "\n", s.str());
    if (text.back() != '\n') text += '\n';
  }
  return text;
}

}  // namespace

const std::vector<TextInfo>& KnownTexts() {
  static const std::vector<TextInfo> texts = {
      {"bible", "The King James Bible", "bible-kjv", "/usr/bin/bible"},
      {"cpp-annotations", "The C++ Annotations (a book by Frank B. Brokken)", "c++-annotations-txt",
       "/usr/share/doc/c++-annotations/cplusplus.txt.gz"},
      {"jargon", "The Jargon File", "jargon-text", "/usr/share/doc/jargon-text/jargon.txt.gz"},
      {"debian-policy", "The Debian Policy Manual (version 4.6.2 in Debian 12)", "debian-policy",
       "/usr/share/doc/debian-policy/policy.txt.gz"},
      {"python-asyncio", "Python 3.11's asyncio package, source code", "libpython3.11-stdlib",
       "/usr/lib/python3.11/asyncio"},
  };
  return texts;
}

absl::StatusOr<std::string> LoadText(const std::string& name, const std::string& root) {
  for (const TextInfo& info : KnownTexts()) {
    if (info.name != name) continue;
    const std::string path = root + info.path;
    // The paths reach a shell inside single quotes.
    if (path.find('\'') != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat("a quote in the path ", path));
    }
    if (name == "python-asyncio") return LoadPythonModules(info, path);
    if (!FileExists(path)) return Missing(info, path);
    if (name == "bible") return LoadBible(absl::StrCat("'", path, "'"));
    return CommandOutput(absl::StrCat("gzip -dc '", path, "'"));  // the .gz texts
  }
  std::ifstream f(name, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat("no text named ", name, " and no such file"));
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

absl::StatusOr<PasskeyPrompt> BuildPasskeyPrompt(const Tokenizer& tokenizer,
                                                 const std::string& filler,
                                                 uint32_t haystack_tokens, double depth,
                                                 const std::string& passkey, bool chat) {
  if (depth < 0 || depth > 1) return absl::InvalidArgumentError("depth must be within [0, 1]");
  if (chat && !tokenizer.FindToken("<|im_start|>").has_value()) {
    return absl::InvalidArgumentError("the vocabulary has no chat tokens");
  }
  const std::string intro =
      "There is an important piece of information hidden inside a lot of irrelevant text. "
      "Find it and memorize it. I will quiz you about it.\n\n";
  const std::string needle = absl::StrCat("\nThe secret number is ", passkey, ". Remember it. ",
                                          passkey, " is the secret number.\n");
  const std::string question = "\n\nWhat is the secret number?";
  std::vector<int32_t> hay = tokenizer.Encode(filler, /*parse_special=*/false);
  if (hay.size() < haystack_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("the filler has ", hay.size(), " tokens, ", haystack_tokens, " needed"));
  }
  hay.resize(haystack_tokens);
  const size_t cut = static_cast<size_t>(depth * haystack_tokens);
  PasskeyPrompt p;
  p.passkey = passkey;
  auto append = [&](const std::string& s, bool special) {
    const std::vector<int32_t> ids = tokenizer.Encode(s, special);
    p.tokens.insert(p.tokens.end(), ids.begin(), ids.end());
  };
  if (chat) append("<|im_start|>user\n", true);
  append(intro, false);
  p.tokens.insert(p.tokens.end(), hay.begin(), hay.begin() + static_cast<long>(cut));
  p.needle_position = static_cast<uint32_t>(p.tokens.size());
  append(needle, false);
  p.tokens.insert(p.tokens.end(), hay.begin() + static_cast<long>(cut), hay.end());
  append(question, false);
  if (chat) {
    append("<|im_end|>\n<|im_start|>assistant\nThe secret number is", true);
  } else {
    append(" The secret number is", false);
  }
  return p;
}

std::string FirstNumber(const std::string& text) {
  size_t i = 0;
  while (i < text.size() && !std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
  size_t j = i;
  while (j < text.size() && std::isdigit(static_cast<unsigned char>(text[j]))) ++j;
  return text.substr(i, j - i);
}

}  // namespace icecache::model
