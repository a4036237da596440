// icecache-model-reference: the C++ model path the Python tests compare the transformers
// integration with. It runs the project's own Llama forward pass (model/llama.h) on a GGUF
// model, with full attention and through IceCache (ServiceAttention: libicecache_client
// against the icecached at --socket), on token ids from the C++ tokenizer, and prints one
// JSON object on stdout:
//
//   --task=generate --ids=1,2,3 --max_new=N     greedy continuation of the ids
//       {"prompt": [...], "full": [...], "service": [...]}
//   --task=passkey --text=bible --haystack_tokens=2000 --depth=0.5 --passkey=12345 --max_new=N
//       the prompt of model/texts.h's BuildPasskeyPrompt (as the demo), then greedy tokens
//       {"prompt": [...], "passkey": "...", "full": [...], "service": [...]}
//   --task=ppl --text=bible --prompt_tokens=P --continuation=M
//       the first P + M tokens of the text; the prompt prefilled in full, the M continuation
//       tokens teacher-forced; nll of each continuation token under both
//       {"tokens": [...], "full_nll": [...], "service_nll": [...], "full_ppl": x,
//        "service_ppl": y, "ratio": y / x}
//
// --budget (default 256; the paper's split of model/attention.h) and --full_kv_layers (2)
// configure IceCache as the demo and bench/model_quality do.
#include <cmath>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/flags_compat.h"
#include "icecache/client.h"
#include "model/attention.h"
#include "model/blas.h"
#include "model/llama.h"
#include "model/texts.h"
#include "selection/budget.h"

ABSL_FLAG(std::string, model, "", "GGUF model file.");
ABSL_FLAG(std::string, socket, "", "The icecached to use (its control socket).");
ABSL_FLAG(std::string, mode, "cpu", "Client mode: cpu, cuda or auto.");
ABSL_FLAG(std::string, task, "generate", "generate, passkey or ppl.");
ABSL_FLAG(std::string, ids, "", "generate: the prompt's token ids, comma-separated.");
ABSL_FLAG(uint32_t, max_new, 16, "generate, passkey: greedy tokens to produce.");
ABSL_FLAG(std::string, text, "bible", "passkey, ppl: bible, cpp-annotations, jargon or a file.");
ABSL_FLAG(uint32_t, haystack_tokens, 2000, "passkey: tokens of text around the passkey.");
ABSL_FLAG(double, depth, 0.5, "passkey: where the passkey sits (0..1).");
ABSL_FLAG(std::string, passkey, "58213", "passkey: the number to hide.");
ABSL_FLAG(uint32_t, prompt_tokens, 1024, "ppl: prompt tokens.");
ABSL_FLAG(uint32_t, continuation, 64, "ppl: teacher-forced continuation tokens.");
ABSL_FLAG(uint32_t, budget, 256, "IceCache token budget per decode step.");
ABSL_FLAG(uint32_t, full_kv_layers, 2, "First layers that keep their whole KV cache.");

namespace {

using namespace icecache;
using namespace icecache::model;

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "icecache-model-reference: %s\n", s.ToString().c_str());
  return 1;
}

std::string Json(const std::vector<int32_t>& v) { return "[" + absl::StrJoin(v, ", ") + "]"; }

std::string Json(const std::vector<double>& v) {
  std::ostringstream o;
  o.precision(9);
  o << "[";
  for (size_t i = 0; i < v.size(); ++i) o << (i ? ", " : "") << v[i];
  return o.str() + "]";
}

// Greedy tokens from `logits` (the prefill's last position) on, decoding each at pos, pos+1...
absl::StatusOr<std::vector<int32_t>> Greedy(const LlamaModel& model, AttentionBackend* attention,
                                            std::vector<float> logits, uint32_t pos,
                                            uint32_t max_new) {
  std::vector<int32_t> out;
  for (uint32_t i = 0; i < max_new; ++i) {
    out.push_back(ArgmaxToken(logits));
    if (i + 1 == max_new) break;
    absl::Status s = model.Decode(out.back(), pos + i, attention, &logits);
    if (!s.ok()) return s;
  }
  return out;
}

// Negative log-likelihood of each of `next` (teacher-forced from `logits` at position pos).
absl::StatusOr<std::vector<double>> Nll(const LlamaModel& model, AttentionBackend* attention,
                                        std::vector<float> logits, uint32_t pos,
                                        const std::vector<int32_t>& next) {
  std::vector<double> nll;
  const uint32_t vocab = model.config().vocab;
  for (size_t i = 0; i < next.size(); ++i) {
    nll.push_back(-TokenLogProb(logits.data(), vocab, next[i]));
    if (i + 1 == next.size()) break;
    absl::Status s = model.Decode(next[i], pos + static_cast<uint32_t>(i), attention, &logits);
    if (!s.ok()) return s;
  }
  return nll;
}

double Ppl(const std::vector<double>& nll) {
  double sum = 0;
  for (double x : nll) sum += x;
  return std::exp(sum / static_cast<double>(nll.size()));
}

}  // namespace

