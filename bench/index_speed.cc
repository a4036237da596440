// Speed of the semantic index, each figure beside its baseline in the same run:
//   - search latency per (layer, KV head) for one decode step (the GQA group's queries, k
//     pages) at several context sizes, against the exact SIMD scan over the same pages;
//     with the attention recall both reach (and the best-pages oracle's) on those queries;
//   - build throughput (tokens/s on one core), insert latency per page, index memory as a
//     share of the KV bytes it indexes;
//   - building a whole 8B-shaped layer stack (32 layers x 8 KV heads) on the worker pool.
//
//   build/bench/index_speed [--config=PRESET] [--sizes=4096,32768,131072,524288] [--out=DIR]
//                           [--stack=true] [--stack_tokens=32768,131072] [--trace=FILE]
//
// The default configuration is the daemon's default preset. With --trace, every (layer, KV
// head) of a captured trace instead of synthetic sizes. Prints tables; writes
// DIR/index_speed_<config>.json and .csv. Timings are medians; recall means.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/bench_output.h"
#include "bench/stats.h"
#include "common/flags_compat.h"
#include "common/thread_pool.h"
#include "eval/baselines.h"
#include "eval/in_memory_pages.h"
#include "eval/quality.h"
#include "eval/synthetic.h"
#include "eval/trace.h"
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
ABSL_FLAG(uint32_t, insert_pages, 64,
          "Synthetic data: 16-token pages inserted one at a time after the build (their "
          "median and p99 time are reported).");
ABSL_FLAG(uint32_t, build_reps, 1,
          "Builds timed per tree (fresh each time, same keys); the median is reported.");
ABSL_FLAG(bool, stack, true, "Also build a 32-layer x 8-head stack at 32k on the pool.");
ABSL_FLAG(std::string, stack_tokens, "32768", "Tokens per head of each stack build (a list).");
ABSL_FLAG(uint32_t, threads, 0, "Pool threads for the stack build (0: all cores).");
ABSL_FLAG(std::string, config, std::string(icecache::selection::kDefaultPreset),
          "Index preset (selection/index_factory.h; default: the daemon's default), or all "
          "(= tuned), all-r1 (tuned with promotion ratio 0.03); the option flags below "
          "override it when given.");
ABSL_FLAG(std::string, trace, "",
          "Trace file (bench/README.md): time every (layer, KV head) from --first_layer on, "
          "indexing the tokens before the first query; empty: synthetic data at --sizes.");
ABSL_FLAG(uint32_t, first_layer, 2, "Trace: first layer (2 skips the full-KV layers).");
// Option overrides: unset (empty) keeps the preset's value.
ABSL_FLAG(std::string, search, "", "DCI option: search mode descent, exact or sketch.");
ABSL_FLAG(std::string, slack, "", "DCI option: cell_bound_slack of the best-first search.");
ABSL_FLAG(std::string, rescore, "", "DCI option: rescore_tokens of the sketch search.");
ABSL_FLAG(std::string, parent_beam, "", "DCI option: parent_beam of the build (0: paper's).");
ABSL_FLAG(std::string, insert_beam, "",
          "DCI option: insert_beam, the beam of an insert's parent search (0: parent_beam).");
ABSL_FLAG(std::string, rerank, "",
          "DCI option: rerank_extra_pages of the best-first search (0: best key, no re-ranking).");
ABSL_FLAG(std::string, reproject_growth, "",
          "DCI option: norm growth (squared) before an insert re-projects a cell (1: paper's).");
ABSL_FLAG(bool, scaled_query, false, "DCI option: scale the query projection.");
ABSL_FLAG(std::string, page_order, "",
          "DCI option: page order within a cell, projection (the paper's) or clustered.");
