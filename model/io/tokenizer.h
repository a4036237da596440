// Byte-level BPE tokenizer (GPT-2 style, as used by SmolLM2), built from GGUF metadata.
//
// Encode: special tokens are split out first (control and user-defined tokens written
// literally in the text), the rest is pre-tokenized into words by a hand-written equivalent
// of the model's split regex, each word's bytes are mapped to the GPT-2 byte alphabet (one
// token per byte to start with) and merged pairwise, lowest merge rank first (ties: leftmost),
// exactly like Hugging Face tokenizers' BPE model. Decode maps tokens back to bytes.
//
// Pre-tokenizers (tokenizer.ggml.pre):
//   "smollm" (and the pre-tokenizers llama.cpp treats identically: "starcoder", "refact",
//   "command-r", "codeshell", "exaone", "minerva"): every \p{N} code point is its own piece
//   (Hugging Face's Digits(individual_digits=true)), then within each piece the GPT-2 pattern
//     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//   (Hugging Face's ByteLevel(add_prefix_space=false, use_regex=true)).
//   "gpt2", "default": the GPT-2 pattern alone. (llama.cpp's own "default" is a different,
//   Llama-3-like split; GGUF files from Hugging Face GPT-2-style tokenizers say "gpt2".)
// Character classes follow the full Unicode 14.0 general categories (L*, N*) and the
// White_Space property; a byte that is not part of valid UTF-8 counts as one character that
// is neither letter, number nor space (so it joins punctuation runs), which keeps Encode
// total on arbitrary bytes.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "model/io/gguf.h"

namespace icecache::model {

// ggml's token types (tokenizer.ggml.token_type).
enum class TokenType : int32_t {
  kUndefined = 0,
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6,
};

struct TokenizerSpec {
  std::string model;                 // tokenizer.ggml.model; must be "gpt2"
  std::string pre;                   // tokenizer.ggml.pre, e.g. "smollm" ("default" if absent)
  std::vector<std::string> tokens;   // in the GPT-2 byte alphabet ("Ġthe"); id = index
  std::vector<std::string> merges;   // "a b" pairs of token strings; rank = index
  std::vector<int32_t> token_types;  // TokenType per token, or empty (all normal)
  int32_t bos_id = -1, eos_id = -1, unk_id = -1, pad_id = -1;  // -1: none
};

// Reads tokenizer.ggml.{model, pre, tokens, merges, token_type, bos_token_id, eos_token_id,
// unknown_token_id, padding_token_id}. model and tokens are required (NOT_FOUND otherwise),
// the rest optional; INVALID_ARGUMENT for a wrong type or an id out of the int32 range.
absl::StatusOr<TokenizerSpec> TokenizerSpecFromGguf(const GgufFile& f);

// Thread safety: immutable after Create; Encode/Decode may be called concurrently.
class Tokenizer {
 public:
  // INVALID_ARGUMENT for: a model other than "gpt2", an unsupported pre-tokenizer, an empty
  // vocabulary or one above 2^31 - 1 tokens, token_types of the wrong length, a special id out
  // of range, a merge that is not two
  // non-empty tokens separated by a space, names a token not in the vocabulary, or whose
  // concatenation is not in the vocabulary. Duplicate token strings keep the lowest id;
  // duplicate merges keep the lowest rank.
  static absl::StatusOr<Tokenizer> Create(TokenizerSpec spec);

  // Token ids of `text` (any bytes; no BOS is added). With parse_special, control (type 3)
  // and user-defined (type 4) tokens written literally in the text become that single token
  // (leftmost-longest match); otherwise they are encoded as plain text. Words are cached
  // within one call, so repetitive text is cheap.
  std::vector<int32_t> Encode(absl::string_view text, bool parse_special = true) const;
  // The words the pre-tokenizer splits `text` into (no special-token handling), in order;
  // they concatenate to `text`. For tests and debugging.
  std::vector<std::string> PreTokenize(absl::string_view text) const;
  // The bytes of the tokens, concatenated. Decode(Encode(x)) == x for every byte string x
  // whose bytes all have a byte token (any x when the vocabulary has all 256; a byte without
  // one is dropped by Encode, as Hugging Face and llama.cpp do: SmolLM2 lacks 21 of them,
  // 0x04 0x06 0x13 0x14 0x16 0x1D 0xC0 0xC1 0xF1 0xF2 0xF5-0xFF). Ids out of range
  // contribute nothing.
  std::string Decode(const std::vector<int32_t>& ids) const;
  // The decoded bytes of one token: the byte-level alphabet mapped back to bytes for normal
  // tokens, the literal text for control/user-defined ones; "" for an id out of range.
  std::string TokenText(int32_t id) const;
  // The id of a token by its vocabulary string (in the byte-level alphabet, e.g. "Ġthe").
  std::optional<int32_t> FindToken(absl::string_view token_string) const;
  // The type of a token (kNormal when the spec had no types; kUndefined out of range).
  TokenType token_type(int32_t id) const;

  size_t vocab_size() const { return tokens_.size(); }
  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  int32_t unk_id() const { return unk_id_; }
  int32_t pad_id() const { return pad_id_; }
  const std::string& pre() const { return pre_; }

 private:
  enum class Split { kGpt2, kDigitsThenGpt2 };
  struct Merge {
    int32_t rank;
    int32_t id;  // the merged token
  };
  struct Special {
    std::string text;
    int32_t id;
  };

  struct Scratch;  // per-Encode buffers and word cache (tokenizer.cc)

  Tokenizer() = default;
  // Calls word(begin, end) for every pre-tokenized word of `text`, as byte offsets.
  template <typename WordFn>
  void ForEachWord(absl::string_view text, Scratch* scratch, WordFn&& word) const;
  // Appends the ids of a text without special tokens.
  void EncodePlain(absl::string_view text, std::vector<int32_t>* out, Scratch* scratch) const;
  // Appends the BPE ids of one pre-tokenized word (cached in `scratch`).
  void EncodeWord(absl::string_view word, std::vector<int32_t>* out, Scratch* scratch) const;

  std::string pre_;
  Split split_ = Split::kGpt2;
  std::vector<std::string> tokens_;       // vocabulary strings
  std::vector<std::string> token_bytes_;  // decoded bytes per token
  std::vector<TokenType> types_;
  absl::flat_hash_map<std::string, int32_t> token_ids_;
  absl::flat_hash_map<uint64_t, Merge> merges_;  // (left id << 32 | right id) -> merge
  int32_t byte_ids_[256] = {};                   // the token of each single byte
  std::vector<Special> specials_;                // longest first
  bool special_first_byte_[256] = {};
  int32_t bos_id_ = -1, eos_id_ = -1, unk_id_ = -1, pad_id_ = -1;
};

}  // namespace icecache::model
