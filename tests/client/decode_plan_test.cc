#include "client/decode_plan.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <vector>

#include "tests/support/status_matchers.h"

namespace icecache::client_internal {
namespace {

using ::icecache::testing::StatusIs;

TEST(DecodePlan, LongRunsAreCutAndHeadsDelimited) {
  DecodePlan plan(2, 4, 8);
  std::vector<uint8_t> k(1000 * 4), v(1000 * 4);
  plan.BeginHead();
  plan.AddRows(k.data(), v.data(), 4, 10, 300);  // 128 + 128 + 44
  plan.BeginHead();
  uint8_t page[64];
  plan.AddPage(page, 32, 5);
  plan.AddGather(k.data(), page);
  ASSERT_TRUE(plan.Finish().ok());
  ASSERT_EQ(plan.chunks().size(), 4u);
  EXPECT_EQ(plan.chunks()[0].k, k.data() + 40);
  EXPECT_EQ(plan.chunks()[0].count, 128u);
  EXPECT_EQ(plan.chunks()[1].k, k.data() + (10 + 128) * 4);
  EXPECT_EQ(plan.chunks()[2].count, 44u);
  EXPECT_EQ(plan.chunks()[2].v, v.data() + (10 + 256) * 4);
  EXPECT_EQ(plan.chunks()[3].k, page);
  EXPECT_EQ(plan.chunks()[3].v, page + 32);
  EXPECT_EQ(plan.offsets(), (std::vector<uint32_t>{0, 3, 4}));
  EXPECT_EQ(plan.max_chunks_in_a_head(), 3u);
  EXPECT_EQ(plan.attended_rows(), 305u);
  EXPECT_EQ(plan.num_items(), 1u);

  // Serialized: [items | chunks | offsets], pointers relative to the device copy.
  std::vector<uint8_t> host(plan.buffer_bytes());
  alignas(16) uint8_t device[1024];
  size_t used = 0;
  const DecodePlan::View view = plan.Serialize(host.data(), device, &used);
  EXPECT_EQ(reinterpret_cast<const uint8_t*>(view.items), device);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(view.chunks) % 16, 0u);
  const size_t chunks_at = reinterpret_cast<const uint8_t*>(view.chunks) - device;
  const size_t offsets_at = reinterpret_cast<const uint8_t*>(view.chunk_offsets) - device;
  EXPECT_EQ(used, offsets_at + 3 * sizeof(uint32_t));
  GatherItem item;
  std::memcpy(&item, host.data(), sizeof(item));
  EXPECT_EQ(item.src, k.data());
  AttentionChunk c3;
  std::memcpy(&c3, host.data() + chunks_at + 3 * sizeof(AttentionChunk), sizeof(c3));
  EXPECT_EQ(c3.count, 5u);
  uint32_t offsets[3];
  std::memcpy(offsets, host.data() + offsets_at, sizeof(offsets));
  EXPECT_EQ(offsets[1], 3u);
  EXPECT_EQ(offsets[2], 4u);

  plan.Clear();
  EXPECT_EQ(plan.chunks().size(), 0u);
  EXPECT_EQ(plan.num_items(), 0u);
}

TEST(DecodePlan, CapacityIsChecked) {
  uint8_t page[64];
  {
    DecodePlan plan(1, 1, 8);
    plan.BeginHead();
    plan.AddGather(page, page);
    plan.AddGather(page, page);
    EXPECT_THAT(plan.Finish(), StatusIs(absl::StatusCode::kInternal));
  }
  {
    DecodePlan plan(1, 0, 2);
    plan.BeginHead();
    for (int i = 0; i < 3; ++i) plan.AddPage(page, 32, 1);
    EXPECT_THAT(plan.Finish(), StatusIs(absl::StatusCode::kInternal));
  }
  {
    DecodePlan plan(2, 0, 2);  // no head at all
    EXPECT_THAT(plan.Finish(), StatusIs(absl::StatusCode::kInternal));
  }
  {
    DecodePlan plan(2, 0, 2);  // fewer heads than the capacity: a smaller batch
    plan.BeginHead();
    plan.AddPage(page, 32, 1);
    EXPECT_TRUE(plan.Finish().ok());
    EXPECT_EQ(plan.offsets(), (std::vector<uint32_t>{0, 1}));
  }
}

}  // namespace
}  // namespace icecache::client_internal
