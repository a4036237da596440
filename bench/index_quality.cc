// Quality of page selection, side by side: the IceCache DCI tree (paper configuration, every
// other preset as the daemon serves it, and the single options), the Quest-style and
// StreamingLLM baselines and the oracles, at several token budgets, on a real-model trace
// (--trace) or on the synthetic generator.
//
//   build/bench/index_quality [--trace=FILE] [--budgets=64,128,256,512] [--out=DIR]
//
// Prints a table and writes DIR/index_quality.json and .csv (and per-layer recall CSV).
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "bench/bench_output.h"
#include "common/flags_compat.h"
#include "common/thread_pool.h"
#include "eval/evaluation.h"
#include "eval/synthetic.h"
#include "eval/trace.h"
#include "selection/budget.h"
#include "selection/index_factory.h"
#include "server/index/simd.h"

ABSL_FLAG(std::string, trace, "", "Trace file (bench/README.md); empty: synthetic data.");
ABSL_FLAG(std::string, budgets, "64,128,256,512", "Token budgets to evaluate.");
ABSL_FLAG(std::string, out, "bench/results", "Directory for JSON/CSV results.");
ABSL_FLAG(uint32_t, threads, 0, "Worker threads (0: all cores).");
ABSL_FLAG(uint32_t, first_layer, 0, "First layer to evaluate (2 skips the full-KV layers).");
ABSL_FLAG(uint32_t, synthetic_tokens, 8192, "Synthetic: tokens per head.");
ABSL_FLAG(uint32_t, synthetic_layers, 2, "Synthetic: layers (seeds differ per layer).");
ABSL_FLAG(float, synthetic_sharpness, 9.0f, "Synthetic: query sharpness.");
ABSL_FLAG(uint32_t, synthetic_run, 3, "Synthetic: mean run length of a cluster.");
ABSL_FLAG(float, synthetic_spread, 0.45f, "Synthetic: within-cluster spread.");
ABSL_FLAG(bool, variants, true, "Also evaluate the DCI option variants.");
ABSL_FLAG(uint32_t, page_size, icecache::selection::BudgetDefaults::kPageSize,
          "Tokens per page (the daemon's default; 16 is the paper's). Each budget is split by "
          "the paper's rule with pages of this size.");

using namespace icecache::index;
using namespace icecache::eval;

