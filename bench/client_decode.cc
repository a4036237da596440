// The client library's decode step against full attention, through the real daemon:
//
//   1. Per-layer decode step for an 8B shape (32 query heads, 8 KV heads, d=128, bf16) at each
//      context and budget, broken into select (query to the daemon and back), fetch (gather of
//      the missed pages) and attention, against full attention over the whole context by the
//      same kernel in the same run (layer 0 of the sequence is a full-KV layer holding the same
//      K/V). Profiled mode: the stream is synchronized between phases.
//   2. Steady-state page-cache hit rate over a few hundred decode steps (synthetic queries with
//      a given drift, or a trace's queries at consecutive positions with --trace).
//
// Runs in CUDA mode where a GPU is usable (--mode=auto), else in CPU mode (the kernels' CPU
// references: much slower attention, identical selections and hit rates).
//
//   build/bench/client_decode [--mode=auto|cpu|cuda] [--contexts=32768,131072]
//       [--budgets=256,2048] [--steps=32] [--hit_steps=300] [--drifts=1,0.1] [--trace=FILE]
//       [--out=DIR]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/bench_output.h"
#include "bench/decode_workload.h"
#include "bench/stats.h"
#include "common/flags_compat.h"
#include "common/half.h"
#include "eval/local_daemon.h"
#include "eval/synthetic.h"
#include "eval/trace.h"
#include "icecache/client.h"
#include "selection/budget.h"

#if defined(ICECACHE_HAVE_CUDA)
#include <cuda_runtime_api.h>
#endif

ABSL_FLAG(std::string, mode, "auto", "auto, cpu or cuda.");
ABSL_FLAG(std::string, contexts, "32768,131072", "Context lengths of the step breakdown.");
ABSL_FLAG(std::string, budgets, "256,2048", "Token budgets of the step breakdown.");
ABSL_FLAG(uint32_t, steps, 32, "Timed decode steps per configuration (after --warmup).");
ABSL_FLAG(uint32_t, warmup, 4, "Untimed decode steps first.");
ABSL_FLAG(uint32_t, hit_steps, 300, "Decode steps of each hit-rate run (0: skip).");
ABSL_FLAG(uint32_t, hit_context, 32768, "Prompt tokens of the hit-rate runs.");
ABSL_FLAG(std::string, drifts, "1,0.1", "Synthetic query drifts of the hit-rate runs.");
ABSL_FLAG(std::string, trace, "", "ICTRACE1 file whose layer 0 drives a hit-rate run too.");
ABSL_FLAG(std::string, configs, "default,no-tail,paper",
          "Configurations of the step breakdown, each in the same run: default (the daemon's "
          "defaults: fast index preset, MEAN_VAR tail estimate), no-tail (the same without the "
          "tail estimate), default-pages16 (the defaults with the paper's split: pages of 16, 32 "
          "sink and 32 window tokens), paper (a second icecached with --index-preset=paper, no "
          "tail, the paper's split: the paper's configuration).");
ABSL_FLAG(std::string, out, "bench/results", "Directory for JSON/CSV results.");

namespace {

using namespace icecache;

using icecache::bench::Median;

std::vector<double> ParseList(const std::string& s) {
  std::vector<double> out;
  for (absl::string_view part : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    double v = 0;
    if (!absl::SimpleAtod(part, &v)) {
      std::fprintf(stderr, "not a number: %s\n", std::string(part).c_str());
      std::exit(2);
    }
    out.push_back(v);
  }
  return out;
}

std::string JsonEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) >= 0x20) out += c;
  }
  return out;
}

void Check(const absl::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}

// The engine's tensors: device memory in CUDA mode, host memory in CPU mode.
class Tensors {
 public:
  explicit Tensors(bool cuda) : cuda_(cuda) {}
  ~Tensors() {
    for (void* p : owned_) Free(p);
  }
  void* Upload(const void* host, size_t bytes) {
    void* p = Alloc(bytes);
    Copy(p, host, bytes);
    return p;
  }
  void* Alloc(size_t bytes) {
    void* p = nullptr;
#if defined(ICECACHE_HAVE_CUDA)
    if (cuda_) {
      if (cudaMalloc(&p, bytes) != cudaSuccess) Check(absl::InternalError("cudaMalloc"), "alloc");
      owned_.push_back(p);
      return p;
    }
#endif
    p = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
    owned_.push_back(p);
    return p;
  }
  void Copy(void* dst, const void* host, size_t bytes) {
#if defined(ICECACHE_HAVE_CUDA)
    if (cuda_) {
      cudaMemcpy(dst, host, bytes, cudaMemcpyHostToDevice);
      return;
    }
#endif
    std::memcpy(dst, host, bytes);
  }
  void Sync() {
#if defined(ICECACHE_HAVE_CUDA)
    if (cuda_) cudaDeviceSynchronize();
#endif
  }

