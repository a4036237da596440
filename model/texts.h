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
  std::string name;      // "bible", "cpp-annotations", "jargon"
  std::string title;     // what it is
  std::string package;   // the Debian package that provides it
};
const std::vector<TextInfo>& KnownTexts();

// The plain text of a known text (the King James Bible without verse references, the C++
// Annotations book, the Jargon File), or of a file when `name` is a path. NOT_FOUND, naming the
// Debian package to install, when it is missing.
absl::StatusOr<std::string> LoadText(const std::string& name);

struct PasskeyPrompt {
  std::vector<int32_t> tokens;
  std::string passkey;        // the digits hidden in the text
  uint32_t needle_position;   // token index where the passkey sentence starts
};

// An instruction, `haystack_tokens` tokens of `filler` with the sentence "The pass key is N.
// Remember it. N is the pass key." inserted at `depth` (0..1) of the haystack, and the
// question, ending so that the answer's digits come next. Uses the model's chat format when
// the tokenizer has <|im_start|>. INVALID_ARGUMENT when the filler is too short.
absl::StatusOr<PasskeyPrompt> BuildPasskeyPrompt(const Tokenizer& tokenizer,
                                                 const std::string& filler,
                                                 uint32_t haystack_tokens, double depth,
                                                 const std::string& passkey);

// The first run of digits in `text` ("" when none).
std::string FirstNumber(const std::string& text);

}  // namespace icecache::model
