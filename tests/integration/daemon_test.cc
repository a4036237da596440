// Integration tests: the real icecached binary as a subprocess, talked to over its real unix
// socket (and TCP) with the generated stubs, its /metrics scraped over HTTP.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "google/protobuf/descriptor.pb.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "tests/support/daemon_process.h"
#include "tests/support/status_matchers.h"

namespace icecache::testing {
namespace {

namespace v1 = ::icecache::v1;
using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::Not;

v1::SequenceGeometry SmallGeometry(uint64_t max_tokens = 4096) {
  v1::SequenceGeometry g;
  g.set_num_layers(4);
  g.set_num_q_heads(8);
  g.set_num_kv_heads(2);
  g.set_head_dim(128);
  g.set_dtype(v1::DTYPE_BF16);
  g.set_max_tokens(max_tokens);
  return g;
}
// The dense KV of SmallGeometry(): (4 - 2 full-KV layers) x 2 heads x 256 pages x 8 KiB. A
// sequence is promised more (kv_bytes): pages are clusters and not all full, staging, index
// metadata (server/core/promise.h).
constexpr uint64_t kSmallBytes = 2ull * 2 * 256 * 8192;

class DaemonTest : public ::testing::Test {
 protected:
  // These tests call as fast as they can; the per-caller rate limit has its own test.
  DaemonTest() { config_.extra_args.push_back("--control-rate=0"); }

  void SetUp() override {
    auto d = DaemonProcess::Start(dir_.path(), config_);
    ASSERT_TRUE(d.ok()) << d.status();
    daemon_ = std::move(*d);
    auto a = daemon_->Attach();
    ASSERT_TRUE(a.ok()) << a.status();
    client_ = std::move(*a);
    base_ = Stats().memory_used_bytes();  // the attachment's control segment
  }

  // A context acting for this test's client attachment.
  std::unique_ptr<grpc::ClientContext> Ctx() const { return ContextWithToken(client_->token()); }

  absl::StatusOr<v1::Sequence> Create(const v1::SequenceGeometry& g, const std::string& label,
                                      grpc::Status* status_out = nullptr) {
    v1::CreateSequenceRequest req;
    *req.mutable_geometry() = g;
    req.set_label(label);
    v1::CreateSequenceResponse resp;
    grpc::Status s = daemon_->stub().CreateSequence(Ctx().get(), req, &resp);
    if (status_out) *status_out = s;
    if (!s.ok())
      return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
    return resp.sequence();
  }

