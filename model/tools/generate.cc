// icecache-generate: the model alone, for checking it works: greedy continuation of a prompt
// and perplexity on real text, full attention in process.
//
//   build/model/icecache-generate --model=FILE --prompt="Once upon a time" [--max_new=40]
//   build/model/icecache-generate --model=FILE --ppl_text=bible --ppl_tokens=1024
#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "common/flags_compat.h"
#include "model/attention.h"
#include "model/blas.h"
#include "model/llama.h"
#include "model/texts.h"

ABSL_FLAG(std::string, model, "", "GGUF file (scripts/fetch_model.sh prints its path).");
ABSL_FLAG(std::string, prompt, "", "Prompt to continue greedily.");
ABSL_FLAG(bool, chat, false, "Wrap the prompt in the model's chat format.");
ABSL_FLAG(uint32_t, max_new, 40, "Tokens to generate.");
ABSL_FLAG(std::string, ppl_text, "",
          "Text (bible, cpp-annotations, jargon, or a file) for perplexity.");
ABSL_FLAG(uint32_t, ppl_tokens, 1024, "Tokens of the text the perplexity is measured on.");

namespace {

using namespace icecache;
using namespace icecache::model;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "icecache-generate: %s\n", s.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  EnsureBlasKernel(argc, argv);
  std::vector<std::string> args = NormalizeFlagNames(argc, argv);
  std::vector<char*> ptrs = ArgvPointers(args);
  absl::ParseCommandLine(static_cast<int>(args.size()), ptrs.data());
  const std::string path = absl::GetFlag(FLAGS_model);
  if (path.empty()) return Fail(absl::InvalidArgumentError("--model is required"));
  auto t0 = Clock::now();
  auto model = LlamaModel::LoadFile(path);
  if (!model.ok()) return Fail(model.status());
  const LlamaConfig& c = (*model)->config();
  std::printf(
      "%s: %u layers, d %u, %u heads / %u KV heads of %u, FFN %u, vocab %u, RoPE %.0f "
      "(loaded in %.1f s; %s)\n",
      c.name.c_str(), c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn, c.vocab,
      c.rope_base, Seconds(t0), BlasDescription().c_str());
  const Tokenizer& tok = (*model)->tokenizer();

  if (!absl::GetFlag(FLAGS_prompt).empty()) {
    std::string text = absl::GetFlag(FLAGS_prompt);
    if (absl::GetFlag(FLAGS_chat)) {
      text = "<|im_start|>user\n" + text + "<|im_end|>\n<|im_start|>assistant\n";
    }
    std::vector<int32_t> ids = tok.Encode(text);
    const uint32_t max_new = absl::GetFlag(FLAGS_max_new);
    FullAttention attention(c, static_cast<uint32_t>(ids.size()) + max_new);
    std::vector<float> logits;
    t0 = Clock::now();
    absl::Status s = (*model)->Prefill(ids, &attention, &logits);
    if (!s.ok()) return Fail(s);
    const double prefill_s = Seconds(t0);
    std::printf("prompt: %zu tokens, prefill %.2f s\n%s", ids.size(), prefill_s, text.c_str());
    std::fflush(stdout);
    t0 = Clock::now();
    uint32_t generated = 0;
    for (uint32_t i = 0; i < max_new; ++i) {
      const int32_t next = ArgmaxToken(logits.data(), c.vocab);
      if (next == tok.eos_id()) break;
      std::printf("%s", tok.TokenText(next).c_str());
      std::fflush(stdout);
      ++generated;
      s = (*model)->Decode(next, static_cast<uint32_t>(ids.size()) + i, &attention, &logits);
      if (!s.ok()) return Fail(s);
    }
    std::printf("\n[%u tokens in %.2f s]\n", generated, Seconds(t0));
  }

  if (!absl::GetFlag(FLAGS_ppl_text).empty()) {
    absl::StatusOr<std::string> text = LoadText(absl::GetFlag(FLAGS_ppl_text));
    if (!text.ok()) return Fail(text.status());
    std::vector<int32_t> ids = tok.Encode(*text, false);
    const uint32_t n =
        std::min<uint32_t>(absl::GetFlag(FLAGS_ppl_tokens), static_cast<uint32_t>(ids.size()));
    ids.resize(n);
    FullAttention attention(c, n);
    std::vector<float> logits;
    t0 = Clock::now();
    absl::Status s = (*model)->Prefill(ids, &attention, &logits, /*all_logits=*/true);
    if (!s.ok()) return Fail(s);
    double nll = 0;
    for (uint32_t t = 0; t + 1 < n; ++t) {
      nll -= TokenLogProb(logits.data() + uint64_t{t} * c.vocab, c.vocab, ids[t + 1]);
    }
    std::printf("perplexity of %s over %u tokens: %.3f (%.1f s, %.0f tokens/s)\n",
                absl::GetFlag(FLAGS_ppl_text).c_str(), n, std::exp(nll / (n - 1)), Seconds(t0),
                n / Seconds(t0));
  }
  return 0;
}
