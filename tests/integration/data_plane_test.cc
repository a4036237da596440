// The data plane end to end: the real icecached as a subprocess, real client attachments (in
// this process and as separate icecache_test_client processes), real shared memory.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/index/rows.h"
#include "tests/support/attachment_peer.h"
#include "tests/support/daemon_process.h"
#include "tests/support/status_matchers.h"
#include "tests/support/workload.h"

namespace icecache::testing {
namespace {

namespace v1 = ::icecache::v1;
using ::testing::HasSubstr;

class DataPlaneTest : public ::testing::Test {
 protected:
  void StartDaemon(const std::vector<std::string>& extra = {}) {
    DaemonConfig config;
    config.extra_args = extra;
    auto d = DaemonProcess::Start(dir_.path(), config);
    ASSERT_TRUE(d.ok()) << d.status();
    daemon_ = std::move(*d);
  }
  void SetUp() override { StartDaemon(); }

  std::unique_ptr<Attachment> AttachClient() {
    auto a = daemon_->Attach();
    EXPECT_TRUE(a.ok()) << a.status();
    return a.ok() ? std::move(*a) : nullptr;
  }

  v1::GetStatsResponse Stats() {
    v1::GetStatsResponse r;
    EXPECT_TRUE(daemon_->stub().GetStats(ContextWithDeadline().get(), {}, &r).ok());
    return r;
  }

