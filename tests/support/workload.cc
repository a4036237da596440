#include "tests/support/workload.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "eval/in_memory_pages.h"
#include "eval/synthetic.h"
#include "selection/index_factory.h"
#include "server/index/kv_index.h"

namespace icecache::testing {
namespace {

uint32_t PromptTokens(const WorkloadOptions& o) { return o.tokens - o.appends * 16; }

std::string RowKey(const void* row, uint64_t bytes) {
  return std::string(static_cast<const char*>(row), bytes);
}

}  // namespace

eval::Trace WorkloadTrace(const WorkloadOptions& o) {
  eval::SyntheticOptions so;
  so.num_tokens = o.tokens;
  so.head_dim = o.head_dim;
  so.num_layers = o.layers;
  so.num_kv_heads = o.kv_heads;
  so.group_size = o.group;
  so.num_queries = o.appends + 1;
  so.seed = o.seed;
  so.kv_type = index::ElemType::kF16;
  return eval::GenerateSynthetic(so);
}

icecache::v1::SequenceGeometry WorkloadGeometry(const WorkloadOptions& o) {
  icecache::v1::SequenceGeometry g;
  g.set_num_layers(o.layers);
  g.set_num_q_heads(o.kv_heads * o.group);
  g.set_num_kv_heads(o.kv_heads);
  g.set_head_dim(o.head_dim);
  g.set_dtype(icecache::v1::DTYPE_FP16);
  g.set_max_tokens(o.tokens);
  g.set_page_size(16);  // the workload appends and indexes pages of 16 (sink, window: 2 each)
  g.set_full_kv_layers(0);
  return g;
}

std::string FormatSelections(const Selections& s) {
  std::string out;
  for (size_t l = 0; l < s.size(); ++l) {
    for (size_t step = 0; step < s[l].size(); ++step) {
      for (size_t h = 0; h < s[l][step].size(); ++h) {
        absl::StrAppend(&out, "layer ", l, " step ", step, " head ", h, ":");
        for (uint32_t p : s[l][step][h]) absl::StrAppend(&out, " ", p);
        absl::StrAppend(&out, "\n");
      }
    }
  }
  return out;
}

absl::StatusOr<Selections> RunWorkload(Attachment& a, icecache::v1::IceCache::Stub& stub,
                                       const WorkloadOptions& o, std::string* handle_out) {
  const eval::Trace t = WorkloadTrace(o);
  icecache::v1::CreateSequenceRequest req;
  *req.mutable_geometry() = WorkloadGeometry(o);
  req.set_label(absl::StrCat("workload-", o.seed));
  icecache::v1::CreateSequenceResponse resp;
  grpc::ClientContext ctx;
  ctx.AddMetadata(abi::kTokenMetadataKey, a.token());
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::Status gs = stub.CreateSequence(&ctx, req, &resp);
  if (!gs.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(gs.error_code()), gs.error_message());
  }
  const std::string handle = resp.sequence().handle();
  if (handle_out != nullptr) *handle_out = handle;
  const uint64_t row = uint64_t{o.head_dim} * 2;
  const uint32_t prompt = PromptTokens(o);
  const uint32_t q_heads = o.kv_heads * o.group;

  // Writes K then V rows [head][n][dim] of tokens [begin, begin+n) into a staging buffer.
  auto stage = [&](uint32_t layer, uint32_t begin, uint32_t n) -> absl::StatusOr<abi::ArenaRef> {
    absl::StatusOr<abi::StageResponse> st = a.Stage(handle, n);
    if (!st.ok()) return st.status();
    absl::StatusOr<uint8_t*> base = a.Address(st->buffer, st->bytes);
    if (!base.ok()) return base.status();
    for (uint32_t h = 0; h < o.kv_heads; ++h) {
      std::memcpy(*base + uint64_t{h} * n * row, t.Keys(layer, h).row(begin), n * row);
      std::memcpy(*base + st->v_offset + uint64_t{h} * n * row, t.Values(layer, h).row(begin),
                  n * row);
    }
    return st->buffer;
  };