 private:
  void Free(void* p) {
#if defined(ICECACHE_HAVE_CUDA)
    if (cuda_) {
      cudaFree(p);
      return;
    }
#endif
    std::free(p);
  }
  bool cuda_;
  std::vector<void*> owned_;
};

// Token-major [tokens][kv][d] rows of layer `l` of a trace (bf16/fp16 element bytes copied).
std::vector<uint16_t> TokenMajor(const eval::Trace& t, uint32_t l, bool values) {
  const uint32_t d = t.head_dim, kv = t.num_kv_heads;
  std::vector<uint16_t> out(size_t{t.num_tokens} * kv * d);
  for (uint32_t h = 0; h < kv; ++h) {
    const index::RowView r = values ? t.Values(l, h) : t.Keys(l, h);
    for (uint32_t tok = 0; tok < t.num_tokens; ++tok) {
      std::memcpy(&out[(size_t{tok} * kv + h) * d], r.row(tok), d * 2);
    }
  }
  return out;
}

std::vector<uint16_t> QueryOf(const eval::Trace& t, uint32_t l, uint32_t qi, DType dtype) {
  std::vector<uint16_t> q(size_t{t.num_q_heads} * t.head_dim);
  for (uint32_t h = 0; h < t.num_q_heads; ++h) {
    const float* src = t.Query(l, h, qi);
    for (uint32_t i = 0; i < t.head_dim; ++i) {
      q[size_t{h} * t.head_dim + i] =
          dtype == DType::kBF16 ? FloatToBf16(src[i]) : FloatToHalf(src[i]);
    }
  }
  return q;
}

struct StepRow {
  std::string config = "default";
  uint32_t context = 0, budget = 0;
  double build_s = 0;
  double select_us = 0, fetch_us = 0, attention_us = 0, sparse_total_us = 0;
  double full_attention_us = 0, full_total_us = 0;
  double hit_rate = 0;
  uint32_t attended_per_head = 0;
};

// The 8B-shape synthetic data of one context: `context` prompt tokens, then one token and one
// query per decode step.
eval::Trace BreakdownTrace(uint32_t context) {
  const uint32_t steps = absl::GetFlag(FLAGS_warmup) + absl::GetFlag(FLAGS_steps);
  eval::SyntheticOptions so;
  so.num_tokens = context + steps;
  so.head_dim = 128;
  so.num_kv_heads = 8;
  so.group_size = 4;
  so.num_queries = steps;
  so.kv_type = index::ElemType::kBF16;
  so.seed = context;
  std::printf("  generating %u tokens of synthetic K/V...\n", so.num_tokens);
  std::fflush(stdout);
  return eval::GenerateSynthetic(so);
}

