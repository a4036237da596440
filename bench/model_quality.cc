// End-to-end quality of IceCache on a real model (SmolLM2-135M-Instruct) and real long texts,
// against full attention and the baselines, all in one run:
//
//   1. For each text: a prompt of --prompt_tokens tokens, prefilled once with full attention,
//      then a teacher-forced continuation of --continuation tokens decoded by every method at
//      every budget from the same prompt KV: perplexity of the continuation (and its ratio to
//      full attention's), top-1 next-token agreement with full attention, and attention recall
//      per layer (softmax mass on the attended positions, every query head and step); the
//      same per --segment_tokens segment of the continuation (a long continuation's later
//      tokens select from pages the index built by inserts, not at the prompt's build).
//      Methods: IceCache through the real daemon (libicecache_client, CPU or CUDA mode), the
//      DCI tree replayed in process (paper configuration and all options), the Quest-style
//      and StreamingLLM baselines, and the oracles; each under the same sink + window + pages
//      split, the first --full_kv_layers layers whole.
//   2. Passkey retrieval: a number hidden at several depths of long real texts of different
//      kinds (--passkey_texts), asked for at the end; every method's answer at every
//      (haystack, depth), against full attention's.
//   3. Optionally (--trace_dir) the full run's post-RoPE keys, values and continuation queries
//      as ICTRACE1 files for the index benchmarks (index_quality --trace=...).
//
//   build/bench/model_quality --model=$(scripts/fetch_model.sh) [--quick] [--out=DIR]
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "bench/bench_output.h"
#include "common/flags_compat.h"
#include "eval/local_daemon.h"
#include "eval/trace.h"
#include "icecache/client.h"
#include "model/attention.h"
#include "model/blas.h"
#include "model/capture.h"
#include "model/llama.h"
#include "model/texts.h"
#include "selection/index_factory.h"

ABSL_FLAG(std::string, model, "", "GGUF model file (scripts/fetch_model.sh prints its path).");
ABSL_FLAG(std::string, texts, "bible,cpp-annotations,jargon,debian-policy,python-asyncio",
          "Texts for perplexity and recall (model/texts.h: prose, a programming book, a "
          "glossary, a reference manual, source code).");
ABSL_FLAG(uint32_t, prompt_tokens, 7936, "Prompt tokens per text (the model's context is 8192).");
ABSL_FLAG(uint32_t, continuation, 128, "Teacher-forced continuation tokens per text.");
ABSL_FLAG(uint32_t, segment_tokens, 128,
          "Also report each method's perplexity ratio and recall over consecutive segments of "
          "this many continuation tokens (model_quality_by_segment.csv), to follow quality "
          "along a long continuation whose tokens the index took in as inserts; 0: off.");
ABSL_FLAG(std::string, budgets, "64,128,256,512", "Token budgets.");
ABSL_FLAG(uint32_t, full_kv_layers, 2, "First layers kept whole (as in the paper).");
ABSL_FLAG(std::string, service_presets, "fast,paper",
          "Index presets of the icecached runs (--index-preset): the daemon's default (fast) "
          "and paper, the reference.");
ABSL_FLAG(std::string, drift_thresholds, "",
          "Also replay the default preset one step ahead in process with each of these drift "
          "thresholds (icecache-dci-async-t<T>), beside the client's default threshold.");
ABSL_FLAG(std::string, service_modes, "sync,async",
          "Selection modes of the service runs (SequenceOptions::selection): the client's "
          "default keeps the plain name, the other gets a -sync / -async suffix.");
ABSL_FLAG(std::string, tail_modes, "mean,mean-var",
          "Also replay the default preset with each of these tail estimations "
          "(icecache-dci-default-tail-<mode>; selection/tail.h).");
ABSL_FLAG(std::string, windows, "",
          "Also replay the default preset with the tail estimate (mean-var) and each of these "
          "recent windows (icecache-dci-hybrid-w<W>: the StreamingLLM + pages hybrid; budgets "
          "too small for a window skip it).");
ABSL_FLAG(std::string, rerank, "",
          "Also replay the default preset with the tail estimate (mean-var) and each of these "
          "DciOptions::rerank_extra_pages (icecache-dci-rerank<N>; 0: the default preset without "
          "re-ranking, icecache-dci-default-no-rerank).");
ABSL_FLAG(std::string, rescore, "",
          "Also replay the default preset with the tail estimate (mean-var) and each of these "
          "DciOptions::rescore_tokens, the keys each query rescores exactly after the sketches "
          "(icecache-dci-rescore<N>; the default preset's is 64).");
ABSL_FLAG(std::string, slacks, "",
          "Also replay the default preset with the tail estimate (mean-var) and each of these "
          "DciOptions::cell_bound_slack of its best-first search (icecache-dci-slack<S>; 1 is "
          "the valid bound, the default preset's is below it).");
ABSL_FLAG(std::string, page_orders, "",
          "Also replay the default preset with the tail estimate (mean-var) and each of these "
          "page orders (DciOptions::page_order; icecache-dci-<order>-pages): projection (the "
          "paper's slices along one direction, the default before clustered) or clustered.");
ABSL_FLAG(std::string, summary_types, "",
          "Also replay the default preset with the tail estimate (mean-var) and its page "
          "summaries in each of these types (icecache-dci-summaries-<type>): fp32, or fp16 / "
          "bf16 rounded as icecached stores them (in the KV's type).");
ABSL_FLAG(std::string, head_budgets, "",
          "Comma-separated adaptive splits of a layer's pages between its KV heads, each run on "
          "the default preset with the MEAN_VAR tail (icecache-dci-heads-<name>): observed (the "
          "previous step's attention outside sink and window), oracle (this step's exact "
          "attention), observed-layers (pages moved between layers), observed-all (between every "
          "(layer, KV head) pair).");