  v1::GetStatsResponse Stats() {
    v1::GetStatsResponse resp;
    grpc::Status s =
        daemon_->stub().GetStats(ContextWithDeadline().get(), v1::GetStatsRequest(), &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp;
  }

  TempDir dir_;
  DaemonConfig config_;
  std::unique_ptr<DaemonProcess> daemon_;
  std::unique_ptr<Attachment> client_;
  uint64_t base_ = 0;  // memory in use with the client attached and no sequence
};

TEST_F(DaemonTest, HealthServesTheServerAndTheControlApi) {
  for (const std::string service : {"", "icecache.v1.IceCache"}) {
    grpc::health::v1::HealthCheckRequest req;
    req.set_service(service);
    grpc::health::v1::HealthCheckResponse resp;
    grpc::Status s = daemon_->health().Check(ContextWithDeadline().get(), req, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::SERVING) << service;
  }
  grpc::health::v1::HealthCheckRequest req;
  req.set_service("no.such.Service");
  grpc::health::v1::HealthCheckResponse resp;
  EXPECT_THAT(daemon_->health().Check(ContextWithDeadline().get(), req, &resp),
              GrpcStatusIs(grpc::StatusCode::NOT_FOUND));
}

TEST_F(DaemonTest, ReflectionListsAndDescribesTheServices) {
  auto stub = grpc::reflection::v1alpha::ServerReflection::NewStub(daemon_->channel());
  auto ctx = ContextWithDeadline();
  auto stream = stub->ServerReflectionInfo(ctx.get());
  grpc::reflection::v1alpha::ServerReflectionRequest req;
  req.set_list_services("");
  ASSERT_TRUE(stream->Write(req));
  grpc::reflection::v1alpha::ServerReflectionResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  std::set<std::string> names;
  for (const auto& s : resp.list_services_response().service()) names.insert(s.name());
  EXPECT_THAT(names, Contains("icecache.v1.IceCache"));
  EXPECT_THAT(names, Contains("grpc.health.v1.Health"));
  EXPECT_THAT(names, Contains("grpc.reflection.v1alpha.ServerReflection"));

  req.set_file_containing_symbol("icecache.v1.IceCache");
  ASSERT_TRUE(stream->Write(req));
  ASSERT_TRUE(stream->Read(&resp));
  ASSERT_GE(resp.file_descriptor_response().file_descriptor_proto_size(), 1);
  bool found = false;
  for (const std::string& bytes : resp.file_descriptor_response().file_descriptor_proto()) {
    google::protobuf::FileDescriptorProto file;
    ASSERT_TRUE(file.ParseFromString(bytes));
    if (file.name() != "icecache/v1/icecache.proto") continue;
    found = true;
    EXPECT_EQ(file.package(), "icecache.v1");
    ASSERT_EQ(file.service_size(), 1);
    std::set<std::string> methods;
    for (const auto& m : file.service(0).method()) methods.insert(m.name());
    EXPECT_EQ(methods,
              (std::set<std::string>{"CreateSequence", "GetSequence", "ListSequences",
                                     "DropSequence", "GetStats", "GetConfig", "RestoreSequence"}));
  }
  EXPECT_TRUE(found);
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(DaemonTest, SequenceLifecycle) {
  absl::StatusOr<v1::Sequence> a = Create(SmallGeometry(), "alpha");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_THAT(a->handle(), ::testing::StartsWith("seq_"));
  EXPECT_EQ(a->handle().size(), 36u);
  EXPECT_EQ(a->label(), "alpha");
  EXPECT_GT(a->kv_bytes(), kSmallBytes);  // the promise covers more than the dense KV
  // At most 4x the dense KV, plus the tail estimate's page summaries (3 vectors of head_dim in
  // the KV's type per page: 37.5% of a page of 4 tokens of d 128 bf16, on every page the
  // promise bounds) and the frames' tags.
  EXPECT_LT(a->kv_bytes(), 4.75 * kSmallBytes);
  EXPECT_EQ(a->geometry().page_size(), 4u);  // defaults are filled in
  EXPECT_EQ(a->geometry().sink_tokens(), 8u);
  EXPECT_EQ(a->geometry().window_tokens(), 16u);
  EXPECT_EQ(a->geometry().tail_estimate(), v1::TAIL_ESTIMATE_MEAN_VAR);
  EXPECT_FLOAT_EQ(a->geometry().softmax_scale(), 1.0f / std::sqrt(128.0f));
  EXPECT_EQ(a->geometry().budget_tokens(), 256u);
  EXPECT_EQ(a->geometry().full_kv_layers(), 2u);
  EXPECT_GT(a->create_time().seconds(), 1'700'000'000);

  v1::GetSequenceRequest get;
  get.set_handle(a->handle());
  v1::GetSequenceResponse got;
  ASSERT_TRUE(daemon_->stub().GetSequence(Ctx().get(), get, &got).ok());
  EXPECT_EQ(got.sequence().handle(), a->handle());
  EXPECT_EQ(got.sequence().geometry().num_layers(), 4u);

  absl::StatusOr<v1::Sequence> b = Create(SmallGeometry(), "beta");
  ASSERT_TRUE(b.ok());
  v1::ListSequencesRequest list;
  list.set_page_size(1);
  v1::ListSequencesResponse page1, page2;
  ASSERT_TRUE(daemon_->stub().ListSequences(Ctx().get(), list, &page1).ok());
  EXPECT_EQ(page1.total_size(), 2u);
  ASSERT_EQ(page1.sequences_size(), 1);
  ASSERT_FALSE(page1.next_page_token().empty());
  list.set_page_token(page1.next_page_token());
  ASSERT_TRUE(daemon_->stub().ListSequences(Ctx().get(), list, &page2).ok());
  ASSERT_EQ(page2.sequences_size(), 1);
  EXPECT_TRUE(page2.next_page_token().empty());
  EXPECT_EQ((std::set<std::string>{page1.sequences(0).handle(), page2.sequences(0).handle()}),
            (std::set<std::string>{a->handle(), b->handle()}));

  EXPECT_EQ(b->kv_bytes(), a->kv_bytes());
  EXPECT_EQ(Stats().memory_used_bytes(), base_ + 2 * a->kv_bytes());
  v1::DropSequenceRequest drop;
  drop.set_handle(a->handle());
  v1::DropSequenceResponse dropped;
  ASSERT_TRUE(daemon_->stub().DropSequence(Ctx().get(), drop, &dropped).ok());
  EXPECT_EQ(dropped.freed_bytes(), a->kv_bytes());
  const v1::GetStatsResponse stats = Stats();
  EXPECT_EQ(stats.memory_used_bytes(), base_ + a->kv_bytes());
  EXPECT_EQ(stats.num_sequences(), 1u);
  EXPECT_EQ(stats.sequences_created_total(), 2u);
  EXPECT_EQ(stats.sequences_dropped_total(), 1u);
  EXPECT_THAT(daemon_->stub().GetSequence(Ctx().get(), get, &got),
              GrpcStatusIs(grpc::StatusCode::NOT_FOUND));
  EXPECT_THAT(daemon_->stub().DropSequence(Ctx().get(), drop, &dropped),
              GrpcStatusIs(grpc::StatusCode::NOT_FOUND));
}

TEST_F(DaemonTest, BadRequestsGetTheirCodeAndChangeNothing) {
  grpc::Status s;
  v1::CreateSequenceRequest no_geometry;
  v1::CreateSequenceResponse resp;
  EXPECT_THAT(daemon_->stub().CreateSequence(Ctx().get(), no_geometry, &resp),
              GrpcStatusIs(grpc::StatusCode::INVALID_ARGUMENT, HasSubstr("geometry is required")));

  v1::SequenceGeometry g = SmallGeometry();
  g.set_head_dim(96);
  (void)Create(g, "", &s);
  EXPECT_THAT(s, GrpcStatusIs(grpc::StatusCode::INVALID_ARGUMENT, HasSubstr("geometry.head_dim")));
  g = SmallGeometry();
  g.set_dtype(static_cast<v1::DType>(7));  // an enum value this server does not know
  (void)Create(g, "", &s);
  EXPECT_THAT(s, GrpcStatusIs(grpc::StatusCode::INVALID_ARGUMENT, HasSubstr("geometry.dtype")));
  g = SmallGeometry();
  g.set_budget_tokens(24);  // 8 sink + 16 window (the defaults) leave no page
  (void)Create(g, "", &s);
  EXPECT_THAT(
      s, GrpcStatusIs(grpc::StatusCode::INVALID_ARGUMENT, HasSubstr("geometry.budget_tokens")));
  (void)Create(SmallGeometry(), std::string(300, 'x'), &s);
  EXPECT_THAT(s, GrpcStatusIs(grpc::StatusCode::INVALID_ARGUMENT, HasSubstr("label")));
  g = SmallGeometry();
  g.set_tail_estimate(static_cast<v1::TailEstimate>(9));  // a value this server does not know
  (void)Create(g, "", &s);
  EXPECT_THAT(s, GrpcStatusIs(grpc::StatusCode::INVALID_ARGUMENT,
                              HasSubstr("geometry.tail_estimate must be NONE, MEAN or MEAN_VAR")));
  for (float bad : {0.0f, -0.125f, std::numeric_limits<float>::quiet_NaN()}) {
    g = SmallGeometry();
    g.set_softmax_scale(bad);
    (void)Create(g, "", &s);
    EXPECT_THAT(s, GrpcStatusIs(grpc::StatusCode::INVALID_ARGUMENT,
                                HasSubstr("geometry.softmax_scale must be finite")));
  }

  // 1 GiB limit: as many 32k-token sequences as their promise allows fit, the next does not.
  absl::StatusOr<v1::Sequence> big = Create(SmallGeometry(32768), "big");
  ASSERT_TRUE(big.ok()) << big.status();
  const uint64_t fit = ((1ull << 30) - base_) / big->kv_bytes();
  ASSERT_GE(fit, 2u);
  for (uint64_t i = 1; i < fit; ++i) ASSERT_TRUE(Create(SmallGeometry(32768), "big").ok());
  (void)Create(SmallGeometry(32768), "too-much", &s);
  EXPECT_THAT(s, GrpcStatusIs(grpc::StatusCode::RESOURCE_EXHAUSTED, HasSubstr("memory limit")));

  v1::GetSequenceRequest get;
  v1::GetSequenceResponse got;
  get.set_handle("seq_not-a-handle");
  EXPECT_THAT(
      daemon_->stub().GetSequence(Ctx().get(), get, &got),
      GrpcStatusIs(grpc::StatusCode::INVALID_ARGUMENT, HasSubstr("is not a sequence handle")));
  get.set_handle("seq_" + std::string(32, '0'));
  EXPECT_THAT(daemon_->stub().GetSequence(Ctx().get(), get, &got),
              GrpcStatusIs(grpc::StatusCode::NOT_FOUND));
  v1::ListSequencesRequest list;
  list.set_page_size(5000);
  v1::ListSequencesResponse listed;
  EXPECT_THAT(daemon_->stub().ListSequences(Ctx().get(), list, &listed),
              GrpcStatusIs(grpc::StatusCode::INVALID_ARGUMENT));

  const v1::GetStatsResponse stats = Stats();
  EXPECT_EQ(stats.num_sequences(), fit);
  EXPECT_EQ(stats.memory_used_bytes(), base_ + fit * big->kv_bytes());
  EXPECT_EQ(stats.memory_limit_bytes(), 1ull << 30);
  EXPECT_EQ(stats.memory_rejections_total(), 1u);
  EXPECT_EQ(stats.sequences_created_total(), fit);
}

TEST_F(DaemonTest, ConfigReportsWhatIsInForce) {
  v1::GetConfigResponse cfg;
  ASSERT_TRUE(
      daemon_->stub().GetConfig(ContextWithDeadline().get(), v1::GetConfigRequest(), &cfg).ok());
  EXPECT_EQ(cfg.socket_path(), daemon_->socket_path());
  EXPECT_EQ(cfg.memory_limit_bytes(), 1ull << 30);
  EXPECT_GT(cfg.metrics_port(), 0u);
  EXPECT_EQ(cfg.tcp_address(), "");
  EXPECT_EQ(cfg.log_level(), "info");
  EXPECT_DOUBLE_EQ(cfg.shutdown_grace_seconds(), 10.0);
  EXPECT_THAT(cfg.geometry_limits().head_dims(), ::testing::ElementsAre(64, 128, 256));
  EXPECT_THAT(cfg.geometry_limits().page_sizes(), ::testing::ElementsAre(4, 8, 16, 32));
  EXPECT_EQ(cfg.geometry_defaults().page_size(), 4u);
  EXPECT_EQ(cfg.geometry_defaults().sink_tokens(), 8u);
  EXPECT_EQ(cfg.geometry_defaults().window_tokens(), 16u);
  EXPECT_EQ(cfg.geometry_defaults().budget_tokens(), 256u);
  EXPECT_FALSE(cfg.version().empty());
}

TEST_F(DaemonTest, MetricsAreScrapedOverHttp) {
  absl::StatusOr<v1::Sequence> m = Create(SmallGeometry(), "m");
  ASSERT_TRUE(m.ok());
  grpc::Status s;
  (void)Create(SmallGeometry(1u << 24), "too-big", &s);
  ASSERT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  absl::StatusOr<std::string> body = HttpGet(daemon_->metrics_port(), "/metrics");
  ASSERT_TRUE(body.ok()) << body.status();
  EXPECT_THAT(*body, HasSubstr("# TYPE icecache_rpc_requests_total counter"));
  EXPECT_THAT(*body,
              HasSubstr("icecache_rpc_requests_total{code=\"OK\",method=\"CreateSequence\"} 1"));
  EXPECT_THAT(*body, HasSubstr("icecache_rpc_requests_total{code=\"RESOURCE_EXHAUSTED\","
                               "method=\"CreateSequence\"} 1"));
  EXPECT_THAT(*body, HasSubstr("# TYPE icecache_rpc_latency_seconds histogram"));
  EXPECT_THAT(*body, HasSubstr("icecache_rpc_latency_seconds_count{method=\"CreateSequence\"} 2"));
  EXPECT_THAT(*body, HasSubstr("icecache_sequences 1"));
  EXPECT_THAT(*body, HasSubstr(absl::StrCat("icecache_memory_used_bytes ", base_ + m->kv_bytes())));
  EXPECT_THAT(*body, HasSubstr("icecache_memory_limit_bytes 1073741824"));
  EXPECT_THAT(*body, HasSubstr("icecache_memory_rejections_total 1"));
  EXPECT_THAT(*body, HasSubstr("icecache_build_info{"));
  EXPECT_THAT(*body, HasSubstr("icecache_process_resident_memory_bytes"));
}

class DaemonTcpTest : public DaemonTest {
 protected:
  DaemonTcpTest() { config_.tcp = true; }
};

TEST_F(DaemonTcpTest, ControlApiAlsoServesOnTcp) {
  ASSERT_THAT(daemon_->tcp_address(), ::testing::StartsWith("127.0.0.1:"));
  auto channel = grpc::CreateChannel(daemon_->tcp_address(), grpc::InsecureChannelCredentials());
  auto stub = v1::IceCache::NewStub(channel);
  v1::GetStatsResponse stats;
  ASSERT_TRUE(stub->GetStats(ContextWithDeadline().get(), v1::GetStatsRequest(), &stats).ok());
  EXPECT_EQ(stats.memory_limit_bytes(), 1ull << 30);
}

TEST_F(DaemonTest, SigtermDrainsExitsZeroAndRemovesTheSocket) {
  // Clients hammer the daemon while it is told to stop. Every call that reached a handler
  // completes (OK) or is refused as UNAVAILABLE ("shutting down"); a call that arrives while
  // gRPC closes the connections is CANCELLED before any handler runs. No other outcome (an
  // INTERNAL or UNKNOWN from a handler cut off half way) is allowed.
  std::atomic<bool> stop{false};
  std::atomic<int> ok{0}, unavailable{0}, cancelled{0}, other{0};
  absl::Mutex mu;
  std::vector<std::string> other_messages;
  std::vector<std::thread> clients;
  for (int t = 0; t < 4; ++t) {
    clients.emplace_back([&] {
      auto channel = grpc::CreateChannel(daemon_->target(), grpc::InsecureChannelCredentials());
      auto stub = v1::IceCache::NewStub(channel);
      while (!stop.load()) {
        v1::GetStatsResponse r;
        grpc::Status s = stub->GetStats(ContextWithDeadline(2).get(), v1::GetStatsRequest(), &r);
        if (s.ok()) {
          ok.fetch_add(1);
        } else if (s.error_code() == grpc::StatusCode::UNAVAILABLE) {
          unavailable.fetch_add(1);
        } else if (s.error_code() == grpc::StatusCode::CANCELLED) {
          cancelled.fetch_add(1);
        } else {
          other.fetch_add(1);
          absl::MutexLock lock(&mu);
          other_messages.push_back(absl::StrCat(s.error_code(), ": ", s.error_message()));
        }
      }
    });
  }
  absl::SleepFor(absl::Milliseconds(200));
  ASSERT_TRUE(daemon_->process().Signal(SIGTERM));
  std::optional<int> status = daemon_->process().Wait(absl::Seconds(15));
  stop.store(true);
  for (auto& t : clients) t.join();
  ASSERT_TRUE(status.has_value()) << "daemon did not exit after SIGTERM";
  ASSERT_TRUE(WIFEXITED(*status)) << "killed by signal " << WTERMSIG(*status);
  EXPECT_EQ(WEXITSTATUS(*status), 0);
  EXPECT_GT(ok.load(), 0);
  EXPECT_EQ(other.load(), 0) << ::testing::PrintToString(other_messages);
  EXPECT_GT(unavailable.load() + cancelled.load(), 0);
  EXPECT_NE(::access(daemon_->socket_path().c_str(), F_OK), 0) << "socket left behind";
  EXPECT_NE(::access((daemon_->socket_path() + ".lock").c_str(), F_OK), 0);
  EXPECT_THAT(daemon_->process().Stderr(), HasSubstr("shutdown complete"));
}

// During the shutdown grace the daemon still answers: health NOT_SERVING, new control calls
// and data-plane requests UNAVAILABLE "shutting down", while a prefill in flight completes.
TEST_F(DaemonTest, ShutdownGraceShowsNotServingAndFinishesWhatIsInFlight) {
  daemon_.reset();
  client_.reset();
  config_.extra_args.push_back("--shutdown-grace=30s");
  config_.memory_limit = "4GiB";
  SetUp();
  v1::SequenceGeometry g;
  g.set_num_layers(1);
  g.set_num_q_heads(4);
  g.set_num_kv_heads(4);
  g.set_head_dim(128);
  g.set_dtype(v1::DTYPE_FP16);
  g.set_max_tokens(120000);
  g.set_full_kv_layers(0);
  absl::StatusOr<v1::Sequence> seq = Create(g, "long");
  ASSERT_TRUE(seq.ok()) << seq.status();
  const uint32_t tokens = 120000;
  absl::StatusOr<abi::StageResponse> st = client_->Stage(seq->handle(), tokens);
  ASSERT_TRUE(st.ok()) << st.status();
  absl::StatusOr<uint8_t*> base = client_->Address(st->buffer, st->bytes);
  ASSERT_TRUE(base.ok());
  uint64_t x = 1;
  auto* h = reinterpret_cast<uint16_t*>(*base);
  for (uint64_t i = 0; i < st->bytes / 2; ++i) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    h[i] = 0x3000 | static_cast<uint16_t>((x >> 33) & 0x0fff);  // finite fp16 values
  }
  absl::StatusOr<uint32_t> prefill =
      client_->SubmitStaged(abi::kOpPrefill, seq->handle(), 0, st->buffer, tokens, 0);
  ASSERT_TRUE(prefill.ok());
  absl::SleepFor(absl::Milliseconds(50));
  ASSERT_TRUE(daemon_->process().Signal(SIGTERM));
  grpc::health::v1::HealthCheckResponse::ServingStatus seen =
      grpc::health::v1::HealthCheckResponse::SERVING;
  const absl::Time until = absl::Now() + absl::Seconds(5);
  while (seen == grpc::health::v1::HealthCheckResponse::SERVING && absl::Now() < until) {
    grpc::health::v1::HealthCheckRequest req;
    grpc::health::v1::HealthCheckResponse resp;
    ASSERT_TRUE(daemon_->health().Check(ContextWithDeadline().get(), req, &resp).ok());
    seen = resp.status();
  }
  EXPECT_EQ(seen, grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  v1::GetStatsResponse stats;
  EXPECT_THAT(daemon_->stub().GetStats(ContextWithDeadline().get(), {}, &stats),
              GrpcStatusIs(grpc::StatusCode::UNAVAILABLE, HasSubstr("shutting down")));
  EXPECT_THAT(client_->Nop(),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("icecached is shutting down")));
  EXPECT_OK(client_->Finish(*prefill));  // the prefill in flight completes
  std::optional<int> status = daemon_->process().Wait(absl::Seconds(40));
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0);
}

TEST_F(DaemonTest, SigintAlsoExitsZero) {
  ASSERT_TRUE(daemon_->process().Signal(SIGINT));
  std::optional<int> status = daemon_->process().Wait(absl::Seconds(15));
  ASSERT_TRUE(status.has_value());
  ASSERT_TRUE(WIFEXITED(*status));
  EXPECT_EQ(WEXITSTATUS(*status), 0);
  EXPECT_NE(::access(daemon_->socket_path().c_str(), F_OK), 0);
}

TEST_F(DaemonTest, ASecondDaemonOnTheSameSocketRefusesToStart) {
  absl::StatusOr<RunResult> second =
      RunCommand({IcecachedBinary(), "--socket=" + daemon_->socket_path(), "--metrics-port=-1",
                  "--memory-limit=64MiB"},
                 dir_.path(), absl::Seconds(20));
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->exit_code, 2);
  EXPECT_THAT(second->err,
              HasSubstr(absl::StrCat("another icecached (pid ", daemon_->process().pid(),
                                     ") is already serving")));
  // The first one is untouched and still serves on its socket.
  EXPECT_TRUE(daemon_->process().Running());
  EXPECT_EQ(Stats().memory_limit_bytes(), 1ull << 30);
}

TEST_F(DaemonTest, ADaemonKilledHardLeavesAStaleSocketThatTheNextOneReplaces) {
  ASSERT_TRUE(daemon_->process().Signal(SIGKILL));
  ASSERT_TRUE(daemon_->process().Wait(absl::Seconds(10)).has_value());
  ASSERT_EQ(::access(daemon_->socket_path().c_str(), F_OK), 0) << "expected a stale socket";
  auto next = DaemonProcess::Start(dir_.path(), config_);
  ASSERT_TRUE(next.ok()) << next.status();
  v1::GetStatsResponse stats;
  ASSERT_TRUE((*next)->stub().GetStats(ContextWithDeadline().get(), {}, &stats).ok());
  EXPECT_EQ(stats.num_sequences(), 0u);
}

// Bad flags end with a clear message and a non-zero exit, before anything is served.
TEST(DaemonFlags, InvalidFlagsExitNonZeroWithAMessage) {
  TempDir dir;
  const std::string sock = "--socket=" + dir.path() + "/d.sock";
  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{"--memory-limit=lots"}, "must start with a non-negative number"},
      {{"--memory-limit=1000TiB"}, "exceeds the memory available"},
      {{"--metrics-port=70000"}, "--metrics-port must be -1 (off), 0 (any free port) or 1..65535"},
      {{"--log-level=loud"}, "--log-level must be debug, info, warning or error"},
      {{"--no-such-flag=1"}, "Unknown command line flag 'no_such_flag'"},
      {{"stray-argument"}, "unexpected argument 'stray-argument'"},
      {{"--shutdown-grace=-1s"}, "--shutdown-grace must not be negative"},
      {{"--socket=relative.sock"}, "must be absolute"},
      {{"--tcp=256.1.1.1:99999"}, "cannot serve gRPC"},
  };
  for (const Case& c : cases) {
    std::vector<std::string> argv = {IcecachedBinary(), sock, "--metrics-port=-1"};
    argv.insert(argv.end(), c.args.begin(), c.args.end());
    absl::StatusOr<RunResult> r = RunCommand(argv, dir.path(), absl::Seconds(20));
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_NE(r->exit_code, 0) << c.args[0];
    EXPECT_THAT(r->err, HasSubstr(c.message)) << c.args[0];
    EXPECT_NE(::access((dir.path() + "/d.sock").c_str(), F_OK), 0) << c.args[0];
    EXPECT_NE(::access((dir.path() + "/d.sock.lock").c_str(), F_OK), 0) << c.args[0];
  }
}

