// DonatedArena on arenas built here as sealed memfds: what its index of tagged frames costs
// against the memory limit, and what Gather takes from the frames.
#include "server/core/recovery.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/core/geometry.h"
#include "server/core/memory_accountant.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::testing::HasSubstr;
using testing::StatusIs;

constexpr uint32_t kPageBytes = 2048;  // 8 tokens of 64 fp16 elements, K then V
constexpr uint32_t kFrames = 64;
constexpr uint64_t kOwner = 0x5eed;

// A sealed memfd holding `bytes` (shrink and grow sealed, as an arena's segments are).
int SealedMemfd(const std::vector<uint8_t>& bytes) {
  const int fd = ::memfd_create("recovery-test", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  EXPECT_GE(fd, 0);
  EXPECT_EQ(::ftruncate(fd, static_cast<off_t>(bytes.size())), 0);
  EXPECT_EQ(::pwrite(fd, bytes.data(), bytes.size(), 0), static_cast<ssize_t>(bytes.size()));
  EXPECT_EQ(::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW), 0);
  return fd;
}

Geometry OneHeadGeometry() {
  GeometrySpec spec;
  spec.num_layers = 2;
  spec.num_q_heads = 1;
  spec.num_kv_heads = 1;
  spec.head_dim = 64;
  spec.dtype = DType::kFP16;
  spec.max_tokens = 1024;
  spec.page_size = 8;
  spec.full_kv_layers = 0;
  absl::StatusOr<Geometry> g = ResolveGeometry(spec);
  EXPECT_TRUE(g.ok()) << g.status();
  return *g;
}

// A previous arena of one page segment of kFrames frames: the control segment's header names
// it; frames are tagged by Tag() and their rows hold (position, marker) in every element.
class DonatedArenaTest : public ::testing::Test {
 protected:
  DonatedArenaTest()
      : control_(sizeof(abi::ArenaHeader) + 4096, 0),
        pages_(uint64_t{kFrames} * abi::FrameFootprint(kPageBytes), 0) {
    auto header = std::make_unique<abi::ArenaHeader>();  // aligned as the type asks
    header->magic = abi::kArenaMagic;
    header->segments[1].bytes = pages_.size();
    header->segments[1].kind = abi::kSegmentPages;
    header->segments[1].page_bytes = kPageBytes;
    std::memcpy(control_.data(), static_cast<const void*>(header.get()), sizeof(*header));
  }

  // Frame `frame` holds `positions` of (owner, layer, head 0); its K and V rows are the
  // position plus `marker`, as fp16-sized integers (only compared bytewise).
  void Tag(uint32_t frame, uint64_t owner, uint32_t layer, std::vector<uint32_t> positions,
           uint16_t marker = 0) {
    auto* tag = reinterpret_cast<abi::FrameTag*>(pages_.data() +
                                                 abi::TagOffset(pages_.size(), kPageBytes, frame));
    tag->owner.store(owner);
    tag->layer = layer;
    tag->kv_head = 0;
    tag->count = static_cast<uint32_t>(positions.size());
    for (size_t i = 0; i < positions.size(); ++i) {
      tag->positions[i] = positions[i];
      const uint16_t value = static_cast<uint16_t>(positions[i] + marker);
      uint8_t* k = pages_.data() + uint64_t{frame} * kPageBytes + i * 128;
      for (int e = 0; e < 64; ++e) {
        std::memcpy(k + 2 * e, &value, 2);
        std::memcpy(k + 1024 + 2 * e, &value, 2);
      }
    }
  }

  absl::StatusOr<std::unique_ptr<DonatedArena>> Map(MemoryAccountant* memory) {
    return DonatedArena::Map({SealedMemfd(control_), SealedMemfd(pages_)}, uint64_t{1} << 30,
                             memory);
  }

  std::vector<uint8_t> control_, pages_;
};