StepRow RunBreakdown(const std::string& socket, ExecutionMode mode, const eval::Trace& t,
                     uint32_t context, uint32_t budget,
                     std::optional<TailEstimate> tail = std::nullopt, bool paper_split = false) {
  const uint32_t warmup = absl::GetFlag(FLAGS_warmup), steps = absl::GetFlag(FLAGS_steps);
  const std::vector<uint16_t> k = TokenMajor(t, 0, false), v = TokenMajor(t, 0, true);

  ClientOptions co;
  co.socket = socket;
  co.mode = mode;
  co.profile = true;
  auto client = Client::Attach(co);
  Check(client.status(), "attach");
  SequenceOptions sq;
  sq.num_layers = 2;  // layer 0 keeps full KV (the baseline), layer 1 is offloaded
  sq.full_kv_layers = 1;
  sq.num_q_heads = 32;
  sq.num_kv_heads = 8;
  sq.head_dim = 128;
  sq.dtype = DType::kBF16;
  sq.max_tokens = t.num_tokens;
  sq.budget_tokens = budget;
  if (paper_split) {  // the paper's pages of 16 tokens, 2 sink + 2 window pages
    const selection::BudgetSplit p = selection::PaperSplit(budget);
    sq.page_size = p.page_size;
    sq.sink_tokens = p.sink_tokens;
    sq.window_tokens = p.window_tokens;
  }
  sq.label = "bench";
  sq.tail_estimate = tail;
  auto seq = (*client)->CreateSequence(sq);
  Check(seq.status(), "create sequence");
  const bool cuda = (*client)->mode() == ExecutionMode::kCuda;
  Tensors tensors(cuda);
  const size_t row = 8 * 128;
  void* kd = tensors.Upload(k.data(), size_t{t.num_tokens} * row * 2);
  void* vd = tensors.Upload(v.data(), size_t{t.num_tokens} * row * 2);
  for (uint32_t l = 0; l < 2; ++l) Check((*seq)->Prefill(l, kd, vd, context), "prefill");
  tensors.Sync();
  void* qd = tensors.Alloc(32 * 128 * 2);
  void* out = tensors.Alloc(32 * 128 * 2);
  StepRow r;
  r.context = context;
  r.budget = budget;
  std::vector<double> sel, fetch, attn, total, full_attn, full_total;
  uint64_t hits = 0, all = 0;
  for (uint32_t s = 0; s < warmup + steps; ++s) {
    const uint32_t pos = context + s;
    const std::vector<uint16_t> q = QueryOf(t, 0, s, DType::kBF16);
    tensors.Copy(qd, q.data(), q.size() * 2);
    for (uint32_t l = 0; l < 2; ++l) {
      const auto* kn = static_cast<const uint8_t*>(kd) + size_t{pos} * row * 2;
      const auto* vn = static_cast<const uint8_t*>(vd) + size_t{pos} * row * 2;
      Check((*seq)->Decode(l, qd, kn, vn, out), "decode");
      const DecodeBreakdown& b = (*seq)->last_decode();
      if (l == 1 && s == 0) r.build_s = b.wait_us / 1e6;
      if (s < warmup) continue;
      if (l == 0) {
        full_attn.push_back(b.attention_us);
        full_total.push_back(b.total_us);
      } else {
        sel.push_back(b.select_us);
        fetch.push_back(b.fetch_us);
        attn.push_back(b.attention_us);
        total.push_back(b.total_us);
        hits += b.hits;
        all += b.hits + b.misses;
        r.attended_per_head = b.attended_tokens / 8;
      }
    }
  }
  r.select_us = Median(sel);
  r.fetch_us = Median(fetch);
  r.attention_us = Median(attn);
  r.sparse_total_us = Median(total);
  r.full_attention_us = Median(full_attn);
  r.full_total_us = Median(full_total);
  r.hit_rate = all ? static_cast<double>(hits) / all : 0;
  return r;
}

struct HitRow {
  std::string source;
  double overall = 0, steady = 0;  // steady: the second half of the steps
  std::vector<double> per_step;
};

