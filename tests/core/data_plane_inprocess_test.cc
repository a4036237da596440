// The daemon's real data plane in process (attach socket in a private directory, real client
// attachments, the test's own thread pool), for what a subprocess cannot show on demand:
// - CreateSequence against the reaper of a detached client: a sequence created with an
//   attachment that is being detached must either be refused or be dropped with the client's
//   other sequences; none may outlive its client (nothing would ever drop it, and its arena,
//   promise and memory would stay charged until the daemon restarts).
// - Buffers held by requests in flight (the pool held busy, so that they stay in flight): the
//   client cannot release them or submit them again until the answer (a released buffer's range
//   would be reused, or its segment given back, under the request).
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "icecache/attachment.h"
#include "proto/icecache/v1/abi.h"
#include "selection/index_factory.h"
#include "server/core/clock.h"
#include "server/core/data_plane.h"
#include "server/core/memory_accountant.h"
#include "server/core/sequence_registry.h"
#include "tests/support/null_observer.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

class DetachCounter final : public ::icecache::testing::NullDataPlaneObserver {
 public:
  void OnDetach() override { ++detached; }
  std::atomic<int> detached{0};
};

bool WaitFor(const std::function<bool()>& done, absl::Duration limit) {
  const absl::Time until = absl::Now() + limit;
  while (!done()) {
    if (absl::Now() >= until) return false;
    absl::SleepFor(absl::Milliseconds(1));
  }
  return true;
}

// Occupies every worker of a pool until Release (or destruction): what runs on the pool
// (prefills, appends, batch selects queued behind them) waits meanwhile.
class PoolHold {
 public:
  PoolHold(ThreadPool* pool, int workers) {
    for (int i = 0; i < workers; ++i) {
      pool->Schedule([this] {
        ++running_;
        go_.WaitForNotification();
        --running_;
      });
    }
    held_ = WaitFor([&] { return running_.load() == workers; }, absl::Seconds(20));
  }
  ~PoolHold() {
    Release();
    while (running_.load() != 0) absl::SleepFor(absl::Milliseconds(1));
  }
  void Release() {
    if (!go_.HasBeenNotified()) go_.Notify();
  }
  bool held() const { return held_; }

 private:
  absl::Notification go_;
  std::atomic<int> running_{0};
  bool held_ = false;
};

class InProcessDataPlaneTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/icecache-reap-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    DataPlaneOptions o;
    o.attach_socket = dir_ + "/icecached.attach.sock";
    o.arena.slots = 8;
    o.arena.slot_payload = 8192;
    o.arena.page_segment_bytes = 1 << 20;
    o.arena.staging_segment_bytes = 1 << 20;
    o.index_spec = *selection::Preset(selection::kDefaultPreset);
    plane_ = std::make_unique<DataPlane>(o, &registry_, &accountant_, &pool_, &observer_);
    ASSERT_OK(plane_->Start());
    Attachment::Options a;
    a.socket = dir_ + "/icecached.sock";
    absl::StatusOr<std::unique_ptr<Attachment>> att = Attachment::Attach(a);
    ASSERT_OK(att.status());
    client_ = std::move(*att);
    absl::StatusOr<Caller> caller = plane_->Authenticate(client_->token());
    ASSERT_OK(caller.status());
    caller_ = *caller;
  }
  void TearDown() override {
    client_.reset();
    plane_.reset();
    (void)::unlink((dir_ + "/icecached.attach.sock").c_str());
    (void)::rmdir(dir_.c_str());
  }

  static GeometrySpec Spec() {
    GeometrySpec g;
    g.num_layers = 2;
    g.num_q_heads = 4;
    g.num_kv_heads = 2;
    g.head_dim = 64;
    g.dtype = DType::kFP16;
    g.max_tokens = 256;
    g.full_kv_layers = 0;
    return g;
  }

  // Runs CreateSequence on another thread, paused at the hook's `claimed` point; detaches the
  // client there (its attachment closed, as by a crash); then lets the call go on.
  // `reaped_while_paused`: whether the reaper finished (OnDetach) while the call was paused.
  absl::StatusOr<SequenceInfo> CreateAcrossADetach(bool pause_claimed, bool* reaped_while_paused) {
    absl::Notification paused, resume;
    std::atomic<bool> once{false};
    plane_->SetCreateSequenceHookForTesting([&](bool claimed) {
      if (claimed != pause_claimed || once.exchange(true)) return;
      paused.Notify();
      resume.WaitForNotification();
    });
    absl::StatusOr<SequenceInfo> result = absl::UnknownError("not run");
    std::thread t([&] { result = plane_->CreateSequence(caller_, Spec(), "raced"); });
    paused.WaitForNotification();
    client_.reset();  // the client goes away: the daemon detaches and reaps it
    // Unclaimed, the reaper has nothing to wait for; claimed, it must wait for the call.
    *reaped_while_paused = WaitFor([&] { return observer_.detached.load() > 0; },
                                   pause_claimed ? absl::Milliseconds(500) : absl::Seconds(20));
    resume.Notify();
    t.join();
    return result;
  }

  std::string dir_;
  MemoryAccountant accountant_{uint64_t{1} << 30};
  SequenceRegistry registry_{&accountant_, RealClock::Get()};
  static constexpr int kWorkers = 2;
  ThreadPool pool_{kWorkers};
  DetachCounter observer_;
  std::unique_ptr<DataPlane> plane_;
  std::unique_ptr<Attachment> client_;
  Caller caller_;
};