  // Creates a small sequence for `a` and returns its handle.
  std::string Create(Attachment& a, uint32_t tokens = 1000, uint32_t layers = 2) {
    v1::CreateSequenceRequest req;
    WorkloadOptions w;
    w.tokens = tokens;
    w.layers = layers;
    *req.mutable_geometry() = WorkloadGeometry(w);
    v1::CreateSequenceResponse resp;
    grpc::Status s = daemon_->stub().CreateSequence(ContextWithToken(a.token()).get(), req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp.sequence().handle();
  }

  TempDir dir_;
  std::unique_ptr<DaemonProcess> daemon_;
};

TEST_F(DataPlaneTest, SelectionsThroughTheDaemonEqualTheIndexAlone) {
  auto a = AttachClient();
  ASSERT_NE(a, nullptr);
  WorkloadOptions w;
  std::string handle;
  absl::StatusOr<Selections> got = RunWorkload(*a, daemon_->stub(), w, &handle);
  ASSERT_TRUE(got.ok()) << got.status();
  const Selections expected = RunWorkloadInProcess(w);
  EXPECT_EQ(FormatSelections(*got), FormatSelections(expected));
  // Appended tokens are selectable: some step after an append picks an appended position.
  bool saw_appended = false;
  for (const auto& layer : *got) {
    for (size_t step = 1; step < layer.size(); ++step) {
      for (const auto& head : layer[step]) {
        for (uint32_t p : head) saw_appended |= p >= w.tokens - w.appends * 16;
      }
    }
  }
  EXPECT_TRUE(saw_appended);
  // The sequence reports its tokens; the store holds its pages.
  v1::GetSequenceRequest get;
  get.set_handle(handle);
  v1::GetSequenceResponse seq;
  ASSERT_TRUE(daemon_->stub().GetSequence(ContextWithToken(a->token()).get(), get, &seq).ok());
  EXPECT_EQ(seq.sequence().num_tokens(), w.tokens);
  const v1::GetStatsResponse st = Stats();
  EXPECT_GT(st.page_frames(), 2u * 2u * (w.tokens / 16));
  EXPECT_GE(st.arena_bytes(), st.page_frame_bytes());
}

TEST_F(DataPlaneTest, SequencesBelongToTheirClient) {
  auto a = AttachClient(), b = AttachClient();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  const std::string ha = Create(*a), hb = Create(*b);
  // Each sees only its own.
  v1::ListSequencesResponse la, lb, lo;
  ASSERT_TRUE(daemon_->stub().ListSequences(ContextWithToken(a->token()).get(), {}, &la).ok());
  ASSERT_EQ(la.sequences_size(), 1);
  EXPECT_EQ(la.sequences(0).handle(), ha);
  ASSERT_TRUE(daemon_->stub().ListSequences(ContextWithToken(b->token()).get(), {}, &lb).ok());
  ASSERT_EQ(lb.sequences_size(), 1);
  EXPECT_EQ(lb.sequences(0).handle(), hb);
  // Another client's handle does not exist for a, neither over gRPC nor on the ring.
  v1::DropSequenceRequest drop;
  drop.set_handle(hb);
  v1::DropSequenceResponse dropped;
  EXPECT_THAT(daemon_->stub().DropSequence(ContextWithToken(a->token()).get(), drop, &dropped),
              GrpcStatusIs(grpc::StatusCode::NOT_FOUND));
  EXPECT_THAT(a->Stage(hb, 16), StatusIs(absl::StatusCode::kNotFound));
  // Without a token, or with a forged one: UNAUTHENTICATED.
  EXPECT_THAT(daemon_->stub().ListSequences(ContextWithDeadline().get(), {}, &lo),
              GrpcStatusIs(grpc::StatusCode::UNAUTHENTICATED, HasSubstr("attach")));
  EXPECT_THAT(daemon_->stub().ListSequences(ContextWithToken(std::string(32, '0')).get(), {}, &lo),
              GrpcStatusIs(grpc::StatusCode::UNAUTHENTICATED));
  // An operator sees both; it cannot own sequences.
  auto op = daemon_->Attach(/*as_operator=*/true);
  ASSERT_TRUE(op.ok()) << op.status();
  ASSERT_TRUE(daemon_->stub().ListSequences(ContextWithToken((*op)->token()).get(), {}, &lo).ok());
  EXPECT_EQ(lo.sequences_size(), 2);
  v1::CreateSequenceRequest req;
  *req.mutable_geometry() = WorkloadGeometry({});
  v1::CreateSequenceResponse resp;
  EXPECT_THAT(daemon_->stub().CreateSequence(ContextWithToken((*op)->token()).get(), req, &resp),
              GrpcStatusIs(grpc::StatusCode::UNAUTHENTICATED, HasSubstr("operators")));
  // When a detaches, its sequence goes with it (within a second) and b's stays.
  a.reset();
  const absl::Time deadline = absl::Now() + absl::Seconds(1);
  do {
    lo.Clear();
    ASSERT_TRUE(
        daemon_->stub().ListSequences(ContextWithToken((*op)->token()).get(), {}, &lo).ok());
  } while (lo.sequences_size() != 1 && absl::Now() < deadline);
  ASSERT_EQ(lo.sequences_size(), 1);
  EXPECT_EQ(lo.sequences(0).handle(), hb);
}

TEST_F(DataPlaneTest, MalformedRequestsGetTheirCodeAndTheDaemonCarriesOn) {
  auto a = AttachClient(), other = AttachClient();
  ASSERT_NE(a, nullptr);
  const std::string h = Create(*a, 1000, 2);
  const std::string foreign = Create(*other, 1000, 2);

  // Raw slot manipulation: a fresh slot with chosen fields.
  auto submit = [&](auto&& fill) -> absl::Status {
    absl::StatusOr<uint32_t> i = a->AcquireSlot();
    if (!i.ok()) return i.status();
    abi::SlotHeader* s = a->slot(*i);
    s->op = abi::kOpNop;
    std::memset(s->handle, 0, sizeof(s->handle));
    std::memcpy(s->handle, h.data(), h.size());
    s->layer = 0;
    s->tokens = 16;
    s->k = 0;
    s->query_dtype = 0;
    s->payload_bytes = 0;
    s->staging = abi::ArenaRef{0, 0, 0};
    fill(s, a->payload(*i));
    a->Submit(*i);
    absl::Status st = a->Wait(*i, absl::Seconds(10));
    a->ReleaseSlot(*i);
    return st;
  };
  EXPECT_THAT(submit([](abi::SlotHeader* s, uint8_t*) { s->op = 77; }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("unknown op 77")));
  EXPECT_THAT(submit([](abi::SlotHeader* s, uint8_t*) {
                s->op = abi::kOpStage;
                std::memcpy(s->handle, "seq_nothex", 10);
              }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not a sequence handle")));
  EXPECT_THAT(submit([](abi::SlotHeader* s, uint8_t*) {
                s->op = abi::kOpStage;
                std::memset(s->handle, 0, sizeof(s->handle));
                std::memcpy(s->handle, ("seq_" + std::string(32, 'a')).data(), 36);
              }),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(submit([&](abi::SlotHeader* s, uint8_t*) {
                s->op = abi::kOpStage;
                std::memcpy(s->handle, foreign.data(), foreign.size());
              }),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(submit([](abi::SlotHeader* s, uint8_t*) {
                s->op = abi::kOpStage;
                s->tokens = 0;
              }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("must be in 1..max_tokens")));
  EXPECT_THAT(submit([](abi::SlotHeader* s, uint8_t*) {
                s->op = abi::kOpStage;
                s->tokens = 1u << 30;
              }),
              StatusIs(absl::StatusCode::kInvalidArgument));
  // Staging references that are not this client's live buffers.
  absl::StatusOr<abi::StageResponse> st = a->Stage(h, 16);
  ASSERT_TRUE(st.ok()) << st.status();
  for (abi::ArenaRef bad :
       {abi::ArenaRef{0, 0, 0}, abi::ArenaRef{st->buffer.segment, 0, 4096 + 64},
        abi::ArenaRef{200, 0, 0}, abi::ArenaRef{st->buffer.segment, 0, 1ull << 40}}) {
    EXPECT_THAT(submit([&](abi::SlotHeader* s, uint8_t*) {
                  s->op = abi::kOpPrefill;
                  s->staging = bad;
                }),
                StatusIs(absl::StatusCode::kInvalidArgument))
        << bad.segment << "/" << bad.offset;
  }
  EXPECT_THAT(submit([&](abi::SlotHeader* s, uint8_t*) {  // buffer holds 16 tokens, not 64
                s->op = abi::kOpPrefill;
                s->staging = st->buffer;
                s->tokens = 64;
              }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("needed")));
  // Live buffers of this client that were not staged for the sequence: one staged for another
  // of its sequences, and a scratch buffer.
  const std::string h2 = Create(*a, 1000, 2);
  absl::StatusOr<abi::StageResponse> st2 = a->Stage(h2, 16);
  ASSERT_TRUE(st2.ok()) << st2.status();
  absl::StatusOr<abi::StageResponse> scratch = a->Scratch(st->bytes);
  ASSERT_TRUE(scratch.ok()) << scratch.status();
  for (const abi::ArenaRef& wrong : {st2->buffer, scratch->buffer}) {
    for (uint32_t op : {abi::kOpPrefill, abi::kOpAppend}) {
      EXPECT_THAT(
          submit([&](abi::SlotHeader* s, uint8_t*) {
            s->op = op;
            s->staging = wrong;
          }),
          StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not staged for this sequence")))
          << "op " << op << ", segment " << wrong.segment << " offset " << wrong.offset;
    }
  }
  // Layers, selects before prefill, payloads, NaN queries.
  EXPECT_THAT(submit([&](abi::SlotHeader* s, uint8_t*) {
                s->op = abi::kOpPrefill;
                s->staging = st->buffer;
                s->layer = 9;
              }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layer 9 is out of range")));
  std::vector<float> q(4 * 64, 0.25f);
  auto select = [&](uint32_t layer, uint32_t bytes) {
    return submit([&](abi::SlotHeader* s, uint8_t* payload) {
      s->op = abi::kOpSelect;
      s->layer = layer;
      s->payload_bytes = bytes;
      std::memcpy(payload, q.data(), q.size() * sizeof(float));
    });
  };
  EXPECT_THAT(select(0, 1024),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("not built")));
  EXPECT_THAT(select(0, 1000),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("fp32 queries")));
  // The refused requests consumed nothing: the same buffer (16 zero tokens) prefills layer 0,
  // the other sequence's prefills its own, and the scratch buffer is still there to release.
  ASSERT_OK(a->Prefill(h, 0, st->buffer, 16, 0));
  ASSERT_OK(a->Prefill(h2, 0, st2->buffer, 16, 0));
  ASSERT_OK(a->ReleaseStaging("", scratch->buffer));
  q[70] = std::nanf("");
  EXPECT_THAT(select(0, 1024),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not finite")));
  // Queue entries that name no slot, or a slot that is not submitted: counted, skipped.
  AttachmentTestPeer::SubmitRaw(*a, 9999);
  absl::StatusOr<uint32_t> idle = a->AcquireSlot();
  ASSERT_TRUE(idle.ok());
  AttachmentTestPeer::SubmitRaw(*a, *idle);  // state still kSlotFree
  a->ReleaseSlot(*idle);
  // A client that lies about its queue tail gets a bounded pass, not a crash.
  a->header()->sq_tail.fetch_add(100000);
  absl::SleepFor(absl::Milliseconds(50));
  // The daemon carries on: the other client works end to end.
  absl::StatusOr<Selections> w = RunWorkload(*other, daemon_->stub(), WorkloadOptions{});
  EXPECT_TRUE(w.ok()) << w.status();
  absl::StatusOr<std::string> metrics = HttpGet(daemon_->metrics_port(), "/metrics");
  ASSERT_TRUE(metrics.ok());
  EXPECT_GE(MetricValue(*metrics, "icecache_protocol_errors_total"), 2.0);
  EXPECT_EQ(
      MetricValue(*metrics, "icecache_data_requests_total{code=\"INVALID_ARGUMENT\",op=\"stage\"}"),
      3.0);
  EXPECT_EQ(MetricValue(*metrics, "icecache_data_requests_total{code=\"NOT_FOUND\",op=\"stage\"}"),
            2.0);
  EXPECT_TRUE(daemon_->process().Running());
}

// A client that registers its segments with a device says so at attach; the daemon takes the
// flag (its arena then never gives a segment back: Arena.SegmentsOfAClientThatPinsThemAreNever
// GivenBack) and serves it like any other.
TEST_F(DataPlaneTest, AClientThatPinsItsSegmentsIsServedAndNamedInTheLog) {
  Attachment::Options o;
  o.socket = daemon_->socket_path();
  o.pins_segments = true;
  absl::StatusOr<std::unique_ptr<Attachment>> a = Attachment::Attach(o);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_FALSE(Create(**a).empty());
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (daemon_->process().Stderr().find("pins its segments: none is given back") ==
             std::string::npos &&
         absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_THAT(daemon_->process().Stderr(),
              HasSubstr(absl::StrCat("client ", (*a)->client_id(), " attached (uid ")));
  EXPECT_THAT(daemon_->process().Stderr(), HasSubstr("pins its segments: none is given back"));
  // A plain client is not named so.
  auto plain = AttachClient();
  ASSERT_NE(plain, nullptr);
  EXPECT_FALSE(Create(*plain).empty());
  const std::string plain_line = absl::StrCat("client ", plain->client_id(), " attached (uid ");
  const absl::Time until = absl::Now() + absl::Seconds(5);
  while (daemon_->process().Stderr().find(plain_line) == std::string::npos && absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  const std::string log = daemon_->process().Stderr();
  const size_t at = log.find(plain_line);
  ASSERT_NE(at, std::string::npos);
  EXPECT_EQ(log.substr(at, log.find('\n', at) - at).find("pins its segments"), std::string::npos);
}

TEST_F(DataPlaneTest, AWrongAbiVersionIsRefused) {
  Attachment::Options o;
  o.socket = daemon_->socket_path();
  o.abi_version = abi::kAbiVersion + 1;
  EXPECT_THAT(
      Attachment::Attach(o),
      StatusIs(absl::StatusCode::kFailedPrecondition,
               HasSubstr(absl::StrCat("ABI version ", abi::kAbiVersion + 1, " is not supported"))));
}

// A recovery attach and RestoreSequence check what they are handed: no arena, a handle
// whose tokens are in no frame, a malformed handle, no recovery at all; the daemon carries on
// and nothing is left behind.
TEST_F(DataPlaneTest, RecoveryAttachAndRestoreCheckWhatTheyAreHanded) {
  auto op = daemon_->Attach(/*as_operator=*/true);
  ASSERT_TRUE(op.ok()) << op.status();
  Attachment::Options o;
  o.socket = daemon_->socket_path();
  o.previous = op->get();  // an operator has no arena to hand back
  EXPECT_THAT(Attachment::Attach(o), StatusIs(absl::StatusCode::kInvalidArgument,
                                              HasSubstr("hands back its previous arena")));
  auto a = AttachClient();
  ASSERT_NE(a, nullptr);
  const std::string live = Create(*a);
  o.previous = a.get();  // a live client's arena: mapped read-only, nothing of it restorable
  auto b = Attachment::Attach(o);
  ASSERT_TRUE(b.ok()) << b.status();
  v1::RestoreSequenceRequest req;
  *req.mutable_geometry() = WorkloadGeometry({});
  req.set_previous_handle("seq_" + std::string(32, '0'));
  v1::LayerHistory* layer = req.add_layers();
  layer->set_layer(req.geometry().full_kv_layers());
  layer->set_prefill_first_position(0);
  layer->set_prefill_tokens(64);
  v1::RestoreSequenceResponse resp;
  grpc::Status st =
      daemon_->stub().RestoreSequence(ContextWithToken((*b)->token()).get(), req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::DATA_LOSS) << st.error_message();
  EXPECT_THAT(st.error_message(), HasSubstr("is in no frame of the previous arena"));
  req.set_previous_handle("not-a-handle");
  st = daemon_->stub().RestoreSequence(ContextWithToken((*b)->token()).get(), req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
  // A history naming a layer the geometry has not, or an append run of no tokens.
  req.set_previous_handle("seq_" + std::string(32, '0'));
  layer->set_layer(req.geometry().num_layers());
  st = daemon_->stub().RestoreSequence(ContextWithToken((*b)->token()).get(), req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
  EXPECT_THAT(st.error_message(), HasSubstr("is not an offloaded layer"));
  layer->set_layer(req.geometry().full_kv_layers());
  v1::AppendRun* run = layer->add_appends();
  run->set_first_position(64);
  run->set_tokens(0);
  run->set_count(1);
  st = daemon_->stub().RestoreSequence(ContextWithToken((*b)->token()).get(), req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
  EXPECT_THAT(st.error_message(), HasSubstr("a run of 1 appends of 0 tokens"));
  layer->clear_appends();
  // A plain attachment has no previous arena.
  req.set_previous_handle(live);
  st = daemon_->stub().RestoreSequence(ContextWithToken(a->token()).get(), req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << st.error_message();
  // Nothing was created by the refused restores: only the live sequence exists.
  EXPECT_EQ(Stats().num_sequences(), 1u);
  EXPECT_TRUE(daemon_->process().Running());
}

// A restore whose call is cancelled stops inside the layer it is rebuilding, not after it:
// one layer of 4 KV heads x 48k tokens builds for about a second here, and a restore called
// with a 150 ms deadline used to build all of it before it looked (it looked between layers
// only: with one layer, it finished and answered OK to a caller long gone). The previous
// arena's rows are untouched by the cancelled attempt: the same restore then succeeds.
TEST_F(DataPlaneTest, ACancelledRestoreStopsWithinTheLayerItIsBuilding) {
  auto a = AttachClient();
  ASSERT_NE(a, nullptr);
  WorkloadOptions w;
  w.tokens = 48 * 1024;
  w.appends = 1;
  w.layers = 1;
  w.kv_heads = 4;
  std::string handle;
  ASSERT_OK(RunWorkload(*a, daemon_->stub(), w, &handle).status());
  absl::StatusOr<std::string> m = HttpGet(daemon_->metrics_port(), "/metrics");
  ASSERT_TRUE(m.ok()) << m.status();
  // The same rows, the same index: about what a whole restore of the layer costs.
  const double build_seconds = MetricValue(*m, "icecache_index_build_seconds_sum");
  ASSERT_GT(build_seconds, 0.0);
  daemon_->process().Signal(SIGKILL);
  ASSERT_TRUE(daemon_->process().Wait(absl::Seconds(10)).has_value());
  StartDaemon();
  Attachment::Options o;
  o.socket = daemon_->socket_path();
  o.previous = a.get();
  auto b = Attachment::Attach(o);
  ASSERT_TRUE(b.ok()) << b.status();

  v1::RestoreSequenceRequest req;
  *req.mutable_geometry() = WorkloadGeometry(w);
  req.set_previous_handle(handle);
  req.set_last(false);
  v1::LayerHistory* layer = req.add_layers();
  layer->set_layer(0);
  layer->set_prefill_first_position(0);
  layer->set_prefill_tokens(w.tokens - 16);
  v1::AppendRun* run = layer->add_appends();
  run->set_first_position(w.tokens - 16);
  run->set_tokens(16);
  run->set_count(1);
  v1::RestoreSequenceResponse resp;
  auto ctx = ContextWithToken((*b)->token());
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(150));
  grpc::Status st = daemon_->stub().RestoreSequence(ctx.get(), req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << st.error_message();
  // The daemon's handler ends on its own time: wait for its record.
  const std::string cancelled =
      "icecache_rpc_requests_total{code=\"CANCELLED\",method=\"RestoreSequence\"}";
  const std::string finished_ok =
      "icecache_rpc_requests_total{code=\"OK\",method=\"RestoreSequence\"}";
  const absl::Time until = absl::Now() + absl::Seconds(60);
  do {
    absl::SleepFor(absl::Milliseconds(20));
    m = HttpGet(daemon_->metrics_port(), "/metrics");
    ASSERT_TRUE(m.ok()) << m.status();
  } while (MetricValue(*m, cancelled) + MetricValue(*m, finished_ok) < 1 && absl::Now() < until);
  EXPECT_EQ(MetricValue(*m, cancelled), 1.0);
  EXPECT_EQ(MetricValue(*m, finished_ok), 0.0);
  const double handled =
      MetricValue(*m, "icecache_rpc_latency_seconds_sum{method=\"RestoreSequence\"}");
  std::printf("restore cancelled at 150 ms: handled in %.3f s; the layer's build took %.3f s\n",
              handled, build_seconds);
  EXPECT_LT(handled, 0.5 * build_seconds + 0.15)
      << "the cancelled restore built on (the layer's build: " << build_seconds << " s)";
  EXPECT_EQ(Stats().num_sequences(), 0u);  // nothing left of the cancelled attempt

  v1::RestoreSequenceResponse again;
  req.set_last(true);
  auto ctx2 = ContextWithToken((*b)->token());
  ctx2->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  st = daemon_->stub().RestoreSequence(ctx2.get(), req, &again);
  EXPECT_TRUE(st.ok()) << st.error_code() << " " << st.error_message();
  EXPECT_EQ(Stats().num_sequences(), 1u);
}

// Counts in a restore's history are the client's: a few bytes of request must not make the
// daemon allocate for them. Runs of 2^24 appends (each history was expanded into one entry per
// append: 134 MB apiece, 2.15 GB for 16 histories of a 281-byte request, before any other
// check), a prefill of 2^32 - 16 tokens or more appends than max_tokens (the rows were
// gathered, 16.8 GB touched, before the counts were checked) are refused up front, and the
// sequence the restore created is dropped on every refusal.
TEST_F(DataPlaneTest, ARestoresCountsAreCheckedBeforeAnythingIsAllocatedForThem) {
  auto a = AttachClient();
  ASSERT_NE(a, nullptr);
  const std::string live = Create(*a);
  Attachment::Options o;
  o.socket = daemon_->socket_path();
  o.previous = a.get();
  auto b = Attachment::Attach(o);
  ASSERT_TRUE(b.ok()) << b.status();
  const pid_t pid = daemon_->process().pid();
  const uint64_t peak_before = PeakResidentBytes(pid);
  ASSERT_GT(peak_before, 0u);

  v1::RestoreSequenceRequest req;
  WorkloadOptions w;
  w.layers = 16;
  *req.mutable_geometry() = WorkloadGeometry(w);
  const uint32_t first_offloaded = req.geometry().full_kv_layers();
  const uint32_t max_tokens = req.geometry().max_tokens();
  req.set_previous_handle("seq_" + std::string(32, '0'));
  auto restore = [&](Attachment& who) {
    v1::RestoreSequenceResponse resp;
    return daemon_->stub().RestoreSequence(ContextWithToken(who.token()).get(), req, &resp);
  };
  // 16 histories of one run of 2^24 one-token appends, from a plain attachment (refused for
  // having no previous arena: the runs cost nothing on the way).
  for (uint32_t l = 0; l < 16; ++l) {
    v1::LayerHistory* h = req.add_layers();
    h->set_layer(first_offloaded + l);
    h->set_prefill_tokens(64);
    v1::AppendRun* run = h->add_appends();
    run->set_first_position(64);
    run->set_tokens(1);
    run->set_count(uint32_t{1} << 24);
  }
  grpc::Status st = restore(*a);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << st.error_message();
  // The same from the recovery attachment: more appends than max_tokens.
  st = restore(**b);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
  EXPECT_THAT(st.error_message(), HasSubstr("more than max_tokens"));
  // Appends longer than a page, a prefill beyond max_tokens, and one of 2^32 - 16 tokens.
  req.clear_layers();
  v1::LayerHistory* h = req.add_layers();
  h->set_layer(first_offloaded);
  h->set_prefill_tokens(64);
  v1::AppendRun* run = h->add_appends();
  run->set_first_position(64);
  run->set_tokens(req.geometry().page_size() + 1);
  run->set_count(1);
  st = restore(**b);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
  EXPECT_THAT(st.error_message(), HasSubstr("a run of 1 appends of"));
  h->clear_appends();
  for (const uint32_t tokens : {max_tokens + 1, 0xFFFFFFF0u}) {
    h->set_prefill_tokens(tokens);
    st = restore(**b);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
    EXPECT_THAT(st.error_message(), HasSubstr(absl::StrCat("a prefill of ", tokens, " tokens")));
  }
  // A valid history after an invalid one: nothing of the first is rebuilt (checked whole).
  h->set_prefill_tokens(64);
  req.add_layers()->set_layer(first_offloaded + 1);  // a prefill of 0 tokens
  st = restore(**b);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
  EXPECT_THAT(st.error_message(), HasSubstr("a prefill of 0 tokens"));

  EXPECT_LT(PeakResidentBytes(pid), peak_before + (uint64_t{64} << 20))
      << "the daemon allocated for the counts of refused restores";
  // Every refused restore dropped what it created: only the live sequence exists.
  EXPECT_EQ(Stats().num_sequences(), 1u);
  EXPECT_TRUE(daemon_->process().Running());
}

TEST_F(DataPlaneTest, AnotherUidIsRefused) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to run a client as another uid";
  // The socket's directory must be reachable for the other uid to try at all.
  ASSERT_EQ(::chmod(dir_.path().c_str(), 0755), 0);
  absl::StatusOr<RunResult> r = RunCommand(
      {TestClientBinary(), "--socket=" + daemon_->socket_path(), "--mode=attach", "--as_uid=65534"},
      dir_.path());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->exit_code, 3) << r->out << r->err;
  EXPECT_THAT(r->out, HasSubstr("PERMISSION_DENIED: icecached refused to attach: uid 65534 may "
                                "not attach"));
  // The daemon's own uid attaches fine.
  absl::StatusOr<RunResult> ok = RunCommand(
      {TestClientBinary(), "--socket=" + daemon_->socket_path(), "--mode=attach"}, dir_.path());
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(ok->exit_code, 0) << ok->out;
}

TEST_F(DataPlaneTest, QuotaExceededIsResourceExhaustedAndChangesNothing) {
  daemon_.reset();
  StartDaemon({"--client-quota=12MiB", "--segment-size=2MiB"});
  auto a = AttachClient();
  ASSERT_NE(a, nullptr);
  const v1::GetStatsResponse before = Stats();  // the control segment: about 4 MiB
  // A sequence's promise (its pages at worst, its staging, its index metadata) is reserved
  // in the client's quota when it is created: 20000 tokens do not fit what the quota leaves,
  // and the refusal changes nothing.
  v1::CreateSequenceRequest req;
  WorkloadOptions w;
  w.tokens = 20000;
  w.layers = 1;
  *req.mutable_geometry() = WorkloadGeometry(w);
  v1::CreateSequenceResponse resp;
  EXPECT_THAT(daemon_->stub().CreateSequence(ContextWithToken(a->token()).get(), req, &resp),
              GrpcStatusIs(grpc::StatusCode::RESOURCE_EXHAUSTED, HasSubstr("quota")));
  EXPECT_EQ(Stats().memory_used_bytes(), before.memory_used_bytes());
  // 3000 tokens fit, and what was promised is there: the whole prompt stages at once.
  const std::string h = Create(*a, 3000, 1);
  ASSERT_FALSE(h.empty());
  EXPECT_OK(a->Stage(h, 3000).status());
  EXPECT_GT(Stats().arena_bytes(), before.arena_bytes() + 3000 * 512 - 1);
}

TEST_F(DataPlaneTest, AClientKilledMidRequestIsCleanedUpWithinASecond) {
  const v1::GetStatsResponse idle = Stats();
  absl::StatusOr<Subprocess> child =
      Subprocess::Start({TestClientBinary(), "--socket=" + daemon_->socket_path(),
                         "--mode=hold-prefill", "--tokens=24000"},
                        dir_.path());
  ASSERT_TRUE(child.ok()) << child.status();
  const absl::Time wait_until = absl::Now() + absl::Seconds(30);
  while (child->Stdout().find("submitted") == std::string::npos && absl::Now() < wait_until) {
    ASSERT_TRUE(child->Running()) << child->Stdout() << child->Stderr();
    absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_THAT(child->Stdout(), HasSubstr("submitted"));
  const v1::GetStatsResponse busy = Stats();
  EXPECT_EQ(busy.num_clients(), 1u);
  EXPECT_GT(busy.arena_bytes(), idle.arena_bytes());
  EXPECT_GT(busy.memory_used_bytes(), 0u);
  ASSERT_TRUE(child->Signal(SIGKILL));
  ASSERT_TRUE(child->Wait(absl::Seconds(5)).has_value());
  const absl::Time killed = absl::Now();
  v1::GetStatsResponse after;
  do {
    absl::SleepFor(absl::Milliseconds(20));
    after = Stats();
  } while ((after.arena_bytes() != 0 || after.num_clients() != 0) &&
           absl::Now() - killed < absl::Seconds(5));
  const double seconds = absl::ToDoubleSeconds(absl::Now() - killed);
  EXPECT_EQ(after.arena_bytes(), 0u);
  EXPECT_EQ(after.memory_used_bytes(), 0u);
  EXPECT_EQ(after.num_clients(), 0u);
  EXPECT_EQ(after.num_sequences(), 0u);
  EXPECT_LT(seconds, 1.0) << "memory came back after " << seconds << " s";
  EXPECT_TRUE(daemon_->process().Running());
}

TEST_F(DataPlaneTest, ManyClientsAtOnceSelectWhatEachSelectsAlone) {
  const int kClients = 4;
  auto run = [&](int seed) -> absl::StatusOr<Subprocess> {
    return Subprocess::Start({TestClientBinary(), "--socket=" + daemon_->socket_path(),
                              "--mode=workload", absl::StrCat("--seed=", seed)},
                             dir_.path());
  };
  std::vector<std::string> alone(kClients);
  for (int c = 0; c < kClients; ++c) {
    absl::StatusOr<Subprocess> p = run(c + 1);
    ASSERT_TRUE(p.ok());
    std::optional<int> st = p->Wait(absl::Seconds(60));
    ASSERT_TRUE(st.has_value() && WIFEXITED(*st) && WEXITSTATUS(*st) == 0) << p->Stdout();
    alone[c] = p->Stdout();
    ASSERT_THAT(alone[c], HasSubstr("layer 1 step 3 head 1:"));
  }
  std::vector<Subprocess> together;
  for (int c = 0; c < kClients; ++c) {
    absl::StatusOr<Subprocess> p = run(c + 1);
    ASSERT_TRUE(p.ok());
    together.push_back(std::move(*p));
  }
  for (int c = 0; c < kClients; ++c) {
    std::optional<int> st = together[c].Wait(absl::Seconds(120));
    ASSERT_TRUE(st.has_value() && WIFEXITED(*st) && WEXITSTATUS(*st) == 0) << together[c].Stdout();
    EXPECT_EQ(together[c].Stdout(), alone[c]) << "client " << c;
  }
  // And they all match the index alone.
  WorkloadOptions w;
  w.seed = 1;
  EXPECT_EQ(alone[0], FormatSelections(RunWorkloadInProcess(w)));
}

TEST_F(DataPlaneTest, NopRoundTripsAndMetricsCountRequests) {
  auto a = AttachClient();
  ASSERT_NE(a, nullptr);
  for (int i = 0; i < 100; ++i) ASSERT_OK(a->Nop());
  // The daemon counts an attach once its reply has left, so a client as quick as this one can
  // finish its requests before the attach thread counts it (CI, 1 run in 4 on a loaded VM):
  // the scrape waits for that count, which must then be exactly 1.
  absl::StatusOr<std::string> metrics;
  const absl::Time until = absl::Now() + absl::Seconds(5);
  do {
    metrics = HttpGet(daemon_->metrics_port(), "/metrics");
    ASSERT_TRUE(metrics.ok());
  } while (MetricValue(*metrics, "icecache_attach_total{result=\"ok\"}") < 1.0 &&
           absl::Now() < until);
  EXPECT_EQ(MetricValue(*metrics, "icecache_data_requests_total{code=\"OK\",op=\"nop\"}"), 100.0);
  EXPECT_EQ(MetricValue(*metrics, "icecache_clients"), 1.0);
  EXPECT_EQ(MetricValue(*metrics, "icecache_attach_total{result=\"ok\"}"), 1.0);
}

}  // namespace
}  // namespace icecache::testing

namespace icecache::testing {
namespace {

// kOpSelectBatch: every entry is checked alone (a bad one answers its own error, the others
// their pages), and a good entry's pages equal a single select's with the same queries.
TEST_F(DataPlaneTest, ABatchSelectAnswersEachEntryAloneAndEqualsSingleSelects) {
  auto a = AttachClient();
  ASSERT_NE(a, nullptr);
  WorkloadOptions w;
  std::string first, second;
  ASSERT_TRUE(RunWorkload(*a, daemon_->stub(), w, &first).ok());
  w.seed = 2;
  ASSERT_TRUE(RunWorkload(*a, daemon_->stub(), w, &second).ok());
  const uint32_t q_floats = w.kv_heads * w.group * w.head_dim;
  std::vector<float> queries(q_floats);
  for (uint32_t i = 0; i < q_floats; ++i) queries[i] = std::sin(0.37f * i);
  // The workload's sequences keep the daemon's default tail estimate: the entries' room holds
  // the page references and the tail partials (abi.h).
  const uint64_t ref_bytes = uint64_t{w.kv_heads} * w.k * sizeof(abi::SelectedPageRef);
  const uint64_t tail_floats = uint64_t{w.kv_heads} * w.group * abi::TailPartialFloats(w.head_dim);
  const uint64_t result_bytes = ref_bytes + tail_floats * sizeof(float);
  ASSERT_LE(result_bytes, 4096u);

  absl::StatusOr<abi::StageResponse> scratch = a->Scratch(64 << 10);
  ASSERT_TRUE(scratch.ok()) << scratch.status();
  absl::StatusOr<uint8_t*> base = a->Address(scratch->buffer, scratch->bytes);
  ASSERT_TRUE(base.ok());
  // Entries: first (good), an unknown handle, wrong query bytes, results outside the buffer,
  // second (good).
  // A well-formed handle no sequence has: the first's with its last character changed.
  std::string unknown = first;
  unknown.back() = unknown.back() == 'a' ? 'b' : 'a';
  const char* handles[] = {first.c_str(), unknown.c_str(), first.c_str(), first.c_str(),
                           second.c_str()};
  constexpr uint32_t kEntries = 5;
  for (uint32_t i = 0; i < kEntries; ++i) {
    abi::BatchSelectEntry e{};
    std::memcpy(e.handle, handles[i], std::min(std::strlen(handles[i]), sizeof(e.handle)));
    e.k = w.k;
    e.query_offset = 4096 + uint64_t{i} * 4096;
    e.query_bytes = q_floats * sizeof(float) - (i == 2 ? 4 : 0);
    e.result_offset = 32768 + uint64_t{i} * 4096;
    if (i == 3) e.result_offset = scratch->bytes - 8;
    e.result_bytes = result_bytes;
    e.status = 77;  // the daemon overwrites the answer fields
    std::memcpy(*base + i * sizeof(e), &e, sizeof(e));
    std::memcpy(*base + e.query_offset, queries.data(), q_floats * sizeof(float));
  }
  absl::StatusOr<uint32_t> slot = a->SubmitSelectBatch(0, scratch->buffer, kEntries);
  ASSERT_TRUE(slot.ok()) << slot.status();
  ASSERT_TRUE(a->Finish(*slot).ok());
  abi::BatchSelectEntry got[kEntries];
  std::memcpy(got, *base, sizeof(got));
  EXPECT_EQ(got[0].status, 0u) << got[0].message;
  EXPECT_EQ(got[0].result_k, w.k);
  EXPECT_EQ(got[1].status, static_cast<uint32_t>(absl::StatusCode::kNotFound)) << got[1].message;
  EXPECT_EQ(got[2].status, static_cast<uint32_t>(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(got[2].message, HasSubstr("queries of"));
  EXPECT_EQ(got[3].status, static_cast<uint32_t>(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(got[3].message, HasSubstr("results outside"));
  EXPECT_EQ(got[4].status, 0u) << got[4].message;
  // A room without space for the tail partials is refused (that entry alone).
  {
    abi::BatchSelectEntry e{};
    std::memcpy(e.handle, first.data(), std::min(first.size(), sizeof(e.handle)));
    e.k = w.k;
    e.query_offset = 4096;
    e.query_bytes = q_floats * sizeof(float);
    e.result_offset = 32768;
    e.result_bytes = ref_bytes;  // the references only
    std::memcpy(*base + 5 * sizeof(e), &e, sizeof(e));
  }
  for (uint32_t i : {0u, 4u}) {
    absl::StatusOr<uint32_t> submitted =
        a->SubmitSelect(handles[i], 0, queries.data(), q_floats, w.k);
    ASSERT_TRUE(submitted.ok()) << submitted.status();
    std::vector<float> tail;
    absl::StatusOr<std::vector<abi::SelectedPageRef>> single =
        a->FinishSelect(*submitted, uint64_t{w.kv_heads} * w.k, tail_floats, &tail);
    ASSERT_TRUE(single.ok()) << single.status();
    ASSERT_EQ(single->size(), uint64_t{w.kv_heads} * w.k);
    ASSERT_EQ(tail.size(), tail_floats);
    const uint8_t* batched = *base + 32768 + uint64_t{i} * 4096;
    EXPECT_EQ(std::memcmp(single->data(), batched, ref_bytes), 0) << "entry " << i;
    EXPECT_EQ(std::memcmp(tail.data(), batched + ref_bytes, tail_floats * sizeof(float)), 0)
        << "entry " << i << "'s tail partials";
    bool some = false;
    for (uint64_t j = 0; j < tail_floats; j += abi::TailPartialFloats(w.head_dim)) {
      some |= tail[j + 1] > 0;  // a query head's sum
    }
    EXPECT_TRUE(some) << "entry " << i << " estimated nothing";
  }
  slot = a->SubmitSelectBatch(0, scratch->buffer, 6);
  ASSERT_TRUE(slot.ok()) << slot.status();
  ASSERT_TRUE(a->Finish(*slot).ok());
  abi::BatchSelectEntry short_room;
  std::memcpy(&short_room, *base + 5 * sizeof(short_room), sizeof(short_room));
  EXPECT_EQ(short_room.status, static_cast<uint32_t>(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(short_room.message, HasSubstr("room for"));
  // A count of 0 or above the bound fails the whole request.
  slot = a->SubmitSelectBatch(0, scratch->buffer, 0);
  ASSERT_TRUE(slot.ok());
  EXPECT_THAT(a->Finish(*slot),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("must be in 1..")));
  slot = a->SubmitSelectBatch(0, scratch->buffer, abi::kMaxBatchSelect);
  ASSERT_TRUE(slot.ok());  // 1024 entries of 128 bytes do not fit a 64 KiB buffer
  EXPECT_THAT(a->Finish(*slot), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_TRUE(a->ReleaseStaging("", scratch->buffer).ok());
}

// Scratch buffers are bounded per client, promised like staging, and given back on release.
TEST_F(DataPlaneTest, ScratchBuffersAreBoundedAndGivenBack) {
  auto a = AttachClient();
  ASSERT_NE(a, nullptr);
  EXPECT_THAT(a->Scratch(0), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(a->Scratch((uint64_t{256} << 20) + 1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("must be in 1..")));
  absl::StatusOr<abi::StageResponse> big = a->Scratch(uint64_t{200} << 20);
  ASSERT_TRUE(big.ok()) << big.status();
  EXPECT_THAT(a->Scratch(uint64_t{100} << 20),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("per client")));
  const auto arena_bytes = [&] {
    absl::StatusOr<std::string> m = HttpGet(daemon_->metrics_port(), "/metrics");
    EXPECT_TRUE(m.ok()) << m.status();
    return m.ok() ? MetricValue(*m, "icecache_arena_bytes") : -1.0;
  };
  const double with_big = arena_bytes();
  EXPECT_GE(with_big, 200 << 20);
  ASSERT_TRUE(a->ReleaseStaging("", big->buffer).ok());
  // Its segment's memory goes back with its promise.
  EXPECT_LE(arena_bytes(), with_big - (200 << 20));
  absl::StatusOr<abi::StageResponse> again = a->Scratch(uint64_t{100} << 20);
  ASSERT_TRUE(again.ok()) << again.status();
  ASSERT_TRUE(a->ReleaseStaging("", again->buffer).ok());
  // A buffer released twice is refused.
  EXPECT_THAT(a->ReleaseStaging("", again->buffer), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(DataPlaneTest, SampledRecallIsExportedForOperators) {
  daemon_.reset();
  StartDaemon({"--recall-sample-every=1"});
  auto a = AttachClient();
  ASSERT_NE(a, nullptr);
  ASSERT_TRUE(RunWorkload(*a, daemon_->stub(), WorkloadOptions{}).ok());
  // Samples run after the selects, off their path: wait for them to land.
  double count = 0, sum = 0;
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  do {
    absl::StatusOr<std::string> m = HttpGet(daemon_->metrics_port(), "/metrics");
    ASSERT_TRUE(m.ok());
    count = MetricValue(*m, "icecache_select_recall_count");
    sum = MetricValue(*m, "icecache_select_recall_sum");
  } while (count < 8 && absl::Now() < deadline);
  // 8 selects x 4 query heads; a sample is dropped when an append changed the layer first,
  // but the last select of each layer is never followed by an append to it.
  EXPECT_GE(count, 8.0);
  EXPECT_LE(count, 32.0);
  EXPECT_GT(sum / count, 0.2);
  EXPECT_LE(sum / count, 1.0);
}

}  // namespace
}  // namespace icecache::testing