HitRow RunHitRate(const std::string& socket, ExecutionMode mode, const eval::Trace& t,
                  uint32_t prompt, const std::string& source) {
  const uint32_t steps = static_cast<uint32_t>(t.query_positions.size());
  ClientOptions co;
  co.socket = socket;
  co.mode = mode;
  auto client = Client::Attach(co);
  Check(client.status(), "attach");
  SequenceOptions sq;
  sq.num_layers = 1;
  sq.full_kv_layers = 0;
  sq.num_q_heads = t.num_q_heads;
  sq.num_kv_heads = t.num_kv_heads;
  sq.head_dim = t.head_dim;
  sq.dtype = t.kv_type == index::ElemType::kF16 ? DType::kFP16 : DType::kBF16;
  sq.max_tokens = t.num_tokens;
  sq.budget_tokens = 256;
  auto seq = (*client)->CreateSequence(sq);
  Check(seq.status(), "create sequence");
  const bool cuda = (*client)->mode() == ExecutionMode::kCuda;
  Tensors tensors(cuda);
  const std::vector<uint16_t> k = TokenMajor(t, 0, false), v = TokenMajor(t, 0, true);
  const size_t row = size_t{t.num_kv_heads} * t.head_dim;
  void* kd = tensors.Upload(k.data(), k.size() * 2);
  void* vd = tensors.Upload(v.data(), v.size() * 2);
  Check((*seq)->Prefill(0, kd, vd, prompt), "prefill");
  void* qd = tensors.Alloc(size_t{t.num_q_heads} * t.head_dim * 2);
  void* out = tensors.Alloc(size_t{t.num_q_heads} * t.head_dim * 2);
  HitRow h;
  h.source = source;
  uint64_t hits = 0, all = 0, steady_hits = 0, steady_all = 0;
  for (uint32_t s = 0; s < steps; ++s) {
    const uint32_t pos = t.query_positions[s];
    const std::vector<uint16_t> q = QueryOf(t, 0, s, sq.dtype);
    tensors.Copy(qd, q.data(), q.size() * 2);
    Check((*seq)->Decode(0, qd, static_cast<const uint8_t*>(kd) + size_t{pos} * row * 2,
                         static_cast<const uint8_t*>(vd) + size_t{pos} * row * 2, out),
          "decode");
    const DecodeBreakdown& b = (*seq)->last_decode();
    const uint32_t n = b.hits + b.misses;
    h.per_step.push_back(n ? static_cast<double>(b.hits) / n : 0);
    hits += b.hits;
    all += n;
    if (s >= steps / 2) {
      steady_hits += b.hits;
      steady_all += n;
    }
  }
  h.overall = all ? static_cast<double>(hits) / all : 0;
  h.steady = steady_all ? static_cast<double>(steady_hits) / steady_all : 0;
  return h;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args = NormalizeFlagNames(argc, argv);
  std::vector<char*> ptrs = ArgvPointers(args);
  absl::ParseCommandLine(static_cast<int>(args.size()), ptrs.data());
  icecache::bench::PrepareOutDir(absl::GetFlag(FLAGS_out), "client_decode");
  const absl::StatusOr<ExecutionMode> parsed =
      icecache::bench::ParseExecutionMode(absl::GetFlag(FLAGS_mode));
  Check(parsed.status(), "flags");
  ExecutionMode mode = *parsed;
  const std::string out_dir = absl::GetFlag(FLAGS_out);
  auto started = eval::LocalDaemon::Start(eval::IcecachedPath(ICECACHE_BENCH_ICECACHED_BIN));
  Check(started.status(), "start icecached");
  std::unique_ptr<eval::LocalDaemon> daemon = std::move(*started);
  {
    ClientOptions co;
    co.socket = daemon->socket();
    co.mode = mode;
    auto probe = Client::Attach(co);
    Check(probe.status(), "attach");
    mode = (*probe)->mode();
  }
  std::printf("client_decode: mode %s\n", ExecutionModeName(mode));

  const std::vector<std::string> configs =
      absl::StrSplit(absl::GetFlag(FLAGS_configs), ',', absl::SkipEmpty());
  std::unique_ptr<eval::LocalDaemon> paper;
  for (const std::string& cfg : configs) {
    if (cfg != "default" && cfg != "no-tail" && cfg != "paper" && cfg != "default-pages16") {
      Check(absl::InvalidArgumentError(
                "--configs: default, no-tail, default-pages16 or paper, got " + cfg),
            "flags");
    }
    if (cfg == "paper" && paper == nullptr) {
      auto p = eval::LocalDaemon::Start(eval::IcecachedPath(ICECACHE_BENCH_ICECACHED_BIN),
                                        {"--index-preset=paper"});
      Check(p.status(), "start the paper preset's icecached");
      paper = std::move(*p);
    }
  }
  std::vector<StepRow> rows;
  for (double c : ParseList(absl::GetFlag(FLAGS_contexts))) {
    const eval::Trace trace = BreakdownTrace(static_cast<uint32_t>(c));
    for (double b : ParseList(absl::GetFlag(FLAGS_budgets))) {
      for (const std::string& cfg : configs) {
        std::printf("== decode step, context %u, budget %u, %s\n", static_cast<uint32_t>(c),
                    static_cast<uint32_t>(b), cfg.c_str());
        std::fflush(stdout);
        StepRow r = RunBreakdown(cfg == "paper" ? paper->socket() : daemon->socket(), mode, trace,
                                 static_cast<uint32_t>(c), static_cast<uint32_t>(b),
                                 cfg == "default" || cfg == "default-pages16"
                                     ? std::nullopt
                                     : std::optional<TailEstimate>(TailEstimate::kNone),
                                 cfg == "paper" || cfg == "default-pages16");
        r.config = cfg;
        std::printf(
            "  build %.2f s | sparse: select %.1f + fetch %.1f + attention %.1f = %.1f us "
            "(hit rate %.2f, %u tokens/head) | full attention %.1f us (total %.1f) | "
            "full/sparse %.2fx, full/(fetch+attention) %.2fx\n",
            r.build_s, r.select_us, r.fetch_us, r.attention_us, r.sparse_total_us, r.hit_rate,
            r.attended_per_head, r.full_attention_us, r.full_total_us,
            r.full_total_us / r.sparse_total_us,
            r.full_attention_us / (r.fetch_us + r.attention_us));
        rows.push_back(r);
      }
      // Selection latency of each configuration against the paper's, same context and budget.
      const StepRow* base_row = nullptr;
      for (const StepRow& r : rows) {
        if (r.context == c && r.budget == b && r.config == "paper") base_row = &r;
      }
      for (const StepRow& r : rows) {
        if (base_row != nullptr && r.context == c && r.budget == b && r.config != "paper") {
          std::printf("  select %s / paper: %.2fx\n", r.config.c_str(),
                      r.select_us / base_row->select_us);
        }
      }
    }
  }

  std::vector<HitRow> hit_rows;
  const uint32_t hit_steps = absl::GetFlag(FLAGS_hit_steps);
  if (hit_steps > 0) {
    const uint32_t prompt = absl::GetFlag(FLAGS_hit_context);
    for (double drift : ParseList(absl::GetFlag(FLAGS_drifts))) {
      eval::SyntheticOptions so;
      so.num_tokens = prompt + hit_steps;
      so.head_dim = 128;
      so.num_kv_heads = 8;
      so.group_size = 4;
      so.num_queries = hit_steps;
      so.kv_type = index::ElemType::kBF16;
      so.query_drift = static_cast<float>(drift);
      so.seed = 5;
      std::printf("== hit rate, synthetic, query drift %.2f, %u steps\n", drift, hit_steps);
      std::fflush(stdout);
      hit_rows.push_back(RunHitRate(daemon->socket(), mode, eval::GenerateSynthetic(so), prompt,
                                    absl::StrCat("synthetic drift ", drift)));
      std::printf("  overall %.3f, steady (second half) %.3f\n", hit_rows.back().overall,
                  hit_rows.back().steady);
    }
    const std::string trace_path = absl::GetFlag(FLAGS_trace);
    if (!trace_path.empty()) {
      auto t = eval::ReadTrace(trace_path);
      Check(t.status(), "trace");
      std::printf("== hit rate, trace %s (%zu steps)\n", trace_path.c_str(),
                  t->query_positions.size());
      hit_rows.push_back(RunHitRate(daemon->socket(), mode, *t, t->query_positions.front(),
                                    "trace " + t->description));
      std::printf("  overall %.3f, steady (second half) %.3f\n", hit_rows.back().overall,
                  hit_rows.back().steady);
    }
  }

  const std::string base = out_dir + "/client_decode_" + ExecutionModeName(mode);
  std::ofstream json(base + ".json");
  json << "{\n  \"mode\": \"" << ExecutionModeName(mode) << "\",\n  \"shape\": "
       << "{\"q_heads\": 32, \"kv_heads\": 8, \"head_dim\": 128, \"dtype\": \"bf16\"},\n"
       << "  \"steps\": " << absl::GetFlag(FLAGS_steps) << ",\n  \"breakdown\": [";
  for (size_t i = 0; i < rows.size(); ++i) {
    const StepRow& r = rows[i];
    json << (i ? "," : "") << "\n    {\"config\": \"" << r.config
         << "\", \"context\": " << r.context << ", \"budget\": " << r.budget
         << ", \"build_s\": " << r.build_s << ", \"select_us\": " << r.select_us
         << ", \"fetch_us\": " << r.fetch_us << ", \"attention_us\": " << r.attention_us
         << ", \"sparse_total_us\": " << r.sparse_total_us
         << ", \"full_attention_us\": " << r.full_attention_us
         << ", \"full_total_us\": " << r.full_total_us
         << ", \"full_over_sparse\": " << r.full_total_us / r.sparse_total_us
         << ", \"hit_rate\": " << r.hit_rate << ", \"attended_per_head\": " << r.attended_per_head
         << "}";
  }
  json << "\n  ],\n  \"hit_rate\": [";
  for (size_t i = 0; i < hit_rows.size(); ++i) {
    const HitRow& h = hit_rows[i];
    json << (i ? "," : "") << "\n    {\"source\": \"" << JsonEscape(h.source)
         << "\", \"overall\": " << h.overall << ", \"steady\": " << h.steady << ", \"per_step\": [";
    for (size_t s = 0; s < h.per_step.size(); ++s) json << (s ? ", " : "") << h.per_step[s];
    json << "]}";
  }
  json << "\n  ]\n}\n";
  icecache::bench::CloseResult(json, base + ".json", "client_decode");
  std::printf("wrote %s.json\n", base.c_str());
  return 0;
}
