#include "server/index/evaluation.h"

#include <algorithm>
#include <map>
#include <memory>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "server/index/baselines.h"
#include "server/index/in_memory_pages.h"
#include "server/index/quality.h"

namespace icecache::index {
namespace {

// One method's index over one (layer, KV head), with the map from pages to token rows.
class MethodState {
 public:
  MethodState(const MethodSpec& spec, const IndexGeometry& geometry) : spec_(spec) {
    pages_ = std::make_unique<InMemoryPages>(geometry, /*with_values=*/false);
    switch (spec.kind) {
      case MethodKind::kDci:
      case MethodKind::kOraclePagesOurLayout:
        layout_ = std::make_unique<DciTree>(geometry, spec.dci, pages_.get());
        break;
      case MethodKind::kQuest:
        layout_ = std::make_unique<QuestIndex>(geometry, pages_.get());
        break;
      case MethodKind::kStreaming:
      case MethodKind::kOraclePagesPositional:
      case MethodKind::kOracleTokens:
        layout_ = std::make_unique<StreamingIndex>(geometry, pages_.get());
        break;
    }
  }

  absl::Status Ingest(bool build, const RowView& rows, const uint32_t* positions) {
    KeyBatch batch{rows, positions};
    InMemoryPages::Writer writer(pages_.get(), rows, nullptr);
    absl::Status s = build ? layout_->Build(batch, &writer) : layout_->Insert(batch, &writer);
    if (!s.ok()) return s;
    if (oracle_ == nullptr && (spec_.kind == MethodKind::kOraclePagesOurLayout ||
                               spec_.kind == MethodKind::kOraclePagesPositional ||
                               spec_.kind == MethodKind::kOracleTokens)) {
      oracle_ = std::make_unique<ExactOracle>(layout_.get(), pages_.get(),
                                              ExactOracle::Rank::kSoftmaxMass);
    } else if (oracle_ != nullptr) {
      oracle_->Refresh();
    }
    page_positions_.assign(layout_->page_id_limit(), {});
    for (PageInfo& p : layout_->Layout()) page_positions_[p.page] = std::move(p.positions);
    return absl::OkStatus();
  }

  // Appends the token rows this method attends to besides sink and window.
  absl::Status Select(const float* queries, uint32_t group, uint32_t k, uint32_t page_size,
                      std::vector<uint32_t>* tokens) const {
    if (spec_.kind == MethodKind::kStreaming) return absl::OkStatus();
    if (spec_.kind == MethodKind::kOracleTokens) {
      std::vector<uint32_t> best;
      absl::Status s = oracle_->TopTokens(queries, group, k * page_size, &best);
      tokens->insert(tokens->end(), best.begin(), best.end());
      return s;
    }
    const uint32_t kk = std::min(k, layout_->num_pages());
    if (kk == 0) return absl::OkStatus();
    std::vector<SelectedPage> picked;
    const KvIndex* searcher = oracle_ != nullptr ? static_cast<const KvIndex*>(oracle_.get())
                                                 : layout_.get();
    absl::Status s = searcher->Search(queries, group, kk, &picked);
    if (!s.ok()) return s;
    for (const SelectedPage& p : picked) {
      const auto& pos = page_positions_.at(p.page);
      tokens->insert(tokens->end(), pos.begin(), pos.end());
    }
    return absl::OkStatus();
  }

