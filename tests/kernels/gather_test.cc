#include "kernels/gather.h"

#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/page_layout.h"

namespace icecache {
namespace {

TEST(PageLayout, OffsetsOfKAndVRows) {
  constexpr PageLayout l{16, 128, 2};
  static_assert(l.row_bytes() == 256);
  static_assert(l.half_bytes() == 4096);
  static_assert(l.page_bytes() == 8192);
  EXPECT_EQ(l.k_offset(0), 0u);
  EXPECT_EQ(l.k_offset(15), 15u * 256);
  EXPECT_EQ(l.v_offset(0), 4096u);
  EXPECT_EQ(l.v_offset(3), 4096u + 3 * 256);
}

// Scattered source pages land, byte-exact, in their destination slots; nothing else moves.
TEST(GatherPagesCpu, CopiesScatteredPagesExactly) {
  for (uint64_t page_bytes : {16u, 4096u, 8192u, 16384u + 16u}) {
    const uint32_t src_pages = 37, n = 11;
    std::vector<uint8_t, std::allocator<uint8_t>> src_buf(page_bytes * src_pages + 16);
    std::vector<uint8_t> dst_buf(page_bytes * n + 16, 0xAB);
    uint8_t* src = src_buf.data() + (16 - reinterpret_cast<uintptr_t>(src_buf.data()) % 16) % 16;
    uint8_t* dst = dst_buf.data() + (16 - reinterpret_cast<uintptr_t>(dst_buf.data()) % 16) % 16;
    std::mt19937 rng(7);
    for (uint64_t i = 0; i < page_bytes * src_pages; ++i) src[i] = static_cast<uint8_t>(rng());
    std::vector<uint32_t> pick(src_pages);
    std::iota(pick.begin(), pick.end(), 0);
    std::shuffle(pick.begin(), pick.end(), rng);
    std::vector<GatherItem> items;
    for (uint32_t i = 0; i < n; ++i) {
      items.push_back({src + pick[i] * page_bytes, dst + (n - 1 - i) * page_bytes});
    }
    ASSERT_TRUE(GatherPagesCpu(items.data(), n, page_bytes));
    for (uint32_t i = 0; i < n; ++i) {
      EXPECT_EQ(std::memcmp(dst + (n - 1 - i) * page_bytes, src + pick[i] * page_bytes, page_bytes),
                0)
          << "page " << i << " of " << page_bytes << " bytes";
    }
  }
}

TEST(GatherPagesCpu, RejectsBadArgumentsAndCopiesNothing) {
  alignas(16) uint8_t src[64] = {1, 2, 3};
  alignas(16) uint8_t dst[64] = {};
  GatherItem ok{src, dst};
  EXPECT_FALSE(GatherPagesCpu(&ok, 1, 0));
  EXPECT_FALSE(GatherPagesCpu(&ok, 1, 24));  // not a multiple of 16
  EXPECT_FALSE(GatherPagesCpu(nullptr, 1, 16));
  GatherItem items[2] = {ok, {src + 1, dst + 16}};  // second source misaligned
  EXPECT_FALSE(GatherPagesCpu(items, 2, 16));
  EXPECT_EQ(dst[0], 0);  // the valid first item was not copied either
  GatherItem null_dst{src, nullptr};
  EXPECT_FALSE(GatherPagesCpu(&null_dst, 1, 16));
  EXPECT_TRUE(GatherPagesCpu(nullptr, 0, 16));
}

}  // namespace
}  // namespace icecache