// The client is reaped between CreateSequence finding its attachment and claiming it: the
// call is refused, and the registry and the memory accountant are back to nothing (the
// attachment's arena is charged until then).
TEST_F(InProcessDataPlaneTest, ACreateThatFindsItsClientBeingReapedIsRefusedAndLeavesNothing) {
  ASSERT_GT(accountant_.used(), 0u);  // the attachment's arena
  bool reaped = false;
  absl::StatusOr<SequenceInfo> created = CreateAcrossADetach(/*pause_claimed=*/false, &reaped);
  EXPECT_TRUE(reaped) << "the reaper did not finish while the create was paused unclaimed";
  EXPECT_THAT(created.status(),
              StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("being detached")));
  EXPECT_EQ(registry_.size(), 0u);
  EXPECT_TRUE(WaitFor([&] { return accountant_.used() == 0; }, absl::Seconds(20)))
      << accountant_.used() << " bytes still charged";
  EXPECT_EQ(plane_->Stats().clients, 0u);
}

// The client detaches after CreateSequence claimed its attachment: the reaper waits for the
// call, which succeeds, and then drops the new sequence with the client.
TEST_F(InProcessDataPlaneTest, AClaimedCreateHoldsTheReaperWhichThenDropsTheNewSequence) {
  bool reaped = true;
  absl::StatusOr<SequenceInfo> created = CreateAcrossADetach(/*pause_claimed=*/true, &reaped);
  EXPECT_FALSE(reaped) << "the reaper finished while a create of the client was in flight";
  ASSERT_OK(created.status());
  EXPECT_TRUE(WaitFor([&] { return observer_.detached.load() == 1; }, absl::Seconds(20)));
  EXPECT_EQ(registry_.size(), 0u) << "the sequence created during the detach outlived its client";
  EXPECT_THAT(registry_.Get(created->handle).status(), StatusIs(absl::StatusCode::kNotFound));
  // The caller's copy holds the stored KV and the charge's release, and with them the arena;
  // the service answers with the handle and lets it go.
  created = absl::CancelledError("let go");
  EXPECT_TRUE(WaitFor([&] { return accountant_.used() == 0; }, absl::Seconds(20)))
      << accountant_.used() << " bytes still charged";
}