 private:
  const MethodSpec& spec_;
  std::unique_ptr<InMemoryPages> pages_;
  std::unique_ptr<KvIndex> layout_;
  std::unique_ptr<ExactOracle> oracle_;
  std::vector<std::vector<uint32_t>> page_positions_;
};

RowView Slice(const RowView& all, uint32_t begin, uint32_t count) {
  RowView v = all;
  v.data = all.row(begin);
  v.rows = count;
  return v;
}

double Quantile(std::vector<float> v, double q) {
  if (v.empty()) return 0;
  const size_t i = static_cast<size_t>(q * (v.size() - 1));
  std::nth_element(v.begin(), v.begin() + i, v.end());
  return v[i];
}

}  // namespace

BudgetSplit PaperSplit(uint32_t budget, uint32_t page_size) {
  BudgetSplit s;
  s.budget = budget;
  s.page_size = page_size;
  if (budget < 128) {
    s.sink = page_size;
    s.window = page_size;
  } else {
    s.sink = 2 * page_size;
    s.window = 2 * page_size;
  }
  return s;
}

std::vector<MethodSpec> DefaultMethods() {
  std::vector<MethodSpec> m;
  m.push_back({"icecache-dci", MethodKind::kDci, DciOptions{}});
  m.push_back({"quest", MethodKind::kQuest, {}});
  m.push_back({"streaming-llm", MethodKind::kStreaming, {}});
  m.push_back({"oracle-pages-dci-layout", MethodKind::kOraclePagesOurLayout, DciOptions{}});
  m.push_back({"oracle-pages-positional", MethodKind::kOraclePagesPositional, {}});
  m.push_back({"oracle-tokens", MethodKind::kOracleTokens, {}});
  return m;
}

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
  std::vector<BudgetSplit> splits;
  for (uint32_t b : options.budgets) {
    BudgetSplit s = PaperSplit(b, options.page_size);
    if (b % options.page_size != 0 || b < s.sink + s.window + options.page_size) {
      return absl::InvalidArgumentError(absl::StrCat("budget ", b, " leaves no selected page"));
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
    std::vector<uint32_t> positions(trace.num_tokens);
    std::iota(positions.begin(), positions.end(), 0u);
    // [method][budget] -> samples, merged at the end.
    std::vector<std::vector<EvalCell>> local(options.methods.size(),
                                             std::vector<EvalCell>(splits.size()));
    absl::Status status;
    // Methods are built once per distinct (sink, window) and serve every budget using it.
    std::map<std::pair<uint32_t, uint32_t>, std::vector<size_t>> by_split;
    for (size_t b = 0; b < splits.size(); ++b) {
      by_split[{splits[b].sink, splits[b].window}].push_back(b);
    }
    const uint32_t ps = options.page_size;
    for (const auto& [sw, budget_ids] : by_split) {
      const uint32_t sink = sw.first, window = sw.second;
      const uint32_t t0 = trace.query_positions.front();
      if (t0 + 1 < sink + window + ps) continue;  // context too short for this split
      uint32_t e = t0 + 1 - window;
      std::vector<std::unique_ptr<MethodState>> states;
      for (const MethodSpec& spec : options.methods) {
        states.push_back(std::make_unique<MethodState>(spec, geometry));
        status.Update(states.back()->Ingest(true, Slice(keys, sink, e - sink), &positions[sink]));
      }
      std::vector<FullAttention> full(group);
      std::vector<float> queries(uint64_t{group} * trace.head_dim);
      for (uint32_t qi = 0; qi < trace.query_positions.size() && status.ok(); ++qi) {
        const uint32_t p = trace.query_positions[qi];
        while (p + 1 - e > window) {
          for (auto& st : states) status.Update(st->Ingest(false, Slice(keys, e, ps), &positions[e]));
          e += ps;
        }
        for (uint32_t g = 0; g < group; ++g) {
          const float* q = trace.Query(task.layer, task.kv_head * group + g, qi);
          std::copy(q, q + trace.head_dim, queries.begin() + uint64_t{g} * trace.head_dim);
          ComputeFullAttention(q, keys, options.output_error ? &values : nullptr, p + 1, &full[g]);
        }
        std::vector<uint32_t> base;
        for (uint32_t t = 0; t < sink; ++t) base.push_back(t);
        for (uint32_t t = e; t <= p; ++t) base.push_back(t);
        for (size_t m = 0; m < states.size(); ++m) {
          for (size_t b : budget_ids) {
            std::vector<uint32_t> tokens = base;
            status.Update(
                states[m]->Select(queries.data(), group, splits[b].selected_pages(), ps, &tokens));
            std::sort(tokens.begin(), tokens.end());
            tokens.erase(std::unique(tokens.begin(), tokens.end()), tokens.end());
            EvalCell& cell = local[m][b];
            for (uint32_t g = 0; g < group; ++g) {
              cell.recall.push_back(static_cast<float>(AttentionRecall(full[g], tokens)));
              if (options.output_error) {
                cell.output_error.push_back(static_cast<float>(OutputError(full[g], values, tokens)));
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
        auto key = std::make_tuple(options.methods[m].name, splits[b].budget, task.layer);
        auto it = cell_at.find(key);
        if (it == cell_at.end()) {
          it = cell_at.emplace(key, result.cells.size()).first;
          EvalCell c;
          c.method = options.methods[m].name;
          c.budget = splits[b].budget;
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

}  // namespace icecache::index