int main(int argc, char** argv) {
  EnsureBlasKernel(argc, argv);
  std::vector<std::string> args = NormalizeFlagNames(argc, argv);
  std::vector<char*> ptrs = ArgvPointers(args);
  absl::ParseCommandLine(static_cast<int>(args.size()), ptrs.data());
  const std::string task = absl::GetFlag(FLAGS_task);

  auto model = LlamaModel::LoadFile(absl::GetFlag(FLAGS_model));
  if (!model.ok()) return Fail(model.status());
  const LlamaConfig& c = (*model)->config();
  const Tokenizer& tok = (*model)->tokenizer();

  // The token ids of the task.
  std::vector<int32_t> prompt, continuation;
  std::string passkey;
  if (task == "generate") {
    for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_ids), ',')) {
      int32_t id = 0;
      if (!absl::SimpleAtoi(part, &id)) return Fail(absl::InvalidArgumentError("bad --ids"));
      prompt.push_back(id);
    }
  } else if (task == "passkey" || task == "ppl") {
    absl::StatusOr<std::string> text = LoadText(absl::GetFlag(FLAGS_text));
    if (!text.ok()) return Fail(text.status());
    if (task == "passkey") {
      passkey = absl::GetFlag(FLAGS_passkey);
      auto p = BuildPasskeyPrompt(tok, *text, absl::GetFlag(FLAGS_haystack_tokens),
                                  absl::GetFlag(FLAGS_depth), passkey);
      if (!p.ok()) return Fail(p.status());
      prompt = p->tokens;
    } else {
      std::vector<int32_t> all = tok.Encode(*text);
      const uint32_t p = absl::GetFlag(FLAGS_prompt_tokens), m = absl::GetFlag(FLAGS_continuation);
      if (all.size() < p + m) return Fail(absl::InvalidArgumentError("text too short"));
      prompt.assign(all.begin(), all.begin() + p);
      continuation.assign(all.begin() + p, all.begin() + p + m);
    }
  } else {
    return Fail(absl::InvalidArgumentError("--task must be generate, passkey or ppl"));
  }
  if (prompt.empty()) return Fail(absl::InvalidArgumentError("empty prompt"));
  const uint32_t n = static_cast<uint32_t>(prompt.size());
  const uint32_t extra =
      task == "ppl" ? static_cast<uint32_t>(continuation.size()) : absl::GetFlag(FLAGS_max_new);

  // Full attention and IceCache, one shared prefill (as the demo).
  ClientOptions co;
  co.socket = absl::GetFlag(FLAGS_socket);
  const std::string mode = absl::GetFlag(FLAGS_mode);
  co.mode = mode == "cuda"   ? ExecutionMode::kCuda
            : mode == "auto" ? ExecutionMode::kAuto
                             : ExecutionMode::kCpu;
  auto client = Client::Attach(co);
  if (!client.ok()) return Fail(client.status());
  const selection::BudgetSplit split = selection::DefaultSplit(absl::GetFlag(FLAGS_budget));
  auto seq = (*client)->CreateSequence(SequenceOptionsFor(
      c, n + extra, split, std::min(absl::GetFlag(FLAGS_full_kv_layers), c.n_layers)));
  if (!seq.ok()) return Fail(seq.status());
  FullAttention full(c, n + extra);
  ServiceAttention service(c, seq->get(), /*measure_recall=*/false, n + extra);
  PrefillTee tee(&full, {&service});
  std::vector<float> logits;
  absl::Status s = (*model)->Prefill(prompt, &tee, &logits);
  if (!s.ok()) return Fail(s);

  if (task == "ppl") {
    auto full_nll = Nll(**model, &full, logits, n, continuation);
    if (!full_nll.ok()) return Fail(full_nll.status());
    auto service_nll = Nll(**model, &service, logits, n, continuation);
    if (!service_nll.ok()) return Fail(service_nll.status());
    std::vector<int32_t> tokens = prompt;
    tokens.insert(tokens.end(), continuation.begin(), continuation.end());
    const double fp = Ppl(*full_nll), sp = Ppl(*service_nll);
    std::printf(
        "{\"tokens\": %s, \"prompt_tokens\": %u, \"full_nll\": %s, \"service_nll\": %s, "
        "\"full_ppl\": %.6f, \"service_ppl\": %.6f, \"ratio\": %.6f}\n",
        Json(tokens).c_str(), n, Json(*full_nll).c_str(), Json(*service_nll).c_str(), fp, sp,
        sp / fp);
    return 0;
  }
  auto full_ids = Greedy(**model, &full, logits, n, extra);
  if (!full_ids.ok()) return Fail(full_ids.status());
  auto service_ids = Greedy(**model, &service, logits, n, extra);
  if (!service_ids.ok()) return Fail(service_ids.status());
  std::printf("{\"prompt\": %s, \"passkey\": \"%s\", \"full\": %s, \"service\": %s}\n",
              Json(prompt).c_str(), passkey.c_str(), Json(*full_ids).c_str(),
              Json(*service_ids).c_str());
  return 0;
}
