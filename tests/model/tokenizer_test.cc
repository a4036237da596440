// Byte-level BPE tokenizer: a tiny vocabulary whose ids are known by hand (merge order,
// ties, special tokens, dropped bytes), the pre-tokenizer's splits (checked against Hugging
// Face tokenizers), exact Decode(Encode(x)) on random bytes, reading the spec from a GGUF,
// Create's argument checks, speed, and (when ICECACHE_MODEL_GGUF is set) the real SmolLM2
// vocabulary against ids Hugging Face tokenizers produced.
#include "model/io/tokenizer.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/io/gguf.h"
#include "tests/support/status_matchers.h"
#include "tests/support/subprocess.h"

namespace icecache::model {
namespace {

using ::icecache::testing::StatusIs;
using ::icecache::testing::TempDir;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// GPT-2's byte alphabet, written independently of the tokenizer: the character that stands
// for `byte` in vocabulary strings.
std::string ByteChar(int byte) {
  int cp = byte;
  if (!((byte >= 0x21 && byte <= 0x7e) || (byte >= 0xa1 && byte <= 0xac) || byte >= 0xae)) {
    int n = 0;
    for (int b = 0; b < byte; ++b) {
      if (!((b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || b >= 0xae)) ++n;
    }
    cp = 256 + n;
  }
  std::string s;
  if (cp < 0x80) {
    s.push_back(static_cast<char>(cp));
  } else {
    s.push_back(static_cast<char>(0xc0 | (cp >> 6)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  }
  return s;
}

// Ids of the tiny vocabulary.
constexpr int32_t kEndOfText = 0, kImStart = 1, kImEnd = 2, kTool = 3, kLt = 4;
constexpr int32_t Byte(int b) { return 5 + b; }
constexpr int32_t kHe = 261, kLl = 262, kHell = 263, kHello = 264, kGw = 265, kOr = 266,
                  kGwor = 267, kLd = 268, kGworld = 269, kBc = 270, kAb = 271, kAa = 272, kGG = 273,
                  k12 = 274, kNlNl = 275;

// 3 control tokens, 2 user-defined ones, the 256 byte tokens (byte b -> id 5 + b), then one
// token per merge (rank r -> id 261 + r).
TokenizerSpec TinySpec(const std::string& pre = "smollm") {
  TokenizerSpec spec;
  spec.model = "gpt2";
  spec.pre = pre;
  spec.tokens = {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>", "<t"};
  spec.token_types = {3, 3, 3, 4, 4};
  for (int b = 0; b < 256; ++b) {
    spec.tokens.push_back(ByteChar(b));
    spec.token_types.push_back(1);
  }
  spec.merges = {"h e",     "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d",
                 "Ġwor ld", "b c", "a b",   "a a",    "Ġ Ġ", "1 2", "Ċ Ċ"};
  for (const std::string& m : spec.merges) {
    const size_t sp = m.find(' ');
    spec.tokens.push_back(m.substr(0, sp) + m.substr(sp + 1));
    spec.token_types.push_back(1);
  }
  spec.bos_id = kEndOfText;
  spec.eos_id = kEndOfText;
  return spec;
}

Tokenizer Tiny(const std::string& pre = "smollm") {
  auto t = Tokenizer::Create(TinySpec(pre));
  EXPECT_OK(t);
  return *std::move(t);
}

TEST(TokenizerTest, TinyVocabularyLayout) {
  const Tokenizer t = Tiny();
  EXPECT_EQ(t.vocab_size(), 276u);
  EXPECT_EQ(t.FindToken("Ġworld"), kGworld);
  EXPECT_EQ(t.FindToken("ĊĊ"), kNlNl);
  EXPECT_EQ(t.FindToken("Ġ"), Byte(' '));
  EXPECT_EQ(t.FindToken("nope"), std::nullopt);
  EXPECT_EQ(t.bos_id(), kEndOfText);
  EXPECT_EQ(t.eos_id(), kEndOfText);
  EXPECT_EQ(t.token_type(kImStart), TokenType::kControl);
  EXPECT_EQ(t.token_type(kTool), TokenType::kUserDefined);
  EXPECT_EQ(t.token_type(kHello), TokenType::kNormal);
  EXPECT_EQ(t.token_type(9999), TokenType::kUndefined);
}

TEST(TokenizerTest, MergesApplyByRank) {
  const Tokenizer t = Tiny();
  EXPECT_THAT(t.Encode("hello world"), ElementsAre(kHello, kGworld));
  EXPECT_THAT(t.Encode("hello"), ElementsAre(kHello));
  EXPECT_THAT(t.Encode("hell"), ElementsAre(kHell));
  EXPECT_THAT(t.Encode("help"), ElementsAre(kHe, Byte('l'), Byte('p')));
  EXPECT_THAT(t.Encode("world"), ElementsAre(Byte('w'), kOr, kLd));  // no leading space
  // "b c" (rank 9) beats "a b" (rank 10) although "a b" comes first in the word.
  EXPECT_THAT(t.Encode("abc"), ElementsAre(Byte('a'), kBc));
  EXPECT_THAT(t.Encode("ab"), ElementsAre(kAb));
  // Equal ranks: leftmost first.
  EXPECT_THAT(t.Encode("aaa"), ElementsAre(kAa, Byte('a')));
  EXPECT_THAT(t.Encode("aaaa"), ElementsAre(kAa, kAa));
  // Whitespace runs keep their last space for the next word.
  EXPECT_THAT(t.Encode("hello   world"), ElementsAre(kHello, kGG, kGworld));
  EXPECT_THAT(t.Encode("\n\n"), ElementsAre(kNlNl));
  EXPECT_THAT(t.Encode(""), ElementsAre());
  // smollm splits digits; gpt2 does not.
  EXPECT_THAT(t.Encode("12"), ElementsAre(Byte('1'), Byte('2')));
  EXPECT_THAT(Tiny("gpt2").Encode("12"), ElementsAre(k12));
  EXPECT_THAT(Tiny("default").Encode("12"), ElementsAre(k12));
  // Non-ASCII text falls back to byte tokens: "é" is C3 A9.
  EXPECT_THAT(t.Encode("é"), ElementsAre(Byte(0xc3), Byte(0xa9)));
}

TEST(TokenizerTest, SpecialTokens) {
  const Tokenizer t = Tiny();
  EXPECT_THAT(t.Encode("<|im_start|>hello<|im_end|>"), ElementsAre(kImStart, kHello, kImEnd));
  EXPECT_THAT(t.Encode("hello<|endoftext|> world"), ElementsAre(kHello, kEndOfText, kGworld));
  // User-defined tokens too, leftmost-longest.
  EXPECT_THAT(t.Encode("<tool>a"), ElementsAre(kTool, Byte('a')));
  EXPECT_THAT(t.Encode("<to"), ElementsAre(kLt, Byte('o')));
  EXPECT_THAT(t.Encode("x<tool><t"), ElementsAre(Byte('x'), kTool, kLt));
  // An incomplete special token is plain text.
  const std::vector<int32_t> partial = t.Encode("<|im_start");
  EXPECT_EQ(partial.front(), Byte('<'));
  EXPECT_EQ(t.Decode(partial), "<|im_start");
  // Without parse_special, special tokens are text.
  const std::string chat = "<|im_start|>hello<|im_end|>";
  const std::vector<int32_t> plain = t.Encode(chat, /*parse_special=*/false);
  for (int32_t id : plain) EXPECT_GT(id, kLt) << id;
  EXPECT_EQ(t.Decode(plain), chat);
  EXPECT_EQ(t.TokenText(kImStart), "<|im_start|>");
  EXPECT_EQ(t.TokenText(kTool), "<tool>");
}

TEST(TokenizerTest, DecodeAndTokenText) {
  const Tokenizer t = Tiny();
  EXPECT_EQ(t.TokenText(kGworld), " world");
  EXPECT_EQ(t.TokenText(Byte('\n')), "\n");
  EXPECT_EQ(t.TokenText(Byte(0)), std::string(1, '\0'));
  EXPECT_EQ(t.TokenText(Byte(0xff)), "\xff");
  EXPECT_EQ(t.TokenText(-1), "");
  EXPECT_EQ(t.TokenText(100000), "");
  EXPECT_EQ(t.Decode({kHello, kGworld, -5, 100000, kImEnd}), "hello world<|im_end|>");
}

// Expected splits checked against Hugging Face tokenizers 0.23.3:
// Sequence([Digits(individual_digits=True), ByteLevel(add_prefix_space=False)]) for smollm
// and ByteLevel alone for gpt2, via pre_tokenize_str.
TEST(TokenizerTest, PreTokenizerMatchesHuggingFace) {
  const Tokenizer smol = Tiny("smollm");
  const Tokenizer gpt2 = Tiny("gpt2");
  struct Case {
    std::string text;
    std::vector<std::string> smollm, gpt2;
  };
  const std::vector<Case> cases = {
      {"Hello world", {"Hello", " world"}, {"Hello", " world"}},
      {"a  b", {"a", " ", " b"}, {"a", " ", " b"}},
      {"a\t\tb", {"a", "\t", "\t", "b"}, {"a", "\t", "\t", "b"}},
      {"x   ", {"x", "   "}, {"x", "   "}},
      {"don't", {"don", "'t"}, {"don", "'t"}},
      {"I'LL they're", {"I", "'", "LL", " they", "'re"}, {"I", "'", "LL", " they", "'re"}},
      {" 's", {" '", "s"}, {" '", "s"}},
      {"''s", {"''", "s"}, {"''", "s"}},
      {"'re'", {"'re", "'"}, {"'re", "'"}},
      {"abc123", {"abc", "1", "2", "3"}, {"abc", "123"}},
      {" 42", {" ", "4", "2"}, {" 42"}},
      {"3.14", {"3", ".", "1", "4"}, {"3", ".", "14"}},
      {"héllo wörld", {"héllo", " wörld"}, {"héllo", " wörld"}},
      {"Привет мир", {"Привет", " мир"}, {"Привет", " мир"}},
      {"日本語 テキスト", {"日本語", " テキスト"}, {"日本語", " テキスト"}},
      {"x½y²", {"x", "½", "y", "²"}, {"x", "½", "y", "²"}},
      {"!!!  ?", {"!!!", " ", " ?"}, {"!!!", " ", " ?"}},
      {"a \n b", {"a", " \n", " b"}, {"a", " \n", " b"}},
      {"a\u3000\u3000b", {"a", "\u3000", "\u3000", "b"}, {"a", "\u3000", "\u3000", "b"}},
      {"a\u00a0b", {"a", "\u00a0", "b"}, {"a", "\u00a0", "b"}},
      {"tab\t x", {"tab", "\t", " x"}, {"tab", "\t", " x"}},
      {"e\u0301", {"e", "\u0301"}, {"e", "\u0301"}},
      {"\n\n", {"\n\n"}, {"\n\n"}},
      {"  ", {"  "}, {"  "}},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(smol.PreTokenize(c.text), c.smollm) << c.text;
    EXPECT_EQ(gpt2.PreTokenize(c.text), c.gpt2) << c.text;
  }
  // Invalid UTF-8: each bad byte is one "other" character (joins punctuation runs).
  EXPECT_THAT(smol.PreTokenize("a\xff!b"), ElementsAre("a", "\xff!", "b"));
  EXPECT_THAT(smol.PreTokenize("\xe6\x97 x"), ElementsAre("\xe6\x97", " x"));
  EXPECT_TRUE(smol.PreTokenize("").empty());
}

// Every byte string comes back exactly, special tokens, invalid UTF-8 and NULs included.
TEST(TokenizerTest, DecodeInvertsEncodeOnRandomBytes) {
  const Tokenizer t = Tiny();
  const std::vector<std::string> pieces = {"hello",
                                           " world",
                                           "<|im_start|>",
                                           "<|im_end|>",
                                           "<tool>",
                                           "<t",
                                           "<|",
                                           "12",
                                           "3",
                                           " ",
                                           "  ",
                                           "\t",
                                           "\n",
                                           "\r\n",
                                           "'s",
                                           "'",
                                           "é",
                                           "日",
                                           "😀",
                                           "\u00a0",
                                           "\u3000",
                                           "\xe6\x97",
                                           "\xff",
                                           "\xc0\x80",
                                           "\xed\xa0\x80",
                                           std::string(1, '\0'),
                                           "aaa",
                                           "abc"};
  std::mt19937 rng(99);
  for (int iter = 0; iter < 3000; ++iter) {
    std::string s;
    const int parts = static_cast<int>(rng() % 24);
    for (int p = 0; p < parts; ++p) {
      if (rng() % 3 == 0) {
        s.push_back(static_cast<char>(rng() & 0xff));
      } else {
        s += pieces[rng() % pieces.size()];
      }
    }
    const std::vector<int32_t> ids = t.Encode(s);
    ASSERT_EQ(t.Decode(ids), s) << "iteration " << iter;
    ASSERT_EQ(t.Decode(t.Encode(s, /*parse_special=*/false)), s) << "iteration " << iter;
    std::string joined;
    for (const std::string& w : t.PreTokenize(s)) joined += w;
    ASSERT_EQ(joined, s);
  }
}

// A byte without a token is dropped before merging, as Hugging Face's BPE does, so its
// neighbours can merge across it.
TEST(TokenizerTest, BytesWithoutTokensAreDropped) {
  TokenizerSpec spec = TinySpec();
  spec.tokens[Byte(0xff)] = "<unused-ff>";  // no token for byte 0xFF any more
  spec.merges.push_back("! !");
  spec.tokens.push_back("!!");
  spec.token_types.push_back(1);
  ASSERT_OK_AND_ASSIGN(const Tokenizer t, Tokenizer::Create(spec));
  const int32_t bang2 = static_cast<int32_t>(spec.tokens.size() - 1);
  EXPECT_THAT(t.Encode("!\xff!"), ElementsAre(bang2));
  EXPECT_THAT(t.Encode("a\xff"), ElementsAre(Byte('a')));
  EXPECT_THAT(t.Encode("\xff"), ElementsAre());
  EXPECT_THAT(t.Encode("\xff\xff"), ElementsAre());
}

TEST(TokenizerTest, CreateRejectsBadSpecs) {
  auto with = [](auto mutate) {
    TokenizerSpec spec = TinySpec();
    mutate(spec);
    return Tokenizer::Create(spec).status();
  };
  EXPECT_THAT(with([](TokenizerSpec& s) { s.model = "llama"; }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("llama")));
  EXPECT_THAT(with([](TokenizerSpec& s) { s.pre = "qwen2"; }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("qwen2")));
  EXPECT_THAT(with([](TokenizerSpec& s) {
                s.tokens.clear();
                s.token_types.clear();
              }),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(with([](TokenizerSpec& s) { s.token_types.pop_back(); }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("types")));
  EXPECT_THAT(with([](TokenizerSpec& s) { s.eos_id = 276; }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("eos")));
  EXPECT_THAT(with([](TokenizerSpec& s) { s.bos_id = -2; }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("bos")));
  EXPECT_THAT(with([](TokenizerSpec& s) { s.merges.push_back("h q9"); }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("q9")));
  EXPECT_THAT(with([](TokenizerSpec& s) { s.merges.push_back("x y"); }),  // "xy" is no token
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("xy")));
  for (const char* bad : {"hello", "", " h", "h ", "h"}) {
    EXPECT_THAT(with([&](TokenizerSpec& s) { s.merges.push_back(bad); }),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("merge 15")))
        << bad;
  }
  // Untyped vocabularies are all normal tokens.
  EXPECT_OK(with([](TokenizerSpec& s) { s.token_types.clear(); }));
}

TEST(TokenizerTest, SpecFromGguf) {
  TempDir dir;
  const TokenizerSpec spec = TinySpec();
  GgufWriter w;
  w.AddString("tokenizer.ggml.model", spec.model);
  w.AddString("tokenizer.ggml.pre", spec.pre);
  w.AddStringArray("tokenizer.ggml.tokens", spec.tokens);
  w.AddStringArray("tokenizer.ggml.merges", spec.merges);
  w.AddInt32Array("tokenizer.ggml.token_type", spec.token_types);
  w.AddUint32("tokenizer.ggml.bos_token_id", 0);
  w.AddUint32("tokenizer.ggml.eos_token_id", 2);
  const std::string path = dir.path() + "/tok.gguf";
  ASSERT_OK(w.Write(path));
  ASSERT_OK_AND_ASSIGN(auto f, GgufFile::Open(path));
  ASSERT_OK_AND_ASSIGN(const TokenizerSpec read, TokenizerSpecFromGguf(*f));
  EXPECT_EQ(read.model, "gpt2");
  EXPECT_EQ(read.pre, "smollm");
  EXPECT_EQ(read.tokens, spec.tokens);
  EXPECT_EQ(read.merges, spec.merges);
  EXPECT_EQ(read.token_types, spec.token_types);
  EXPECT_EQ(read.bos_id, 0);
  EXPECT_EQ(read.eos_id, 2);
  EXPECT_EQ(read.unk_id, -1);
  EXPECT_EQ(read.pad_id, -1);
  ASSERT_OK_AND_ASSIGN(const Tokenizer t, Tokenizer::Create(read));
  EXPECT_THAT(t.Encode("<|im_start|>hello world"), ElementsAre(kImStart, kHello, kGworld));

  GgufWriter missing;
  missing.AddString("tokenizer.ggml.model", "gpt2");
  ASSERT_OK(missing.Write(dir.path() + "/missing.gguf"));
  ASSERT_OK_AND_ASSIGN(f, GgufFile::Open(dir.path() + "/missing.gguf"));
  EXPECT_THAT(TokenizerSpecFromGguf(*f), StatusIs(absl::StatusCode::kNotFound));

  GgufWriter wrong;
  wrong.AddUint32("tokenizer.ggml.model", 2);
  ASSERT_OK(wrong.Write(dir.path() + "/wrong.gguf"));
  ASSERT_OK_AND_ASSIGN(f, GgufFile::Open(dir.path() + "/wrong.gguf"));
  EXPECT_THAT(TokenizerSpecFromGguf(*f), StatusIs(absl::StatusCode::kInvalidArgument));
}

// About 1 MB of varied text; the brief is "well under a second". Prints the rate.
TEST(TokenizerTest, EncodesAMegabyteQuickly) {
  const Tokenizer t = Tiny();
  std::mt19937 rng(5);
  const std::vector<std::string> words = {"hello", "world", "abc",  "aaa", "the",        "of",
                                          "12",    "é",     "help", "or",  "<|im_end|>", "日本"};
  std::string text;
  while (text.size() < (1u << 20)) {
    const int kind = static_cast<int>(rng() % 10);
    text += kind == 0 ? "\n" : kind == 1 ? ", " : " ";
    text += words[rng() % words.size()];
    if (rng() % 5 == 0) text += std::to_string(rng() % 100000);
  }
  const auto start = std::chrono::steady_clock::now();
  const std::vector<int32_t> ids = t.Encode(text);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("encoded %zu bytes into %zu tokens in %.3f s\n", text.size(), ids.size(), s);
  EXPECT_EQ(t.Decode(ids), text);
  EXPECT_LT(s, 2.0);  // typically ~0.05 s; generous for loaded CI machines
}

// ------------------------------------------------------------------------------- real model

// Runs when ICECACHE_MODEL_GGUF, or else ICECACHE_MODEL (which the test command exports), names
// SmolLM2-135M-Instruct.Q4_1.gguf.
TEST(TokenizerRealModelTest, SmolLM2MatchesHuggingFace) {
  const char* path = std::getenv("ICECACHE_MODEL_GGUF");
  if (path == nullptr || *path == '\0') path = std::getenv("ICECACHE_MODEL");
  if (path == nullptr || *path == '\0') {
    GTEST_SKIP() << "neither ICECACHE_MODEL_GGUF nor ICECACHE_MODEL is set";
  }
  ASSERT_OK_AND_ASSIGN(auto f, GgufFile::Open(path));
  ASSERT_OK_AND_ASSIGN(TokenizerSpec spec, TokenizerSpecFromGguf(*f));
  EXPECT_EQ(spec.pre, "smollm");
  EXPECT_EQ(spec.merges.size(), 48900u);
  ASSERT_OK_AND_ASSIGN(const Tokenizer t, Tokenizer::Create(std::move(spec)));
  EXPECT_EQ(t.vocab_size(), 49152u);
  EXPECT_EQ(t.bos_id(), 1);
  EXPECT_EQ(t.eos_id(), 2);
  EXPECT_EQ(t.TokenText(1), "<|im_start|>");

  // Reference ids from Hugging Face tokenizers 0.23.3: models.BPE built from this file's
  // tokenizer.ggml.tokens/merges, pre_tokenizer Sequence([Digits(individual_digits=True),
  // ByteLevel(add_prefix_space=False)]), the 17 control tokens added as special tokens,
  // encode(text, add_special_tokens=False).ids.
  EXPECT_THAT(t.Encode("Hello world"), ElementsAre(19556, 905));
  EXPECT_THAT(t.Encode("The quick brown fox jumps over the lazy dog."),
              ElementsAre(504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30));
  EXPECT_THAT(t.Encode("It's 2024: 3.14 apples!"),
              ElementsAre(1589, 506, 216, 34, 32, 34, 36, 42, 216, 35, 30, 33, 36, 13855, 17));
  EXPECT_THAT(t.Encode("<|im_start|>user\nHi there<|im_end|>\n"),
              ElementsAre(1, 4093, 198, 26843, 665, 2, 198));
  EXPECT_THAT(t.Encode("Привет, мир! 日本語"),
              ElementsAre(155, 249, 46879, 16464, 32547, 28, 41337, 7872, 9175, 17, 17097, 241, 115,
                          40993, 179, 120, 248));
  EXPECT_THAT(t.Encode("  indented\tcode();\n\n"),
              ElementsAre(216, 641, 6574, 197, 4635, 35040, 1116));

  const std::string paragraph =
      "This program is free software: you can redistribute it and/or modify it under the "
      "terms of the GNU General Public License as published by the Free Software "
      "Foundation, either version 3 of the License, or (at your option) any later version.\n\n"
      "  for (int i = 0; i < n; ++i) { sum += x[i] * 2.5e-3; }  // naïve — “quoted” 😀\n";
  const std::vector<int32_t> ids = t.Encode(paragraph);
  EXPECT_LT(ids.size(), paragraph.size() / 2);
  EXPECT_EQ(t.Decode(ids), paragraph);
}

}  // namespace
}  // namespace icecache::model
