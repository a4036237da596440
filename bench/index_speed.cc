// Speed of the semantic index, each figure beside its baseline in the same run:
//   - search latency per (layer, KV head) for one decode step (the GQA group's queries, k
//     pages) at several context sizes, against the exact SIMD scan over the same pages;
//     with the attention recall both reach (and the best-pages oracle's) on those queries;
//   - build throughput (tokens/s on one core), insert latency per page, index memory as a
//     share of the KV bytes it indexes;
//   - building a whole 8B-shaped layer stack (32 layers x 8 KV heads) on the worker pool.
//
//   build/bench/index_speed [--sizes=4096,32768,131072,524288] [--out=DIR] [--stack=true]
//
// Prints tables; writes DIR/index_speed.json and DIR/index_speed.csv. Medians throughout.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/bench_output.h"
#include "common/flags_compat.h"
#include "common/thread_pool.h"
#include "eval/baselines.h"
#include "eval/in_memory_pages.h"
#include "eval/quality.h"
#include "eval/synthetic.h"
#include "selection/index_factory.h"
#include "server/index/dci_tree.h"
#include "server/index/simd.h"

ABSL_FLAG(std::string, sizes, "4096,32768,131072,524288", "Context sizes (tokens per head).");
ABSL_FLAG(std::string, out, "bench/results", "Directory for JSON/CSV results.");
ABSL_FLAG(uint32_t, dim, 128, "Head dimension.");
ABSL_FLAG(uint32_t, group, 4, "Query heads per KV head (GQA group).");
ABSL_FLAG(uint32_t, k, 12, "Pages selected per search (12 = the paper's 256-token budget).");
ABSL_FLAG(uint32_t, steps, 32, "Decode steps (query groups) timed per size.");
ABSL_FLAG(uint32_t, reps, 5, "Timing repetitions of each step; the median is reported.");
ABSL_FLAG(bool, stack, true, "Also build a 32-layer x 8-head stack at 32k on the pool.");
ABSL_FLAG(uint32_t, stack_tokens, 32768, "Tokens per head of the stack build.");
ABSL_FLAG(uint32_t, threads, 0, "Pool threads for the stack build (0: all cores).");
ABSL_FLAG(std::string, config, "paper",
          "Index preset (selection/index_factory.h: paper, tuned), or all (= tuned), all-r1 "
          "(tuned with promotion ratio 0.03); the single-option flags below override it.");
ABSL_FLAG(bool, scaled_query, false, "DCI option: scale the query projection.");
ABSL_FLAG(double, retrieve_ratio, 0.8, "DCI option: share of each expanded cell scored.");
ABSL_FLAG(bool, joint, false, "DCI option: joint group search.");
ABSL_FLAG(bool, page_granular, false, "DCI option: page-granular scoring.");
ABSL_FLAG(bool, mass, false, "DCI options: rank pages by mass, merge the group by mass.");
ABSL_FLAG(double, promotion_ratio_1, 0.01, "DCI option: level 0 -> 1 promotion ratio.");
ABSL_FLAG(uint32_t, min_fov, 30, "DCI option: minimum field of view.");
ABSL_FLAG(double, fov_ratio, 0.0015, "DCI option: field of view per token.");
ABSL_FLAG(uint32_t, exact_parent_max, 3000, "DCI option: exact parent search up to this size.");
ABSL_FLAG(uint32_t, final_fov, 0, "DCI option: beam width over level-0 cells (0: the FOV).");
ABSL_FLAG(uint32_t, anchor_interval, 0, "DCI option: anchor shortcut interval (0: off).");
ABSL_FLAG(uint32_t, exact_below, 0, "DCI option: exact search up to this many tokens.");

namespace {

using namespace icecache::index;
using namespace icecache::eval;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * v.size()));
  std::nth_element(v.begin(), v.begin() + i, v.end());
  return v[i];
}

struct SizeResult {
  uint32_t tokens = 0;
  double build_s = 0, build_tok_per_s = 0;
  double dci_us = 0, scan_us = 0, ratio = 0;
  double dci_recall = 0, scan_recall = 0, oracle_recall = 0;
  double scored_share = 0;
  double insert_us_median = 0, insert_us_p99 = 0;
  double memory_share = 0;
  uint64_t index_bytes = 0, kv_bytes = 0;
};

// Recall (over the indexed tokens) of the tokens of `pages`, averaged over the group.
double GroupRecall(const std::vector<FullAttention>& full, const std::vector<SelectedPage>& pages,
                   const std::vector<std::vector<uint32_t>>& page_positions) {
  std::vector<uint32_t> tokens;
  for (const SelectedPage& p : pages) {
    tokens.insert(tokens.end(), page_positions[p.page].begin(), page_positions[p.page].end());
  }
  double r = 0;
  for (const FullAttention& f : full) r += AttentionRecall(f, tokens);
  return r / full.size();
}

