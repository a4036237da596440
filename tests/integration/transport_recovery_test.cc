// The client's transport across daemon restarts, against the real icecached (killed and
// started again in the test), through AttachmentTransport directly: what a recovery does to
// staging buffers that their owners are still writing, and to requests whose wait ended with
// a recovery that failed.
#include <signal.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "client/attachment_transport.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/daemon_process.h"
#include "tests/support/status_matchers.h"

namespace icecache::testing {
namespace {

using client_internal::AttachmentTransport;

v1::CreateSequenceRequest Request() {
  v1::CreateSequenceRequest req;
  v1::SequenceGeometry* g = req.mutable_geometry();
  g->set_num_layers(2);
  g->set_num_q_heads(4);
  g->set_num_kv_heads(2);
  g->set_head_dim(64);
  g->set_dtype(v1::DTYPE_BF16);
  g->set_max_tokens(1024);
  g->set_page_size(16);
  g->set_full_kv_layers(0);
  req.set_label("recovery");
  return req;
}

class TransportRecoveryTest : public ::testing::Test {
 protected:
  void Start() {
    DaemonConfig c;
    c.extra_args = {"--recall-sample-every=0"};
    auto d = DaemonProcess::Start(dir_.path(), c);
    ASSERT_TRUE(d.ok()) << d.status();
    daemon_ = std::move(*d);
  }
  void Kill() {
    daemon_->process().Signal(SIGKILL);
    (void)daemon_->process().Wait(absl::Seconds(30));
    daemon_.reset();
  }
  void Attach(absl::Duration reconnect_timeout) {
    backend_ = client_internal::CreateCpuBackend(1);
    auto t = AttachmentTransport::Create(backend_.get(), daemon_->socket_path(), absl::Seconds(5),
                                         reconnect_timeout);
    ASSERT_TRUE(t.ok()) << t.status();
    transport_ = std::move(*t);
    auto seq = transport_->CreateSequence(Request());
    ASSERT_TRUE(seq.ok()) << seq.status();
    handle_ = seq->handle();
  }
  void TearDown() override {
    transport_.reset();
    if (daemon_ != nullptr) Kill();
  }

