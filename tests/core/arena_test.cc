#include "server/core/arena.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <random>
#include <set>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

class RecordingListener : public SegmentListener {
 public:
  void OnSegmentAdded(uint32_t segment, int fd, uint64_t bytes) override {
    segments.push_back(segment);
    fds.push_back(fd);
    sizes.push_back(bytes);
  }
  std::vector<uint32_t> segments;
  std::vector<int> fds;
  std::vector<uint64_t> sizes;
};

ArenaOptions Small() {
  ArenaOptions o;
  o.slots = 8;
  o.slot_payload = 4096;
  o.page_segment_bytes = 1 << 20;
  o.staging_segment_bytes = 1 << 20;
  return o;
}

TEST(Arena, ControlSegmentCarriesTheHeaderAndIsCharged) {
  MemoryAccountant global(64 << 20);
  {
    ASSERT_OK_AND_ASSIGN(auto arena, Arena::Create(7, Small(), 16 << 20, &global, nullptr));
    const abi::ArenaHeader* h = arena->header();
    EXPECT_EQ(h->magic, abi::kArenaMagic);
    EXPECT_EQ(h->abi_version, abi::kAbiVersion);
    EXPECT_EQ(h->client_id, 7u);
    EXPECT_EQ(h->num_slots, 8u);
    EXPECT_EQ(h->slot_bytes, sizeof(abi::SlotHeader) + 4096);
    EXPECT_EQ(arena->control_bytes(), abi::ControlBytes(8, 4096));
    EXPECT_EQ(global.used(), arena->control_bytes());
    // The daemon's own slot addressing agrees with the header's.
    for (uint32_t i = 0; i < 8; ++i) EXPECT_EQ(arena->Slot(i), abi::SlotAt(arena->control(), i));
    EXPECT_EQ(arena->SubmissionQueue(), abi::SubmissionQueue(arena->control()));
  }
  EXPECT_EQ(global.used(), 0u);  // released with the arena
}

TEST(Arena, SegmentsAreSealedAgainstShrinking) {
  MemoryAccountant global(64 << 20);
  RecordingListener listener;
  ASSERT_OK_AND_ASSIGN(auto arena, Arena::Create(1, Small(), 16 << 20, &global, &listener));
  Arena::FrameReservation r;
  ASSERT_OK(arena->ReserveFrames(8192, 4, &r));
  ASSERT_EQ(listener.fds.size(), 1u);
  // A client holding the descriptor cannot shrink it under the daemon's mapping.
  EXPECT_NE(::ftruncate(listener.fds[0], 0), 0);
  EXPECT_NE(::ftruncate(arena->control_fd(), 0), 0);
  EXPECT_EQ(listener.sizes[0], 1u << 20);
  EXPECT_EQ(arena->header()->segments[1].page_bytes, 8192u);
  EXPECT_EQ(arena->header()->num_segments.load(), 2u);
}

TEST(Arena, FramesComeFromSegmentsAndReturnWithNewVersions) {
  MemoryAccountant global(64 << 20);
  ASSERT_OK_AND_ASSIGN(auto arena, Arena::Create(1, Small(), 16 << 20, &global, nullptr));
  std::set<std::pair<uint32_t, uint32_t>> seen;
  FrameRef first;
  {
    Arena::FrameReservation r;
    ASSERT_OK(
        arena->ReserveFrames(8192, 200, &r));  // 125 frames (and tags) per 1 MiB: two segments
    EXPECT_EQ(arena->num_segments(), 3u);
    EXPECT_EQ(arena->frames_in_use(), 200u);
    for (int i = 0; i < 150; ++i) {
      FrameRef f = r.Take();
      EXPECT_TRUE(seen.insert({f.segment, f.frame}).second);
      if (i == 0) first = f;
      std::memset(arena->FrameAddress(f), i, 8192);  // every frame is writable memory
    }
    EXPECT_EQ(r.remaining(), 50u);
  }  // the 50 untaken frames go back
  EXPECT_EQ(arena->frames_in_use(), 150u);
  const uint32_t v = arena->FrameVersion(first);
  arena->BumpFrameVersion(first);
  EXPECT_EQ(arena->FrameVersion(first), v + 1);
  arena->FreeFrame(first);
  EXPECT_EQ(arena->FrameVersion(first), v + 2);
  EXPECT_EQ(arena->frames_in_use(), 149u);
  EXPECT_EQ(arena->frame_bytes_in_use(), 149u * 8192);
}

