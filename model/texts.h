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
  std::string name;     // "bible", "cpp-annotations", "jargon"
  std::string title;    // what it is
  std::string package;  // the Debian package that provides it
};
const std::vector<TextInfo>& KnownTexts();

// The plain text of a known text (the King James Bible without verse references, the C++
// Annotations book, the Jargon File), or of a file when `name` is a path. NOT_FOUND, naming the
// Debian package to install, when it is missing.
absl::StatusOr<std::string> LoadText(const std::string& name);

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
