// libFuzzer target: the semantic index (the daemon's DCI tree, the paper preset or the tuned
// one) under random and adversarial keys: raw bit patterns (NaN, infinities, subnormals),
// duplicated rows, zero rows and rows of huge norm. A prompt with a non-finite key must be
// refused with INVALID_ARGUMENT and change nothing; anything accepted keeps the tree's
// invariants through inserts; searches (NaN queries refused) return distinct live pages.
// Finally page contents are scribbled over after the fact, as a client can do to the pages in
// its shared memory, and searches must stay memory-safe.
#include <fuzzer/FuzzedDataProvider.h>

#include <cmath>
#include <cstring>
#include <numeric>
#include <set>
#include <vector>

#include "common/half.h"
#include "eval/in_memory_pages.h"
#include "selection/index_factory.h"
#include "server/index/dci_tree.h"

namespace {

using namespace icecache;

float ToFloat(uint16_t bits, index::ElemType t) {
  return t == index::ElemType::kF16 ? HalfToFloat(bits) : Bf16ToFloat(bits);
}
uint16_t FromFloat(float f, index::ElemType t) {
  return t == index::ElemType::kF16 ? FloatToHalf(f) : FloatToBf16(f);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  const index::ElemType type = in.ConsumeBool() ? index::ElemType::kF16 : index::ElemType::kBF16;
  const uint32_t page_size = 8u << in.ConsumeIntegralInRange<int>(0, 2);
  const uint32_t dim = 64;
  const uint32_t n = in.ConsumeIntegralInRange<uint32_t>(1, 600);
  const uint64_t seed = in.ConsumeIntegral<uint64_t>();
  // Keys: a generated base (seeded normal-ish values), then adversarial edits from the input.
  std::vector<uint16_t> keys(uint64_t{n} * dim);
  uint64_t x = seed | 1;
  for (uint16_t& k : keys) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    k = FromFloat(static_cast<float>(static_cast<int64_t>(x % 2001) - 1000) / 500.f, type);
  }
  const int edits = in.ConsumeIntegralInRange<int>(0, 24);
  for (int e = 0; e < edits && in.remaining_bytes() > 0; ++e) {
    const uint32_t row = in.ConsumeIntegralInRange<uint32_t>(0, n - 1);
    uint16_t* r = keys.data() + uint64_t{row} * dim;
    switch (in.ConsumeIntegralInRange<int>(0, 4)) {
      case 0:  // raw bits (NaN, infinities, subnormals)
        r[in.ConsumeIntegralInRange<uint32_t>(0, dim - 1)] = in.ConsumeIntegral<uint16_t>();
        break;
      case 1:  // a duplicate of another row
        std::memcpy(r, keys.data() + uint64_t{in.ConsumeIntegralInRange<uint32_t>(0, n - 1)} * dim,
                    dim * 2);
        break;
      case 2:  // zeros
        std::memset(r, 0, dim * 2);
        break;
      case 3: {  // a huge norm (largest finite values)
        const float big = type == index::ElemType::kF16 ? 60000.f : 3.0e38f;
        for (uint32_t d = 0; d < dim; ++d) r[d] = FromFloat(d % 2 ? big : -big, type);
        break;
      }
      default: {  // many rows the same
        const uint32_t count = in.ConsumeIntegralInRange<uint32_t>(0, n - row);
        for (uint32_t i = 1; i < count; ++i) std::memcpy(r + uint64_t{i} * dim, r, dim * 2);
      }
    }
  }
  bool finite = true;
  for (uint16_t k : keys) finite &= std::isfinite(ToFloat(k, type));