int main(int argc, char** argv) {
  std::vector<std::string> args = icecache::NormalizeFlagNames(argc, argv);
  std::vector<char*> ptrs = icecache::ArgvPointers(args);
  absl::ParseCommandLine(static_cast<int>(args.size()), ptrs.data());
  icecache::bench::PrepareOutDir(absl::GetFlag(FLAGS_out), "index_quality");

  Trace trace;
  const std::string path = absl::GetFlag(FLAGS_trace);
  std::string data_name;
  if (!path.empty()) {
    absl::StatusOr<Trace> t = ReadTrace(path);
    if (!t.ok()) {
      std::fprintf(stderr, "index_quality: %s\n", std::string(t.status().message()).c_str());
      return 1;
    }
    trace = std::move(*t);
    data_name = path;
  } else {
    SyntheticOptions so;
    so.num_tokens = absl::GetFlag(FLAGS_synthetic_tokens);
    so.num_layers = absl::GetFlag(FLAGS_synthetic_layers);
    so.head_dim = 128;
    so.num_kv_heads = 2;
    so.group_size = 4;
    so.num_queries = 32;
    so.query_sharpness = absl::GetFlag(FLAGS_synthetic_sharpness);
    so.mean_run = absl::GetFlag(FLAGS_synthetic_run);
    so.cluster_spread = absl::GetFlag(FLAGS_synthetic_spread);
    trace = GenerateSynthetic(so);
    data_name = "synthetic";
  }
  std::printf(
      "data: %s\n  %s\n  %u layers x %u KV heads (%u query heads), dim %u, %u tokens, "
      "%zu query positions\n",
      data_name.c_str(), trace.description.c_str(), trace.num_layers, trace.num_kv_heads,
      trace.num_q_heads, trace.head_dim, trace.num_tokens, trace.query_positions.size());

  EvalOptions opts;
  opts.budgets.clear();
  for (absl::string_view b : absl::StrSplit(absl::GetFlag(FLAGS_budgets), ',')) {
    uint32_t v;
    if (!absl::SimpleAtoi(b, &v)) {
      std::fprintf(stderr, "index_quality: bad budget '%s'\n", std::string(b).c_str());
      return 2;
    }
    opts.budgets.push_back(v);
  }
  opts.page_size = absl::GetFlag(FLAGS_page_size);
  opts.first_layer = absl::GetFlag(FLAGS_first_layer);
  opts.output_error = trace.has_values;
  if (absl::GetFlag(FLAGS_variants)) {
    // The improvement options, each measured beside the paper configuration.
    std::vector<MethodSpec> variants;
    auto add = [&](const std::string& name, auto&& set) {
      MethodSpec m = Method(name, MethodKind::kDci);
      set(m.dci);
      variants.push_back(m);
    };
    add("dci+scaled-query", [](DciOptions& o) { o.scale_query_projection = true; });
    add("dci+page-granular", [](DciOptions& o) { o.page_granular_scoring = true; });
    add("dci+mass-ranking", [](DciOptions& o) {
      o.page_score = DciOptions::PageScore::kSoftmaxMass;
      o.group_merge = DciOptions::GroupMerge::kSumOfMass;
    });
    add("dci+joint-group", [](DciOptions& o) { o.joint_group_search = true; });
    // The tuned preset without its exact search of small trees (the trace's trees are
    // small: the exact scan would hide the tree), and the same with promotion ratio 0.03.
    const DciOptions tuned = icecache::selection::Preset(icecache::selection::kTunedPreset)->dci;
    add("dci+all", [&](DciOptions& o) {
      o = tuned;
      o.exact_search_max_tokens = 0;
    });
    add("dci+all+r1-0.03", [&](DciOptions& o) {
      o = tuned;
      o.exact_search_max_tokens = 0;
      o.promotion_ratio_1 = 0.03;
    });
    opts.methods.insert(opts.methods.begin() + 1, variants.begin(), variants.end());
  }
  // The page oracle on the default preset's layout (its beam-built cells), beside the one on
  // the paper's layout that DefaultMethods holds.
  {
    MethodSpec m = Method("oracle-pages-default-layout", MethodKind::kOraclePagesOurLayout);
    m.dci = icecache::selection::Preset(icecache::selection::kDefaultPreset)->dci;
    opts.methods.push_back(m);
    m.name = "oracle-pages-default-clustered-layout";
    m.dci.page_order = DciOptions::PageOrder::kClustered;
    opts.methods.push_back(m);
    absl::StatusOr<MethodSpec> d =
        PresetMethod("dci-default-clustered", std::string(icecache::selection::kDefaultPreset));
    if (!d.ok()) {
      std::fprintf(stderr, "index_quality: %s\n", std::string(d.status().message()).c_str());
      return 1;
    }
    d->dci.page_order = DciOptions::PageOrder::kClustered;
    opts.methods.push_back(*d);
  }
  // Every preset other than the paper's (which DefaultMethods holds as icecache-dci) as the
  // daemon serves it, named dci-<preset>; the daemon's default among them.
  for (const std::string& preset : icecache::selection::PresetNames()) {
    if (preset == icecache::selection::kPaperPreset) continue;
    absl::StatusOr<MethodSpec> m = PresetMethod("dci-" + preset, preset);
    if (!m.ok()) {
      std::fprintf(stderr, "index_quality: %s\n", std::string(m.status().message()).c_str());
      return 1;
    }
    opts.methods.insert(opts.methods.begin() + 1, *m);
  }
  icecache::ThreadPool pool(absl::GetFlag(FLAGS_threads));
  std::printf("simd: %s, threads: %zu\n", SimdLevelName(ActiveSimdLevel()), pool.size());
  const absl::Time start = absl::Now();
  absl::StatusOr<EvalResult> result = Evaluate(trace, opts, &pool, [&](size_t done, size_t total) {
    std::fprintf(stderr, "\r  evaluated %zu/%zu (layer, KV head) pairs, %.0f s", done, total,
                 absl::ToDoubleSeconds(absl::Now() - start));
    if (done == total) std::fprintf(stderr, "\n");
  });
  if (!result.ok()) {
    std::fprintf(stderr, "index_quality: %s\n", std::string(result.status().message()).c_str());
    return 1;
  }
  const std::vector<EvalSummary> sums = result->Summaries();
  std::printf("\n%-28s %6s %8s %12s %13s %10s %11s\n", "method", "budget", "samples", "recall mean",
              "recall median", "recall p10", "out err mean");
  for (const EvalSummary& s : sums) {
    std::printf("%-28s %6u %8llu %12.4f %13.4f %10.4f %11.4f\n", s.method.c_str(), s.budget,
                static_cast<unsigned long long>(s.samples), s.recall_mean, s.recall_median,
                s.recall_p10, s.error_mean);
  }

  const std::string out_dir = absl::GetFlag(FLAGS_out);
  const std::string stem = out_dir + "/index_quality";
  std::ofstream csv(stem + ".csv");
  csv << "method,budget,samples,recall_mean,recall_median,recall_p10,error_mean,error_median\n";
  for (const EvalSummary& s : sums) {
    csv << s.method << ',' << s.budget << ',' << s.samples << ',' << s.recall_mean << ','
        << s.recall_median << ',' << s.recall_p10 << ',' << s.error_mean << ',' << s.error_median
        << '\n';
  }
  std::ofstream layers(stem + "_by_layer.csv");
  layers << "method,budget,layer,recall_mean\n";
  for (const MethodSpec& m : opts.methods) {
    for (uint32_t b : opts.budgets) {
      for (const auto& [layer, r] : result->RecallByLayer(m.name, b)) {
        layers << m.name << ',' << b << ',' << layer << ',' << r << '\n';
      }
    }
  }
  std::ofstream json(stem + ".json");
  json << "{\n  \"data\": \"" << data_name << "\",\n  \"description\": \"" << trace.description
       << "\",\n  \"simd\": \"" << SimdLevelName(ActiveSimdLevel()) << "\",\n  \"results\": [\n";
  for (size_t i = 0; i < sums.size(); ++i) {
    const EvalSummary& s = sums[i];
    json << "    {\"method\": \"" << s.method << "\", \"budget\": " << s.budget
         << ", \"samples\": " << s.samples << ", \"recall_mean\": " << s.recall_mean
         << ", \"recall_median\": " << s.recall_median << ", \"recall_p10\": " << s.recall_p10
         << ", \"error_mean\": " << s.error_mean << ", \"error_median\": " << s.error_median << "}"
         << (i + 1 < sums.size() ? "," : "") << "\n";
  }
  json << "  ]\n}\n";
  icecache::bench::CloseResult(csv, stem + ".csv", "index_quality");
  icecache::bench::CloseResult(layers, stem + "_by_layer.csv", "index_quality");
  icecache::bench::CloseResult(json, stem + ".json", "index_quality");
  std::printf("\nwrote %s.{json,csv} and %s_by_layer.csv\n", stem.c_str(), stem.c_str());
  return 0;
}