// A prefill's buffer is held from its submission to its answer: a release and a second
// submission of it are refused meanwhile, and change nothing; the prefill then consumes it.
TEST_F(InProcessDataPlaneTest, ABufferInFlightIsNeitherReleasedNorSubmittedAgain) {
  ASSERT_OK_AND_ASSIGN(SequenceInfo seq, plane_->CreateSequence(caller_, Spec(), "pinned"));
  const std::string& h = seq.handle;
  ASSERT_OK_AND_ASSIGN(abi::StageResponse st, client_->Stage(h, 64));
  {
    PoolHold hold(&pool_, kWorkers);
    ASSERT_TRUE(hold.held());
    ASSERT_OK_AND_ASSIGN(uint32_t slot,
                         client_->SubmitStaged(abi::kOpPrefill, h, 0, st.buffer, 64, 0));
    EXPECT_THAT(client_->ReleaseStaging(h, st.buffer),
                StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("in flight")));
    EXPECT_THAT(client_->Prefill(h, 1, st.buffer, 64, 0),
                StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("another request")));
    hold.Release();
    EXPECT_OK(client_->Finish(slot));
  }
  // Consumed by the prefill: no longer the client's to release. The pool thread answers
  // first and frees the buffer after (docs/data_plane.md), so for a moment after the answer a
  // release is still refused as in flight; each such refusal changes nothing.
  absl::Status released;
  EXPECT_TRUE(WaitFor(
      [&] {
        released = client_->ReleaseStaging(h, st.buffer);
        return released.code() != absl::StatusCode::kFailedPrecondition;
      },
      absl::Seconds(20)));
  EXPECT_THAT(released,
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not a live staging")));
  // The refused prefill of layer 1 changed nothing: it builds from a buffer of its own.
  ASSERT_OK_AND_ASSIGN(abi::StageResponse st1, client_->Stage(h, 64));
  EXPECT_OK(client_->Prefill(h, 1, st1.buffer, 64, 0));
  EXPECT_EQ(seq.kv->tokens(0), 64u);
  EXPECT_EQ(seq.kv->tokens(1), 64u);
}

// A client's published counters stay in the daemon's totals while it is reaped: unlisted at
// its detach, it is retired (its counters added to the retired totals) only once its requests
// in flight end. In between, the totals left it out and dipped (a rate() over them sees a
// counter reset).
TEST_F(InProcessDataPlaneTest, ADetachedClientsCountersStayCountedWhileItIsReaped) {
  ASSERT_OK_AND_ASSIGN(SequenceInfo seq, plane_->CreateSequence(caller_, Spec(), "counted"));
  client_->stats().decode_steps.store(7);
  client_->stats().cache_hits.store(11);
  EXPECT_EQ(plane_->Stats().decode_steps, 7u);
  ASSERT_OK_AND_ASSIGN(abi::StageResponse st, client_->Stage(seq.handle, 64));
  {
    PoolHold hold(&pool_, kWorkers);
    ASSERT_TRUE(hold.held());
    ASSERT_OK(client_->SubmitStaged(abi::kOpPrefill, seq.handle, 0, st.buffer, 64, 0).status());
    // Answered after the prefill was taken (the ring is served in order): it is in flight.
    EXPECT_THAT(client_->ReleaseStaging(seq.handle, st.buffer),
                StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("in flight")));
    client_.reset();  // detached: the reaper waits for the prefill held on the pool
    ASSERT_TRUE(WaitFor([&] { return plane_->Stats().clients == 0; }, absl::Seconds(20)));
    EXPECT_EQ(observer_.detached.load(), 0) << "reaped with a request in flight";
    const DataPlaneStats during = plane_->Stats();
    EXPECT_EQ(during.decode_steps, 7u);
    EXPECT_EQ(during.cache_hits, 11u);
    hold.Release();
  }
  ASSERT_TRUE(WaitFor([&] { return observer_.detached.load() == 1; }, absl::Seconds(20)));
  const DataPlaneStats after = plane_->Stats();
  EXPECT_EQ(after.decode_steps, 7u);
  EXPECT_EQ(after.cache_hits, 11u);
}