  Selections out(o.layers);
  for (uint32_t l = 0; l < o.layers; ++l) {
    std::unordered_map<std::string, uint32_t> where;  // key row -> position, per layer
    absl::StatusOr<abi::ArenaRef> buf = stage(l, 0, prompt);
    if (!buf.ok()) return buf.status();
    absl::Status s = a.Prefill(handle, l, *buf, prompt, 0);
    if (!s.ok()) return s;
    for (uint32_t step = 0; step <= o.appends; ++step) {
      if (step > 0) {
        const uint32_t begin = prompt + (step - 1) * 16;
        absl::StatusOr<abi::ArenaRef> pb = stage(l, begin, 16);
        if (!pb.ok()) return pb.status();
        s = a.Append(handle, l, *pb, 16, begin);
        if (!s.ok()) return s;
      }
      std::vector<float> q(uint64_t{q_heads} * o.head_dim);
      for (uint32_t h = 0; h < q_heads; ++h) {
        std::copy_n(t.Query(l, h, step), o.head_dim, q.begin() + uint64_t{h} * o.head_dim);
      }
      absl::StatusOr<std::vector<abi::SelectedPageRef>> sel =
          a.Select(handle, l, q.data(), q.size(), o.k);
      if (!sel.ok()) return sel.status();
      std::vector<std::vector<uint32_t>> per_head(o.kv_heads);
      for (uint32_t h = 0; h < o.kv_heads; ++h) {
        std::unordered_map<std::string, uint32_t> head_rows;
        for (uint32_t p = 0; p < prompt + step * 16; ++p) {
          head_rows.emplace(RowKey(t.Keys(l, h).row(p), row), p);
        }
        for (uint32_t i = 0; i < o.k; ++i) {
          const abi::SelectedPageRef& r = (*sel)[uint64_t{h} * o.k + i];
          if (r.segment == abi::kNoSegment) continue;
          uint32_t page_bytes = 0;
          absl::StatusOr<const uint8_t*> frame = a.Frame(r.segment, r.frame, &page_bytes);
          if (!frame.ok()) return frame.status();
          for (uint32_t slot = 0; slot < r.valid; ++slot) {
            auto it = head_rows.find(RowKey(*frame + slot * row, row));
            if (it == head_rows.end()) {
              return absl::DataLossError(absl::StrCat("page ", r.segment, "/", r.frame, " slot ",
                                                      slot, " holds no key of this head"));
            }
            per_head[h].push_back(it->second);
          }
        }
        std::sort(per_head[h].begin(), per_head[h].end());
      }
      out[l].push_back(std::move(per_head));
    }
  }
  return out;
}

Selections RunWorkloadInProcess(const WorkloadOptions& o) {
  const eval::Trace t = WorkloadTrace(o);
  const index::IndexGeometry g{o.head_dim, index::ElemType::kF16, 16};
  const uint32_t prompt = PromptTokens(o);
  // The daemon under test serves its default preset; the reference builds the same index.
  const absl::StatusOr<selection::IndexSpec> preset = selection::Preset(selection::kDefaultPreset);
  if (!preset.ok()) {
    std::fprintf(stderr, "workload: %s\n", preset.status().ToString().c_str());
    std::abort();
  }
  const selection::IndexSpec& spec = *preset;
  std::vector<uint32_t> positions(o.tokens);
  std::iota(positions.begin(), positions.end(), 0u);
  Selections out(o.layers);
  for (uint32_t l = 0; l < o.layers; ++l) {
    std::vector<std::unique_ptr<eval::InMemoryPages>> pages;
    std::vector<std::unique_ptr<index::KvIndex>> trees;
    for (uint32_t h = 0; h < o.kv_heads; ++h) {
      pages.push_back(std::make_unique<eval::InMemoryPages>(g, false));
      trees.push_back(selection::CreateIndex(spec, g, pages.back().get()));
      index::RowView k = t.Keys(l, h);
      k.rows = prompt;
      eval::InMemoryPages::Writer w(pages.back().get(), k, nullptr);
      (void)trees.back()->Build({k, positions.data()}, &w);
    }
    for (uint32_t step = 0; step <= o.appends; ++step) {
      std::vector<std::vector<uint32_t>> per_head(o.kv_heads);
      for (uint32_t h = 0; h < o.kv_heads; ++h) {
        if (step > 0) {
          index::RowView k = t.Keys(l, h);
          k.data = k.row(prompt + (step - 1) * 16);
          k.rows = 16;
          eval::InMemoryPages::Writer w(pages[h].get(), k, nullptr);
          (void)trees[h]->Insert({k, positions.data() + prompt + (step - 1) * 16}, &w);
        }
        std::vector<float> q(uint64_t{o.group} * o.head_dim);
        for (uint32_t g2 = 0; g2 < o.group; ++g2) {
          std::copy_n(t.Query(l, h * o.group + g2, step), o.head_dim,
                      q.begin() + uint64_t{g2} * o.head_dim);
        }
        std::vector<index::SelectedPage> sel;
        (void)trees[h]->Search(q.data(), o.group, std::min(o.k, trees[h]->num_pages()), &sel);
        std::vector<std::vector<uint32_t>> by_page(trees[h]->page_id_limit());
        for (index::PageInfo& p : trees[h]->Layout()) by_page[p.page] = std::move(p.positions);
        for (const index::SelectedPage& p : sel) {
          per_head[h].insert(per_head[h].end(), by_page[p.page].begin(), by_page[p.page].end());
        }
        std::sort(per_head[h].begin(), per_head[h].end());
      }
      out[l].push_back(std::move(per_head));
    }
  }
  return out;
}

}  // namespace icecache::testing