// A stopping daemon's freed frames keep their tags (the client hands them to the successor);
// reserved again for new rows, a frame loses its old tag first, so that a successor never
// takes the new rows for the old tag's positions. (A copy-on-write append while the daemon
// stopped freed a frame, another operation wrote other rows into it, and until its new tag a
// kill left the old tag over those rows.)
TEST(Arena, AFrameKeptTaggedAtStopLosesItsTagWhenReservedAgain) {
  MemoryAccountant global(64 << 20);
  ASSERT_OK_AND_ASSIGN(auto arena, Arena::Create(1, Small(), 16 << 20, &global, nullptr));
  auto owner_of = [&](FrameRef f) -> uint64_t {
    for (const Arena::TagCopy& t : arena->Tags()) {
      if (t.frame.segment == f.segment && t.frame.frame == f.frame) return t.owner;
    }
    return ~uint64_t{0};
  };
  FrameRef f;
  {
    Arena::FrameReservation r;
    ASSERT_OK(arena->ReserveFrames(8192, 1, &r));
    f = r.Take();
  }
  const uint32_t positions[2] = {40, 41};
  arena->WriteTag(f, 0x77, 3, 1, positions, 2);
  EXPECT_EQ(owner_of(f), 0x77u);
  arena->KeepTagsOnRelease();
  arena->FreeFrame(f);
  EXPECT_EQ(owner_of(f), 0x77u) << "a stopping daemon's freed frame keeps its tag";
  Arena::FrameReservation again;
  ASSERT_OK(arena->ReserveFrames(8192, 1, &again));
  const FrameRef g = again.Take();
  ASSERT_EQ(g.segment, f.segment);
  ASSERT_EQ(g.frame, f.frame);  // the free list hands the last freed frame out first
  EXPECT_EQ(owner_of(g), 0u);
}

TEST(Arena, QuotaAndLimitRefuseSegmentsAndChangeNothing) {
  MemoryAccountant global(3 << 20);
  ASSERT_OK_AND_ASSIGN(auto arena, Arena::Create(1, Small(), 2 << 20, &global, nullptr));
  const uint64_t used = global.used();
  Arena::FrameReservation r;
  ASSERT_OK(arena->ReserveFrames(8192, 100, &r));  // one 1 MiB segment
  Arena::FrameReservation more;
  // A second segment would pass the 2 MiB quota.
  EXPECT_THAT(arena->ReserveFrames(8192, 200, &more),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("memory limit")));
  EXPECT_EQ(more.remaining(), 0u);
  EXPECT_EQ(global.used(), used + (1 << 20));
  EXPECT_EQ(arena->num_segments(), 2u);
  EXPECT_THAT(arena->AllocStaging(3 << 20), StatusIs(absl::StatusCode::kResourceExhausted));
}