// A refused prefill lets its buffer go before it answers: the client can release it (or
// submit it again) as soon as it has the answer.
TEST_F(InProcessDataPlaneTest, ARefusedIngestLeavesItsBufferToTheClientAtItsAnswer) {
  ASSERT_OK_AND_ASSIGN(SequenceInfo seq, plane_->CreateSequence(caller_, Spec(), "refused"));
  const std::string& h = seq.handle;
  for (int round = 0; round < 20; ++round) {
    ASSERT_OK_AND_ASSIGN(abi::StageResponse st, client_->Stage(h, 64));
    ASSERT_OK_AND_ASSIGN(uint8_t * at, client_->Address(st.buffer, st.bytes));
    const uint16_t nan = 0x7e00;  // fp16 NaN: the first key is not finite
    std::memcpy(at, &nan, sizeof(nan));
    EXPECT_THAT(client_->Prefill(h, 0, st.buffer, 64, 0),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not finite")));
    ASSERT_OK(client_->ReleaseStaging(h, st.buffer)) << "round " << round;
  }
  EXPECT_EQ(seq.kv->tokens(0), 0u);
}

// A batch select holds its scratch buffer until its answer (it writes the results there after
// its submission); only a scratch buffer serves, and one batch at a time.
TEST_F(InProcessDataPlaneTest, ABatchSelectHoldsItsScratchBufferUntilItsAnswer) {
  ASSERT_OK_AND_ASSIGN(SequenceInfo seq, plane_->CreateSequence(caller_, Spec(), "batch"));
  const std::string& h = seq.handle;
  ASSERT_OK_AND_ASSIGN(abi::StageResponse st, client_->Stage(h, 64));
  ASSERT_OK(client_->Prefill(h, 0, st.buffer, 64, 0));
  const GeometrySpec g = Spec();
  const uint32_t q_floats = g.num_q_heads * g.head_dim;
  ASSERT_OK_AND_ASSIGN(abi::StageResponse scratch, client_->Scratch(64 << 10));
  ASSERT_OK_AND_ASSIGN(uint8_t * base, client_->Address(scratch.buffer, scratch.bytes));
  abi::BatchSelectEntry e{};
  std::memcpy(e.handle, h.data(), std::min(h.size(), sizeof(e.handle)));
  e.query_offset = 4096;
  e.query_bytes = q_floats * sizeof(float);
  e.result_offset = 32768;
  e.result_bytes = 16384;
  e.status = 77;  // the daemon overwrites it
  std::memcpy(base, &e, sizeof(e));
  for (uint32_t i = 0; i < q_floats; ++i) {
    const float q = 0.1f * static_cast<float>(i % 7);
    std::memcpy(base + e.query_offset + i * sizeof(float), &q, sizeof(q));
  }
  // A sequence's staging buffer does not serve as a batch's scratch.
  ASSERT_OK_AND_ASSIGN(abi::StageResponse staged, client_->Stage(h, 4));
  ASSERT_OK_AND_ASSIGN(uint32_t wrong, client_->SubmitSelectBatch(0, staged.buffer, 1));
  EXPECT_THAT(client_->Finish(wrong),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("scratch buffer")));
  {
    PoolHold hold(&pool_, kWorkers);
    ASSERT_TRUE(hold.held());
    // An append queued on the held pool; the batch waits behind it (its layer's queue).
    ASSERT_OK_AND_ASSIGN(uint32_t append,
                         client_->SubmitStaged(abi::kOpAppend, h, 0, staged.buffer, 4, 64));
    ASSERT_OK_AND_ASSIGN(uint32_t batch, client_->SubmitSelectBatch(0, scratch.buffer, 1));
    EXPECT_THAT(client_->ReleaseStaging("", scratch.buffer),
                StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("in flight")));
    EXPECT_THAT(client_->ReleaseStaging(h, staged.buffer),
                StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("in flight")));
    ASSERT_OK_AND_ASSIGN(uint32_t again, client_->SubmitSelectBatch(0, scratch.buffer, 1));
    EXPECT_THAT(client_->Finish(again),
                StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("another request")));
    hold.Release();
    EXPECT_OK(client_->Finish(append));
    EXPECT_OK(client_->Finish(batch));
  }
  abi::BatchSelectEntry got;
  std::memcpy(&got, base, sizeof(got));
  EXPECT_EQ(got.status, 0u) << got.message;
  EXPECT_EQ(got.result_k, seq.kv->SelectK(0));
  EXPECT_EQ(seq.kv->tokens(0), 68u);
  // Answered: the scratch buffer is the client's to release again (once).
  EXPECT_OK(client_->ReleaseStaging("", scratch.buffer));
  EXPECT_THAT(client_->ReleaseStaging("", scratch.buffer),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

// A slot released before its answer (a Wait that timed out) is not handed out again until the
// daemon has answered it: its late answer would otherwise land in the next request's slot.
TEST_F(InProcessDataPlaneTest, ASlotReleasedUnansweredIsNotReusedUntilAnswered) {
  ASSERT_OK_AND_ASSIGN(SequenceInfo seq, plane_->CreateSequence(caller_, Spec(), "late"));
  const std::string& h = seq.handle;
  ASSERT_OK_AND_ASSIGN(abi::StageResponse st, client_->Stage(h, 64));
  ASSERT_OK(client_->Prefill(h, 0, st.buffer, 64, 0));
  ASSERT_OK_AND_ASSIGN(abi::StageResponse page, client_->Stage(h, 4));
  const GeometrySpec g = Spec();
  const std::vector<float> q(size_t{g.num_q_heads} * g.head_dim, 0.25f);
  uint32_t late = 0;
  {
    PoolHold hold(&pool_, kWorkers);
    ASSERT_TRUE(hold.held());
    // The select waits behind an append on the held pool; its wait gives up first.
    ASSERT_OK_AND_ASSIGN(uint32_t append,
                         client_->SubmitStaged(abi::kOpAppend, h, 0, page.buffer, 4, 64));
    ASSERT_OK_AND_ASSIGN(late, client_->SubmitSelect(h, 0, q.data(), q.size(), 0));
    EXPECT_THAT(client_->Wait(late, absl::Milliseconds(20)),
                StatusIs(absl::StatusCode::kDeadlineExceeded));
    client_->ReleaseSlot(late);
    // Every other slot can be had; the unanswered one cannot.
    std::vector<uint32_t> taken;
    while (true) {
      absl::StatusOr<uint32_t> i = client_->AcquireSlot();
      if (!i.ok()) {
        EXPECT_TRUE(IsSlotsExhausted(i.status())) << i.status();
        break;
      }
      EXPECT_NE(*i, late) << "a slot the daemon has not answered was handed out again";
      taken.push_back(*i);
    }
    EXPECT_EQ(taken.size(), 8u - 2u);  // 8 slots: the append's and the unanswered select's
    for (uint32_t i : taken) client_->ReleaseSlot(i);
    hold.Release();
    EXPECT_OK(client_->Finish(append));
  }
  // Answered now (the select ran after the append): the slot comes back.
  ASSERT_TRUE(WaitFor([&] { return client_->Done(late); }, absl::Seconds(20)));
  bool back = false;
  std::vector<uint32_t> taken;
  for (absl::StatusOr<uint32_t> i = client_->AcquireSlot(); i.ok(); i = client_->AcquireSlot()) {
    back |= *i == late;
    taken.push_back(*i);
  }
  EXPECT_TRUE(back);
  EXPECT_EQ(taken.size(), 8u);
  for (uint32_t i : taken) client_->ReleaseSlot(i);
}

}  // namespace
}  // namespace icecache