ABSL_FLAG(
    std::string, splits, "default",
    "Comma-separated splits of each budget, every method run under each: 'default' (the "
    "daemon's: pages of 4 tokens, a sink of 8 and a window of 16 at every budget; rows named "
    "<method>), 'paper' (the paper's: 2 sink + 2 window pages of 16, 1 + 1 below 128; rows named "
    "<method>-paper-split) or page:sink:window in tokens, e.g. 16:16:32 (rows named "
    "<method>-p<page>s<sink>w<window>).");
ABSL_FLAG(std::string, methods, "",
          "Only these in-process methods, by name (empty: all; full attention always runs).");
ABSL_FLAG(
    bool, service_without_tail, true,
    "Also run the default preset's service with no tail estimate (icecache-service-no-tail).");
ABSL_FLAG(bool, service, true, "Also run IceCache through a real icecached.");
ABSL_FLAG(std::string, passkey_texts, "bible,python-asyncio",
          "Haystacks of the passkey runs, every method at every depth of each (empty: skip).");
ABSL_FLAG(std::string, passkey_budgets, "",
          "Budgets of the passkey runs (empty: every --budgets value).");
ABSL_FLAG(uint32_t, passkey_tokens, 4000, "Haystack tokens of the passkey runs.");
ABSL_FLAG(std::string, depths, "0.1,0.3,0.5,0.7,0.9", "Depths of the passkey.");
ABSL_FLAG(bool, quick, false,
          "One text, 2048-token prompt, budgets 128 and 256, 3 depths, 1500-token haystacks.");
ABSL_FLAG(std::string, trace_dir, "", "Write each text's full run as an ICTRACE1 trace here.");
ABSL_FLAG(std::string, out, "bench/results", "Directory for JSON/CSV results.");

