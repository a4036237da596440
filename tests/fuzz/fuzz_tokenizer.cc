// libFuzzer target: the byte-level BPE tokenizer. The first byte picks the mode:
//   even: encode the rest as text with a fixed vocabulary that holds all 256 bytes, and check
//         that decoding gives the text back (Decode(Encode(x)) == x) and every id is in range;
//   odd:  build a tokenizer from a fuzzed vocabulary, merges and special tokens (Create must
//         accept it or say INVALID_ARGUMENT), then encode and decode a fixed text with it.
#include <fuzzer/FuzzedDataProvider.h>

#include <string>
#include <vector>

#include "model/io/tokenizer.h"

namespace {

using icecache::model::Tokenizer;
using icecache::model::TokenizerSpec;
using icecache::model::TokenType;

// GPT-2's byte -> printable character mapping, UTF-8 encoded.
std::string ByteToken(int b) {
  int cp = b;
  if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255))) {
    int n = 0;
    for (int x = 0; x < b; ++x) {
      if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255))) ++n;
    }
    cp = 256 + n;
  }
  std::string out;
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return out;
}

TokenizerSpec BaseSpec() {
  TokenizerSpec spec;
  spec.model = "gpt2";
  spec.pre = "smollm";
  for (int b = 0; b < 256; ++b) spec.tokens.push_back(ByteToken(b));
  const std::string sp = ByteToken(' ');
  for (const char* pair : {"h e", "t he", "i n", "e r", "a n", "o n"}) spec.merges.push_back(pair);
  spec.merges.push_back(sp + " t");
  spec.merges.push_back(sp + "t he");
  for (const std::string& t :
       {std::string("he"), std::string("the"), std::string("in"), std::string("er"),
        std::string("an"), std::string("on"), sp + "t", sp + "the"}) {
    spec.tokens.push_back(t);
  }
  spec.token_types.assign(spec.tokens.size(), static_cast<int32_t>(TokenType::kNormal));
  for (const char* special : {"<|im_start|>", "<|im_end|>", "<|endoftext|>"}) {
    spec.tokens.push_back(special);
    spec.token_types.push_back(static_cast<int32_t>(TokenType::kControl));
  }
  spec.eos_id = static_cast<int32_t>(spec.tokens.size()) - 1;
  return spec;
}

const Tokenizer& Fixed() {
  static const Tokenizer* t = new Tokenizer(*Tokenizer::Create(BaseSpec()));
  return *t;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  if ((data[0] & 1) == 0) {
    const Tokenizer& t = Fixed();
    const std::string text(reinterpret_cast<const char*>(data + 1), size - 1);
    const bool special = (data[0] & 2) != 0;
    const std::vector<int32_t> ids = t.Encode(text, special);
    for (int32_t id : ids) {
      if (id < 0 || static_cast<size_t>(id) >= t.vocab_size()) ::abort();
    }
    if (t.Decode(ids) != text) ::abort();
    std::string joined;
    for (const std::string& w : t.PreTokenize(text)) joined += w;
    if (joined != text) ::abort();
    return 0;
  }
  FuzzedDataProvider in(data + 1, size - 1);
  TokenizerSpec spec;
  spec.model = in.ConsumeBool() ? "gpt2" : in.ConsumeRandomLengthString(8);
  spec.pre = in.ConsumeBool() ? "smollm" : in.ConsumeRandomLengthString(12);
  const int n = in.ConsumeIntegralInRange<int>(0, 64);
  for (int i = 0; i < n; ++i) spec.tokens.push_back(in.ConsumeRandomLengthString(12));
  const int m = in.ConsumeIntegralInRange<int>(0, 64);
  for (int i = 0; i < m; ++i) spec.merges.push_back(in.ConsumeRandomLengthString(16));
  if (in.ConsumeBool()) {
    for (size_t i = 0; i < spec.tokens.size() + in.ConsumeIntegralInRange<int>(0, 1); ++i) {
      spec.token_types.push_back(in.ConsumeIntegralInRange<int32_t>(-1, 7));
    }
  }
  spec.bos_id = in.ConsumeIntegralInRange<int32_t>(-2, 70);
  spec.eos_id = in.ConsumeIntegralInRange<int32_t>(-2, 70);
  absl::StatusOr<Tokenizer> t = Tokenizer::Create(spec);
  if (!t.ok()) {
    if (t.status().code() != absl::StatusCode::kInvalidArgument) ::abort();
    return 0;
  }
  const std::string text = in.ConsumeRemainingBytesAsString();
  const std::vector<int32_t> ids = t->Encode(text);
  for (int32_t id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= t->vocab_size()) ::abort();
  }
  (void)t->Decode(ids);
  return 0;
}