  const selection::IndexSpec spec =
      *selection::Preset(in.ConsumeBool() ? selection::kPaperPreset : selection::kTunedPreset);
  const index::IndexGeometry g{dim, type, page_size};
  eval::InMemoryPages pages(g, /*with_values=*/false);
  std::unique_ptr<index::KvIndex> idx = selection::CreateIndex(spec, g, &pages);
  std::vector<uint32_t> positions(n);
  std::iota(positions.begin(), positions.end(), 0u);
  const uint32_t prompt = in.ConsumeIntegralInRange<uint32_t>(1, n);
  auto batch = [&](uint32_t from, uint32_t count) {
    index::KeyBatch b;
    b.keys = index::RowView{keys.data() + uint64_t{from} * dim, type, dim, count, 0};
    b.positions = positions.data() + from;
    return b;
  };
  bool prompt_finite = true;
  for (uint64_t i = 0; i < uint64_t{prompt} * dim; ++i) {
    prompt_finite &= std::isfinite(ToFloat(keys[i], type));
  }
  index::KeyBatch first = batch(0, prompt);
  eval::InMemoryPages::Writer w0(&pages, first.keys, nullptr);
  const absl::Status built = idx->Build(first, &w0);
  if (!prompt_finite) {
    if (built.code() != absl::StatusCode::kInvalidArgument || idx->num_tokens() != 0) ::abort();
    return 0;
  }
  if (!built.ok()) ::abort();
  auto* tree = dynamic_cast<index::DciTree*>(idx.get());
  auto check = [&] {
    if (tree != nullptr && !tree->CheckInvariants().ok()) ::abort();
    if (idx->num_pages() > idx->num_tokens()) ::abort();  // no empty page
  };
  check();
  for (uint32_t at = prompt; at < n;) {
    const uint32_t count = std::min(n - at, in.ConsumeIntegralInRange<uint32_t>(1, page_size));
    index::KeyBatch b = batch(at, count);
    bool ok = true;
    for (uint64_t i = 0; i < uint64_t{count} * dim; ++i) {
      ok &= std::isfinite(ToFloat(keys[uint64_t{at} * dim + i], type));
    }
    const uint32_t before = idx->num_tokens();
    eval::InMemoryPages::Writer w(&pages, b.keys, nullptr);
    const absl::Status inserted = idx->Insert(b, &w);
    if (ok != inserted.ok()) ::abort();
    if (!ok && idx->num_tokens() != before) ::abort();
    at += count;
    check();
  }
  // Searches, with finite and non-finite queries.
  const uint32_t group = in.ConsumeIntegralInRange<uint32_t>(1, 4);
  for (int s = 0; s < 3; ++s) {
    std::vector<float> q(uint64_t{group} * dim);
    for (float& v : q) v = in.ConsumeFloatingPointInRange<float>(-10.f, 10.f);
    const bool nan_query = in.ConsumeBool() && in.ConsumeBool();
    if (nan_query) q[in.ConsumeIntegralInRange<uint32_t>(0, group * dim - 1)] = NAN;
    const uint32_t k = in.ConsumeIntegralInRange<uint32_t>(1, idx->num_pages());
    std::vector<index::SelectedPage> out;
    const absl::Status found = idx->Search(q.data(), group, k, &out);
    if (nan_query) {
      if (found.code() != absl::StatusCode::kInvalidArgument) ::abort();
      continue;
    }
    if (!found.ok() || out.size() > k) ::abort();
    std::set<uint32_t> seen;
    for (const index::SelectedPage& p : out) {
      if (p.page >= idx->page_id_limit() || !seen.insert(p.page).second) ::abort();
      if (p.valid == 0 || p.valid > page_size) ::abort();
    }
  }
  // A client scribbles over its pages (they are in its shared memory): the index reads keys
  // from them when it searches and inserts; whatever it finds must stay memory-safe.
  if (in.ConsumeBool()) {
    for (const index::PageInfo& info : idx->Layout()) {
      auto* k = static_cast<uint16_t*>(const_cast<void*>(pages.PageKeys(info.page)));
      for (uint32_t i = 0; i < info.positions.size() * dim; ++i) {
        k[i] = in.remaining_bytes() > 0 ? in.ConsumeIntegral<uint16_t>() : 0x7e00;
      }
    }
    std::vector<float> q(uint64_t{group} * dim, 0.5f);
    std::vector<index::SelectedPage> out;
    (void)idx->Search(q.data(), group, 1, &out);
  }
  return 0;
}
