#include "eval/evaluation.h"

#include <algorithm>
#include <map>
#include <memory>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "eval/baselines.h"
#include "eval/in_memory_pages.h"
#include "eval/quality.h"

namespace icecache::eval {
namespace {

double Quantile(std::vector<float> v, double q) {
  if (v.empty()) return 0;
  const size_t i = static_cast<size_t>(q * (v.size() - 1));
  std::nth_element(v.begin(), v.begin() + i, v.end());
  return v[i];
}

}  // namespace

std::vector<EvalSummary> EvalResult::Summaries() const {
  std::vector<EvalSummary> out;
  std::map<std::pair<std::string, uint32_t>, size_t> at;
  std::vector<std::vector<float>> recalls, errors;
  for (const EvalCell& c : cells) {
    auto key = std::make_pair(c.method, c.budget);
    auto it = at.find(key);
    if (it == at.end()) {
      it = at.emplace(key, out.size()).first;
      out.push_back({c.method, c.budget});
      recalls.emplace_back();
      errors.emplace_back();
    }
    recalls[it->second].insert(recalls[it->second].end(), c.recall.begin(), c.recall.end());
    errors[it->second].insert(errors[it->second].end(), c.output_error.begin(),
                              c.output_error.end());
  }
  for (size_t i = 0; i < out.size(); ++i) {
    const auto& r = recalls[i];
    const auto& e = errors[i];
    out[i].samples = r.size();
    out[i].recall_mean = r.empty() ? 0 : std::accumulate(r.begin(), r.end(), 0.0) / r.size();
    out[i].recall_median = Quantile(r, 0.5);
    out[i].recall_p10 = Quantile(r, 0.1);
    out[i].error_mean = e.empty() ? 0 : std::accumulate(e.begin(), e.end(), 0.0) / e.size();
    out[i].error_median = Quantile(e, 0.5);
  }
  return out;
}

std::vector<std::pair<uint32_t, double>> EvalResult::RecallByLayer(const std::string& method,
                                                                   uint32_t budget) const {
  std::map<uint32_t, std::pair<double, uint64_t>> acc;
  for (const EvalCell& c : cells) {
    if (c.method != method || c.budget != budget) continue;
    auto& a = acc[c.layer];
    a.first += std::accumulate(c.recall.begin(), c.recall.end(), 0.0);
    a.second += c.recall.size();
  }
  std::vector<std::pair<uint32_t, double>> out;
  for (const auto& [layer, a] : acc) out.push_back({layer, a.second ? a.first / a.second : 0});
  return out;
}

absl::StatusOr<EvalResult> Evaluate(const Trace& trace, const EvalOptions& options,
                                    ThreadPool* pool,
                                    const std::function<void(size_t, size_t)>& progress) {
  absl::Status valid = ValidateTrace(trace);
  if (!valid.ok()) return valid;
  if (options.output_error && !trace.has_values) {
    return absl::InvalidArgumentError("output error needs values in the trace");
  }
  if (trace.query_positions.empty()) return absl::InvalidArgumentError("trace has no queries");
  std::vector<selection::BudgetSplit> splits;
  for (uint32_t b : options.budgets) {
    const selection::BudgetSplit s = selection::PaperSplit(b, options.page_size);
    if (const absl::Status st = selection::ValidateSplit(s); !st.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("budget ", b, " with pages of ", options.page_size, ": ", st.message()));
    }
    splits.push_back(s);
  }
  const uint32_t end_layer = std::min(options.end_layer, trace.num_layers);
  const IndexGeometry geometry{trace.head_dim, trace.kv_type, options.page_size};
  const uint32_t group = trace.group_size();

  struct Task {
    uint32_t layer, kv_head;
  };
  std::vector<Task> tasks;
  for (uint32_t l = options.first_layer; l < end_layer; ++l) {
    for (uint32_t h = 0; h < trace.num_kv_heads; ++h) tasks.push_back({l, h});
  }
  absl::Mutex mu;
  EvalResult result;
  std::map<std::tuple<std::string, uint32_t, uint32_t>, size_t> cell_at;
  absl::Status first_error;
  size_t done = 0;

