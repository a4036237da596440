// Real long texts from Debian packages (reference/real-model.md) and the passkey-retrieval
// prompt built from them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/io/tokenizer.h"

namespace icecache::model {

struct TextInfo {
  std::string name;     // "bible", "cpp-annotations", "jargon", "debian-policy", "python-asyncio"
  std::string title;    // what it is
  std::string package;  // the Debian package that provides it
  std::string path;     // what of the package LoadText reads: a program, a .gz file or a directory
};
// Every known text: prose (the Bible), a programming book (the C++ Annotations), a glossary (the
// Jargon File), a reference manual (the Debian Policy Manual) and source code (the asyncio
// package of Python 3.11's standard library).
const std::vector<TextInfo>& KnownTexts();

// The plain text of a known text, or of a file when `name` is a path:
//   bible            the King James Bible without verse references (the `bible` program)
//   cpp-annotations  the C++ Annotations book, as text
//   jargon           the Jargon File, as text
//   debian-policy    the Debian Policy Manual, as text (the package's own policy.txt)
//   python-asyncio   every asyncio/*.py module in byte order of the file names, each after a
//                    line "# file: asyncio/NAME.py"
// The same bytes on every call. NOT_FOUND, naming the Debian package to install, when the
// package's file is missing (or the directory holds no module). `root`: a directory under which
// the packages' paths are looked up instead of / (tests); empty for the system's own;
// INVALID_ARGUMENT when it holds a single quote (the paths reach a shell quoted).
absl::StatusOr<std::string> LoadText(const std::string& name, const std::string& root = "");

struct PasskeyPrompt {
  std::vector<int32_t> tokens;
  std::string passkey;       // the digits hidden in the text
  uint32_t needle_position;  // token index where the passkey sentence starts
};

// An instruction, `haystack_tokens` tokens of `filler` with the sentence "The secret number is
// N. Remember it. N is the secret number." inserted at `depth` (0..1) of the haystack, and the
// question, ending so that the answer's digits come next. (The classic wording, "the pass key
// is", made SmolLM2-135M explain what a pass key is even with full attention at 1.5k-4k
// tokens; "secret number" it retrieves: 5 of 5 depths at 2k, 3 of 3 at 4k.) `chat`: wrap it in the
// model's chat format (needs <|im_start|> in the vocabulary), else a plain completion prompt.
// INVALID_ARGUMENT when the filler is too short or chat is asked without a chat vocabulary.
absl::StatusOr<PasskeyPrompt> BuildPasskeyPrompt(const Tokenizer& tokenizer,
                                                 const std::string& filler,
                                                 uint32_t haystack_tokens, double depth,
                                                 const std::string& passkey, bool chat = false);

// The first run of digits in `text` ("" when none).
std::string FirstNumber(const std::string& text);

}  // namespace icecache::model
