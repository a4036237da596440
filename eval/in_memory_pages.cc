#include "eval/in_memory_pages.h"

#include <cstring>

#include "common/log.h"

namespace icecache::eval {

InMemoryPages::InMemoryPages(const IndexGeometry& geometry, bool with_values)
    : geometry_(geometry),
      layout_{geometry.page_size, geometry.dim, ElemBytes(geometry.elem_type)},
      with_values_(with_values),
      frame_bytes_(with_values ? layout_.page_bytes() : layout_.half_bytes()) {}

const void* InMemoryPages::PageKeys(uint32_t page) const { return Frame(page); }

const void* InMemoryPages::PageValues(uint32_t page) const {
  return with_values_ ? Frame(page) + layout_.v_offset(0) : nullptr;
}

uint32_t InMemoryPages::valid(uint32_t page) const {
  return page < valid_.size() ? valid_[page] : 0;
}

uint64_t InMemoryPages::version(uint32_t page) const {
  return page < version_.size() ? version_[page] : 0;
}

bool InMemoryPages::allocated(uint32_t page) const {
  return page < allocated_.size() && allocated_[page] != 0;
}

void InMemoryPages::Apply(const LayoutChange& change, const RowView& keys, const RowView* values) {
  uint32_t max_page = 0;
  for (uint32_t p : change.allocated) max_page = std::max(max_page, p + 1);
  if (max_page > valid_.size()) {
    data_.resize(uint64_t{max_page} * frame_bytes_);
    valid_.resize(max_page, 0);
    version_.resize(max_page, 0);
    allocated_.resize(max_page, 0);
  }
  for (uint32_t p : change.allocated) {
    ICECACHE_CHECK(!allocated_[p]) << "page " << p << " allocated twice";
    allocated_[p] = 1;
    ++allocated_count_;
  }
  const uint64_t row = layout_.row_bytes();
  // Rows moved within the store are read first (the moves are a parallel assignment); rows
  // of the batch are copied straight in.
  std::vector<uint64_t> staged_at(change.writes.size(), ~uint64_t{0});
  uint64_t n_staged = 0;
  for (size_t i = 0; i < change.writes.size(); ++i) {
    if (change.writes[i].src.kind == SlotSource::Kind::kExisting) staged_at[i] = n_staged++;
  }
  std::vector<uint8_t> staged(n_staged * row * (with_values_ ? 2 : 1));
  for (size_t i = 0; i < change.writes.size(); ++i) {
    const SlotWrite& w = change.writes[i];
    if (w.src.kind != SlotSource::Kind::kExisting) continue;
    ICECACHE_CHECK(allocated(w.src.page)) << "source page " << w.src.page << " not allocated";
    std::memcpy(staged.data() + staged_at[i] * row,
                Frame(w.src.page) + layout_.k_offset(w.src.slot), row);
    if (with_values_) {
      std::memcpy(staged.data() + (n_staged + staged_at[i]) * row,
                  Frame(w.src.page) + layout_.v_offset(w.src.slot), row);
    }
  }
  for (size_t i = 0; i < change.writes.size(); ++i) {
    const SlotWrite& w = change.writes[i];
    ICECACHE_CHECK(allocated(w.page) && w.slot < layout_.page_size)
        << "write to page " << w.page << " slot " << w.slot;
    const uint8_t* k_src;
    const uint8_t* v_src = nullptr;
    if (w.src.kind == SlotSource::Kind::kExisting) {
      k_src = staged.data() + staged_at[i] * row;
      if (with_values_) v_src = staged.data() + (n_staged + staged_at[i]) * row;
    } else {
      ICECACHE_CHECK(w.src.batch_row < keys.rows) << "batch row " << w.src.batch_row;
      k_src = static_cast<const uint8_t*>(keys.row(w.src.batch_row));
      if (with_values_) {
        ICECACHE_CHECK(values != nullptr) << "store holds values but the batch has none";
        v_src = static_cast<const uint8_t*>(values->row(w.src.batch_row));
      }
    }
    std::memcpy(Frame(w.page) + layout_.k_offset(w.slot), k_src, row);
    if (with_values_) std::memcpy(Frame(w.page) + layout_.v_offset(w.slot), v_src, row);
  }
  for (const PageFill& f : change.changed) {
    ICECACHE_CHECK(allocated(f.page) && f.valid <= layout_.page_size) << "fill of page " << f.page;
    valid_[f.page] = f.valid;
    ++version_[f.page];
  }
  for (uint32_t p : change.freed) {
    ICECACHE_CHECK(allocated(p)) << "freeing page " << p << " twice";
    allocated_[p] = 0;
    valid_[p] = 0;
    ++version_[p];
    --allocated_count_;
  }
}

}  // namespace icecache::eval