TEST(Arena, StagingBuffersAreCheckedAndCoalesce) {
  MemoryAccountant global(64 << 20);
  ASSERT_OK_AND_ASSIGN(auto arena, Arena::Create(1, Small(), 16 << 20, &global, nullptr));
  ASSERT_OK_AND_ASSIGN(abi::ArenaRef a, arena->AllocStaging(100));
  ASSERT_OK_AND_ASSIGN(abi::ArenaRef b, arena->AllocStaging(5000));
  EXPECT_EQ(a.segment, b.segment);
  EXPECT_EQ(b.offset, 4096u);  // 4 KiB granules
  EXPECT_EQ(arena->staging_bytes_in_use(), 4096u + 8192u);
  EXPECT_OK(arena->StagingAddress(a, 4096).status());
  EXPECT_THAT(arena->StagingAddress(a, 4097),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("4097 needed")));
  EXPECT_THAT(arena->StagingAddress({a.segment, 0, 64}, 1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not a live staging")));
  EXPECT_THAT(arena->StagingAddress({0, 0, 0}, 1), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(arena->StagingAddress({99, 0, 0}, 1), StatusIs(absl::StatusCode::kInvalidArgument));
  // With a tag: only a buffer allocated with it (a and b were allocated with tag 0).
  ASSERT_OK_AND_ASSIGN(abi::ArenaRef t, arena->AllocStaging(100, 7));
  EXPECT_OK(arena->StagingAddress(t, 4096, 7).status());
  EXPECT_OK(arena->StagingAddress(t, 4096).status());
  EXPECT_OK(arena->StagingAddress(a, 4096, 0).status());
  EXPECT_THAT(arena->StagingAddress(t, 4096, 8),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("another use")));
  EXPECT_THAT(arena->StagingAddress(a, 4096, 7),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("another use")));
  EXPECT_EQ(arena->StagingBytes(7), 4096u);
  ASSERT_OK(arena->FreeStaging(t));
  EXPECT_THAT(arena->AllocStaging(0), StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_OK(arena->FreeStaging(a));
  EXPECT_THAT(arena->FreeStaging(a), StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_OK(arena->FreeStaging(b));
  EXPECT_EQ(arena->staging_bytes_in_use(), 0u);
  // Freed ranges coalesced: the whole segment is one buffer again.
  ASSERT_OK_AND_ASSIGN(abi::ArenaRef whole, arena->AllocStaging(1 << 20));
  EXPECT_EQ(whole.segment, a.segment);
  EXPECT_EQ(whole.offset, 0u);
}

// A buffer a request in flight uses is pinned: the client cannot free it or pin it again
// until the request unpins it; unpinned as consumed it is freed.
TEST(Arena, PinnedStagingBuffersAreNeitherFreedNorPinnedAgain) {
  MemoryAccountant global(64 << 20);
  ASSERT_OK_AND_ASSIGN(auto arena, Arena::Create(1, Small(), 16 << 20, &global, nullptr));
  ASSERT_OK_AND_ASSIGN(abi::ArenaRef a, arena->AllocStaging(100, 7));
  ASSERT_OK_AND_ASSIGN(abi::ArenaRef b, arena->AllocStaging(100, 7));
  ASSERT_OK_AND_ASSIGN(uint8_t * at, arena->StagingAddress(a, 4096));
  // Refused pins change nothing: a wrong tag (with the caller's message), too many bytes,
  // no live buffer. The buffer stays free to release or pin.
  EXPECT_THAT(arena->PinStaging(a, 4096, 8, "not for this sequence"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not for this sequence")));
  EXPECT_THAT(arena->PinStaging(a, 4097), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(arena->PinStaging({a.segment, 0, 64}, 1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not a live staging")));
  EXPECT_THAT(arena->UnpinStaging(a, false),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not pinned")));
  // Pinned: the same address; no free, no second pin; the other buffer is unaffected.
  ASSERT_OK_AND_ASSIGN(uint8_t * pinned, arena->PinStaging(a, 4096, 7));
  EXPECT_EQ(pinned, at);
  EXPECT_THAT(arena->FreeStaging(a),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("in flight")));
  EXPECT_THAT(arena->PinStaging(a, 1),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("another request")));
  EXPECT_EQ(arena->StagingBytes(7), 8192u);
  EXPECT_EQ(arena->staging_bytes_in_use(), 8192u);
  EXPECT_OK(arena->StagingAddress(a, 4096).status());
  // Unpinned (not consumed): the buffer is the client's again.
  ASSERT_OK(arena->UnpinStaging(a, /*consumed=*/false));
  EXPECT_THAT(arena->UnpinStaging(a, false), StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_OK(arena->FreeStaging(a));
  EXPECT_EQ(arena->StagingBytes(7), 4096u);
  // Unpinned as consumed: freed, and no longer the client's to free.
  ASSERT_OK(arena->PinStaging(b, 100).status());
  ASSERT_OK(arena->UnpinStaging(b, /*consumed=*/true));
  // (Its segment, empty now, was given back: the arena holds more than it was promised.)
  EXPECT_THAT(arena->FreeStaging(b),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not a staging segment")));
  EXPECT_EQ(arena->dormant_segments(), 1u);
  EXPECT_EQ(arena->StagingBytes(7), 0u);
  EXPECT_EQ(arena->staging_bytes_in_use(), 0u);
}

TEST(Arena, BadOptionsAreInvalidArgument) {
  MemoryAccountant global(64 << 20);
  ArenaOptions o = Small();
  o.slots = 6;
  EXPECT_THAT(Arena::Create(1, o, 1 << 20, &global, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("power of two")));
  o = Small();
  o.slot_payload = 100;
  EXPECT_THAT(Arena::Create(1, o, 1 << 20, &global, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Arena::Create(1, Small(), 1024, &global, nullptr),
              StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_EQ(global.used(), 0u);
}

// ------------------------------------------------------------------ promises

// An arena charged to a client's budget grows within what was promised without touching the
// daemon-wide accountant, sizes its last segment to the promise's headroom, and charges only
// what goes beyond the promise.
TEST(Arena, SegmentsWithinThePromiseCostNothingMore) {
  MemoryAccountant global(64 << 20);
  auto budget = std::make_unique<ClientBudget>(&global, 0);
  ClientBudget* b = budget.get();
  ASSERT_OK_AND_ASSIGN(auto arena, Arena::Create(1, Small(), std::move(budget), nullptr));
  const uint64_t control = arena->control_bytes();
  ASSERT_OK(b->Promise(1536 << 10, 1000, "sequence"));  // 1.5 MiB of arena, 1000 B of heap
  EXPECT_EQ(global.used(), control + (1536 << 10) + 1000);
  Arena::FrameReservation r1, r2;
  // 1 MiB: a whole configured segment (frames and their tags).
  ASSERT_OK(arena->ReserveFrames(4096, abi::FramesInPageSegment(1 << 20, 4096), &r1));
  EXPECT_EQ(global.used(), control + (1536 << 10) + 1000);
  ASSERT_OK(arena->ReserveFrames(4096, 10, &r2));        // the last 0.5 MiB: sized to the headroom
  const uint64_t footprint = abi::FrameFootprint(4096);  // whole frames with their tags
  EXPECT_EQ(arena->segment_bytes(), control + (1 << 20) + (512 << 10) / footprint * footprint);
  EXPECT_EQ(global.used(), control + (1536 << 10) + 1000);
  // Beyond the promise: charged as it happens.
  Arena::FrameReservation r3;
  ASSERT_OK(arena->ReserveFrames(4096, 200, &r3));
  EXPECT_GT(global.used(), control + (1536 << 10) + 1000);
}

// When the promise shrinks below what the arena holds (a sequence dropped), segments that
// empty are given back and reused later, for another page size too, with versions above any
// their frames had.
TEST(Arena, EmptySegmentsBeyondThePromiseAreGivenBackAndReused) {
  MemoryAccountant global(64 << 20);
  auto budget = std::make_unique<ClientBudget>(&global, 0);
  ClientBudget* b = budget.get();
  RecordingListener listener;
  ASSERT_OK_AND_ASSIGN(auto arena, Arena::Create(1, Small(), std::move(budget), &listener));
  const uint64_t control = arena->control_bytes();
  ASSERT_OK(b->Promise(1 << 20, 0, "sequence"));
  std::vector<FrameRef> frames;
  {
    Arena::FrameReservation r;
    const uint32_t n = abi::FramesInPageSegment(1 << 20, 4096);  // one segment's frames
    ASSERT_OK(arena->ReserveFrames(4096, n, &r));
    for (uint32_t i = 0; i < n; ++i) frames.push_back(r.Take());
  }
  const uint32_t seg = frames[0].segment;
  for (FrameRef f : frames) arena->BumpFrameVersion(f);
  b->Unpromise(1 << 20, 0);
  // Still held: still charged (the segment was sized to the promise, in whole frames).
  EXPECT_EQ(global.used(),
            control + abi::FramesInPageSegment(1 << 20, 4096) * abi::FrameFootprint(4096));
  for (FrameRef f : frames) arena->FreeFrame(f);
  EXPECT_EQ(arena->dormant_segments(), 1u);
  EXPECT_EQ(global.used(), control);
  EXPECT_EQ(arena->segment_bytes(), control);
  // A new promise for another page size reuses the segment (no new descriptor).
  ASSERT_OK(b->Promise(1 << 20, 0, "sequence"));
  Arena::FrameReservation r;
  ASSERT_OK(arena->ReserveFrames(8192, 4, &r));
  const FrameRef g = r.Take();
  EXPECT_EQ(g.segment, seg);
  EXPECT_EQ(arena->dormant_segments(), 0u);
  EXPECT_EQ(listener.segments.size(), 1u);
  EXPECT_EQ(arena->header()->segments[seg].page_bytes, 8192u);
  EXPECT_GE(arena->FrameVersion(g), 2u);  // above the 2 the 4 KiB frames reached
}

// Each use grows within its own share of the promise: a staging segment takes the staging
// share (not a configured 1 MiB that would take the page frames' room), and the page frames
// then fill their whole share without a segment beyond the promise.
TEST(Arena, StagingAndPageFramesEachGrowWithinTheirShare) {
  MemoryAccountant global(64 << 20);
  auto budget = std::make_unique<ClientBudget>(&global, 0);
  ClientBudget* b = budget.get();
  ASSERT_OK_AND_ASSIGN(auto arena, Arena::Create(1, Small(), std::move(budget), nullptr));
  const uint64_t control = arena->control_bytes();
  ASSERT_OK(b->Promise(2 << 20, 0, "sequence", 256 << 10));
  ASSERT_OK_AND_ASSIGN(abi::ArenaRef buffer, arena->AllocStaging(8192));
  EXPECT_EQ(b->held(ArenaUse::kStaging), 256u << 10);
  // The page frames' whole share: 1 MiB, then the rest sized to the headroom.
  const uint64_t footprint = abi::FrameFootprint(4096);
  const uint32_t share =
      static_cast<uint32_t>(abi::FramesInPageSegment(1 << 20, 4096) +
                            abi::FramesInPageSegment((768 << 10) / footprint * footprint, 4096));
  Arena::FrameReservation r;
  ASSERT_OK(arena->ReserveFrames(4096, share, &r));
  EXPECT_EQ(arena->num_segments(), 4u);  // control, staging, two page segments
  EXPECT_EQ(arena->beyond_promise_segments(), 0u);
  EXPECT_FALSE(b->over_promise());
  EXPECT_EQ(global.used(), control + (2 << 20));
  // One frame more is beyond the promise, and counted.
  Arena::FrameReservation more;
  ASSERT_OK(arena->ReserveFrames(4096, 1, &more));
  EXPECT_EQ(arena->beyond_promise_segments(), 1u);
  EXPECT_GT(global.used(), control + (2 << 20));
  ASSERT_OK(arena->FreeStaging(buffer));
}

// Beyond the promise, a new page segment takes an eighth of what the page frames hold (up to
// the configured size): 200 inserts of 2 frames each add a few segments, not 200.
TEST(Arena, SegmentsBeyondThePromiseComeInEighthsOfWhatIsHeld) {
  MemoryAccountant global(64 << 20);
  auto budget = std::make_unique<ClientBudget>(&global, 0);
  ClientBudget* b = budget.get();
  RecordingListener listener;
  ASSERT_OK_AND_ASSIGN(auto arena, Arena::Create(1, Small(), std::move(budget), &listener));
  ASSERT_OK(b->Promise(4 << 20, 0, "sequence"));
  Arena::FrameReservation all;
  ASSERT_OK(arena->ReserveFrames(4096, 4 * abi::FramesInPageSegment(1 << 20, 4096), &all));
  ASSERT_EQ(listener.sizes.size(), 4u);
  ASSERT_EQ(arena->beyond_promise_segments(), 0u);
  std::vector<std::unique_ptr<Arena::FrameReservation>> inserts;
  std::vector<uint64_t> held_before;  // page bytes held when each new segment came
  for (int i = 0; i < 200; ++i) {
    const uint64_t held = b->held(ArenaUse::kPages);
    const size_t before = listener.sizes.size();
    inserts.push_back(std::make_unique<Arena::FrameReservation>());
    ASSERT_OK(arena->ReserveFrames(4096, 2, inserts.back().get())) << "insert " << i;
    if (listener.sizes.size() > before) held_before.push_back(held);
  }
  // 400 frames (1.6 MiB) beyond 4 MiB: segments of 0.5, 0.56, 0.63 MiB.
  ASSERT_EQ(listener.sizes.size(), 4u + 3u);
  EXPECT_EQ(arena->beyond_promise_segments(), 3u);
  const uint64_t footprint = abi::FrameFootprint(4096);
  for (size_t k = 0; k < held_before.size(); ++k) {
    EXPECT_EQ(listener.sizes[4 + k], held_before[k] / 8 / footprint * footprint) << k;
  }
}

// Where the limit leaves room beyond the promise for less than an eighth, the segment is
// exactly the need; where not even that fits, RESOURCE_EXHAUSTED and nothing changes.
TEST(Arena, BeyondThePromiseTheNeedAloneWhereAnEighthDoesNotFit) {
  const uint64_t control = abi::ControlBytes(Small().slots, Small().slot_payload);
  const uint64_t footprint = abi::FrameFootprint(4096);
  MemoryAccountant global(control + (1 << 20) + 3 * footprint);
  auto budget = std::make_unique<ClientBudget>(&global, 0);
  ClientBudget* b = budget.get();
  RecordingListener listener;
  ASSERT_OK_AND_ASSIGN(auto arena, Arena::Create(1, Small(), std::move(budget), &listener));
  ASSERT_OK(b->Promise(1 << 20, 0, "sequence"));
  Arena::FrameReservation all, two, again;
  ASSERT_OK(arena->ReserveFrames(4096, abi::FramesInPageSegment(1 << 20, 4096), &all));
  ASSERT_OK(arena->ReserveFrames(4096, 2, &two));
  ASSERT_EQ(listener.sizes.size(), 2u);
  EXPECT_EQ(listener.sizes[1], 2 * footprint);
  EXPECT_EQ(arena->beyond_promise_segments(), 1u);
  EXPECT_THAT(arena->ReserveFrames(4096, 2, &again),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("memory limit")));
  EXPECT_EQ(arena->num_segments(), 3u);
  EXPECT_EQ(arena->beyond_promise_segments(), 1u);
  EXPECT_EQ(again.remaining(), 0u);
}

// A client that pins its segments with a device (abi::kAttachPinsSegments) never has one
// given back: freeing the memory under a pinned page orphans it (the device keeps reading the
// old page; bench/experiments/pinned_punch.c shows it with io_uring's pinned buffers). What the
// arena holds beyond the promise stays held and charged, and its free frames are reused.
TEST(Arena, SegmentsOfAClientThatPinsThemAreNeverGivenBack) {
  MemoryAccountant global(64 << 20);
  auto budget = std::make_unique<ClientBudget>(&global, 0);
  ClientBudget* b = budget.get();
  ArenaOptions o = Small();
  o.keep_segments = true;
  ASSERT_OK_AND_ASSIGN(auto arena, Arena::Create(1, o, std::move(budget), nullptr));
  const uint64_t control = arena->control_bytes();
  ASSERT_OK(b->Promise(1 << 20, 0, "sequence"));
  const uint32_t n = abi::FramesInPageSegment(1 << 20, 4096);
  std::vector<FrameRef> frames;
  {
    Arena::FrameReservation r;
    ASSERT_OK(arena->ReserveFrames(4096, n, &r));
    for (uint32_t i = 0; i < n; ++i) frames.push_back(r.Take());
  }
  const uint64_t held = arena->segment_bytes();
  b->Unpromise(1 << 20, 0);
  for (FrameRef f : frames) arena->FreeFrame(f);
  EXPECT_EQ(arena->dormant_segments(), 0u);
  EXPECT_EQ(arena->segment_bytes(), held);
  EXPECT_EQ(global.used(), held);  // beyond every promise: charged
  // The same segment's frames serve the next reservation; no new segment.
  Arena::FrameReservation again;
  ASSERT_OK(arena->ReserveFrames(4096, n, &again));
  EXPECT_EQ(arena->num_segments(), 2u);
  EXPECT_EQ(again.Take().segment, frames[0].segment);
  EXPECT_GT(held, control);
}

// A promise far larger than kMaxArenaSegments configured segments (600 MiB against 250 of
// 1 MiB) fills in a few dozen segments: past 8 configured ones, each takes an eighth of what
// the frames hold, up to 32 configured sizes. (With configured segments only, the frames ran
// out of segments: the 128k-token sequence of an 8B model is promised 34.6 GiB of frames, 256
// default segments held 16 GiB.)
TEST(Arena, ALargePromiseFillsInAFewDozenSegments) {
  MemoryAccountant global(uint64_t{1} << 30);
  auto budget = std::make_unique<ClientBudget>(&global, 0);
  ClientBudget* b = budget.get();
  RecordingListener listener;
  ASSERT_OK_AND_ASSIGN(auto arena, Arena::Create(1, Small(), std::move(budget), &listener));
  const uint64_t promise = uint64_t{600} << 20;
  ASSERT_OK(b->Promise(promise, 0, "sequence"));
  const uint64_t footprint = abi::FrameFootprint(4096);
  std::vector<std::unique_ptr<Arena::FrameReservation>> held;
  uint64_t frames = 0;
  while ((frames + 1000) * footprint <= promise) {
    held.push_back(std::make_unique<Arena::FrameReservation>());
    ASSERT_OK(arena->ReserveFrames(4096, 1000, held.back().get())) << frames << " frames";
    frames += 1000;
  }
  EXPECT_EQ(arena->beyond_promise_segments(), 0u);
  EXPECT_FALSE(b->over_promise());
  EXPECT_LE(arena->num_segments(), 1u + 55u);
  RecordProperty("segments", arena->num_segments());
  // The first 8 are configured; each later one an eighth of what was held before it.
  uint64_t before = 0;
  for (size_t k = 0; k + 1 < listener.sizes.size(); ++k) {
    EXPECT_EQ(listener.sizes[k],
              std::max<uint64_t>(1u << 20,
                                 std::min<uint64_t>(before / 8, 32 << 20) / footprint * footprint))
        << k;
    if (k < 8) {
      EXPECT_EQ(listener.sizes[k], 1u << 20) << k;
    }
    before += listener.sizes[k];
  }
  // The growth stops at 32 configured sizes.
  const uint64_t cap = (uint64_t{32} << 20) / footprint * footprint;
  EXPECT_GE(std::count(listener.sizes.begin(), listener.sizes.end(), cap), 5);
  EXPECT_LE(*std::max_element(listener.sizes.begin(), listener.sizes.end()), cap);
}

// A client gets no more segments than a recovery attach can hand back to a successor
// (abi::kMaxDonatedSegments, control segment included): every frame can be restored.
TEST(Arena, AClientGetsNoMoreSegmentsThanARecoveryHandsBack) {
  MemoryAccountant global(uint64_t{1} << 30);
  ASSERT_OK_AND_ASSIGN(auto arena, Arena::Create(1, Small(), uint64_t{1} << 30, &global, nullptr));
  const uint32_t per_segment = abi::FramesInPageSegment(1 << 20, 4096);
  std::vector<std::unique_ptr<Arena::FrameReservation>> held;
  absl::Status last;
  for (uint32_t i = 0; i < abi::kMaxSegments && last.ok(); ++i) {
    held.push_back(std::make_unique<Arena::FrameReservation>());
    last = arena->ReserveFrames(4096, per_segment, held.back().get());
  }
  EXPECT_THAT(
      last,
      StatusIs(absl::StatusCode::kResourceExhausted,
               HasSubstr(absl::StrCat("has used all ", abi::kMaxDonatedSegments, " segments"))));
  EXPECT_EQ(arena->num_segments(), abi::kMaxDonatedSegments);
  EXPECT_EQ(held.back()->remaining(), 0u);  // the refused reservation holds nothing
  EXPECT_EQ(arena->frames_in_use(), uint64_t{abi::kMaxDonatedSegments - 1} * per_segment);
}

// 3,000 random operations on an arena charged to a budget (promises of both shares and their
// release, frame reservations and frees of two page sizes, staging buffers, give-backs) under
// a limit that refuses some of them. After each: the shares add up to what the arena holds,
// the segments' bytes are the control segment plus that, the global charge is
// fixed + heap + max(promised, held), and a refused operation changed nothing.
TEST(Arena, RandomOperationsKeepTheSharesAndTheChargeExact) {
  const uint64_t control = abi::ControlBytes(Small().slots, Small().slot_payload);
  MemoryAccountant global(control + (uint64_t{48} << 20));
  auto budget = std::make_unique<ClientBudget>(&global, 0);
  ClientBudget* b = budget.get();
  ASSERT_OK_AND_ASSIGN(auto arena, Arena::Create(1, Small(), std::move(budget), nullptr));
  std::mt19937_64 rng(2026);
  struct Promised {
    uint64_t arena, heap, staging;
  };
  std::vector<Promised> promises;
  std::vector<FrameRef> frames;
  std::vector<abi::ArenaRef> buffers;
  uint64_t heap = 0;
  const auto check = [&](int step) {
    ASSERT_EQ(b->held(ArenaUse::kPages) + b->held(ArenaUse::kStaging), b->arena_held()) << step;
    ASSERT_EQ(arena->segment_bytes(), control + b->arena_held()) << step;
    ASSERT_EQ(b->promised(ArenaUse::kPages) + b->promised(ArenaUse::kStaging), b->arena_promised())
        << step;
    ASSERT_EQ(global.used(), control + heap + std::max(b->arena_promised(), b->arena_held()))
        << step;
    ASSERT_EQ(b->charged(), global.used()) << step;
    ASSERT_LE(global.used(), global.limit()) << step;
  };
  int refused = 0;
  for (int step = 0; step < 3000; ++step) {
    const uint64_t held_before = b->arena_held(), used_before = global.used();
    const uint32_t segments_before = arena->num_segments();
    absl::Status st;
    switch (rng() % 7) {
      case 0: {  // a promise
        const uint64_t a = (rng() % 8) << 20, st_share = a == 0 ? 0 : rng() % (a + 1);
        const uint64_t h = rng() % 4096;
        st = b->Promise(a, h, "sequence", st_share);
        if (st.ok()) {
          promises.push_back({a, h, st_share});
          heap += h;
        }
        break;
      }
      case 1:  // its release
        if (!promises.empty()) {
          const size_t i = rng() % promises.size();
          b->Unpromise(promises[i].arena, promises[i].heap, promises[i].staging);
          heap -= promises[i].heap;
          promises.erase(promises.begin() + static_cast<long>(i));
        }
        break;
      case 2: {  // frames
        Arena::FrameReservation r;
        const uint32_t page = rng() % 4 == 0 ? 8192 : 4096;
        st = arena->ReserveFrames(page, 1 + rng() % 300, &r);
        if (st.ok()) {
          const size_t take = rng() % (r.remaining() + 1);
          for (size_t i = 0; i < take; ++i) frames.push_back(r.Take());
        }
        break;
      }
      case 3:
        for (int n = 0; n < 40 && !frames.empty(); ++n) {
          const size_t i = rng() % frames.size();
          arena->FreeFrame(frames[i]);
          frames[i] = frames.back();
          frames.pop_back();
        }
        break;
      case 4: {  // a staging buffer
        absl::StatusOr<abi::ArenaRef> ref = arena->AllocStaging(1 + rng() % (2 << 20));
        st = ref.status();
        if (ref.ok()) buffers.push_back(*ref);
        break;
      }
      case 5:
        if (!buffers.empty()) {
          const size_t i = rng() % buffers.size();
          ASSERT_OK(arena->FreeStaging(buffers[i]));
          buffers[i] = buffers.back();
          buffers.pop_back();
        }
        break;
      case 6:
        arena->GiveBackEmptySegments();
        break;
    }
    if (!st.ok()) {
      ++refused;
      ASSERT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << step << ": " << st;
      ASSERT_EQ(b->arena_held(), held_before) << step;
      ASSERT_EQ(global.used(), used_before) << step;
      ASSERT_EQ(arena->num_segments(), segments_before) << step;
    }
    check(step);
  }
  RecordProperty("refused", refused);
  EXPECT_GT(refused, 0);  // the limit was reached
  EXPECT_GT(arena->dormant_segments() + arena->beyond_promise_segments(), 0u);
  for (FrameRef f : frames) arena->FreeFrame(f);
  for (const abi::ArenaRef& r : buffers) ASSERT_OK(arena->FreeStaging(r));
  for (const Promised& p : promises) b->Unpromise(p.arena, p.heap, p.staging);
  arena->GiveBackEmptySegments();
  EXPECT_EQ(global.used(), control);
  EXPECT_EQ(b->arena_held(), 0u);
  EXPECT_EQ(arena->segment_bytes(), control);
}

TEST(Arena, StagingIsTaggedPerSequence) {
  MemoryAccountant global(64 << 20);
  ASSERT_OK_AND_ASSIGN(auto arena, Arena::Create(1, Small(), 16 << 20, &global, nullptr));
  ASSERT_OK_AND_ASSIGN(abi::ArenaRef a, arena->AllocStaging(100, 7));
  ASSERT_OK_AND_ASSIGN(abi::ArenaRef b, arena->AllocStaging(5000, 7));
  ASSERT_OK(arena->AllocStaging(10, 8).status());
  EXPECT_EQ(arena->StagingBytes(7), 4096u + 8192u);
  EXPECT_EQ(arena->StagingBytes(8), 4096u);
  ASSERT_OK(arena->FreeStaging(a));
  EXPECT_EQ(arena->StagingBytes(7), 8192u);
  ASSERT_OK(arena->FreeStaging(b));
  EXPECT_EQ(arena->StagingBytes(7), 0u);
  EXPECT_EQ(Arena::StagingFootprint(4097), 8192u);
}

}  // namespace
}  // namespace icecache
