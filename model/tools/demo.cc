// icecache-demo: the main job end to end on an embedded default. A real model (SmolLM2-135M-
// Instruct) reads a long real text with a secret number hidden in it (passkey retrieval), then
// answers twice: with full attention over every token, and with IceCache (the prompt's KV
// cache handed to a real icecached, each decode step attending to sink + window + the pages
// the daemon selects).
//
//   build/model/icecache-demo --model=$(scripts/fetch_model.sh)
//
// Starts its own daemon unless --socket names a running one. Uses the GPU where one is usable
// (CUDA mode), the CPU otherwise, and says which.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/bytes.h"
#include "common/flags_compat.h"
#include "eval/local_daemon.h"
#include "icecache/client.h"
#include "model/attention.h"
#include "model/blas.h"
#include "model/llama.h"
#include "model/texts.h"
#include "selection/index_factory.h"

ABSL_FLAG(std::string, model, "", "GGUF model file (scripts/fetch_model.sh prints its path).");
ABSL_FLAG(std::string, text, "bible", "Haystack: bible, cpp-annotations, jargon, or a file.");
ABSL_FLAG(uint32_t, haystack_tokens, 4000, "Tokens of real text around the passkey.");
ABSL_FLAG(double, depth, 0.35, "Where the passkey sits in the text (0 = start, 1 = end).");
ABSL_FLAG(std::string, passkey, "", "The number to hide (default: random 5 digits).");
ABSL_FLAG(uint32_t, seed, 0, "Seed of the random passkey (0: from the clock).");
ABSL_FLAG(uint32_t, budget, 256, "IceCache token budget per decode step (sink + pages + window).");
ABSL_FLAG(uint32_t, full_kv_layers, 2, "First layers that keep their whole KV cache.");
ABSL_FLAG(uint32_t, max_new, 10, "Tokens to generate for each answer.");
ABSL_FLAG(std::string, mode, "auto", "Client mode: auto (GPU if usable), cpu or cuda.");
ABSL_FLAG(std::string, socket, "", "Use the icecached at this socket instead of starting one.");
ABSL_FLAG(std::string, index_preset, "",
          "Index preset of the icecached the demo starts (selection/index_factory.h: paper, "
          "tuned); empty: the daemon's default.");
ABSL_FLAG(std::string, json, "", "Also write the results to this JSON file.");
ABSL_FLAG(bool, chat, false, "Ask in the model's chat format instead of a plain completion.");

namespace {

using namespace icecache;
using namespace icecache::model;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "\nicecache-demo: %s\n", s.ToString().c_str());
  return 1;
}

std::string CpuName() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown CPU";
}

// Greedy answer: up to max_new tokens, stopping at the end of the turn or once a number has
// been written and a non-digit follows.
absl::StatusOr<std::string> Answer(const LlamaModel& model, AttentionBackend* attention,
                                   std::vector<float> logits, uint32_t pos, uint32_t max_new,
                                   double* seconds) {
  const Tokenizer& tok = model.tokenizer();
  const std::optional<int32_t> im_end = tok.FindToken("<|im_end|>");
  std::string text;
  const auto t0 = Clock::now();
  for (uint32_t i = 0; i < max_new; ++i) {
    const int32_t next = ArgmaxToken(logits);
    if (next == tok.eos_id() || (im_end && next == *im_end)) break;
    const std::string piece = tok.TokenText(next);
    const bool had_number = !FirstNumber(text).empty();
    text += piece;
    if (had_number && !piece.empty() && !std::isdigit(static_cast<unsigned char>(piece[0]))) {
      break;
    }
    absl::Status s = model.Decode(next, pos + i, attention, &logits);
    if (!s.ok()) return s;
  }
  *seconds = Seconds(t0);
  return text;
}