namespace {

using namespace icecache;
using namespace icecache::model;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

void Check(const absl::Status& s, const std::string& what) {
  if (!s.ok()) {
    std::fprintf(stderr, "\nmodel_quality: %s: %s\n", what.c_str(), s.ToString().c_str());
    std::exit(1);
  }
}

std::vector<double> ParseList(const std::string& s) {
  std::vector<double> out;
  for (absl::string_view part : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    double v = 0;
    if (!absl::SimpleAtod(part, &v)) Check(absl::InvalidArgumentError(std::string(part)), "list");
    out.push_back(v);
  }
  return out;
}

// The values of a list flag (`flag` names it, e.g. "--rerank"), each a whole number of `unit`
// in [lo, hi]; exits with the reason at the first that is not.
std::vector<uint32_t> WholeNumbers(absl::string_view flag, const std::string& list, uint32_t lo,
                                   uint32_t hi, absl::string_view unit) {
  std::vector<uint32_t> out;
  for (double v : ParseList(list)) {
    if (!(v >= lo && v <= hi && v == std::floor(v))) {
      Check(absl::InvalidArgumentError(absl::StrCat(flag, ": ", v, " is not a whole number of ",
                                                    unit, " in [", lo, ", ", hi, "]")),
            std::string(flag));
    }
    out.push_back(static_cast<uint32_t>(v));
  }
  return out;
}

// The selection methods replayed in process.
std::vector<eval::MethodSpec> Methods() {
  std::vector<eval::MethodSpec> m = eval::DefaultMethods();
  absl::StatusOr<eval::MethodSpec> tuned =
      eval::PresetMethod("icecache-dci-tuned", std::string(selection::kTunedPreset));
  Check(tuned.status(), "tuned preset");
  m.insert(m.begin() + 1, *tuned);
  // The daemon's default preset, synchronous: the pair of the one-step-ahead replays below.
  absl::StatusOr<eval::MethodSpec> fast =
      eval::PresetMethod("icecache-dci-default", std::string(selection::kDefaultPreset));
  Check(fast.status(), "default preset");
  m.insert(m.begin() + 2, *fast);
  // The daemon's default preset replayed one step ahead (SelectionMode::kAsync's policy).
  absl::StatusOr<eval::MethodSpec> async =
      eval::PresetMethod("icecache-dci-async", std::string(selection::kDefaultPreset));
  Check(async.status(), "default preset");
  async->replay.async = true;
  async->replay.drift_threshold = SequenceOptions{}.drift_threshold;
  m.insert(m.begin() + 3, *async);
  size_t at = 4;
  for (double t : ParseList(absl::GetFlag(FLAGS_drift_thresholds))) {
    eval::MethodSpec sweep = *async;
    sweep.name = absl::StrCat("icecache-dci-async-t", t);
    sweep.replay.drift_threshold = static_cast<float>(t);
    m.insert(m.begin() + static_cast<ptrdiff_t>(at++), sweep);
  }
  // Tail estimation (selection/tail.h) on the default preset, alone, per mode.
  for (absl::string_view t :
       absl::StrSplit(absl::GetFlag(FLAGS_tail_modes), ',', absl::SkipEmpty())) {
    absl::StatusOr<selection::TailMode> mode = selection::ParseTailMode(std::string(t));
    Check(mode.status(), "--tail_modes");
    eval::MethodSpec with_tail = *fast;
    with_tail.name = absl::StrCat("icecache-dci-default-tail-", t);
    with_tail.tail = *mode;
    m.insert(m.begin() + static_cast<ptrdiff_t>(at++), with_tail);
  }
  // The StreamingLLM + pages hybrid: a longer recent window, fewer pages, the tail estimated.
  for (double w : ParseList(absl::GetFlag(FLAGS_windows))) {
    const uint32_t page = selection::BudgetDefaults::kPageSize;
    if (!(w >= page && w <= selection::kMaxBudgetTokens && w == std::floor(w)) ||
        static_cast<uint32_t>(w) % page != 0) {
      Check(absl::InvalidArgumentError(absl::StrCat(
                "--windows: ", w, " is not a positive multiple of the page size ", page)),
            "--windows");
    }
    eval::MethodSpec hybrid = *fast;
    hybrid.name = absl::StrCat("icecache-dci-hybrid-w", w);
    hybrid.tail = selection::TailMode::kMeanVariance;
    hybrid.window_tokens = static_cast<uint32_t>(w);
    m.insert(m.begin() + static_cast<ptrdiff_t>(at++), hybrid);
  }
  for (uint32_t r : WholeNumbers("--rerank", absl::GetFlag(FLAGS_rerank), 0, 4096, "pages")) {
    eval::MethodSpec rerank = *fast;
    rerank.name = r == 0 ? std::string("icecache-dci-default-no-rerank")
                         : absl::StrCat("icecache-dci-rerank", r);
    rerank.tail = selection::TailMode::kMeanVariance;
    rerank.dci.rerank_extra_pages = r;
    m.insert(m.begin() + static_cast<ptrdiff_t>(at++), rerank);
  }
  for (uint32_t r : WholeNumbers("--rescore", absl::GetFlag(FLAGS_rescore), 1, 65536, "keys")) {
    eval::MethodSpec rescore = *fast;
    rescore.name = absl::StrCat("icecache-dci-rescore", r);
    rescore.tail = selection::TailMode::kMeanVariance;
    rescore.dci.rescore_tokens = r;
    m.insert(m.begin() + static_cast<ptrdiff_t>(at++), rescore);
  }
  for (double sl : ParseList(absl::GetFlag(FLAGS_slacks))) {
    if (!(sl > 0 && sl <= 4)) {
      Check(absl::InvalidArgumentError(absl::StrCat("--slacks: ", sl, " is not in (0, 4]")),
            "--slacks");
    }
    eval::MethodSpec slack = *fast;
    slack.name = absl::StrCat("icecache-dci-slack", sl);
    slack.tail = selection::TailMode::kMeanVariance;
    slack.dci.cell_bound_slack = static_cast<float>(sl);
    m.insert(m.begin() + static_cast<ptrdiff_t>(at++), slack);
  }
  for (absl::string_view order :
       absl::StrSplit(absl::GetFlag(FLAGS_page_orders), ',', absl::SkipEmpty())) {
    eval::MethodSpec pages = *fast;
    pages.tail = selection::TailMode::kMeanVariance;
    const auto parsed = selection::ParsePageOrder(order);
    Check(parsed.status(), "--page_orders");
    pages.dci.page_order = *parsed;
    pages.name = absl::StrCat("icecache-dci-", order, "-pages");
    m.insert(m.begin() + static_cast<ptrdiff_t>(at++), pages);
  }
  for (absl::string_view type :
       absl::StrSplit(absl::GetFlag(FLAGS_summary_types), ',', absl::SkipEmpty())) {
    eval::MethodSpec summaries = *fast;
    summaries.tail = selection::TailMode::kMeanVariance;
    if (type == "fp16") {
      summaries.summary_type = DType::kFP16;
    } else if (type == "bf16") {
      summaries.summary_type = DType::kBF16;
    } else if (type != "fp32") {
      Check(absl::InvalidArgumentError(
                absl::StrCat("unknown summary type '", type, "' (known: fp32, fp16, bf16)")),
            "--summary_types");
    }
    summaries.name = absl::StrCat("icecache-dci-summaries-", type);
    m.insert(m.begin() + static_cast<ptrdiff_t>(at++), summaries);
  }
  for (absl::string_view b :
       absl::StrSplit(absl::GetFlag(FLAGS_head_budgets), ',', absl::SkipEmpty())) {
    eval::MethodSpec heads = *fast;
    heads.tail = selection::TailMode::kMeanVariance;
    const eval::HeadBudget adaptive[] = {eval::HeadBudget::kObserved, eval::HeadBudget::kOracle,
                                         eval::HeadBudget::kObservedLayers,
                                         eval::HeadBudget::kObservedAll};
    std::vector<std::string> known;
    for (eval::HeadBudget a : adaptive) {
      known.emplace_back(eval::HeadBudgetName(a));
      if (known.back() == b) heads.head_budget = a;
    }
    if (heads.head_budget == eval::HeadBudget::kFixed) {
      Check(absl::InvalidArgumentError(absl::StrCat("--head_budgets: unknown split '", b,
                                                    "' (known: ", absl::StrJoin(known, ", "), ")")),
            "--head_budgets");
    }
    heads.name = absl::StrCat("icecache-dci-heads-", b);
    m.insert(m.begin() + static_cast<ptrdiff_t>(at++), heads);
  }
  // --methods: keep only the named in-process methods (empty: all).
  const std::vector<std::string> keep =
      absl::StrSplit(absl::GetFlag(FLAGS_methods), ',', absl::SkipEmpty());
  if (!keep.empty()) {
    std::erase_if(m, [&](const eval::MethodSpec& spec) {
      return std::find(keep.begin(), keep.end(), spec.name) == keep.end();
    });
  }
  return m;
}

// Hands the prompt's K/V kept by `full` (positions [0, n)) to `backend`.
void LoadPromptFrom(const FullAttention& full, const LlamaConfig& c, uint32_t n,
                    AttentionBackend* backend) {
  const uint32_t d = c.head_dim;
  std::vector<float> k(uint64_t{n} * c.kv_dim()), v(k.size());
  for (uint32_t l = 0; l < c.n_layers; ++l) {
    for (uint32_t h = 0; h < c.n_kv_heads; ++h) {
      const float* ks = full.kv().k(l, h);
      const float* vs = full.kv().v(l, h);
      for (uint32_t t = 0; t < n; ++t) {
        std::copy_n(ks + uint64_t{t} * d, d, &k[(uint64_t{t} * c.n_kv_heads + h) * d]);
        std::copy_n(vs + uint64_t{t} * d, d, &v[(uint64_t{t} * c.n_kv_heads + h) * d]);
      }
    }
    Check(backend->LoadPrompt(l, k.data(), v.data(), n), "load prompt");
  }
}

struct ContinuationResult {
  std::vector<double> nll_steps;  // per continuation token
  double Nll() const {            // of the whole continuation
    double sum = 0;
    for (double x : nll_steps) sum += x;
    return sum;
  }
  uint32_t agree = 0;
  std::vector<int32_t> argmax;
};

// Teacher-forced continuation: tokens[prompt..prompt+count) decoded one by one.
ContinuationResult Continue(const LlamaModel& model, AttentionBackend* attention,
                            std::vector<float> logits, const std::vector<int32_t>& tokens,
                            uint32_t prompt, uint32_t count,
                            const std::vector<int32_t>* reference) {
  ContinuationResult r;
  for (uint32_t i = 0; i < count; ++i) {
    const int32_t next = tokens[prompt + i];
    r.nll_steps.push_back(-TokenLogProb(logits.data(), static_cast<uint32_t>(logits.size()), next));
    r.argmax.push_back(ArgmaxToken(logits));
    if (reference != nullptr && r.argmax.back() == (*reference)[i]) ++r.agree;
    if (i + 1 < count) Check(model.Decode(next, prompt + i, attention, &logits), "decode");
    if (count >= 1024 && (i + 1) % 256 == 0) {  // long continuations show their progress
      std::printf("\r  decoded %u/%u", i + 1, count);
      std::fflush(stdout);
    }
  }
  if (count >= 1024) std::printf("\r");
  return r;
}

std::string GreedyAnswer(const LlamaModel& model, AttentionBackend* attention,
                         std::vector<float> logits, uint32_t pos, uint32_t max_new) {
  std::string text;
  for (uint32_t i = 0; i < max_new; ++i) {
    const int32_t next = ArgmaxToken(logits);
    if (next == model.tokenizer().eos_id()) break;
    text += model.tokenizer().TokenText(next);
    Check(model.Decode(next, pos + i, attention, &logits), "decode");
  }
  return text;
}

struct QualityRow {
  std::string text, method;
  uint32_t budget = 0;
  double ppl = 0, ppl_ratio = 0, top1 = 0, recall = 0;
  std::vector<double> recall_by_layer;
  // Per --segment_tokens segment of the continuation: the perplexity ratio over its tokens and
  // the recall of the decode steps that predicted them (positions prompt + i - 1).
  std::vector<double> segment_ppl_ratio, segment_recall;
  double seconds = 0;
};

struct PasskeyRow {
  std::string haystack, method;
  uint32_t budget = 0;
  double depth = 0;
  bool correct = false;
  bool same_as_full = false;
  std::string answer;
};

// A --splits entry: "default", "paper" or "page:sink:window".
struct SplitSpec {
  enum class Rule { kDefault, kPaper, kExplicit } rule = Rule::kDefault;
  std::string name;  // the --splits entry, for messages
  uint32_t page = 0, sink = 0, window = 0;
  std::string suffix;  // appended to the method names ("" for the default split)
};

absl::StatusOr<SplitSpec> ParseSplitSpec(absl::string_view s) {
  SplitSpec spec;
  spec.name = std::string(s);
  if (s == "default") return spec;
  if (s == "paper") {
    spec.rule = SplitSpec::Rule::kPaper;
    spec.suffix = "-paper-split";
    return spec;
  }
  const std::vector<absl::string_view> parts = absl::StrSplit(s, ':');
  uint32_t v[3] = {0, 0, 0};
  if (parts.size() != 3 || !absl::SimpleAtoi(parts[0], &v[0]) ||
      !absl::SimpleAtoi(parts[1], &v[1]) || !absl::SimpleAtoi(parts[2], &v[2])) {
    return absl::InvalidArgumentError(
        absl::StrCat("--splits: '", s, "' is neither 'default', 'paper' nor page:sink:window"));
  }
  spec.rule = SplitSpec::Rule::kExplicit;
  spec.page = v[0];
  spec.sink = v[1];
  spec.window = v[2];
  spec.suffix = absl::StrCat("-p", v[0], "s", v[1], "w", v[2]);
  return spec;
}

// The split of `budget` under `spec`, validated (selection::ValidateSplit) whatever its rule:
// a budget too small for the default or the paper's split is refused as an explicit one is.
absl::StatusOr<selection::BudgetSplit> SplitFor(const SplitSpec& spec, uint32_t budget) {
  selection::BudgetSplit split;
  switch (spec.rule) {
    case SplitSpec::Rule::kDefault:
      split = selection::DefaultSplit(budget);
      break;
    case SplitSpec::Rule::kPaper:
      split = selection::PaperSplit(budget);
      break;
    case SplitSpec::Rule::kExplicit:
      split = {budget, spec.sink, spec.window, spec.page};
      break;
  }
  absl::Status s = selection::ValidateSplit(split);
  if (!s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--splits ", spec.name, " at budget ", budget, ": ", s.message()));
  }
  return split;
}

std::vector<double> RecallByLayer(const SelectionStats& s, uint32_t layers) {
  std::vector<double> out(layers, 0.0);
  for (uint32_t l = 0; l < layers && l < s.recall_sum.size(); ++l) {
    out[l] = s.recall_count[l] ? s.recall_sum[l] / s.recall_count[l] : 0.0;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  EnsureBlasKernel(argc, argv);
  std::vector<std::string> args = NormalizeFlagNames(argc, argv);
  std::vector<char*> ptrs = ArgvPointers(args);
  absl::ParseCommandLine(static_cast<int>(args.size()), ptrs.data());
  icecache::bench::PrepareOutDir(absl::GetFlag(FLAGS_out), "model_quality");
  const bool quick = absl::GetFlag(FLAGS_quick);
  std::vector<std::string> texts =
      absl::StrSplit(absl::GetFlag(FLAGS_texts), ',', absl::SkipEmpty());
  uint32_t prompt_tokens = absl::GetFlag(FLAGS_prompt_tokens);
  uint32_t continuation = absl::GetFlag(FLAGS_continuation);
  const uint32_t segment_tokens = absl::GetFlag(FLAGS_segment_tokens);
  std::vector<double> budgets = ParseList(absl::GetFlag(FLAGS_budgets));
  std::vector<double> depths = ParseList(absl::GetFlag(FLAGS_depths));
  std::vector<double> passkey_budgets = ParseList(absl::GetFlag(FLAGS_passkey_budgets));
  uint32_t passkey_tokens = absl::GetFlag(FLAGS_passkey_tokens);
  if (quick) {
    texts.resize(1);
    prompt_tokens = 2048;
    continuation = 48;
    budgets = {128, 256};
    passkey_budgets.clear();
    depths = {0.2, 0.5, 0.8};
    passkey_tokens = 1500;
  }
  if (passkey_budgets.empty()) passkey_budgets = budgets;
  // Every split at every budget is checked before the model loads.
  std::vector<SplitSpec> splits;
  for (absl::string_view part :
       absl::StrSplit(absl::GetFlag(FLAGS_splits), ',', absl::SkipEmpty())) {
    absl::StatusOr<SplitSpec> spec = ParseSplitSpec(part);
    Check(spec.status(), "--splits");
    for (const std::vector<double>* list : {&budgets, &passkey_budgets}) {
      for (double b : *list) Check(SplitFor(*spec, static_cast<uint32_t>(b)).status(), "--splits");
    }
    splits.push_back(*spec);
  }
  if (splits.empty()) Check(absl::InvalidArgumentError("--splits: empty"), "--splits");
  const uint32_t full_kv_layers = absl::GetFlag(FLAGS_full_kv_layers);
  const std::string out_dir = absl::GetFlag(FLAGS_out);
  const auto start = Clock::now();
  // The passkey haystacks, loaded now so that a missing package stops the run before the long
  // perplexity part rather than after it.
  std::vector<std::pair<std::string, std::string>> haystacks;
  for (absl::string_view name :
       absl::StrSplit(absl::GetFlag(FLAGS_passkey_texts), ',', absl::SkipEmpty())) {
    absl::StatusOr<std::string> hay = LoadText(std::string(name));
    Check(hay.status(), absl::StrCat("passkey text ", name));
    haystacks.emplace_back(std::string(name), std::move(*hay));
  }

  // The in-process methods, their flags checked before anything is loaded.
  const std::vector<eval::MethodSpec> methods = Methods();
  auto model_or = LlamaModel::LoadFile(absl::GetFlag(FLAGS_model));
  Check(model_or.status(), "loading the model");
  LlamaModel& model = **model_or;
  const LlamaConfig& c = model.config();
  std::printf("model_quality: %s (%u layers, %u/%u heads), %s, %ld cores\n", c.name.c_str(),
              c.n_layers, c.n_heads, c.n_kv_heads, BlasDescription().c_str(),
              ::sysconf(_SC_NPROCESSORS_ONLN));

  // One real icecached per index preset: the default preset reports as icecache-service, the
  // others as icecache-service-<preset>.
  // One real icecached per index preset, and per selection mode a service row: the default
  // preset in the client's default mode reports as icecache-service, the others as
  // icecache-service[-<preset>][-<mode>].
  struct Daemon {
    std::unique_ptr<eval::LocalDaemon> daemon;
    std::unique_ptr<Client> client;
  };
  struct Service {
    std::string name;
    Client* client = nullptr;
    SelectionMode mode = SelectionMode::kSync;
    std::optional<TailEstimate> tail;  // unset: the daemon's default
  };
  std::vector<Daemon> daemons;
  std::vector<Service> services;
  if (absl::GetFlag(FLAGS_service)) {
    std::vector<SelectionMode> modes;
    for (absl::string_view m :
         absl::StrSplit(absl::GetFlag(FLAGS_service_modes), ',', absl::SkipEmpty())) {
      if (m != "sync" && m != "async") Check(absl::InvalidArgumentError(std::string(m)), "modes");
      modes.push_back(m == "async" ? SelectionMode::kAsync : SelectionMode::kSync);
    }
    const SelectionMode default_mode = SequenceOptions{}.selection;
    for (absl::string_view preset :
         absl::StrSplit(absl::GetFlag(FLAGS_service_presets), ',', absl::SkipEmpty())) {
      // The daemon's default preset runs with no preset flag: what a user gets out of the box.
      const bool is_default = preset == selection::kDefaultPreset;
      Check(selection::Preset(preset).status(), "--service_presets");
      std::vector<std::string> flags = {"--memory-limit=8GiB"};
      if (!is_default) flags.push_back(absl::StrCat("--index-preset=", preset));
      auto started =
          eval::LocalDaemon::Start(eval::IcecachedPath(ICECACHE_BENCH_ICECACHED_BIN), flags);
      Check(started.status(), absl::StrCat("start the icecached of preset ", preset));
      Daemon d;
      d.daemon = std::move(*started);
      ClientOptions co;
      co.socket = d.daemon->socket();
      auto cl = Client::Attach(co);
      Check(cl.status(), absl::StrCat("attach to the icecached of preset ", preset));
      d.client = std::move(*cl);
      std::printf("  icecached (index preset %s) started; client in %s mode\n",
                  std::string(preset).c_str(), ExecutionModeName(d.client->mode()));
      // The paper preset runs the paper's attention (no tail estimate), as the reference.
      const std::optional<TailEstimate> tail =
          preset == selection::kPaperPreset ? std::optional<TailEstimate>(TailEstimate::kNone)
                                            : std::nullopt;
      for (SelectionMode mode : modes) {
        std::string name =
            is_default ? "icecache-service" : absl::StrCat("icecache-service-", preset);
        if (mode != default_mode) absl::StrAppend(&name, "-", SelectionModeName(mode));
        services.push_back({name, d.client.get(), mode, tail});
      }
      if (is_default && absl::GetFlag(FLAGS_service_without_tail)) {
        // The default preset without the tail estimate: what the estimate adds, in the service.
        services.push_back(
            {"icecache-service-no-tail", d.client.get(), default_mode, TailEstimate::kNone});
      }
      daemons.push_back(std::move(d));
    }
  }
  std::vector<QualityRow> rows;

  // ---- 1. perplexity, agreement and recall per text
  for (const std::string& name : texts) {
    absl::StatusOr<std::string> text = LoadText(name);
    Check(text.status(), "text " + name);
    std::vector<int32_t> tokens = model.tokenizer().Encode(*text, false);
    if (tokens.size() < prompt_tokens + continuation) {
      Check(absl::InvalidArgumentError(absl::StrCat(name, " has only ", tokens.size(), " tokens")),
            "text");
    }
    tokens.resize(prompt_tokens + continuation);
    const uint32_t total = prompt_tokens + continuation;
    std::printf("== %s: %u prompt tokens + %u continuation\n", name.c_str(), prompt_tokens,
                continuation);
    std::fflush(stdout);
    FullAttention full(c, total);
    std::vector<uint32_t> query_positions;
    for (uint32_t i = 0; i < continuation; ++i) query_positions.push_back(prompt_tokens + i);
    TraceCapture capture(
        c, total, query_positions,
        absl::StrCat(c.name, " on ", name, ": ", prompt_tokens, " prompt tokens, queries of the ",
                     continuation, " continuation positions"));
    const std::string trace_dir = absl::GetFlag(FLAGS_trace_dir);
    if (!trace_dir.empty()) model.set_observer(capture.Observer());
    std::vector<float> logits;
    auto t = Clock::now();
    const std::vector<int32_t> prompt(tokens.begin(), tokens.begin() + prompt_tokens);
    Check(model.Prefill(prompt, &full, &logits, false,
                        [&](uint32_t l) {
                          std::printf("\r  prefill: layer %u/%u, %.0f s", l + 1, c.n_layers,
                                      Seconds(t));
                          std::fflush(stdout);
                        }),
          "prefill");
    std::printf("\n");
    const std::vector<float> prompt_logits = logits;
    t = Clock::now();
    ContinuationResult ref =
        Continue(model, &full, prompt_logits, tokens, prompt_tokens, continuation, nullptr);
    // The continuation's last token was not decoded (its logits are unused); decode it so that
    // the trace holds every continuation query.
    if (!trace_dir.empty()) {
      std::vector<float> tail;
      Check(model.Decode(tokens[total - 1], total - 1, &full, &tail), "decode");
      model.set_observer(nullptr);
      const std::string path = absl::StrCat(trace_dir, "/", name, ".ictrace");
      Check(eval::WriteTrace(capture.trace(), path), "writing the trace");
      std::printf("  trace: %s\n", path.c_str());
    }
    const double full_ppl = std::exp(ref.Nll() / continuation);
    std::printf("  %-28s %6s  ppl %8.3f  (%.1f s)\n", "full attention", "-", full_ppl, Seconds(t));
    rows.push_back({name, "full", 0, full_ppl, 1.0, 1.0, 1.0, {}, {}, {}, Seconds(t)});

    auto report = [&](const std::string& method, uint32_t budget, const ContinuationResult& r,
                      const SelectionStats& stats, double seconds) {
      QualityRow row;
      row.text = name;
      row.method = method;
      row.budget = budget;
      row.ppl = std::exp(r.Nll() / continuation);
      row.ppl_ratio = row.ppl / full_ppl;
      row.top1 = static_cast<double>(r.agree) / continuation;
      row.recall = stats.MeanRecall(full_kv_layers);
      row.recall_by_layer = RecallByLayer(stats, c.n_layers);
      for (uint32_t b = 0; segment_tokens > 0 && b < continuation; b += segment_tokens) {
        const uint32_t e = std::min(continuation, b + segment_tokens);
        double nll = 0, ref_nll = 0;
        for (uint32_t i = b; i < e; ++i) {
          nll += r.nll_steps[i];
          ref_nll += ref.nll_steps[i];
        }
        row.segment_ppl_ratio.push_back(std::exp((nll - ref_nll) / (e - b)));
        // Token i is predicted by the decode of position prompt + i - 1 (token 0 by the
        // prompt's last row, which every method computes with full attention).
        row.segment_recall.push_back(stats.MeanRecallAt(
            full_kv_layers, prompt_tokens + (b == 0 ? 0 : b - 1), prompt_tokens + e - 1));
      }
      row.seconds = seconds;
      std::printf("  %-28s %6u  ppl %8.3f  ratio %.4f  top-1 %.3f  recall %.3f  (%.1f s)\n",
                  method.c_str(), budget, row.ppl, row.ppl_ratio, row.top1, row.recall, seconds);
      std::fflush(stdout);
      rows.push_back(row);
    };
    for (double b : budgets) {
      for (const SplitSpec& spec : splits) {
        const selection::BudgetSplit split = *SplitFor(spec, static_cast<uint32_t>(b));
        for (Service& svc : services) {
          t = Clock::now();
          SequenceOptions so = SequenceOptionsFor(c, total, split, full_kv_layers);
          so.selection = svc.mode;
          so.tail_estimate = svc.tail;
          auto seq = svc.client->CreateSequence(so);
          Check(seq.status(), "create sequence");
          ServiceAttention service(c, seq->get(), /*measure_recall=*/true, total);
          LoadPromptFrom(full, c, prompt_tokens, &service);
          ContinuationResult r = Continue(model, &service, prompt_logits, tokens, prompt_tokens,
                                          continuation, &ref.argmax);
          report(svc.name + spec.suffix, split.budget_tokens, r, service.stats(), Seconds(t));
        }
        for (const eval::MethodSpec& m : methods) {
          absl::StatusOr<selection::BudgetSplit> msplit = eval::WithWindow(m, split);
          if (!msplit.ok()) continue;  // a window the budget cannot hold
          t = Clock::now();
          SelectiveAttention sel(c, total, m, *msplit, full_kv_layers, /*measure_recall=*/true);
          LoadPromptFrom(full, c, prompt_tokens, &sel);
          ContinuationResult r = Continue(model, &sel, prompt_logits, tokens, prompt_tokens,
                                          continuation, &ref.argmax);
          report(m.name + spec.suffix, split.budget_tokens, r, sel.stats(), Seconds(t));
        }
      }
    }
  }

  // ---- 2. passkey retrieval: every method at every (haystack, depth)
  std::vector<PasskeyRow> passkeys;
  for (const auto& h : haystacks) {
    const std::string& haystack = h.first;
    const std::string& hay = h.second;
    std::mt19937 rng(2026);  // per haystack: the same keys in each, whatever the others
    for (double depth : depths) {
      const std::string key = std::to_string(10000 + rng() % 90000);
      auto prompt = BuildPasskeyPrompt(model.tokenizer(), hay, passkey_tokens, depth, key);
      Check(prompt.status(), "passkey prompt in " + haystack);
      const uint32_t n = static_cast<uint32_t>(prompt->tokens.size());
      const uint32_t max_new = 8;
      std::printf("== passkey %s in %s at depth %.1f of %u tokens\n", key.c_str(), haystack.c_str(),
                  depth, n);
      FullAttention full(c, n + max_new);
      std::vector<float> logits;
      Check(model.Prefill(prompt->tokens, &full, &logits), "prefill");
      const std::string full_answer = GreedyAnswer(model, &full, logits, n, max_new);
      const bool full_ok = FirstNumber(full_answer) == key;
      passkeys.push_back({haystack, "full", 0, depth, full_ok, true, full_answer});
      std::printf("  %-28s %6s  %s  \"%s\"\n", "full attention", "-", full_ok ? "right" : "wrong",
                  full_answer.c_str());
      for (double b : passkey_budgets) {
        for (const SplitSpec& spec : splits) {
          const selection::BudgetSplit split = *SplitFor(spec, static_cast<uint32_t>(b));
          auto run = [&](const std::string& method, AttentionBackend* backend) {
            LoadPromptFrom(full, c, n, backend);
            const std::string answer = GreedyAnswer(model, backend, logits, n, max_new);
            const bool ok = FirstNumber(answer) == key;
            passkeys.push_back({haystack, method, split.budget_tokens, depth, ok,
                                FirstNumber(answer) == FirstNumber(full_answer), answer});
            std::printf("  %-28s %6u  %s  \"%s\"\n", method.c_str(), split.budget_tokens,
                        ok ? "right" : "wrong", answer.c_str());
            std::fflush(stdout);
          };
          for (Service& svc : services) {
            SequenceOptions so = SequenceOptionsFor(c, n + max_new, split, full_kv_layers);
            so.selection = svc.mode;
            so.tail_estimate = svc.tail;
            auto seq = svc.client->CreateSequence(so);
            Check(seq.status(), "create sequence");
            ServiceAttention service(c, seq->get(), false, n + max_new);
            run(svc.name + spec.suffix, &service);
          }
          for (const eval::MethodSpec& m : methods) {
            absl::StatusOr<selection::BudgetSplit> msplit = eval::WithWindow(m, split);
            if (!msplit.ok()) continue;  // a window the budget cannot hold
            SelectiveAttention sel(c, n + max_new, m, *msplit, full_kv_layers, false);
            run(m.name + spec.suffix, &sel);
          }
        }
      }
    }
  }

  // ---- results
  {
    std::ofstream csv(out_dir + "/model_quality.csv");
    csv << "text,method,budget,perplexity,perplexity_ratio,top1_agreement,recall,seconds\n";
    for (const QualityRow& r : rows) {
      csv << r.text << "," << r.method << "," << r.budget << "," << r.ppl << "," << r.ppl_ratio
          << "," << r.top1 << "," << r.recall << "," << r.seconds << "\n";
    }
    std::ofstream layers(out_dir + "/model_quality_by_layer.csv");
    layers << "text,method,budget,layer,recall\n";
    for (const QualityRow& r : rows) {
      for (size_t l = full_kv_layers; l < r.recall_by_layer.size(); ++l) {
        layers << r.text << "," << r.method << "," << r.budget << "," << l << ","
               << r.recall_by_layer[l] << "\n";
      }
    }
    std::ofstream seg(out_dir + "/model_quality_by_segment.csv");
    seg << "text,method,budget,first_token,end_token,perplexity_ratio,recall\n";
    for (const QualityRow& r : rows) {
      for (size_t i = 0; i < r.segment_ppl_ratio.size(); ++i) {
        const uint64_t b = i * uint64_t{segment_tokens};
        seg << r.text << "," << r.method << "," << r.budget << "," << prompt_tokens + b << ","
            << prompt_tokens + std::min<uint64_t>(continuation, b + segment_tokens) << ","
            << r.segment_ppl_ratio[i] << "," << r.segment_recall[i] << "\n";
      }
    }
    std::ofstream pk(out_dir + "/model_passkey.csv");
    pk << "haystack,method,budget,depth,correct,same_as_full\n";
    for (const PasskeyRow& r : passkeys) {
      pk << r.haystack << "," << r.method << "," << r.budget << "," << r.depth << ","
         << (r.correct ? 1 : 0) << "," << (r.same_as_full ? 1 : 0) << "\n";
    }
    icecache::bench::CloseResult(csv, out_dir + "/model_quality.csv", "model_quality");
    icecache::bench::CloseResult(layers, out_dir + "/model_quality_by_layer.csv", "model_quality");
    icecache::bench::CloseResult(pk, out_dir + "/model_passkey.csv", "model_quality");
    icecache::bench::CloseResult(seg, out_dir + "/model_quality_by_segment.csv", "model_quality");
  }
  // Summary over texts: mean per (method, budget).
  std::map<std::pair<std::string, uint32_t>, std::vector<const QualityRow*>> by;
  for (const QualityRow& r : rows) by[{r.method, r.budget}].push_back(&r);
  std::ofstream json(out_dir + "/model_quality.json");
  json << "{\n  \"model\": \"" << c.name << "\",\n  \"prompt_tokens\": " << prompt_tokens
       << ", \"continuation\": " << continuation << ", \"full_kv_layers\": " << full_kv_layers
       << ",\n  \"texts\": [";
  for (size_t i = 0; i < texts.size(); ++i) json << (i ? ", " : "") << "\"" << texts[i] << "\"";
  json << "],\n  \"passkey_tokens\": " << passkey_tokens << ", \"passkey_haystacks\": [";
  for (size_t i = 0; i < haystacks.size(); ++i) {
    json << (i ? ", " : "") << "\"" << haystacks[i].first << "\"";
  }
  json << "], \"passkey_depths\": [";
  for (size_t i = 0; i < depths.size(); ++i) json << (i ? ", " : "") << depths[i];
  json << "],\n  \"summary\": [";
  bool first = true;
  std::printf("\n%-28s %6s %10s %8s %8s\n", "method", "budget", "ppl ratio", "top-1", "recall");
  for (const auto& [key, list] : by) {
    double ratio = 0, top1 = 0, recall = 0;
    for (const QualityRow* r : list) {
      ratio += r->ppl_ratio;
      top1 += r->top1;
      recall += r->recall;
    }
    ratio /= list.size();
    top1 /= list.size();
    recall /= list.size();
    uint32_t right = 0, total = 0, same = 0;
    for (const PasskeyRow& p : passkeys) {
      if (p.method == key.first && p.budget == key.second) {
        ++total;
        right += p.correct;
        same += p.same_as_full;
      }
    }
    std::printf("%-28s %6u %10.4f %8.3f %8.3f   passkey %u/%u\n", key.first.c_str(), key.second,
                ratio, top1, recall, right, total);
    json << (first ? "" : ",") << "\n    {\"method\": \"" << key.first
         << "\", \"budget\": " << key.second << ", \"perplexity_ratio\": " << ratio
         << ", \"top1_agreement\": " << top1 << ", \"recall\": " << recall
         << ", \"passkey_correct\": " << right << ", \"passkey_total\": " << total
         << ", \"passkey_same_as_full\": " << same << "}";
    first = false;
  }
  // Every passkey answer, and per haystack a table: the answer of each method at each depth.
  json << "\n  ],\n  \"passkey\": [";
  for (size_t i = 0; i < passkeys.size(); ++i) {
    const PasskeyRow& p = passkeys[i];
    json << (i ? "," : "") << "\n    {\"haystack\": \"" << p.haystack << "\", \"method\": \""
         << p.method << "\", \"budget\": " << p.budget << ", \"depth\": " << p.depth
         << ", \"correct\": " << (p.correct ? "true" : "false")
         << ", \"same_as_full\": " << (p.same_as_full ? "true" : "false") << "}";
  }
  json << "\n  ]\n}\n";
  int width = 28;  // of the method column: the longest name
  for (const PasskeyRow& p : passkeys) width = std::max(width, static_cast<int>(p.method.size()));
  for (const auto& h : haystacks) {
    const std::string& haystack = h.first;
    std::printf("\npasskey in %s (%u haystack tokens), answers by depth\n%-*s %6s",
                haystack.c_str(), passkey_tokens, width, "method", "budget");
    for (double depth : depths) std::printf(" %6.2f", depth);
    std::printf("  right\n");
    std::vector<std::pair<std::string, uint32_t>> order;  // as run: full, then per budget
    for (const PasskeyRow& p : passkeys) {
      const std::pair<std::string, uint32_t> key{p.method, p.budget};
      if (p.haystack == haystack && std::find(order.begin(), order.end(), key) == order.end()) {
        order.push_back(key);
      }
    }
    for (const auto& [method, budget] : order) {
      std::printf("%-*s %6s", width, method.c_str(), budget ? std::to_string(budget).c_str() : "-");
      uint32_t right = 0;
      for (double depth : depths) {
        const char* answer = "";
        for (const PasskeyRow& p : passkeys) {
          if (p.haystack == haystack && p.method == method && p.budget == budget &&
              p.depth == depth) {
            answer = p.correct ? "right" : "wrong";
            right += p.correct;
          }
        }
        std::printf(" %6s", answer);
      }
      std::printf("  %u/%zu\n", right, depths.size());
    }
  }
  icecache::bench::CloseResult(json, out_dir + "/model_quality.json", "model_quality");
  std::printf(
      "\nwrote %s/model_quality.{json,csv}, model_quality_by_layer.csv, "
      "model_quality_by_segment.csv, model_passkey.csv (%.0f s)\n",
      out_dir.c_str(), Seconds(start));
  return 0;
}