ABSL_FLAG(std::string, retrieve_ratio, "", "DCI option: share of each expanded cell scored.");
ABSL_FLAG(bool, joint, false, "DCI option: joint group search.");
ABSL_FLAG(bool, page_granular, false, "DCI option: page-granular scoring.");
ABSL_FLAG(bool, mass, false, "DCI options: rank pages by mass, merge the group by mass.");
ABSL_FLAG(std::string, promotion_ratio_1, "", "DCI option: level 0 -> 1 promotion ratio.");
ABSL_FLAG(std::string, min_fov, "", "DCI option: minimum field of view.");
ABSL_FLAG(std::string, fov_ratio, "", "DCI option: field of view per token.");
ABSL_FLAG(std::string, exact_parent_max, "", "DCI option: exact parent search up to this size.");
ABSL_FLAG(std::string, final_fov, "", "DCI option: beam width over level-0 cells (0: the FOV).");
ABSL_FLAG(std::string, anchor_interval, "", "DCI option: anchor shortcut interval (0: off).");
ABSL_FLAG(std::string, exact_below, "", "DCI option: exact search up to this many tokens.");
ABSL_FLAG(std::string, label, "", "Name of the result files (default: the config).");
ABSL_FLAG(std::string, simd, "best",
          "SIMD level of the index kernels: best (this CPU's), scalar, avx2, avx-vnni, avx512 or "
          "avx512-vnni (a level this CPU lacks is refused).");

namespace {

using namespace icecache::index;
using namespace icecache::eval;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

using icecache::bench::Median;

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * v.size()));
  std::nth_element(v.begin(), v.begin() + i, v.end());
  return v[i];
}

double Mean(const std::vector<double>& v) {
  return v.empty() ? 0 : std::accumulate(v.begin(), v.end(), 0.0) / v.size();
}

// Samples of one size (synthetic) or of every (layer, KV head) of a trace.
struct Samples {
  uint64_t tokens = 0;  // indexed by the builds, summed
  uint32_t heads = 0;
  double build_s = 0;  // summed
  std::vector<double> dci_t, scan_t, dci_rec, scan_rec, oracle_rec, ins;
  double scored = 0, sketched = 0, opened = 0, steps = 0;  // summed over steps
  uint64_t index_bytes = 0, kv_bytes = 0;
};

