#include "server/index/kv_index.h"

#include <algorithm>
#include <cmath>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "server/index/simd.h"

namespace icecache::index {
namespace {

bool RowFinite(const void* row, ElemType type, uint32_t dim) {
  for (uint32_t i = 0; i < dim; ++i) {
    float v = 0;
    switch (type) {
      case ElemType::kF32:
        v = static_cast<const float*>(row)[i];
        break;
      case ElemType::kF16:
        v = HalfToFloat(static_cast<const uint16_t*>(row)[i]);
        break;
      case ElemType::kBF16:
        v = Bf16ToFloat(static_cast<const uint16_t*>(row)[i]);
        break;
    }
    if (!std::isfinite(v)) return false;
  }
  return true;
}

}  // namespace

absl::Status ValidateBatch(const IndexGeometry& geometry, const KeyBatch& batch) {
  const RowView& k = batch.keys;
  if (k.rows == 0) return absl::InvalidArgumentError("empty batch: no keys");
  if (k.data == nullptr) return absl::InvalidArgumentError("null key data");
  if (batch.positions == nullptr) return absl::InvalidArgumentError("null positions");
  if (k.dim != geometry.dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("keys have dim ", k.dim, ", the index has ", geometry.dim));
  }
  if (k.type != geometry.elem_type) {
    return absl::InvalidArgumentError(absl::StrCat("keys are ", ElemTypeName(k.type),
                                                   ", the index stores ",
                                                   ElemTypeName(geometry.elem_type)));
  }
  if (k.stride_bytes != 0 && k.stride_bytes < uint64_t{k.dim} * ElemBytes(k.type)) {
    return absl::InvalidArgumentError("key stride is shorter than a row");
  }
  for (uint32_t i = 0; i < k.rows; ++i) {
    if (!RowFinite(k.row(i), k.type, k.dim)) {
      return absl::InvalidArgumentError(
          absl::StrCat("key row ", i, " (position ", batch.positions[i], ") is not finite"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateQueries(const IndexGeometry& geometry, const float* queries, uint32_t group) {
  if (group == 0) return absl::InvalidArgumentError("no queries (group size 0)");
  if (queries == nullptr) return absl::InvalidArgumentError("null queries");
  for (uint32_t h = 0; h < group; ++h) {
    if (!RowFinite(queries + uint64_t{h} * geometry.dim, ElemType::kF32, geometry.dim)) {
      return absl::InvalidArgumentError(absl::StrCat("query ", h, " is not finite"));
    }
  }
  return absl::OkStatus();
}

std::vector<SelectedPage> TopPages(std::vector<SelectedPage> all, uint32_t k) {
  const size_t kk = std::min<size_t>(k, all.size());
  std::partial_sort(all.begin(), all.begin() + kk, all.end(),
                    [](const SelectedPage& a, const SelectedPage& b) {
                      return a.score > b.score || (a.score == b.score && a.page < b.page);
                    });
  all.resize(kk);
  return all;
}

std::vector<SelectedPage> MergeRankInterleaved(const std::vector<std::vector<SelectedPage>>& lists,
                                               uint32_t k) {
  std::vector<SelectedPage> out;
  out.reserve(k);
  // A page already taken: a scan of what is taken while that is short (the selects' k + a few
  // dozen), a hash set beyond.
  constexpr uint32_t kScanAtMost = 64;
  absl::flat_hash_set<uint32_t> seen;
  auto first_time = [&](uint32_t page) {
    if (k > kScanAtMost) return seen.insert(page).second;
    for (const SelectedPage& sp : out) {
      if (sp.page == page) return false;
    }
    return true;
  };
  size_t longest = 0;
  for (const auto& l : lists) longest = std::max(longest, l.size());
  for (size_t r = 0; r < longest && out.size() < k; ++r) {
    for (const auto& l : lists) {
      if (r < l.size() && first_time(l[r].page)) {
        out.push_back(l[r]);
        if (out.size() == k) break;
      }
    }
  }
  return out;
}

}  // namespace icecache::index
