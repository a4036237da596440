// A page store in ordinary memory, for tests, benchmarks and quality evaluations: the same
// contract as the daemon's arena store (pages of K then V rows, page addressing through
// kernels/page_layout.h, layout changes applied as parallel assignments, a version per page).
//
// Thread safety: PageKeys/PageValues may run concurrently with each other; Apply must be
// exclusive with everything (the index calls it under its write lock).
#pragma once

#include <cstdint>
#include <vector>

#include "eval/index_types.h"
#include "kernels/page_layout.h"

namespace icecache::eval {

class InMemoryPages final : public PageReader {
 public:
  // `with_values`: also hold V rows (quality evaluations need them; search does not).
  InMemoryPages(const IndexGeometry& geometry, bool with_values);

  const void* PageKeys(uint32_t page) const override;
  const void* PageValues(uint32_t page) const;  // null without values
  uint32_t valid(uint32_t page) const;
  uint64_t version(uint32_t page) const;
  bool allocated(uint32_t page) const;
  uint32_t allocated_pages() const { return allocated_count_; }
  uint64_t bytes() const { return data_.size(); }
  const PageLayout& layout() const { return layout_; }

  // Reserves frames for page ids below `pages` so that later changes do not reallocate
  // (growth copies every page, which a benchmark would otherwise time).
  void Reserve(uint32_t pages) { data_.reserve(uint64_t{pages} * frame_bytes_); }

  // Applies `change`; batch rows come from `keys` (and `values`, when the store holds them).
  // A change that writes a page that is not allocated, or frees one that is not, is a broken
  // invariant of the index and aborts.
  void Apply(const LayoutChange& change, const RowView& keys, const RowView* values);

  // A PageWriter bound to one batch.
  class Writer final : public PageWriter {
   public:
    Writer(InMemoryPages* pages, RowView keys, const RowView* values)
        : pages_(pages), keys_(keys), values_(values) {}
    void Apply(const LayoutChange& change) override { pages_->Apply(change, keys_, values_); }

   private:
    InMemoryPages* pages_;
    RowView keys_;
    const RowView* values_;
  };

 private:
  uint8_t* Frame(uint32_t page) { return data_.data() + uint64_t{page} * frame_bytes_; }
  const uint8_t* Frame(uint32_t page) const { return data_.data() + uint64_t{page} * frame_bytes_; }

  IndexGeometry geometry_;
  PageLayout layout_;
  bool with_values_;
  uint64_t frame_bytes_;
  std::vector<uint8_t> data_;
  std::vector<uint32_t> valid_;
  std::vector<uint64_t> version_;
  std::vector<uint8_t> allocated_;
  uint32_t allocated_count_ = 0;
};

}  // namespace icecache::eval
