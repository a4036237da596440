// Per-token accounting at the 8B shape: decode steps of a 32-layer x 8 KV head (GQA 4, d 128,
// bf16) sequence through the real icecached and the client library (CPU mode here; CUDA where
// a GPU is), with selection synchronous and one step ahead, side by side in one run:
//
//   - the daemon's CPU time per token (every layer and KV head: selects, inserts), read from
//     /proc for the daemon process over the timed steps;
//   - the exact SIMD page scan's CPU time for the same searches (every key of every layer and
//     head scored for the step's queries, in this process, one core);
//   - the wait left on Decode's critical path for selection (DecodeBreakdown::select_wait_us)
//     per offloaded layer step, p50 and p99, sync against async;
//   - the drift fallback rate (KV heads searched again because their query moved);
//   - a projection to 16 cores next to full-KV decode on the H200 (figures of
//     ../shared/reference/h200-measurements.md; labelled as a projection).
//
// Between two layers of a step the engine runs the rest of the model; --model_us stands for
// that time (0: none, the worst case for a select sent one step ahead).
//
//   build/bench/token_step [--contexts=32768,131072] [--layers=32] [--layers_long=8]
//       [--steps=48] [--modes=sync,async] [--model_us=0] [--out=DIR]
//
// Contexts above --long_context use --layers_long layers (the machine's memory: 32 layers of
// 128k tokens are 16 GiB of K/V) and scale per-token figures to --layers, saying so.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/bench_output.h"
#include "bench/decode_workload.h"
#include "common/flags_compat.h"
#include "eval/in_memory_pages.h"
#include "eval/local_daemon.h"
#include "eval/synthetic.h"
#include "icecache/client.h"
#include "selection/index_factory.h"
#include "server/index/exact_oracle.h"

ABSL_FLAG(std::string, contexts, "32768,131072", "Context lengths (prompt tokens).");
ABSL_FLAG(uint32_t, layers, 32, "Layers of the modelled sequence (8B: 32).");
ABSL_FLAG(uint32_t, layers_long, 8, "Layers actually run above --long_context (memory).");
ABSL_FLAG(uint32_t, long_context, 65536, "Contexts above this run --layers_long layers.");
ABSL_FLAG(uint32_t, full_kv_layers, 2, "Leading full-KV layers (as the paper).");
ABSL_FLAG(uint32_t, steps, 48, "Timed decode steps per (context, mode), after --warmup.");
ABSL_FLAG(uint32_t, warmup, 4, "Untimed decode steps first.");
ABSL_FLAG(std::string, modes, "sync,async", "Selection modes to run.");
ABSL_FLAG(float, drift_threshold, icecache::SequenceOptions{}.drift_threshold,
          "SequenceOptions::drift_threshold of the async runs.");
ABSL_FLAG(uint32_t, model_us, 0, "Simulated time of the rest of the model per layer (us).");
ABSL_FLAG(std::string, mode, "cpu", "Client mode: auto, cpu or cuda.");
ABSL_FLAG(uint32_t, scan_samples, 4, "Steps whose exact scan is timed per layer (median).");
ABSL_FLAG(double, query_cosine, 0.83,
          "Cosine between a query head's consecutive queries (SmolLM2 on a real text: mean 0.83; "
          "FreeKV reports 0.84): each step's query is the previous one turned toward a fresh "
          "query of the generator by this much.");
ABSL_FLAG(uint32_t, distinct_layers, 4,
          "Layers of distinct synthetic data; the others reuse them in turn (the daemon's work "
          "per layer does not depend on which clustered keys it indexes).");
ABSL_FLAG(std::string, out, "bench/results", "Directory for JSON/CSV results.");