  pool->ParallelFor(tasks.size(), [&](size_t ti) {
    const Task task = tasks[ti];
    const RowView keys = trace.Keys(task.layer, task.kv_head);
    const RowView values = trace.Values(task.layer, task.kv_head);
    // [method][budget] -> samples, merged at the end.
    std::vector<std::vector<EvalCell>> local(options.methods.size(),
                                             std::vector<EvalCell>(splits.size()));
    absl::Status status;
    // Methods are built once per distinct (sink, window) and serve every budget using it.
    std::map<std::pair<uint32_t, uint32_t>, std::vector<size_t>> by_split;
    for (size_t b = 0; b < splits.size(); ++b) {
      by_split[{splits[b].sink_tokens, splits[b].window_tokens}].push_back(b);
    }
    const uint32_t ps = options.page_size;
    for (const auto& [sw, budget_ids] : by_split) {
      const uint32_t sink = sw.first, window = sw.second;
      const uint32_t t0 = trace.query_positions.front();
      if (t0 + 1 < sink + window + ps) continue;  // context too short for this split
      std::vector<std::unique_ptr<HeadSelector>> selectors;
      for (const MethodSpec& spec : options.methods) {
        selectors.push_back(
            std::make_unique<HeadSelector>(spec, splits[budget_ids.front()], geometry));
      }
      std::vector<FullAttention> full(group);
      std::vector<float> queries(uint64_t{group} * trace.head_dim);
      for (uint32_t qi = 0; qi < trace.query_positions.size() && status.ok(); ++qi) {
        const uint32_t p = trace.query_positions[qi];
        for (uint32_t g = 0; g < group; ++g) {
          const float* q = trace.Query(task.layer, task.kv_head * group + g, qi);
          std::copy(q, q + trace.head_dim, queries.begin() + uint64_t{g} * trace.head_dim);
          ComputeFullAttention(q, keys, options.output_error ? &values : nullptr, p + 1, &full[g]);
        }
        for (size_t m = 0; m < selectors.size() && status.ok(); ++m) {
          for (size_t b : budget_ids) {
            absl::StatusOr<std::vector<uint32_t>> tokens =
                selectors[m]->Select(keys, p, queries.data(), group, splits[b].selected_pages());
            if (!tokens.ok()) {
              status.Update(tokens.status());
              break;
            }
            EvalCell& cell = local[m][b];
            for (uint32_t g = 0; g < group; ++g) {
              cell.recall.push_back(static_cast<float>(AttentionRecall(full[g], *tokens)));
              if (options.output_error) {
                cell.output_error.push_back(
                    static_cast<float>(OutputError(full[g], values, *tokens)));
              }
            }
          }
        }
      }
    }
    absl::MutexLock lock(&mu);
    first_error.Update(status);
    for (size_t m = 0; m < options.methods.size(); ++m) {
      for (size_t b = 0; b < splits.size(); ++b) {
        auto key = std::make_tuple(options.methods[m].name, splits[b].budget_tokens, task.layer);
        auto it = cell_at.find(key);
        if (it == cell_at.end()) {
          it = cell_at.emplace(key, result.cells.size()).first;
          EvalCell c;
          c.method = options.methods[m].name;
          c.budget = splits[b].budget_tokens;
          c.layer = task.layer;
          result.cells.push_back(std::move(c));
        }
        EvalCell& dst = result.cells[it->second];
        dst.recall.insert(dst.recall.end(), local[m][b].recall.begin(), local[m][b].recall.end());
        dst.output_error.insert(dst.output_error.end(), local[m][b].output_error.begin(),
                                local[m][b].output_error.end());
      }
    }
    ++done;
    if (progress) progress(done, tasks.size());
  });
  if (!first_error.ok()) return first_error;
  // Cells in method order, then budget, then layer.
  std::map<std::string, size_t> method_rank;
  for (size_t m = 0; m < options.methods.size(); ++m) method_rank[options.methods[m].name] = m;
  std::sort(result.cells.begin(), result.cells.end(), [&](const EvalCell& a, const EvalCell& b) {
    return std::make_tuple(method_rank[a.method], a.budget, a.layer) <
           std::make_tuple(method_rank[b.method], b.budget, b.layer);
  });
  return result;
}

}  // namespace icecache::eval