  TempDir dir_;
  std::unique_ptr<DaemonProcess> daemon_;
  std::unique_ptr<client_internal::Backend> backend_;
  std::unique_ptr<AttachmentTransport> transport_;
  std::string handle_;
};

// A buffer staged and mapped before the daemon went away, written by its owner only after
// another thread's operation recovered (and after a later Stage let old generations go): the
// owner's address stays valid, and what is submitted is what the owner wrote. (Before, the
// recovery copied the buffer as it was, unwritten, and the next Stage unmapped the owner's
// address: the prefill built from zeros, or the owner's write crashed.)
TEST_F(TransportRecoveryTest, ABufferWrittenAfterARecoveryIsSubmittedAsWritten) {
  Start();
  Attach(absl::Seconds(20));
  AttachmentTransport& t = *transport_;
  ASSERT_OK_AND_ASSIGN(abi::StageResponse st, t.Stage(handle_, 64));
  ASSERT_OK_AND_ASSIGN(client_internal::ArenaSpan before, t.Map(st.buffer, st.bytes));
  Kill();
  Start();
  ASSERT_OK(t.Stage(handle_, 16).status());  // another thread's operation: it recovers
  EXPECT_EQ(t.recovery_counters().recoveries, 1u);
  ASSERT_OK(t.Stage(handle_, 16).status());  // and one more: old generations may go now
  // The owner writes its rows through the address it has: 64 tokens of bf16 ones.
  const uint16_t one = 0x3f80;
  for (uint64_t i = 0; i + 1 < st.bytes; i += 2) std::memcpy(before.host + i, &one, 2);
  ASSERT_OK_AND_ASSIGN(client_internal::Ticket ticket,
                       t.SubmitStaged(abi::kOpPrefill, handle_, 0, st.buffer, 64, 0));
  ASSERT_OK(t.Finish(ticket));
  // The daemon built from the rows written: a select of layer 0 finds pages of 64 tokens, and
  // its tail's logits are those of keys of ones, not of zeros.
  std::vector<float> q(4 * 64, 0.5f);
  client_internal::SelectRequest r{.handle = handle_,
                                   .queries = q.data(),
                                   .query_floats = q.size(),
                                   .k = 1,
                                   .head_mask = nullptr,
                                   .num_kv_heads = 2,
                                   .tail_floats = 4 * (2 + 64)};
  ASSERT_OK_AND_ASSIGN(client_internal::Ticket sel,
                       t.SubmitSelectBatch(0, absl::MakeConstSpan(&r, 1)));
  ASSERT_OK_AND_ASSIGN(std::vector<client_internal::SelectAnswer> answers,
                       t.FinishSelectBatch(sel));
  ASSERT_EQ(answers.size(), 1u);
  ASSERT_OK(answers[0].status);
  ASSERT_EQ(answers[0].pages.size(), 2u);
  ASSERT_EQ(answers[0].tail.size(), 4u * (2 + 64));
  // Every key is all ones: the tail's partial output (the values' weighted mean) is all ones
  // too, where keys and values of zeros would give zeros.
  bool any = false;
  for (uint32_t h = 0; h < 4; ++h) {
    const float* partial = answers[0].tail.data() + h * (2 + 64);
    if (partial[1] <= 0) continue;  // no estimated mass for this head
    any = true;
    EXPECT_NEAR(partial[2] / partial[1], 1.0f, 1e-3f) << "query head " << h;
  }
  EXPECT_TRUE(any);
}

// A request whose wait ends because the recovery failed (no daemon within the reconnect
// timeout) is over for its caller: a later successful recovery does not carry it out, and its
// ticket cannot be finished again.
TEST_F(TransportRecoveryTest, ARequestFailedByAFailedRecoveryIsNotResubmittedLater) {
  Start();
  Attach(absl::Seconds(1));
  AttachmentTransport& t = *transport_;
  std::vector<float> q(4 * 64, 0.5f);
  client_internal::SelectRequest r{.handle = handle_,
                                   .queries = q.data(),
                                   .query_floats = q.size(),
                                   .k = 4,
                                   .head_mask = nullptr,
                                   .num_kv_heads = 2,
                                   .tail_floats = 0};
  ASSERT_OK(t.PrepareSelectBatch(absl::MakeConstSpan(&r, 1)));  // its scratch, ahead
  // Every thread stopped before the submit, so the select stays unanswered (with SIGSTOP
  // alone, a dispatcher not yet stopped answered it in 1 of 2 runs under load).
  ASSERT_TRUE(daemon_->process().Stop());
  ASSERT_OK_AND_ASSIGN(client_internal::Ticket ticket,
                       t.SubmitSelectBatch(0, absl::MakeConstSpan(&r, 1)));
  Kill();
  EXPECT_THAT(t.FinishSelectBatch(ticket).status(),
              StatusIs(absl::StatusCode::kUnavailable, ::testing::HasSubstr("did not come back")));
  Start();
  ASSERT_OK(t.Stage(handle_, 16).status());  // recovers
  const client_internal::RecoveryCounters c = t.recovery_counters();
  EXPECT_EQ(c.recoveries, 1u);
  EXPECT_EQ(c.resubmitted, 0u) << "a request its caller was told failed was carried out";
  EXPECT_FALSE(t.Done(ticket));
  EXPECT_THAT(t.FinishSelectBatch(ticket).status(), StatusIs(absl::StatusCode::kInternal));
}

// A sequence whose restore failed UNAVAILABLE (its successor drained or went away during the
// restore) fails at once, FAILED_PRECONDITION, with the restore's error: not UNAVAILABLE, which
// sent every call on it into a recovery that waited reconnect_timeout for the live daemon to go
// away (three times, holding the transport against every other thread). Other restore errors
// keep their code. The other sequences go on; the lost one can be dropped.
TEST_F(TransportRecoveryTest, ALostSequenceFailsAtOnceAndLeavesTheOthersAlone) {
  Start();
  Attach(absl::Seconds(20));
  AttachmentTransport& t = *transport_;
  ASSERT_OK_AND_ASSIGN(v1::Sequence other, t.CreateSequence(Request()));
  ASSERT_OK_AND_ASSIGN(v1::Sequence third, t.CreateSequence(Request()));
  t.MarkLostForTesting(handle_, absl::UnavailableError("icecached is shutting down"));
  t.MarkLostForTesting(third.handle(), absl::DataLossError("position 12 of layer 0 is missing"));
  const absl::Time start = absl::Now();
  EXPECT_THAT(t.Stage(handle_, 16).status(),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       ::testing::AllOf(::testing::HasSubstr("could not be restored"),
                                        ::testing::HasSubstr("shutting down"))));
  EXPECT_THAT(t.Stage(third.handle(), 16).status(),
              StatusIs(absl::StatusCode::kDataLoss, ::testing::HasSubstr("is missing")));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5)) << "a call on a lost sequence waited";
  EXPECT_EQ(t.recovery_counters().recoveries, 0u);
  ASSERT_OK_AND_ASSIGN(abi::StageResponse st, t.Stage(other.handle(), 16));
  EXPECT_OK(t.ReleaseStaging(other.handle(), st.buffer));
  EXPECT_OK(t.DropSequence(handle_));
  EXPECT_OK(t.DropSequence(third.handle()));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

// A sequence dropped while its daemon is gone is forgotten at once: the drop does not wait for
// a successor (it waited up to reconnect_timeout, then failed UNAVAILABLE if none came), and a
// successor that comes later does not rebuild it.
TEST_F(TransportRecoveryTest, ADropWhileTheDaemonIsGoneForgetsTheSequenceAtOnce) {
  Start();
  Attach(absl::Seconds(20));
  AttachmentTransport& t = *transport_;
  ASSERT_OK_AND_ASSIGN(v1::Sequence kept, t.CreateSequence(Request()));
  Kill();
  const absl::Time start = absl::Now();
  EXPECT_OK(t.DropSequence(handle_));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5)) << "the drop waited for a successor";
  EXPECT_EQ(t.recovery_counters().recoveries, 0u);
  Start();
  ASSERT_OK_AND_ASSIGN(abi::StageResponse st, t.Stage(kept.handle(), 16));  // recovers
  EXPECT_OK(t.ReleaseStaging(kept.handle(), st.buffer));
  const client_internal::RecoveryCounters c = t.recovery_counters();
  EXPECT_EQ(c.recoveries, 1u);
  EXPECT_EQ(c.restored_sequences, 1u) << "the dropped sequence was rebuilt";
  EXPECT_EQ(c.lost_sequences, 0u);
  // Dropped for good: the transport no longer knows the handle (it passes it through, and the
  // successor has no such sequence).
  EXPECT_THAT(t.Stage(handle_, 16).status(), StatusIs(absl::StatusCode::kNotFound));
}

}  // namespace
}  // namespace icecache::testing
