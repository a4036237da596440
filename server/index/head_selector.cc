#include "server/index/head_selector.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace icecache::index {

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

// One method's index over one (layer, KV head), with the map from pages to token positions.
class HeadSelector::State {
 public:
  State(const MethodSpec& spec, const IndexGeometry& geometry) : spec_(spec) {
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
  const MethodSpec spec_;
  std::unique_ptr<InMemoryPages> pages_;
  std::unique_ptr<KvIndex> layout_;
  std::unique_ptr<ExactOracle> oracle_;
  std::vector<std::vector<uint32_t>> page_positions_;
};

HeadSelector::HeadSelector(const MethodSpec& spec, uint32_t sink, uint32_t window,
                           const IndexGeometry& geometry)
    : spec_(spec), sink_(sink), window_(window), geometry_(geometry) {
  state_ = std::make_unique<State>(spec_, geometry_);
}

HeadSelector::~HeadSelector() = default;

absl::Status HeadSelector::Ingest(bool build, const RowView& keys, uint32_t begin,
                                  uint32_t count) {
  if (positions_.size() < begin + count) {
    const size_t old = positions_.size();
    positions_.resize(begin + count);
    std::iota(positions_.begin() + old, positions_.end(), static_cast<uint32_t>(old));
  }
  RowView slice = keys;
  slice.data = keys.row(begin);
  slice.rows = count;
  return state_->Ingest(build, slice, &positions_[begin]);
}

absl::StatusOr<std::vector<uint32_t>> HeadSelector::Select(const RowView& keys, uint32_t p,
                                                           const float* queries, uint32_t group,
                                                           uint32_t pages) {
  if (keys.rows < p + 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("keys hold ", keys.rows, " rows, position ", p, " needs ", p + 1));
  }
  if (p + 1 < end_) return absl::InvalidArgumentError("positions must not decrease");
  const uint32_t ps = geometry_.page_size;
  std::vector<uint32_t> tokens;
  if (!built_) {
    if (p + 1 < sink_ + window_ + ps) {
      tokens.resize(p + 1);
      std::iota(tokens.begin(), tokens.end(), 0u);
      return tokens;
    }
    end_ = p + 1 - window_;
    absl::Status s = Ingest(true, keys, sink_, end_ - sink_);
    if (!s.ok()) return s;
    built_ = true;
  }
  while (p + 1 - end_ > window_) {
    absl::Status s = Ingest(false, keys, end_, ps);
    if (!s.ok()) return s;
    end_ += ps;
  }
  for (uint32_t t = 0; t < sink_; ++t) tokens.push_back(t);
  for (uint32_t t = end_; t <= p; ++t) tokens.push_back(t);
  if (spec_.kind == MethodKind::kStreaming) {
    // StreamingLLM spends the pages' share of the budget on more recent tokens: it attends
    // the sink and the pages * page_size positions before the window, as many as the others.
    const uint32_t extra = std::min(pages * ps, end_ - sink_);
    for (uint32_t t = end_ - extra; t < end_; ++t) tokens.push_back(t);
  }
  absl::Status s = state_->Select(queries, group, pages, ps, &tokens);
  if (!s.ok()) return s;
  std::sort(tokens.begin(), tokens.end());
  tokens.erase(std::unique(tokens.begin(), tokens.end()), tokens.end());
  return tokens;
}

}  // namespace icecache::index