// The index is charged while the object lives: its bound before the tags are read, what it
// holds after (one entry per tagged frame), nothing once it is gone. A limit that cannot hold
// the bound refuses the arena and keeps nothing charged. (Before, an index of 144 bytes per
// tagged frame was never charged: 64 recovery attaches handing back the same sparse memfd of
// the memory limit's size held about 8 times the limit in daemon heap.)
TEST_F(DonatedArenaTest, ItsFrameIndexIsChargedToTheMemoryLimitWhileItLives) {
  Tag(3, kOwner, 0, {0, 1, 2});
  Tag(9, kOwner, 1, {0});
  Tag(40, kOwner + 1, 0, {5});
  MemoryAccountant memory(uint64_t{1} << 20);
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<DonatedArena> a, Map(&memory));
    EXPECT_EQ(a->FramesOf(kOwner), 2u);
    EXPECT_EQ(a->FramesOf(kOwner + 1), 1u);
    EXPECT_EQ(a->FramesOf(kOwner + 2), 0u);
    EXPECT_EQ(a->charged_bytes(), 3 * DonatedArena::kFrameIndexBytes);
    EXPECT_EQ(memory.used(), 3 * DonatedArena::kFrameIndexBytes);
  }
  EXPECT_EQ(memory.used(), 0u);

  MemoryAccountant small(kFrames * DonatedArena::kFrameIndexBytes - 1);
  EXPECT_THAT(Map(&small), StatusIs(absl::StatusCode::kResourceExhausted,
                                    HasSubstr("the index of a recovered arena")));
  EXPECT_EQ(small.used(), 0u);
  // The bound: what the segments could hold, at most 1.2% of their bytes (frames of 2 KiB up).
  EXPECT_LE(DonatedArena::kFrameIndexBytes * 1000, 12 * abi::FrameFootprint(2048));
}

// Gather takes each position's row from the first frame that holds it (copy on write leaves
// older copies behind), only from frames of the sequence and layer asked for, and not from a
// frame whose tag no longer says what was indexed; a position in no frame is DATA_LOSS.
TEST_F(DonatedArenaTest, GatherTakesTheFirstCopyFromFramesThatStillSayWhatWasIndexed) {
  Tag(2, kOwner, 1, {8, 9}, /*marker=*/100);    // the first copy of 8 and 9
  Tag(5, kOwner, 1, {9, 10}, /*marker=*/200);   // a later copy of 9, and 10
  Tag(6, kOwner, 0, {11}, /*marker=*/300);      // layer 0: not asked for
  Tag(7, kOwner + 1, 1, {11}, /*marker=*/400);  // another sequence
  Tag(8, kOwner, 1, {11}, /*marker=*/500);      // changed after Map (below)
  MemoryAccountant memory(uint64_t{1} << 20);
  // Mapped from the memfds: the test's vector is a copy, so the change goes through the fd.
  const int pages_fd = SealedMemfd(pages_);
  ASSERT_OK_AND_ASSIGN(
      std::unique_ptr<DonatedArena> a,
      DonatedArena::Map({SealedMemfd(control_), pages_fd}, uint64_t{1} << 30, &memory));
  const Geometry g = OneHeadGeometry();
  std::unique_ptr<SequenceKv::RowSource> rows = a->RowsOf(kOwner, g);
  std::vector<uint8_t> k(3 * 128), v(3 * 128);
  ASSERT_OK(rows->Gather(1, {8, 9, 10}, k.data(), v.data()));
  auto element = [](const std::vector<uint8_t>& r, int i) {
    uint16_t x;
    std::memcpy(&x, r.data() + i * 128 + 2 * 63, 2);
    return x;
  };
  EXPECT_EQ(element(k, 0), 108);
  EXPECT_EQ(element(k, 1), 109);  // frame 2's copy, not frame 5's (209)
  EXPECT_EQ(element(k, 2), 210);
  EXPECT_EQ(element(v, 1), 109);
  // Position 11 of layer 1 is in frame 8 only; once its tag names another owner, in none.
  const uint64_t owner_at = abi::TagOffset(pages_.size(), kPageBytes, 8);
  const uint64_t other = kOwner + 7;
  ASSERT_EQ(::pwrite(pages_fd, &other, sizeof(other), static_cast<off_t>(owner_at)),
            static_cast<ssize_t>(sizeof(other)));
  EXPECT_THAT(rows->Gather(1, {11}, k.data(), v.data()),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("position 11")));
  EXPECT_THAT(rows->Gather(1, {12}, k.data(), v.data()),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("position 12")));
}

}  // namespace
}  // namespace icecache
