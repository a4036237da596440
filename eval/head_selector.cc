#include "eval/head_selector.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "selection/index_factory.h"

namespace icecache::eval {

std::string_view HeadBudgetName(HeadBudget b) {
  switch (b) {
    case HeadBudget::kFixed:
      return "fixed";
    case HeadBudget::kObserved:
      return "observed";
    case HeadBudget::kOracle:
      return "oracle";
    case HeadBudget::kObservedLayers:
      return "observed-layers";
    case HeadBudget::kObservedAll:
      return "observed-all";
  }
  return "unknown";
}

MethodSpec Method(const std::string& name, MethodKind kind) {
  MethodSpec m;
  m.name = name;
  m.kind = kind;
  return m;
}

std::vector<MethodSpec> DefaultMethods() {
  std::vector<MethodSpec> m;
  m.push_back(Method("icecache-dci", MethodKind::kDci));
  m.push_back(Method("quest", MethodKind::kQuest));
  m.push_back(Method("streaming-llm", MethodKind::kStreaming));
  m.push_back(Method("oracle-pages-dci-layout", MethodKind::kOraclePagesOurLayout));
  m.push_back(Method("oracle-pages-positional", MethodKind::kOraclePagesPositional));
  m.push_back(Method("oracle-tokens", MethodKind::kOracleTokens));
  return m;
}

absl::StatusOr<selection::BudgetSplit> WithWindow(const MethodSpec& spec,
                                                  const selection::BudgetSplit& split) {
  if (spec.window_tokens == 0) return split;
  selection::BudgetSplit out = split;
  out.window_tokens = spec.window_tokens;
  absl::Status s = selection::ValidateSplit(out);
  if (!s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("method ", spec.name, ": window of ",
                                                   spec.window_tokens, " tokens in a budget of ",
                                                   split.budget_tokens, ": ", s.message()));
  }
  return out;
}

absl::StatusOr<MethodSpec> PresetMethod(const std::string& name, const std::string& preset) {
  absl::StatusOr<selection::IndexSpec> spec = selection::Preset(preset);
  if (!spec.ok()) return spec.status();
  MethodSpec m = Method(name, MethodKind::kDci);
  m.dci = spec->dci;
  return m;
}