namespace {

using namespace icecache;
using Clock = std::chrono::steady_clock;

using bench::kDim;
using bench::kGroup;
using bench::kKvHeads;
using bench::LayerData;
using bench::MakeLayer;
using bench::Percentile;
using bench::ProcessCpuSeconds;
using bench::Queries;
// ../shared/reference/h200-measurements.md: PyTorch SDPA full-KV decode, bf16, 32 q heads,
// 8 KV heads, d 128, batch 1, one layer.
double H200FullKvLayerUs(uint32_t context) {
  if (context <= 4096) return 53;
  if (context <= 32768) return 53 + (66.0 - 53) * (context - 4096) / (32768 - 4096);
  return 66 + (159.0 - 66) * (context - 32768) / (131072 - 32768);
}

void Check(const absl::Status& s, const std::string& what) {
  if (!s.ok()) {
    std::fprintf(stderr, "token_step: %s: %s\n", what.c_str(), s.ToString().c_str());
    std::exit(1);
  }
}

// Median CPU microseconds of the exact page scan of one layer (every KV head) for a step's
// queries, over `samples` steps: what a daemon scanning every key would spend.
double ExactScanLayerUs(const LayerData& d, uint32_t tokens, uint32_t samples) {
  const index::IndexGeometry g{kDim, index::ElemType::kBF16, 16};
  std::vector<double> us;
  std::vector<std::unique_ptr<eval::InMemoryPages>> pages;
  std::vector<std::unique_ptr<index::KvIndex>> layouts;
  std::vector<std::unique_ptr<index::ExactOracle>> scans;
  std::vector<uint32_t> positions(tokens);
  for (uint32_t i = 0; i < tokens; ++i) positions[i] = i;
  for (uint32_t h = 0; h < kKvHeads; ++h) {
    pages.push_back(std::make_unique<eval::InMemoryPages>(g, false));
    layouts.push_back(selection::CreateIndex(*selection::Preset(selection::kDefaultPreset), g,
                                             pages.back().get()));
    index::RowView keys = d.trace.Keys(0, h);
    keys.rows = tokens;
    eval::InMemoryPages::Writer w(pages.back().get(), keys, nullptr);
    Check(layouts.back()->Build({keys, positions.data()}, &w), "scan layout");
    scans.push_back(std::make_unique<index::ExactOracle>(layouts.back().get(), pages.back().get(),
                                                         index::ExactOracle::Rank::kBestToken));
  }
  std::vector<index::SelectedPage> out;
  for (uint32_t s = 0; s < samples; ++s) {
    const auto t0 = Clock::now();
    for (uint32_t h = 0; h < kKvHeads; ++h) {
      std::vector<float> q(size_t{kGroup} * kDim);
      for (uint32_t j = 0; j < kGroup; ++j) {
        std::copy_n(d.trace.Query(0, h * kGroup + j, s % d.trace.query_positions.size()), kDim,
                    q.begin() + size_t{j} * kDim);
      }
      Check(scans[h]->Search(q.data(), kGroup, 12, &out), "scan");
    }
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  return Percentile(us, 0.5);
}

struct ModeResult {
  std::string mode;
  uint32_t context = 0, layers_run = 0;
  double daemon_cpu_ms_per_token = 0;  // scaled to --layers
  double wait_p50_us = 0, wait_p99_us = 0, wait_mean_us = 0;
  double prefetched_share = 0, fallback_rate = 0;
  double step_ms_p50 = 0;  // wall time of a whole token (all layers run), p50
};

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args = NormalizeFlagNames(argc, argv);
  std::vector<char*> ptrs = ArgvPointers(args);
  absl::ParseCommandLine(static_cast<int>(args.size()), ptrs.data());
  const std::string out_dir = absl::GetFlag(FLAGS_out);
  bench::PrepareOutDir(out_dir, "token_step");
  const absl::StatusOr<ExecutionMode> exec = bench::ParseExecutionMode(absl::GetFlag(FLAGS_mode));
  Check(exec.status(), "--mode");
  const uint32_t layers_model = absl::GetFlag(FLAGS_layers);
  const uint32_t steps = absl::GetFlag(FLAGS_steps), warmup = absl::GetFlag(FLAGS_warmup);
  const uint32_t full_kv = absl::GetFlag(FLAGS_full_kv_layers);

  std::vector<SelectionMode> modes;
  for (absl::string_view m : absl::StrSplit(absl::GetFlag(FLAGS_modes), ',', absl::SkipEmpty())) {
    modes.push_back(m == "async" ? SelectionMode::kAsync : SelectionMode::kSync);
  }
  std::vector<uint32_t> contexts;
  for (absl::string_view c :
       absl::StrSplit(absl::GetFlag(FLAGS_contexts), ',', absl::SkipEmpty())) {
    uint32_t v = 0;
    if (!absl::SimpleAtoi(c, &v)) Check(absl::InvalidArgumentError(std::string(c)), "--contexts");
    contexts.push_back(v);
  }

  auto started = eval::LocalDaemon::Start(eval::IcecachedPath(ICECACHE_BENCH_ICECACHED_BIN),
                                          {"--memory-limit=20GiB"});
  Check(started.status(), "start icecached");
  std::unique_ptr<eval::LocalDaemon> daemon = std::move(*started);
  ClientOptions co;
  co.socket = daemon->socket();
  co.mode = *exec;
  auto client = Client::Attach(co);
  Check(client.status(), "attach");
  std::printf(
      "token_step: 8B shape (%u layers, %u KV heads x GQA %u, d %u, bf16), client in %s "
      "mode, daemon %s, %ld cores; rest of the model per layer: %u us\n",
      layers_model, kKvHeads, kGroup, kDim, ExecutionModeName((*client)->mode()),
      std::string(selection::kDefaultPreset).c_str(), ::sysconf(_SC_NPROCESSORS_ONLN),
      absl::GetFlag(FLAGS_model_us));

  std::vector<ModeResult> results;
  std::vector<std::pair<uint32_t, double>> scan_ms_per_token;
  for (uint32_t context : contexts) {
    const uint32_t layers = context > absl::GetFlag(FLAGS_long_context)
                                ? absl::GetFlag(FLAGS_layers_long)
                                : layers_model;
    const double scale = static_cast<double>(layers_model - full_kv) / (layers - full_kv);
    const uint32_t tokens = context + warmup + steps + 1;
    std::printf("\n== context %u: %u layers run%s\n", context, layers,
                layers < layers_model
                    ? absl::StrCat(" (per-token figures scaled to ", layers_model, ")").c_str()
                    : "");
    std::fflush(stdout);
    // The data of every layer (kept: every mode replays the same K/V and queries).
    std::vector<LayerData> distinct;
    std::vector<std::vector<std::vector<uint16_t>>> queries;
    const uint32_t nd =
        std::max<uint32_t>(1, std::min(layers, absl::GetFlag(FLAGS_distinct_layers)));
    for (uint32_t l = 0; l < nd; ++l) {
      distinct.push_back(MakeLayer(tokens, l, 64));
      queries.push_back(
          Queries(distinct.back(), warmup + steps, absl::GetFlag(FLAGS_query_cosine)));
      std::printf("  generated layer data %u/%u\r", l + 1, nd);
      std::fflush(stdout);
    }
    auto data_of = [&](uint32_t l) -> const LayerData& { return distinct[l % nd]; };
    // The exact scan's cost of one token: every offloaded layer's scan (time one, scale).
    const double scan_layer_us =
        ExactScanLayerUs(data_of(full_kv), context, absl::GetFlag(FLAGS_scan_samples));
    const double scan_token_ms = scan_layer_us * (layers_model - full_kv) / 1000.0;
    scan_ms_per_token.push_back({context, scan_token_ms});
    std::printf("\n  exact page scan: %.0f us per layer (8 KV heads), %.1f ms CPU per token\n",
                scan_layer_us, scan_token_ms);

    for (SelectionMode mode : modes) {
      SequenceOptions so;
      so.num_layers = layers;
      so.num_q_heads = kKvHeads * kGroup;
      so.num_kv_heads = kKvHeads;
      so.head_dim = kDim;
      so.dtype = DType::kBF16;
      so.max_tokens = tokens;
      so.full_kv_layers = full_kv;
      so.selection = mode;
      so.drift_threshold = absl::GetFlag(FLAGS_drift_threshold);
      so.label = absl::StrCat("token-step-", context, "-", SelectionModeName(mode));
      auto seq = (*client)->CreateSequence(so);
      Check(seq.status(), "create sequence");
      const auto tp = Clock::now();
      for (uint32_t l = 0; l < layers; ++l) {
        Check((*seq)->Prefill(l, data_of(l).k.data(), data_of(l).v.data(), context), "prefill");
      }
      std::vector<uint16_t> out(size_t{kKvHeads} * kGroup * kDim);
      std::vector<double> waits, step_ms;
      uint64_t prefetched = 0, fallbacks = 0, offloaded_steps = 0;
      double cpu0 = 0;
      Clock::time_point t0;
      for (uint32_t step = 0; step < warmup + steps; ++step) {
        if (step == warmup) {
          cpu0 = ProcessCpuSeconds(daemon->pid());
          t0 = Clock::now();
        }
        const auto ts = Clock::now();
        const uint32_t pos = context + step;
        for (uint32_t l = 0; l < layers; ++l) {
          const LayerData& d = data_of(l);
          const std::vector<uint16_t>& q = queries[l % nd][step];
          Check((*seq)->Decode(l, q.data(), &d.k[size_t{pos} * kKvHeads * kDim],
                               &d.v[size_t{pos} * kKvHeads * kDim], out.data()),
                "decode");
          const DecodeBreakdown& b = (*seq)->last_decode();
          if (step >= warmup && !b.full_kv) {
            waits.push_back(b.select_wait_us);
            prefetched += b.prefetched;
            fallbacks += b.drift_fallback_heads;
            ++offloaded_steps;
          }
          if (absl::GetFlag(FLAGS_model_us) > 0) {
            std::this_thread::sleep_for(std::chrono::microseconds(absl::GetFlag(FLAGS_model_us)));
          }
        }
        if (step >= warmup) {
          step_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - ts).count());
        }
      }
      const double cpu = ProcessCpuSeconds(daemon->pid()) - cpu0;
      (void)t0;
      ModeResult r;
      r.mode = SelectionModeName(mode);
      r.context = context;
      r.layers_run = layers;
      r.daemon_cpu_ms_per_token = cpu * 1000.0 / steps * scale;
      r.wait_p50_us = Percentile(waits, 0.5);
      r.wait_p99_us = Percentile(waits, 0.99);
      double sum = 0;
      for (double w : waits) sum += w;
      r.wait_mean_us = waits.empty() ? 0 : sum / waits.size();
      r.prefetched_share = offloaded_steps == 0 ? 0 : double(prefetched) / offloaded_steps;
      r.fallback_rate = prefetched == 0 ? 0 : double(fallbacks) / (prefetched * kKvHeads);
      r.step_ms_p50 = Percentile(step_ms, 0.5);
      std::printf(
          "  %-5s prefill %.1f s | daemon CPU %.1f ms/token (scan %.1f: %.3f of it) | "
          "select wait per layer step p50 %.0f us p99 %.0f us | prefetched %.2f, "
          "drift fallback %.3f of heads | token %.1f ms\n",
          r.mode.c_str(), std::chrono::duration<double>(Clock::now() - tp).count(),
          r.daemon_cpu_ms_per_token, scan_token_ms, r.daemon_cpu_ms_per_token / scan_token_ms,
          r.wait_p50_us, r.wait_p99_us, r.prefetched_share, r.fallback_rate, r.step_ms_p50);
      std::fflush(stdout);
      results.push_back(r);
      Check((*seq)->Drop(), "drop");
    }
  }

  // A projection: the same CPU work on 16 cores, next to full-KV decode on the H200.
  std::printf(
      "\nProjection (not measured here): daemon CPU per token spread over 16 cores, "
      "against the H200's full-KV decode of %u layers (reference file)\n",
      layers_model);
  std::printf("  %-8s %-6s %14s %14s %16s\n", "context", "mode", "daemon/16 ms", "scan/16 ms",
              "H200 full-KV ms");
  for (const ModeResult& r : results) {
    double scan = 0;
    for (auto& [c, s] : scan_ms_per_token) {
      if (c == r.context) scan = s;
    }
    std::printf("  %-8u %-6s %14.2f %14.2f %16.2f\n", r.context, r.mode.c_str(),
                r.daemon_cpu_ms_per_token / 16, scan / 16,
                H200FullKvLayerUs(r.context) * layers_model / 1000.0);
  }

  const std::string stem = out_dir + "/token_step";
  std::ofstream csv(stem + ".csv");
  csv << "context,mode,layers_run,daemon_cpu_ms_per_token,scan_cpu_ms_per_token,"
         "wait_p50_us,wait_p99_us,wait_mean_us,prefetched_share,drift_fallback_rate,"
         "token_ms_p50,projected_daemon_ms_16_cores,h200_full_kv_ms\n";
  std::ofstream json(stem + ".json");
  json << "{\n  \"model_us\": " << absl::GetFlag(FLAGS_model_us)
       << ",\n  \"drift_threshold\": " << absl::GetFlag(FLAGS_drift_threshold)
       << ",\n  \"query_cosine\": " << absl::GetFlag(FLAGS_query_cosine) << ",\n  \"rows\": [\n";
  for (size_t i = 0; i < results.size(); ++i) {
    const ModeResult& r = results[i];
    double scan = 0;
    for (auto& [c, s] : scan_ms_per_token) {
      if (c == r.context) scan = s;
    }
    const double h200 = H200FullKvLayerUs(r.context) * layers_model / 1000.0;
    csv << r.context << "," << r.mode << "," << r.layers_run << "," << r.daemon_cpu_ms_per_token
        << "," << scan << "," << r.wait_p50_us << "," << r.wait_p99_us << "," << r.wait_mean_us
        << "," << r.prefetched_share << "," << r.fallback_rate << "," << r.step_ms_p50 << ","
        << r.daemon_cpu_ms_per_token / 16 << "," << h200 << "\n";
    json << "    {\"context\": " << r.context << ", \"mode\": \"" << r.mode
         << "\", \"layers_run\": " << r.layers_run
         << ", \"daemon_cpu_ms_per_token\": " << r.daemon_cpu_ms_per_token
         << ", \"scan_cpu_ms_per_token\": " << scan << ", \"wait_p50_us\": " << r.wait_p50_us
         << ", \"wait_p99_us\": " << r.wait_p99_us
         << ", \"prefetched_share\": " << r.prefetched_share
         << ", \"drift_fallback_rate\": " << r.fallback_rate
         << ", \"token_ms_p50\": " << r.step_ms_p50 << ", \"h200_full_kv_ms_projection\": " << h200
         << "}" << (i + 1 < results.size() ? "," : "") << "\n";
  }
  json << "  ]\n}\n";
  bench::CloseResult(csv, stem + ".csv", "token_step");
  bench::CloseResult(json, stem + ".json", "token_step");
  std::printf("wrote %s.{json,csv}\n", stem.c_str());
  return 0;
}