TEST(DaemonFlags, BusyMetricsPortIsAClearError) {
  TempDir dir;
  auto first = DaemonProcess::Start(dir.path());
  ASSERT_TRUE(first.ok()) << first.status();
  absl::StatusOr<RunResult> r =
      RunCommand({IcecachedBinary(), "--socket=" + dir.path() + "/other.sock",
                  absl::StrCat("--metrics-port=", (*first)->metrics_port()),
                  "--metrics-host=127.0.0.1", "--memory-limit=64MiB"},
                 dir.path(), absl::Seconds(20));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->exit_code, 2);
  EXPECT_THAT(r->err, HasSubstr("cannot serve metrics on 127.0.0.1:"));
  EXPECT_NE(::access((dir.path() + "/other.sock").c_str(), F_OK), 0);
}

TEST(DaemonFlags, VersionAndHelp) {
  TempDir dir;
  absl::StatusOr<RunResult> v = RunCommand({IcecachedBinary(), "--version"}, dir.path());
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->exit_code, 0);
  EXPECT_THAT(v->out, ::testing::StartsWith("icecached 0."));
  absl::StatusOr<RunResult> h = RunCommand({IcecachedBinary(), "--help"}, dir.path());
  ASSERT_TRUE(h.ok());
  EXPECT_THAT(h->out + h->err, HasSubstr("memory_limit"));
}

}  // namespace
}  // namespace icecache::testing