struct SizeResult {
  uint32_t tokens = 0;
  double build_s = 0, build_tok_per_s = 0;
  double dci_us = 0, scan_us = 0, ratio = 0;
  double dci_recall = 0, scan_recall = 0, oracle_recall = 0;
  double scored_share = 0, sketched_share = 0, cells_opened = 0;
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

// One tree: built over keys[0, tokens), searched with each step's group of queries (and the
// exact scan and the oracle over the same layout), then `insert_pages` pages of the rows
// that follow inserted one at a time.
void RunHead(const RowView& all, uint32_t tokens, uint32_t insert_pages,
             const std::vector<std::vector<float>>& step_queries, uint32_t group,
             const DciOptions& dci_options, Samples* acc) {
  const uint32_t dim = all.dim;
  const uint32_t k = absl::GetFlag(FLAGS_k), reps = absl::GetFlag(FLAGS_reps);
  std::vector<uint32_t> positions(tokens + insert_pages * 16);
  std::iota(positions.begin(), positions.end(), 0u);
  const IndexGeometry g{dim, all.type, 16};
  RowView head = all;
  head.rows = tokens;

  // The build is timed build_reps times on fresh trees (the median counts); the last one is
  // searched.
  const uint32_t build_reps = std::max(1u, absl::GetFlag(FLAGS_build_reps));
  std::vector<double> build_times;
  std::unique_ptr<InMemoryPages> pages_ptr;
  std::unique_ptr<DciTree> tree_ptr;
  for (uint32_t rep = 0; rep < build_reps; ++rep) {
    tree_ptr.reset();
    pages_ptr = std::make_unique<InMemoryPages>(g, /*with_values=*/false);
    pages_ptr->Reserve((tokens + insert_pages * 16) / 4);  // far above the pages ever used
    tree_ptr = std::make_unique<DciTree>(g, dci_options, pages_ptr.get());
    InMemoryPages::Writer w(pages_ptr.get(), head, nullptr);
    const auto t0 = Clock::now();
    absl::Status s = tree_ptr->Build({head, positions.data()}, &w);
    build_times.push_back(Seconds(t0, Clock::now()));
    if (!s.ok()) {
      std::fprintf(stderr, "build failed: %s\n", std::string(s.message()).c_str());
      std::exit(1);
    }
  }
  acc->build_s += Median(build_times);
  InMemoryPages& pages = *pages_ptr;
  DciTree& tree = *tree_ptr;
  acc->tokens += tokens;
  ++acc->heads;
  ExactOracle scan(&tree, &pages, ExactOracle::Rank::kBestToken);
  ExactOracle oracle(&tree, &pages, ExactOracle::Rank::kSoftmaxMass);
  std::vector<std::vector<uint32_t>> page_positions(tree.page_id_limit());
  for (PageInfo& p : tree.Layout()) page_positions[p.page] = std::move(p.positions);

  std::vector<FullAttention> full(group);
  for (const std::vector<float>& q : step_queries) {
    for (uint32_t h = 0; h < group; ++h) {
      ComputeFullAttention(q.data() + uint64_t{h} * dim, head, nullptr, tokens, &full[h]);
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
    const DciTree::Stats st = tree.GetStats();
    acc->scored += double(st.tokens_scored_last_search) / (double(tokens) * group);
    acc->sketched += double(st.tokens_sketched_last_search) / (double(tokens) * group);
    acc->opened += st.cells_opened_last_search;
    acc->steps += 1;
    (void)oracle.Search(q.data(), group, k, &c);
    acc->dci_t.push_back(Median(ta));
    acc->scan_t.push_back(Median(tb));
    acc->dci_rec.push_back(GroupRecall(full, a, page_positions));
    acc->scan_rec.push_back(GroupRecall(full, b, page_positions));
    acc->oracle_rec.push_back(GroupRecall(full, c, page_positions));
  }

  // Inserts: whole pages of the tokens that follow.
  for (uint32_t p = 0; p < insert_pages; ++p) {
    RowView page = all;
    page.data = all.row(tokens + p * 16);
    page.rows = 16;
    InMemoryPages::Writer w(&pages, page, nullptr);
    const auto t0 = Clock::now();
    (void)tree.Insert({page, positions.data() + tokens + p * 16}, &w);
    acc->ins.push_back(Seconds(t0, Clock::now()) * 1e6);
  }
  acc->index_bytes += tree.MemoryBytes();
  acc->kv_bytes += uint64_t{tree.num_tokens()} * dim * 2 /*K,V*/ * ElemBytes(all.type);
}

SizeResult Summarize(const Samples& s) {
  SizeResult r;
  r.tokens = s.heads ? static_cast<uint32_t>(s.tokens / s.heads) : 0;
  r.build_s = s.heads ? s.build_s / s.heads : 0;
  r.build_tok_per_s = s.build_s > 0 ? s.tokens / s.build_s : 0;
  r.dci_us = Median(s.dci_t) * 1e6;
  r.scan_us = Median(s.scan_t) * 1e6;
  r.ratio = r.scan_us / r.dci_us;
  r.dci_recall = Mean(s.dci_rec);
  r.scan_recall = Mean(s.scan_rec);
  r.oracle_recall = Mean(s.oracle_rec);
  r.scored_share = s.steps ? s.scored / s.steps : 0;
  r.sketched_share = s.steps ? s.sketched / s.steps : 0;
  r.cells_opened = s.steps ? s.opened / s.steps : 0;
  r.insert_us_median = Median(s.ins);
  r.insert_us_p99 = Percentile(s.ins, 0.99);
  r.index_bytes = s.index_bytes;
  r.kv_bytes = s.kv_bytes;
  r.memory_share = s.kv_bytes ? double(s.index_bytes) / s.kv_bytes : 0;
  return r;
}

SizeResult RunSize(uint32_t tokens, const DciOptions& dci_options) {
  const uint32_t dim = absl::GetFlag(FLAGS_dim), group = absl::GetFlag(FLAGS_group);
  const uint32_t steps = absl::GetFlag(FLAGS_steps);
  const uint32_t insert_pages = absl::GetFlag(FLAGS_insert_pages);
  SyntheticOptions so;
  so.num_tokens = tokens + insert_pages * 16;
  so.head_dim = dim;
  so.num_kv_heads = 1;
  so.group_size = group;
  so.num_queries = steps;
  so.kv_type = ElemType::kBF16;
  so.num_clusters = std::max<uint32_t>(96, tokens / 256);
  const Trace trace = GenerateSynthetic(so);
  // Queries of each step: the group's heads at the step's position, against the indexed
  // tokens (positions < tokens; the queries sit just after them in the synthetic sequence).
  std::vector<std::vector<float>> qs(steps, std::vector<float>(uint64_t{group} * dim));
  for (uint32_t step = 0; step < steps; ++step) {
    for (uint32_t h = 0; h < group; ++h) {
      std::copy_n(trace.Query(0, h, step), dim, qs[step].begin() + uint64_t{h} * dim);
    }
  }
  Samples s;
  RunHead(trace.Keys(0, 0), tokens, insert_pages, qs, group, dci_options, &s);
  return Summarize(s);
}

// Every (layer, KV head) of a trace from --first_layer on: the tokens before the first query
// are indexed, --steps of the queries (evenly spaced) are timed, the pages after the indexed
// tokens inserted.
SizeResult RunTrace(const Trace& t, const DciOptions& dci_options) {
  const uint32_t tokens = t.query_positions.front();
  const uint32_t insert_pages = std::min<uint32_t>(8, (t.num_tokens - tokens) / 16);
  const uint32_t nqp = static_cast<uint32_t>(t.query_positions.size());
  const uint32_t steps = std::min(absl::GetFlag(FLAGS_steps), nqp);
  const uint32_t group = t.group_size();
  Samples s;
  for (uint32_t l = absl::GetFlag(FLAGS_first_layer); l < t.num_layers; ++l) {
    for (uint32_t h = 0; h < t.num_kv_heads; ++h) {
      std::vector<std::vector<float>> qs(steps, std::vector<float>(uint64_t{group} * t.head_dim));
      for (uint32_t step = 0; step < steps; ++step) {
        const uint32_t qi = static_cast<uint32_t>(uint64_t{step} * nqp / steps);
        for (uint32_t g = 0; g < group; ++g) {
          std::copy_n(t.Query(l, h * group + g, qi), t.head_dim,
                      qs[step].begin() + uint64_t{g} * t.head_dim);
        }
      }
      RunHead(t.Keys(l, h), tokens, insert_pages, qs, group, dci_options, &s);
    }
  }
  return Summarize(s);
}

// Applies the option flags that were given to the preset's options.
bool ApplyOverrides(DciOptions* dci) {
  // A flag is refused with its value and what it must be; the run stops before any work.
  auto refuse = [](const char* name, const std::string& flag, const char* must) {
    std::fprintf(stderr, "--%s=%s: must be %s\n", name, flag.c_str(), must);
    return false;
  };
  // Integer options take whole numbers in their type's range, the others finite numbers.
  auto num = [&refuse](const std::string& flag, const char* name, auto* v) {
    using T = std::remove_pointer_t<decltype(v)>;
    if (flag.empty()) return true;
    double x;
    if (!absl::SimpleAtod(flag, &x) || !std::isfinite(x)) {
      return refuse(name, flag, "a finite number");
    }
    if constexpr (std::is_integral_v<T>) {
      if (!(x >= 0 && x == std::floor(x) && x <= double(std::numeric_limits<T>::max()))) {
        return refuse(name, flag, "a whole number >= 0");
      }
    }
    *v = static_cast<T>(x);
    return true;
  };
  const std::string search = absl::GetFlag(FLAGS_search);
  if (search == "descent") {
    dci->search_mode = DciOptions::SearchMode::kBeamDescent;
  } else if (search == "exact") {
    dci->search_mode = DciOptions::SearchMode::kBestFirstExact;
  } else if (search == "sketch") {
    dci->search_mode = DciOptions::SearchMode::kBestFirstSketch;
  } else if (!search.empty()) {
    std::fprintf(stderr, "--search=%s: descent, exact or sketch\n", search.c_str());
    return false;
  }
  if (const std::string order = absl::GetFlag(FLAGS_page_order); !order.empty()) {
    const auto parsed = icecache::selection::ParsePageOrder(order);
    if (!parsed.ok()) {
      std::fprintf(stderr, "--page_order: %s\n", std::string(parsed.status().message()).c_str());
      return false;
    }
    dci->page_order = *parsed;
  }
  if (absl::GetFlag(FLAGS_scaled_query)) dci->scale_query_projection = true;
  if (absl::GetFlag(FLAGS_joint)) dci->joint_group_search = true;
  if (absl::GetFlag(FLAGS_page_granular)) dci->page_granular_scoring = true;
  if (absl::GetFlag(FLAGS_mass)) {
    dci->page_score = DciOptions::PageScore::kSoftmaxMass;
    dci->group_merge = DciOptions::GroupMerge::kSumOfMass;
  }
  const bool parsed =
      num(absl::GetFlag(FLAGS_slack), "slack", &dci->cell_bound_slack) &&
      num(absl::GetFlag(FLAGS_rescore), "rescore", &dci->rescore_tokens) &&
      num(absl::GetFlag(FLAGS_parent_beam), "parent_beam", &dci->parent_beam) &&
      num(absl::GetFlag(FLAGS_insert_beam), "insert_beam", &dci->insert_beam) &&
      num(absl::GetFlag(FLAGS_rerank), "rerank", &dci->rerank_extra_pages) &&
      num(absl::GetFlag(FLAGS_reproject_growth), "reproject_growth", &dci->reproject_growth) &&
      num(absl::GetFlag(FLAGS_retrieve_ratio), "retrieve_ratio", &dci->query_retrieve_ratio) &&
      num(absl::GetFlag(FLAGS_promotion_ratio_1), "promotion_ratio_1", &dci->promotion_ratio_1) &&
      num(absl::GetFlag(FLAGS_min_fov), "min_fov", &dci->min_fov) &&
      num(absl::GetFlag(FLAGS_fov_ratio), "fov_ratio", &dci->fov_ratio) &&
      num(absl::GetFlag(FLAGS_exact_parent_max), "exact_parent_max", &dci->exact_parent_max) &&
      num(absl::GetFlag(FLAGS_final_fov), "final_fov", &dci->final_fov) &&
      num(absl::GetFlag(FLAGS_anchor_interval), "anchor_interval", &dci->anchor_interval) &&
      num(absl::GetFlag(FLAGS_exact_below), "exact_below", &dci->exact_search_max_tokens);
  if (!parsed) return false;
  if (dci->rerank_extra_pages > 4096) {
    return refuse("rerank", absl::GetFlag(FLAGS_rerank), "a whole number of pages in [0, 4096]");
  }
  if (!(dci->reproject_growth >= 1.0f)) {
    return refuse("reproject_growth", absl::GetFlag(FLAGS_reproject_growth),
                  "a finite number >= 1");
  }
  return true;
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
  if (!ApplyOverrides(&dci)) return 2;
  {
    const std::string simd = absl::GetFlag(FLAGS_simd);
    const std::pair<const char*, SimdLevel> levels[] = {{"scalar", SimdLevel::kScalar},
                                                        {"avx2", SimdLevel::kAvx2},
                                                        {"avx-vnni", SimdLevel::kAvxVnni},
                                                        {"avx512", SimdLevel::kAvx512},
                                                        {"avx512-vnni", SimdLevel::kAvx512Vnni}};
    if (simd != "best") {
      const auto* it = std::find_if(std::begin(levels), std::end(levels),
                                    [&](const auto& l) { return simd == l.first; });
      if (it == std::end(levels)) {
        std::fprintf(stderr,
                     "--simd=%s: unknown level (best, scalar, avx2, avx-vnni, avx512, "
                     "avx512-vnni)\n",
                     simd.c_str());
        return 2;
      }
      if (!SimdLevelSupported(it->second)) {
        std::fprintf(stderr, "--simd=%s: this CPU (or OS) cannot run it; best here: %s\n",
                     simd.c_str(), SimdLevelName(DetectSimdLevel()));
        return 2;
      }
      SetSimdLevel(it->second);
    }
  }
  const std::string label =
      absl::GetFlag(FLAGS_label).empty() ? config : absl::GetFlag(FLAGS_label);

  std::vector<SizeResult> results;
  std::string data = "synthetic";
  const std::string trace_path = absl::GetFlag(FLAGS_trace);
  if (!trace_path.empty()) {
    absl::StatusOr<Trace> t = ReadTrace(trace_path);
    if (!t.ok()) {
      std::fprintf(stderr, "index_speed: %s\n", std::string(t.status().message()).c_str());
      return 1;
    }
    data = trace_path;
    std::printf(
        "index speed: config %s; trace %s (%s): %u layers from %u x %u KV heads, dim %u, GQA "
        "group %u, k=%u pages of 16, simd %s, one core\n",
        label.c_str(), trace_path.c_str(), t->description.c_str(), t->num_layers,
        absl::GetFlag(FLAGS_first_layer), t->num_kv_heads, t->head_dim, t->group_size(),
        absl::GetFlag(FLAGS_k), SimdLevelName(ActiveSimdLevel()));
    results.push_back(RunTrace(*t, dci));
  } else {
    std::printf(
        "index speed: config %s; synthetic keys (bf16, dim %u), GQA group %u, k=%u pages "
        "of 16, simd %s, one core unless stated\n",
        label.c_str(), absl::GetFlag(FLAGS_dim), absl::GetFlag(FLAGS_group), absl::GetFlag(FLAGS_k),
        SimdLevelName(ActiveSimdLevel()));
    for (absl::string_view sz : absl::StrSplit(absl::GetFlag(FLAGS_sizes), ',')) {
      uint32_t n;
      if (!absl::SimpleAtoi(sz, &n)) {
        std::fprintf(stderr, "bad size %s\n", std::string(sz).c_str());
        return 2;
      }
      std::fprintf(stderr, "  %u tokens...\n", n);
      results.push_back(RunSize(n, dci));
    }
  }
  std::printf("\n%9s %10s %12s %10s %10s %7s %8s %8s %6s %8s %8s %8s %10s %10s %8s\n", "tokens",
              "build s", "build tok/s", "dci us", "scan us", "ratio", "scored", "sketched", "cells",
              "rec dci", "rec scan", "rec orc", "ins us p50", "ins us p99", "mem %");
  for (const SizeResult& r : results) {
    std::printf(
        "%9u %10.3f %12.0f %10.1f %10.1f %7.2f %7.2f%% %7.2f%% %6.1f %8.4f %8.4f %8.4f %10.1f "
        "%10.1f %7.2f%%\n",
        r.tokens, r.build_s, r.build_tok_per_s, r.dci_us, r.scan_us, r.ratio, 100 * r.scored_share,
        100 * r.sketched_share, r.cells_opened, r.dci_recall, r.scan_recall, r.oracle_recall,
        r.insert_us_median, r.insert_us_p99, 100 * r.memory_share);
  }

  // The 8B-shaped stack: 32 layers x 8 KV heads, each a tree over stack_tokens tokens.
  struct StackRun {
    uint32_t tokens = 0;
    double seconds = 0;
    size_t threads = 0;
  };
  std::vector<StackRun> stacks;
  if (absl::GetFlag(FLAGS_stack) && trace_path.empty()) {
    for (absl::string_view st : absl::StrSplit(absl::GetFlag(FLAGS_stack_tokens), ',')) {
      uint32_t stack_tokens;
      if (!absl::SimpleAtoi(st, &stack_tokens)) {
        std::fprintf(stderr, "bad stack size %s\n", std::string(st).c_str());
        return 2;
      }
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
      const uint32_t trees = 32 * 8;
      // Trees are built and dropped in waves (memory: a 128k stack's pages are 16 GiB).
      const uint32_t wave = static_cast<uint32_t>(pool.size());
      double seconds = 0;
      for (uint32_t w0 = 0; w0 < trees; w0 += wave) {
        const uint32_t nw = std::min(wave, trees - w0);
        std::vector<std::unique_ptr<InMemoryPages>> pages(nw);
        std::vector<std::unique_ptr<DciTree>> built(nw);
        const auto t0 = Clock::now();
        pool.ParallelFor(nw, [&](size_t i) {
          RowView keys = heads.Keys(0, static_cast<uint32_t>((w0 + i) % 8));
          pages[i] = std::make_unique<InMemoryPages>(g, false);
          built[i] = std::make_unique<DciTree>(g, dci, pages[i].get());
          InMemoryPages::Writer w(pages[i].get(), keys, nullptr);
          (void)built[i]->Build({keys, positions.data()}, &w);
        });
        seconds += Seconds(t0, Clock::now());
      }
      stacks.push_back({stack_tokens, seconds, pool.size()});
      std::printf(
          "\nstack: 32 layers x 8 KV heads x %u tokens (dim %u) built in %.2f s on %zu "
          "threads = %.0f tokens/s per thread (includes writing the pages)\n",
          stack_tokens, so.head_dim, seconds, pool.size(),
          double(trees) * stack_tokens / seconds / pool.size());
    }
  }

  const std::string out_dir = absl::GetFlag(FLAGS_out);
  const std::string stem = out_dir + "/index_speed_" + label;
  std::ofstream csv(stem + ".csv");
  csv << "tokens,build_s,build_tokens_per_s,dci_search_us,exact_scan_us,speedup,scored_share,"
         "sketched_share,cells_opened,recall_dci,recall_exact_scan,recall_oracle,insert_us_p50,"
         "insert_us_p99,index_bytes,kv_bytes,memory_share\n";
  std::ofstream json(stem + ".json");
  json << "{\n  \"config\": \"" << label << "\",\n  \"preset\": \"" << preset
       << "\",\n  \"data\": \"" << data << "\",\n  \"simd\": \"" << SimdLevelName(ActiveSimdLevel())
       << "\",\n  \"dim\": " << absl::GetFlag(FLAGS_dim)
       << ",\n  \"group\": " << absl::GetFlag(FLAGS_group)
       << ",\n  \"k\": " << absl::GetFlag(FLAGS_k)
       << ",\n  \"build_reps\": " << absl::GetFlag(FLAGS_build_reps)
       << ",\n  \"insert_pages\": " << absl::GetFlag(FLAGS_insert_pages) << ",\n  \"sizes\": [\n";
  for (size_t i = 0; i < results.size(); ++i) {
    const SizeResult& r = results[i];
    csv << r.tokens << ',' << r.build_s << ',' << r.build_tok_per_s << ',' << r.dci_us << ','
        << r.scan_us << ',' << r.ratio << ',' << r.scored_share << ',' << r.sketched_share << ','
        << r.cells_opened << ',' << r.dci_recall << ',' << r.scan_recall << ',' << r.oracle_recall
        << ',' << r.insert_us_median << ',' << r.insert_us_p99 << ',' << r.index_bytes << ','
        << r.kv_bytes << ',' << r.memory_share << '\n';
    json << "    {\"tokens\": " << r.tokens << ", \"build_s\": " << r.build_s
         << ", \"build_tokens_per_s\": " << r.build_tok_per_s << ", \"dci_search_us\": " << r.dci_us
         << ", \"exact_scan_us\": " << r.scan_us << ", \"speedup\": " << r.ratio
         << ", \"scored_share\": " << r.scored_share << ", \"sketched_share\": " << r.sketched_share
         << ", \"cells_opened\": " << r.cells_opened << ", \"recall_dci\": " << r.dci_recall
         << ", \"recall_exact_scan\": " << r.scan_recall
         << ", \"recall_oracle\": " << r.oracle_recall
         << ", \"insert_us_p50\": " << r.insert_us_median
         << ", \"insert_us_p99\": " << r.insert_us_p99 << ", \"memory_share\": " << r.memory_share
         << "}" << (i + 1 < results.size() ? "," : "") << "\n";
  }
  json << "  ],\n  \"stacks\": [";
  for (size_t i = 0; i < stacks.size(); ++i) {
    json << (i ? ", " : "") << "{\"layers\": 32, \"kv_heads\": 8, \"tokens\": " << stacks[i].tokens
         << ", \"seconds\": " << stacks[i].seconds << ", \"threads\": " << stacks[i].threads
         << ", \"tokens_per_s_per_thread\": "
         << 256.0 * stacks[i].tokens / stacks[i].seconds / stacks[i].threads << "}";
  }
  json << "]\n}\n";
  icecache::bench::CloseResult(csv, stem + ".csv", "index_speed");
  icecache::bench::CloseResult(json, stem + ".json", "index_speed");
  std::printf("\nwrote %s.{json,csv}\n", stem.c_str());
  return 0;
}