void ProgressBar(uint32_t done, uint32_t total, double elapsed) {
  if (!::isatty(1)) {  // a log, not a terminal: a line every few layers
    if (done % 5 == 0 || done == total) {
      std::printf("  %u/%u layers, %.0f s\n", done, total, elapsed);
      std::fflush(stdout);
    }
    return;
  }
  const int width = 30;
  const int filled = static_cast<int>(width * done / total);
  const double eta = done == 0 ? 0 : elapsed / done * (total - done);
  std::printf("\r  [%s%s] %u/%u layers, %.0f s, about %.0f s left   ",
              std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(), done,
              total, elapsed, eta);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  EnsureBlasKernel(argc, argv);
  std::vector<std::string> args = NormalizeFlagNames(argc, argv);
  std::vector<char*> ptrs = ArgvPointers(args);
  absl::ParseCommandLine(static_cast<int>(args.size()), ptrs.data());
  const auto start = Clock::now();
  if (absl::GetFlag(FLAGS_model).empty()) {
    return Fail(absl::InvalidArgumentError("--model is required (scripts/demo.sh passes it)"));
  }
  ExecutionMode mode = ExecutionMode::kAuto;
  if (absl::GetFlag(FLAGS_mode) == "cpu")
    mode = ExecutionMode::kCpu;
  else if (absl::GetFlag(FLAGS_mode) == "cuda")
    mode = ExecutionMode::kCuda;
  else if (absl::GetFlag(FLAGS_mode) != "auto") {
    return Fail(absl::InvalidArgumentError("--mode must be auto, cpu or cuda"));
  }
  const std::string preset_flag = absl::GetFlag(FLAGS_index_preset);
  const std::string preset =
      preset_flag.empty() ? std::string(selection::kDefaultPreset) : preset_flag;
  if (absl::Status p = selection::Preset(preset).status(); !p.ok()) {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--index_preset: ", p.message())));
  }

  std::printf(
      "IceCache demo: a real model reads a long real text, then answers with full "
      "attention and with IceCache.\n\n");
  std::printf("[1/6] machine: %s, %ld cores; %s\n", CpuName().c_str(),
              ::sysconf(_SC_NPROCESSORS_ONLN), BlasDescription().c_str());

  // The daemon.
  std::unique_ptr<eval::LocalDaemon> daemon;
  std::string socket = absl::GetFlag(FLAGS_socket);
  auto t = Clock::now();
  if (socket.empty()) {
    std::vector<std::string> flags = {"--memory-limit=4GiB"};
    if (!preset_flag.empty()) flags.push_back("--index-preset=" + preset_flag);
    auto started =
        eval::LocalDaemon::Start(eval::IcecachedPath(ICECACHE_DEMO_ICECACHED_BIN), flags);
    if (!started.ok()) return Fail(started.status());
    daemon = std::move(*started);
    socket = daemon->socket();
    std::printf("[2/6] started icecached at %s, index preset %s (%.2f s)\n", socket.c_str(),
                preset.c_str(), Seconds(t));
  } else {
    std::printf("[2/6] using the icecached at %s\n", socket.c_str());
  }
  ClientOptions co;
  co.socket = socket;
  co.mode = mode;
  auto client = Client::Attach(co);
  if (!client.ok()) return Fail(client.status());
  std::printf("      client attached, %s mode (%s)\n", ExecutionModeName((*client)->mode()),
              (*client)->mode() == ExecutionMode::kCuda
                  ? "sink, window and page cache on the GPU"
                  : "no usable GPU: the CUDA kernels' CPU references run the same flow");

  // The model.
  t = Clock::now();
  auto model = LlamaModel::LoadFile(absl::GetFlag(FLAGS_model));
  if (!model.ok()) return Fail(model.status());
  const LlamaConfig& c = (*model)->config();
  std::printf("[3/6] loaded %s: %u layers, %u query / %u KV heads of %u, vocab %u (%.1f s)\n",
              c.name.c_str(), c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab, Seconds(t));

  // The prompt.
  absl::StatusOr<std::string> text = LoadText(absl::GetFlag(FLAGS_text));
  if (!text.ok()) return Fail(text.status());
  std::string passkey = absl::GetFlag(FLAGS_passkey);
  if (passkey.empty()) {
    uint32_t seed = absl::GetFlag(FLAGS_seed);
    if (seed == 0) seed = static_cast<uint32_t>(Clock::now().time_since_epoch().count());
    std::mt19937 rng(seed);
    passkey = std::to_string(10000 + rng() % 90000);
  }
  auto prompt =
      BuildPasskeyPrompt((*model)->tokenizer(), *text, absl::GetFlag(FLAGS_haystack_tokens),
                         absl::GetFlag(FLAGS_depth), passkey, absl::GetFlag(FLAGS_chat));
  if (!prompt.ok()) return Fail(prompt.status());
  const uint32_t n = static_cast<uint32_t>(prompt->tokens.size());
  const uint32_t max_new = absl::GetFlag(FLAGS_max_new);
  std::printf(
      "[4/6] prompt: %u tokens of %s with the secret number %s hidden at token %u (%.0f%% "
      "deep), then the question\n",
      n, absl::GetFlag(FLAGS_text).c_str(), passkey.c_str(), prompt->needle_position,
      100.0 * prompt->needle_position / n);

  // One prefill feeds both: full attention here, and IceCache (the K/V go to the daemon,
  // which clusters them into pages and builds its index while the prefill goes on).
  const selection::BudgetSplit split = selection::DefaultSplit(absl::GetFlag(FLAGS_budget));
  const uint32_t full_kv_layers = std::min(absl::GetFlag(FLAGS_full_kv_layers), c.n_layers);
  auto seq = (*client)->CreateSequence(SequenceOptionsFor(c, n + max_new, split, full_kv_layers));
  if (!seq.ok()) return Fail(seq.status());
  FullAttention full(c, n + max_new);
  ServiceAttention icecache_attention(c, seq->get(), /*measure_recall=*/true, n + max_new);
  PrefillTee tee(&full, {&icecache_attention});
  std::printf("[5/6] prefill, %u tokens through %u layers (shared by both runs):\n", n, c.n_layers);
  t = Clock::now();
  std::vector<float> logits;
  absl::Status s = (*model)->Prefill(prompt->tokens, &tee, &logits, false, [&](uint32_t l) {
    ProgressBar(l + 1, c.n_layers, Seconds(t));
  });
  if (!s.ok()) return Fail(s);
  const double prefill_s = Seconds(t);
  std::printf("%s      %.1f s, %.0f tokens/s\n", ::isatty(1) ? "\n" : "", prefill_s, n / prefill_s);

  std::printf("[6/6] answering (greedy, up to %u tokens):\n", max_new);
  double full_s = 0, ice_s = 0;
  auto full_answer = Answer(**model, &full, logits, n, max_new, &full_s);
  if (!full_answer.ok()) return Fail(full_answer.status());
  std::printf("      full attention: \"%s\" (%.2f s)\n", full_answer->c_str(), full_s);
  auto ice_answer = Answer(**model, &icecache_attention, logits, n, max_new, &ice_s);
  if (!ice_answer.ok()) return Fail(ice_answer.status());
  std::printf("      IceCache:       \"%s\" (%.2f s, first step waits for the index build)\n",
              ice_answer->c_str(), ice_s);

  // What a user wants to know.
  const bool full_ok = FirstNumber(*full_answer) == passkey;
  const bool ice_ok = FirstNumber(*ice_answer) == passkey;
  const ResolvedGeometry& g = (*seq)->geometry();
  const uint64_t row = uint64_t{c.head_dim} * 2;  // fp16
  const uint64_t tokens = n + max_new;
  const uint64_t full_kv = uint64_t{c.n_layers} * c.n_kv_heads * tokens * row * 2;
  const uint64_t ice_kv = (*seq)->kv_device_bytes();
  const ClientCounters counters = (*client)->counters();
  std::vector<double> select_us;
  for (const DecodeBreakdown& b : icecache_attention.breakdowns()) select_us.push_back(b.select_us);
  std::sort(select_us.begin(), select_us.end());
  const double select_p50 = select_us.empty() ? 0 : select_us[select_us.size() / 2];
  const double bandwidth = counters.fetch_nanoseconds == 0
                               ? 0
                               : counters.fetched_bytes / (counters.fetch_nanoseconds * 1e-9);
  const double recall = icecache_attention.stats().MeanRecall(full_kv_layers);

  std::printf("\n  %-44s %s\n", "secret number", passkey.c_str());
  std::printf("  %-44s %s\n", "full attention answered",
              full_ok ? "correctly" : absl::StrCat("wrongly (", *full_answer, ")").c_str());
  std::printf("  %-44s %s\n", "IceCache answered",
              ice_ok ? "correctly" : absl::StrCat("wrongly (", *ice_answer, ")").c_str());
  std::printf("  %-44s %s full, %s IceCache (%.1f%%)\n", "KV cache on the accelerator side",
              FormatBytes(full_kv).c_str(), FormatBytes(ice_kv).c_str(), 100.0 * ice_kv / full_kv);
  std::printf(
      "  %-44s %u tokens per step (%u sink + %u pages of %u + %u window), first %u "
      "layers whole\n",
      "IceCache budget", g.budget_tokens, g.sink_tokens, g.selected_pages(), g.page_size,
      g.window_tokens, full_kv_layers);
  std::printf("  %-44s %.3f (%llu hits, %llu misses)\n", "page-cache hit rate", counters.hit_rate(),
              static_cast<unsigned long long>(counters.cache_hits),
              static_cast<unsigned long long>(counters.cache_misses));
  std::printf("  %-44s %s in %.2f ms (%s/s)\n", "pages fetched from the daemon's memory",
              FormatBytes(counters.fetched_bytes).c_str(), counters.fetch_nanoseconds / 1e6,
              FormatBytes(static_cast<uint64_t>(bandwidth)).c_str());
  std::printf("  %-44s %.0f us median per layer and step (%zu selects)\n", "selection latency",
              select_p50, select_us.size());
  std::printf("  %-44s %.3f (softmax mass on what IceCache attended)\n",
              "attention recall, offloaded layers", recall);
  std::printf("  %-44s %.1f s\n", "total", Seconds(start));

  const std::string json_path = absl::GetFlag(FLAGS_json);
  if (!json_path.empty()) {
    std::ofstream j(json_path);
    j << absl::StrFormat(
        "{\"mode\": \"%s\", \"prompt_tokens\": %u, \"passkey\": \"%s\", \"full_answer_correct\": "
        "%s, \"icecache_answer_correct\": %s, \"full_kv_bytes\": %u, \"icecache_kv_bytes\": %u, "
        "\"hit_rate\": %.4f, \"fetched_bytes\": %u, \"fetch_bandwidth_bytes_per_s\": %.0f, "
        "\"select_us_p50\": %.1f, \"recall\": %.4f, \"prefill_s\": %.2f, \"total_s\": %.1f}\n",
        ExecutionModeName((*client)->mode()), n, passkey, full_ok ? "true" : "false",
        ice_ok ? "true" : "false", full_kv, ice_kv, counters.hit_rate(), counters.fetched_bytes,
        bandwidth, select_p50, recall, prefill_s, Seconds(start));
  }
  return 0;
}
