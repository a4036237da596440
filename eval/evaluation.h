// Side-by-side quality evaluation of index implementations on a trace, replaying what the
// service does: the prompt up to the first query is indexed (minus sink and window), then
// for every query position the window slides and each full page that leaves it is inserted,
// each method selects its pages for the GQA group, and attention recall and output error
// are measured against exact attention over the whole context.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/thread_pool.h"
#include "eval/head_selector.h"
#include "eval/index_types.h"
#include "eval/trace.h"

namespace icecache::eval {

struct EvalOptions {
  std::vector<uint32_t> budgets = {64, 128, 256, 512};
  uint32_t page_size = 16;
  std::vector<MethodSpec> methods = DefaultMethods();
  uint32_t first_layer = 0;          // e.g. 2 to skip the full-KV layers
  uint32_t end_layer = 0xffffffffu;  // exclusive
  bool output_error = true;          // needs values in the trace
};

// Aggregates of one (method, budget, layer); samples are (KV head, query head, query).
struct EvalCell {
  std::string method;
  uint32_t budget = 0;
  uint32_t layer = 0;
  std::vector<float> recall;        // one per sample
  std::vector<float> output_error;  // one per sample (empty without values)
};

struct EvalSummary {
  std::string method;
  uint32_t budget = 0;
  uint64_t samples = 0;
  double recall_mean = 0, recall_median = 0, recall_p10 = 0;
  double error_mean = 0, error_median = 0;
};

struct EvalResult {
  std::vector<EvalCell> cells;
  // Over every layer, head and query, per (method, budget), in the order of the methods.
  std::vector<EvalSummary> Summaries() const;
  // Mean recall per layer for one (method, budget).
  std::vector<std::pair<uint32_t, double>> RecallByLayer(const std::string& method,
                                                         uint32_t budget) const;
};

// Runs every (layer, KV head) of the trace on `pool`; `progress(done, total)` is called
// after each one (from worker threads, serialised). Errors: INVALID_ARGUMENT for an invalid
// trace or options (e.g. output_error without values, a budget whose split leaves no page).
absl::StatusOr<EvalResult> Evaluate(const Trace& trace, const EvalOptions& options,
                                    ThreadPool* pool,
                                    const std::function<void(size_t, size_t)>& progress = {});

}  // namespace icecache::eval