// One method's index over one (layer, KV head), with the map from pages to token positions.
class HeadSelector::State {
 public:
  State(const MethodSpec& spec, const IndexGeometry& geometry) : spec_(spec) {
    pages_ = std::make_unique<InMemoryPages>(geometry, /*with_values=*/false);
    switch (spec.kind) {
      case MethodKind::kDci:
      case MethodKind::kOraclePagesOurLayout:
        layout_ = selection::CreateIndex(selection::IndexSpec{spec.name, spec.dci}, geometry,
                                         pages_.get());
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

  const std::vector<std::vector<uint32_t>>& page_positions() const { return page_positions_; }

  // Appends the positions this method attends to besides sink and window.
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
    const KvIndex* searcher =
        oracle_ != nullptr ? static_cast<const KvIndex*>(oracle_.get()) : layout_.get();
    absl::Status s = searcher->Search(queries, group, kk, &picked);
    if (!s.ok()) return s;
    for (const SelectedPage& p : picked) {
      const auto& pos = page_positions_.at(p.page);
      tokens->insert(tokens->end(), pos.begin(), pos.end());
    }
    return absl::OkStatus();
  }

 private:
  const MethodSpec spec_;
  std::unique_ptr<InMemoryPages> pages_;
  std::unique_ptr<KvIndex> layout_;
  std::unique_ptr<ExactOracle> oracle_;
  std::vector<std::vector<uint32_t>> page_positions_;
};

HeadSelector::HeadSelector(const MethodSpec& spec, const selection::BudgetSplit& split,
                           const IndexGeometry& geometry)
    : spec_(spec), geometry_(geometry), policy_(split) {
  state_ = std::make_unique<State>(spec_, geometry_);
}

HeadSelector::~HeadSelector() = default;

const std::vector<std::vector<uint32_t>>& HeadSelector::page_positions() const {
  return state_->page_positions();
}

absl::Status HeadSelector::Ingest(const RowView& keys, uint64_t begin, uint64_t count) {
  if (positions_.size() < begin + count) {
    const size_t old = positions_.size();
    positions_.resize(begin + count);
    std::iota(positions_.begin() + old, positions_.end(), static_cast<uint32_t>(old));
  }
  RowView slice = keys;
  slice.data = keys.row(static_cast<uint32_t>(begin));
  slice.rows = static_cast<uint32_t>(count);
  absl::Status s = state_->Ingest(!built_, slice, &positions_[begin]);
  if (s.ok()) built_ = true;
  return s;
}

// Plays the service's steps up to position p: the first call's prompt, then per position the
// hand-overs of the previous step landing in the index, the token, and a hand-over when the
// window is full.
absl::Status HeadSelector::Advance(const RowView& keys, uint32_t p) {
  if (policy_.tokens() == 0 && p > 0) {
    absl::StatusOr<selection::WindowPolicy::PromptPlan> plan = policy_.Prefill(p);
    if (!plan.ok()) return plan.status();
    if (plan->index_tokens > 0) {
      absl::Status s = Ingest(keys, plan->index_begin, plan->index_tokens);
      if (!s.ok()) return s;
    }
  }
  while (policy_.tokens() <= p) {
    while (!pending_.empty()) {
      absl::Status s = Ingest(keys, pending_.front(), geometry_.page_size);
      if (s.ok()) s = policy_.Retire();
      if (!s.ok()) return s;
      pending_.erase(pending_.begin());
    }
    absl::StatusOr<std::optional<uint64_t>> handed = policy_.Append();
    if (!handed.ok()) return handed.status();
    if (handed->has_value()) pending_.push_back(**handed);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint32_t>> HeadSelector::Select(const RowView& keys, uint32_t p,
                                                           const float* queries, uint32_t group,
                                                           uint32_t pages) {
  if (keys.rows < uint64_t{p} + 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("keys hold ", keys.rows, " rows, position ", p, " needs ", p + 1));
  }
  if (uint64_t{p} + 1 < policy_.tokens()) {
    return absl::InvalidArgumentError(
        absl::StrCat("positions must not decrease: position ", p, " after ", policy_.tokens() - 1));
  }
  absl::Status advanced = Advance(keys, p);
  if (!advanced.ok()) return advanced;
  const uint32_t ps = geometry_.page_size;
  std::vector<uint32_t> tokens;
  const uint64_t sink = std::min<uint64_t>(policy_.sink_end(), uint64_t{p} + 1);
  for (uint32_t t = 0; t < sink; ++t) tokens.push_back(t);
  const uint32_t window_begin = static_cast<uint32_t>(policy_.window_begin());
  for (uint32_t t = window_begin; t <= p; ++t) tokens.push_back(t);
  if (spec_.kind == MethodKind::kStreaming) {
    // StreamingLLM spends the pages' share of the budget on more recent tokens: it attends
    // the sink and the pages * page_size positions before the window, as many as the others.
    const uint32_t indexed = static_cast<uint32_t>(policy_.indexed_tokens());
    const uint32_t extra = std::min(pages * ps, indexed);
    for (uint32_t t = window_begin - extra; t < window_begin; ++t) tokens.push_back(t);
  }
  if (built_) {
    // kAsync: the previous call's queries, unless one of the group's queries moved too far.
    const float* searched = queries;
    const size_t n = size_t{group} * geometry_.dim;
    if (spec_.replay.async && previous_.size() == n) {
      bool drifted = false;
      for (uint32_t j = 0; j < group && !drifted; ++j) {
        const float* a = previous_.data() + size_t{j} * geometry_.dim;
        const float* c = queries + size_t{j} * geometry_.dim;
        double dot = 0, na = 0, nc = 0;
        for (uint32_t i = 0; i < geometry_.dim; ++i) {
          dot += double{a[i]} * c[i];
          na += double{a[i]} * a[i];
          nc += double{c[i]} * c[i];
        }
        const double cosine = na > 0 && nc > 0 ? dot / std::sqrt(na * nc) : -1.0;
        drifted = !(cosine >= spec_.replay.drift_threshold);
      }
      ++prefetched_;
      if (drifted) {
        ++drift_fallbacks_;
      } else {
        searched = previous_.data();
      }
    }
    absl::Status s = state_->Select(searched, group, pages, ps, &tokens);
    if (!s.ok()) return s;
  }
  if (spec_.replay.async) previous_.assign(queries, queries + size_t{group} * geometry_.dim);
  std::sort(tokens.begin(), tokens.end());
  tokens.erase(std::unique(tokens.begin(), tokens.end()), tokens.end());
  return tokens;
}

}  // namespace icecache::eval
