// CreateSequence against the reaper of a detached client, in process (the daemon's real data
// plane, attach socket in a private directory, a real client attachment): a sequence created
// with an attachment that is being detached must either be refused or be dropped with the
// client's other sequences; none may outlive its client (nothing would ever drop it, and its
// arena, promise and memory would stay charged until the daemon restarts).
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "icecache/attachment.h"
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

class DataPlaneReapTest : public ::testing::Test {
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
  ThreadPool pool_{2};
  DetachCounter observer_;
  std::unique_ptr<DataPlane> plane_;
  std::unique_ptr<Attachment> client_;
  Caller caller_;
};

// The client is reaped between CreateSequence finding its attachment and claiming it: the
// call is refused, and the registry and the memory accountant are back to nothing (the
// attachment's arena is charged until then).
TEST_F(DataPlaneReapTest, ACreateThatFindsItsClientBeingReapedIsRefusedAndLeavesNothing) {
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
TEST_F(DataPlaneReapTest, AClaimedCreateHoldsTheReaperWhichThenDropsTheNewSequence) {
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

}  // namespace
}  // namespace icecache