SizeResult RunSize(uint32_t tokens, const DciOptions& dci_options) {
  const uint32_t dim = absl::GetFlag(FLAGS_dim), group = absl::GetFlag(FLAGS_group);
  const uint32_t k = absl::GetFlag(FLAGS_k), steps = absl::GetFlag(FLAGS_steps);
  const uint32_t reps = absl::GetFlag(FLAGS_reps);
  const uint32_t insert_pages = 64;
  SyntheticOptions so;
  so.num_tokens = tokens + insert_pages * 16;
  so.head_dim = dim;
  so.num_kv_heads = 1;
  so.group_size = group;
  so.num_queries = steps;
  so.kv_type = ElemType::kBF16;
  so.num_clusters = std::max<uint32_t>(96, tokens / 256);
  const Trace trace = GenerateSynthetic(so);
  std::vector<uint32_t> positions(so.num_tokens);
  std::iota(positions.begin(), positions.end(), 0u);
  const IndexGeometry g{dim, ElemType::kBF16, 16};
  RowView all = trace.Keys(0, 0);
  RowView head = all;
  head.rows = tokens;

  SizeResult r;
  r.tokens = tokens;
  InMemoryPages pages(g, /*with_values=*/false);
  pages.Reserve((tokens + insert_pages * 16) / 4);  // far above the pages ever used
  DciTree tree(g, dci_options, &pages);
  {
    InMemoryPages::Writer w(&pages, head, nullptr);
    const auto t0 = Clock::now();
    absl::Status s = tree.Build({head, positions.data()}, &w);
    r.build_s = Seconds(t0, Clock::now());
    if (!s.ok()) {
      std::fprintf(stderr, "build failed: %s\n", std::string(s.message()).c_str());
      std::exit(1);
    }
  }
  r.build_tok_per_s = tokens / r.build_s;
  ExactOracle scan(&tree, &pages, ExactOracle::Rank::kBestToken);
  ExactOracle oracle(&tree, &pages, ExactOracle::Rank::kSoftmaxMass);
  std::vector<std::vector<uint32_t>> page_positions(tree.page_id_limit());
  for (PageInfo& p : tree.Layout()) page_positions[p.page] = std::move(p.positions);

  // Queries of each step: the group's heads at the step's position, against the indexed
  // tokens (positions < tokens; the queries sit just after them in the synthetic sequence).
  std::vector<double> dci_t, scan_t, dci_rec, scan_rec, oracle_rec;
  uint64_t scored = 0;
  std::vector<float> q(uint64_t{group} * dim);
  std::vector<FullAttention> full(group);
  for (uint32_t step = 0; step < steps; ++step) {
    for (uint32_t h = 0; h < group; ++h) {
      std::copy_n(trace.Query(0, h, step), dim, q.begin() + uint64_t{h} * dim);
      ComputeFullAttention(trace.Query(0, h, step), head, nullptr, tokens, &full[h]);
    }
    std::vector<SelectedPage> a, b, c;
    std::vector<double> ta, tb;
    for (uint32_t rep = 0; rep < reps; ++rep) {
      auto t0 = Clock::now();
      (void)tree.Search(q.data(), group, k, &a);
      auto t1 = Clock::now();
      (void)scan.Search(q.data(), group, k, &b);
      auto t2 = Clock::now();
      ta.push_back(Seconds(t0, t1));
      tb.push_back(Seconds(t1, t2));
    }
    scored += tree.GetStats().tokens_scored_last_search;
    (void)oracle.Search(q.data(), group, k, &c);
    dci_t.push_back(Median(ta));
    scan_t.push_back(Median(tb));
    dci_rec.push_back(GroupRecall(full, a, page_positions));
    scan_rec.push_back(GroupRecall(full, b, page_positions));
    oracle_rec.push_back(GroupRecall(full, c, page_positions));
  }
  r.dci_us = Median(dci_t) * 1e6;
  r.scan_us = Median(scan_t) * 1e6;
  r.ratio = r.scan_us / r.dci_us;
  auto mean = [](const std::vector<double>& v) {
    return std::accumulate(v.begin(), v.end(), 0.0) / v.size();
  };
  r.dci_recall = mean(dci_rec);
  r.scan_recall = mean(scan_rec);
  r.oracle_recall = mean(oracle_rec);
  r.scored_share = double(scored) / steps / (double(tokens) * group);

  // Inserts: whole pages of the tokens that follow.
  std::vector<double> ins;
  for (uint32_t p = 0; p < insert_pages; ++p) {
    RowView page = all;
    page.data = all.row(tokens + p * 16);
    page.rows = 16;
    InMemoryPages::Writer w(&pages, page, nullptr);
    const auto t0 = Clock::now();
    (void)tree.Insert({page, positions.data() + tokens + p * 16}, &w);
    ins.push_back(Seconds(t0, Clock::now()) * 1e6);
  }
  r.insert_us_median = Median(ins);
  r.insert_us_p99 = Percentile(ins, 0.99);
  r.index_bytes = tree.MemoryBytes();
  r.kv_bytes = uint64_t{tree.num_tokens()} * dim * 2 /*K,V*/ * 2 /*bf16*/;
  r.memory_share = double(r.index_bytes) / r.kv_bytes;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args = icecache::NormalizeFlagNames(argc, argv);
  std::vector<char*> ptrs = icecache::ArgvPointers(args);
  absl::ParseCommandLine(static_cast<int>(args.size()), ptrs.data());
  icecache::bench::PrepareOutDir(absl::GetFlag(FLAGS_out), "index_speed");
  const std::string config = absl::GetFlag(FLAGS_config);
  // "all" is the tuned preset (every improvement option), "all-r1" the same with promotion
  // ratio 0.03; any preset name works too.
  const std::string preset = config == "all" || config == "all-r1" ? "tuned" : config;
  absl::StatusOr<icecache::selection::IndexSpec> spec = icecache::selection::Preset(preset);
  if (!spec.ok()) {
    std::fprintf(stderr, "--config=%s: %s\n", config.c_str(), spec.status().ToString().c_str());
    return 2;
  }
  DciOptions dci = spec->dci;
  if (config == "all-r1") dci.promotion_ratio_1 = 0.03;
  if (absl::GetFlag(FLAGS_scaled_query)) dci.scale_query_projection = true;
  if (absl::GetFlag(FLAGS_joint)) dci.joint_group_search = true;
  if (absl::GetFlag(FLAGS_page_granular)) dci.page_granular_scoring = true;
  if (absl::GetFlag(FLAGS_mass)) {
    dci.page_score = DciOptions::PageScore::kSoftmaxMass;
    dci.group_merge = DciOptions::GroupMerge::kSumOfMass;
  }
  if (absl::GetFlag(FLAGS_retrieve_ratio) != 0.8) {
    dci.query_retrieve_ratio = absl::GetFlag(FLAGS_retrieve_ratio);
  }
  if (absl::GetFlag(FLAGS_promotion_ratio_1) != 0.01) {
    dci.promotion_ratio_1 = absl::GetFlag(FLAGS_promotion_ratio_1);
  }
  dci.min_fov = absl::GetFlag(FLAGS_min_fov);
  dci.fov_ratio = absl::GetFlag(FLAGS_fov_ratio);
  dci.exact_search_max_tokens = absl::GetFlag(FLAGS_exact_below);
  if (absl::GetFlag(FLAGS_final_fov) != 0) dci.final_fov = absl::GetFlag(FLAGS_final_fov);
  dci.exact_parent_max = absl::GetFlag(FLAGS_exact_parent_max);
  dci.anchor_interval = absl::GetFlag(FLAGS_anchor_interval);

  std::printf(
      "index speed: config %s; synthetic keys (bf16, dim %u), GQA group %u, k=%u pages "
      "of 16, simd %s, one core unless stated\n",
      config.c_str(), absl::GetFlag(FLAGS_dim), absl::GetFlag(FLAGS_group), absl::GetFlag(FLAGS_k),
      SimdLevelName(ActiveSimdLevel()));
  std::vector<SizeResult> results;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_sizes), ',')) {
    uint32_t n;
    if (!absl::SimpleAtoi(s, &n)) {
      std::fprintf(stderr, "bad size %s\n", std::string(s).c_str());
      return 2;
    }
    std::fprintf(stderr, "  %u tokens...\n", n);
    results.push_back(RunSize(n, dci));
  }
  std::printf("\n%9s %10s %12s %10s %10s %7s %8s %8s %8s %8s %10s %10s %8s\n", "tokens", "build s",
              "build tok/s", "dci us", "scan us", "ratio", "scored", "rec dci", "rec scan",
              "rec orc", "ins us p50", "ins us p99", "mem %");
  for (const SizeResult& r : results) {
    std::printf(
        "%9u %10.3f %12.0f %10.1f %10.1f %7.2f %7.1f%% %8.4f %8.4f %8.4f %10.1f %10.1f "
        "%7.2f%%\n",
        r.tokens, r.build_s, r.build_tok_per_s, r.dci_us, r.scan_us, r.ratio, 100 * r.scored_share,
        r.dci_recall, r.scan_recall, r.oracle_recall, r.insert_us_median, r.insert_us_p99,
        100 * r.memory_share);
  }

  // The 8B-shaped stack: 32 layers x 8 KV heads, each a tree over stack_tokens tokens.
  double stack_s = 0;
  size_t stack_threads = 0;
  const uint32_t stack_tokens = absl::GetFlag(FLAGS_stack_tokens);
  if (absl::GetFlag(FLAGS_stack)) {
    SyntheticOptions so;
    so.num_tokens = stack_tokens;
    so.head_dim = absl::GetFlag(FLAGS_dim);
    so.num_kv_heads = 8;
    so.group_size = 1;
    so.num_queries = 1;
    so.kv_type = ElemType::kBF16;
    so.num_clusters = std::max<uint32_t>(96, stack_tokens / 256);
    std::fprintf(stderr, "  stack: generating 8 heads x %u tokens...\n", stack_tokens);
    const Trace heads = GenerateSynthetic(so);  // layer l reuses these 8 heads' keys
    std::vector<uint32_t> positions(stack_tokens);
    std::iota(positions.begin(), positions.end(), 0u);
    const IndexGeometry g{so.head_dim, ElemType::kBF16, 16};
    icecache::ThreadPool pool(absl::GetFlag(FLAGS_threads));
    stack_threads = pool.size();
    const uint32_t trees = 32 * 8;
    std::vector<std::unique_ptr<InMemoryPages>> pages(trees);
    std::vector<std::unique_ptr<DciTree>> built(trees);
    const auto t0 = Clock::now();
    pool.ParallelFor(trees, [&](size_t i) {
      RowView keys = heads.Keys(0, static_cast<uint32_t>(i % 8));
      pages[i] = std::make_unique<InMemoryPages>(g, false);
      built[i] = std::make_unique<DciTree>(g, dci, pages[i].get());
      InMemoryPages::Writer w(pages[i].get(), keys, nullptr);
      (void)built[i]->Build({keys, positions.data()}, &w);
    });
    stack_s = Seconds(t0, Clock::now());
    std::printf(
        "\nstack: 32 layers x 8 KV heads x %u tokens (dim %u) built in %.2f s on %zu "
        "threads = %.0f tokens/s per thread (includes writing the pages)\n",
        stack_tokens, so.head_dim, stack_s, stack_threads,
        double(trees) * stack_tokens / stack_s / stack_threads);
  }

  const std::string out_dir = absl::GetFlag(FLAGS_out);
  const std::string stem = out_dir + "/index_speed_" + config;
  std::ofstream csv(stem + ".csv");
  csv << "tokens,build_s,build_tokens_per_s,dci_search_us,exact_scan_us,speedup,scored_share,"
         "recall_dci,recall_exact_scan,recall_oracle,insert_us_p50,insert_us_p99,index_bytes,"
         "kv_bytes,memory_share\n";
  std::ofstream json(stem + ".json");
  json << "{\n  \"config\": \"" << config << "\",\n  \"simd\": \""
       << SimdLevelName(ActiveSimdLevel()) << "\",\n  \"dim\": " << absl::GetFlag(FLAGS_dim)
       << ",\n  \"group\": " << absl::GetFlag(FLAGS_group)
       << ",\n  \"k\": " << absl::GetFlag(FLAGS_k) << ",\n  \"sizes\": [\n";
  for (size_t i = 0; i < results.size(); ++i) {
    const SizeResult& r = results[i];
    csv << r.tokens << ',' << r.build_s << ',' << r.build_tok_per_s << ',' << r.dci_us << ','
        << r.scan_us << ',' << r.ratio << ',' << r.scored_share << ',' << r.dci_recall << ','
        << r.scan_recall << ',' << r.oracle_recall << ',' << r.insert_us_median << ','
        << r.insert_us_p99 << ',' << r.index_bytes << ',' << r.kv_bytes << ',' << r.memory_share
        << '\n';
    json << "    {\"tokens\": " << r.tokens << ", \"build_s\": " << r.build_s
         << ", \"build_tokens_per_s\": " << r.build_tok_per_s << ", \"dci_search_us\": " << r.dci_us
         << ", \"exact_scan_us\": " << r.scan_us << ", \"speedup\": " << r.ratio
         << ", \"scored_share\": " << r.scored_share << ", \"recall_dci\": " << r.dci_recall
         << ", \"recall_exact_scan\": " << r.scan_recall
         << ", \"recall_oracle\": " << r.oracle_recall
         << ", \"insert_us_p50\": " << r.insert_us_median
         << ", \"insert_us_p99\": " << r.insert_us_p99 << ", \"memory_share\": " << r.memory_share
         << "}" << (i + 1 < results.size() ? "," : "") << "\n";
  }
  json << "  ],\n  \"stack\": {\"layers\": 32, \"kv_heads\": 8, \"tokens\": " << stack_tokens
       << ", \"seconds\": " << stack_s << ", \"threads\": " << stack_threads << "}\n}\n";
  icecache::bench::CloseResult(csv, stem + ".csv", "index_speed");
  icecache::bench::CloseResult(json, stem + ".json", "index_speed");
  std::printf("\nwrote %s.{json,csv}\n", stem.c_str());
  return 0;
}
