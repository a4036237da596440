// Identity, limits and hostile clients, end to end: the real icecached as a subprocess, real
// sockets, and real processes of another uid (icecache_test_client --as-uid=65534; these tests
// need root to start them and skip without it).
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/paths.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "icecache/client.h"
#include "tests/support/attachment_peer.h"
#include "tests/support/daemon_process.h"
#include "tests/support/status_matchers.h"
#include "tests/support/workload.h"

namespace icecache::testing {
namespace {

namespace v1 = ::icecache::v1;
using ::testing::HasSubstr;

constexpr int kNobody = 65534;

class SecurityTest : public ::testing::Test {
 protected:
  void StartDaemon(const std::vector<std::string>& extra = {}, const std::string& limit = "1GiB") {
    daemon_.reset();
    DaemonConfig config;
    config.extra_args = extra;
    config.memory_limit = limit;
    auto d = DaemonProcess::Start(dir_.path(), config);
    ASSERT_TRUE(d.ok()) << d.status();
    daemon_ = std::move(*d);
  }

  // Processes of another uid must reach the sockets' directory.
  void OpenDirectory() { ASSERT_EQ(::chmod(dir_.path().c_str(), 0755), 0); }

  absl::StatusOr<std::string> Metrics() { return HttpGet(daemon_->metrics_port(), "/metrics"); }

  v1::GetStatsResponse Stats() {
    v1::GetStatsResponse r;
    EXPECT_TRUE(daemon_->stub().GetStats(ContextWithDeadline().get(), {}, &r).ok());
    return r;
  }

  std::string Create(Attachment& a, const WorkloadOptions& w = {}) {
    v1::CreateSequenceRequest req;
    *req.mutable_geometry() = WorkloadGeometry(w);
    v1::CreateSequenceResponse resp;
    grpc::Status s = daemon_->stub().CreateSequence(ContextWithToken(a.token()).get(), req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp.sequence().handle();
  }

  // Median wall time of `n` attach + detach round trips, in microseconds.
  double MedianAttachMicros(int n) {
    std::vector<double> us;
    for (int i = 0; i < n; ++i) {
      const absl::Time t = absl::Now();
      auto a = daemon_->Attach();
      us.push_back(absl::ToDoubleMicroseconds(absl::Now() - t));
      EXPECT_TRUE(a.ok()) << a.status();
    }
    std::sort(us.begin(), us.end());
    return us[us.size() / 2];
  }

  // Attaches, trying again until `within` has passed (a freed place comes back only once the
  // reaper or the daemon has let the old one go).
  absl::StatusOr<std::unique_ptr<Attachment>> AttachWithin(absl::Duration within) {
    const absl::Time until = absl::Now() + within;
    absl::StatusOr<std::unique_ptr<Attachment>> a;
    do {
      a = daemon_->Attach();
    } while (!a.ok() && absl::Now() < until);
    return a;
  }

  // A process of uid 65534 holding `n` silent attach connections; waits until they are held.
  Subprocess HoldSilent(int n) {
    absl::StatusOr<Subprocess> p = Subprocess::Start(
        {TestClientBinary(), "--socket=" + daemon_->socket_path(), "--mode=hold-silent",
         absl::StrCat("--connections=", n), absl::StrCat("--as_uid=", kNobody)},
        dir_.path());
    EXPECT_TRUE(p.ok()) << p.status();
    const absl::Time until = absl::Now() + absl::Seconds(10);
    while (p->Stdout().find("held") == std::string::npos && absl::Now() < until) {
      absl::SleepFor(absl::Milliseconds(10));
    }
    EXPECT_THAT(p->Stdout(), HasSubstr(absl::StrCat("held ", n))) << p->Stderr();
    return std::move(*p);
  }

  TempDir dir_;
  std::unique_ptr<DaemonProcess> daemon_;
};

bool IsRoot() { return ::geteuid() == 0; }

// A blocking connection to a unix socket (-1 when it cannot be made).
int ConnectRaw(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// Seconds until the daemon closes `fd` (recv answers 0), reading and dropping whatever it
// sends first; -1 when it is still open after `limit` seconds.
double SecondsUntilClosed(int fd, double limit) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(limit);
  tv.tv_usec = static_cast<suseconds_t>((limit - static_cast<double>(tv.tv_sec)) * 1e6);
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  const absl::Time t = absl::Now();
  char buf[256];
  while (true) {
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n == 0 || (n < 0 && errno == ECONNRESET)) return absl::ToDoubleSeconds(absl::Now() - t);
    if (n < 0) return -1;
  }
}

// ------------------------------------------------------------------ attach under load

// 64 silent connections of a uid that may not attach are refused at accept (SO_PEERCRED,
// nothing read); 64 of an admitted uid occupy at most its pending allowance (8) until their
// deadline, the rest are refused at once. Either way a legitimate client attaches within 2x
// of its latency against an idle daemon, plus 2 ms for the scheduling noise of a loaded 2-core
// CI machine (the second test below once measured 1,062 against 425 us idle there); a daemon
// whose loop waited on a silent connection would cost its handshake deadline, 2 s or more.
constexpr double kAttachNoiseMicros = 2000;

TEST_F(SecurityTest, SilentConnectionsDoNotDelayALegitimateAttach) {
  if (!IsRoot()) GTEST_SKIP() << "needs root to hold connections as another uid";
  StartDaemon({"--allow-uids=0," + std::to_string(kNobody), "--handshake-timeout=30s"});
  OpenDirectory();
  MedianAttachMicros(5);  // warm up
  const double idle = MedianAttachMicros(41);
  Subprocess hostile = HoldSilent(64);
  absl::SleepFor(absl::Milliseconds(100));
  const double loaded = MedianAttachMicros(41);
  std::printf("attach p50: idle %.0f us, with 64 silent connections of an admitted uid %.0f us\n",
              idle, loaded);
  EXPECT_LE(loaded, 2 * idle + kAttachNoiseMicros)
      << "idle " << idle << " us, loaded " << loaded << " us";
  absl::StatusOr<std::string> m = Metrics();
  ASSERT_TRUE(m.ok());
  // The 56 beyond the per-uid allowance were refused when they connected.
  EXPECT_GE(MetricValue(*m, "icecache_attach_total{result=\"refused\"}"), 56.0);
  hostile.Signal(SIGKILL);
  hostile.Wait(absl::Seconds(5));
}

TEST_F(SecurityTest, SilentConnectionsOfAnotherUidAreRefusedBeforeAnythingIsRead) {
  if (!IsRoot()) GTEST_SKIP() << "needs root to hold connections as another uid";
  StartDaemon();
  OpenDirectory();
  MedianAttachMicros(5);  // warm up
  const double idle = MedianAttachMicros(21);
  Subprocess hostile = HoldSilent(64);
  absl::SleepFor(absl::Milliseconds(100));
  const double loaded = MedianAttachMicros(21);
  EXPECT_LE(loaded, 2 * idle + kAttachNoiseMicros)
      << "idle " << idle << " us, loaded " << loaded << " us";
  absl::StatusOr<std::string> m = Metrics();
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(MetricValue(*m, "icecache_attach_total{result=\"refused\"}"), 64.0);
  hostile.Signal(SIGKILL);
  hostile.Wait(absl::Seconds(5));
}

TEST_F(SecurityTest, AnAttachRequestThatNeverComesTimesOut) {
  StartDaemon({"--handshake-timeout=300ms"});
  const int fd = ConnectRaw(AttachSocketPath(daemon_->socket_path()));
  ASSERT_GE(fd, 0) << std::strerror(errno);
  // Half a request, then silence: the daemon answers with the reason and closes.
  abi::AttachRequest req{};
  req.magic = abi::kArenaMagic;
  ASSERT_EQ(::send(fd, &req, 8, MSG_NOSIGNAL), 8);
  const absl::Time t = absl::Now();
  abi::AttachReply reply{};
  ASSERT_EQ(::recv(fd, &reply, sizeof(reply), MSG_WAITALL), static_cast<ssize_t>(sizeof(reply)));
  const double waited = absl::ToDoubleSeconds(absl::Now() - t);
  EXPECT_EQ(reply.status, abi::kAttachBadRequest);
  EXPECT_THAT(reply.message, HasSubstr("no complete attach request within 300ms"));
  EXPECT_GT(waited, 0.2);
  EXPECT_LT(waited, 2.0);
  ::close(fd);
}

// Attach flags the daemon does not know are refused with the reason; the pins-segments flag
// (a CUDA client) is known and attaches.
TEST_F(SecurityTest, UnknownAttachFlagsAreRefused) {
  StartDaemon();
  const auto attach_with = [&](uint32_t flags) {
    const int fd = ConnectRaw(AttachSocketPath(daemon_->socket_path()));
    EXPECT_GE(fd, 0) << std::strerror(errno);
    abi::AttachRequest req{};
    req.magic = abi::kArenaMagic;
    req.abi_version = abi::kAbiVersion;
    req.flags = flags;
    EXPECT_EQ(::send(fd, &req, sizeof(req), MSG_NOSIGNAL), static_cast<ssize_t>(sizeof(req)));
    abi::AttachReply reply{};
    EXPECT_EQ(::recv(fd, &reply, sizeof(reply), MSG_WAITALL), static_cast<ssize_t>(sizeof(reply)));
    ::close(fd);
    return reply;
  };
  const abi::AttachReply unknown = attach_with(1u << 3);
  EXPECT_EQ(unknown.status, abi::kAttachBadRequest);
  EXPECT_THAT(unknown.message, HasSubstr("unknown attach flags"));
  const abi::AttachReply pins = attach_with(abi::kAttachPinsSegments | (1u << 31));
  EXPECT_EQ(pins.status, abi::kAttachBadRequest);
  EXPECT_EQ(attach_with(abi::kAttachPinsSegments).status, abi::kAttachOk);
}

TEST_F(SecurityTest, AttachesPerUidAreCapped) {
  StartDaemon({"--max-clients-per-uid=2"});
  auto a = daemon_->Attach(), b = daemon_->Attach();
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_THAT(daemon_->Attach(), StatusIs(absl::StatusCode::kResourceExhausted,
                                          HasSubstr("has its maximum of 2 attached clients")));
  a->reset();
  // The reaper frees the slot within moments.
  absl::StatusOr<std::unique_ptr<Attachment>> c = AttachWithin(absl::Seconds(2));
  EXPECT_TRUE(c.ok()) << c.status();
}

// ------------------------------------------------------------------ a token is no identity

TEST_F(SecurityTest, ALeakedTokenIsRefusedToAnotherUid) {
  if (!IsRoot()) GTEST_SKIP() << "needs root to run a client as another uid";
  StartDaemon();
  OpenDirectory();
  auto a = daemon_->Attach();
  ASSERT_TRUE(a.ok()) << a.status();
  const std::string handle = Create(**a);
  absl::StatusOr<RunResult> r =
      RunCommand({TestClientBinary(), "--socket=" + daemon_->socket_path(), "--mode=use-token",
                  "--token=" + (*a)->token(), absl::StrCat("--as_uid=", kNobody)},
                 dir_.path());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->exit_code, 0) << r->out << r->err;
  EXPECT_THAT(r->out, HasSubstr("list: PERMISSION_DENIED: this attachment token belongs to "
                                "another uid; the call comes from uid 65534"));
  EXPECT_THAT(r->out, HasSubstr("create: PERMISSION_DENIED"));
  EXPECT_THAT(r->out, HasSubstr("stats: OK"));  // what needs no token stays open
  // Nothing was created for the owner; the owner's own calls still work.
  v1::ListSequencesResponse list;
  ASSERT_TRUE(daemon_->stub().ListSequences(ContextWithToken((*a)->token()).get(), {}, &list).ok());
  ASSERT_EQ(list.sequences_size(), 1);
  EXPECT_EQ(list.sequences(0).handle(), handle);
}

// ------------------------------------------------------------------ TCP

class TcpTest : public SecurityTest {
 protected:
  std::shared_ptr<grpc::Channel> Tcp(const std::shared_ptr<grpc::ChannelCredentials>& creds,
                                     const std::string& address) {
    grpc::ChannelArguments args;
    args.SetSslTargetNameOverride("localhost");
    return grpc::CreateCustomChannel(address, creds, args);
  }
  grpc::Status GetStats(const std::shared_ptr<grpc::Channel>& ch) {
    v1::GetStatsResponse r;
    return v1::IceCache::NewStub(ch)->GetStats(ContextWithDeadline(3).get(), {}, &r);
  }
  std::string TcpAddress() {
    v1::GetConfigResponse c;
    EXPECT_TRUE(daemon_->stub().GetConfig(ContextWithDeadline().get(), {}, &c).ok());
    return c.tcp_address();
  }
  // A CA, a server certificate for localhost and a client certificate, made with openssl.
  void MakeCertificates() {
    const std::string d = dir_.path();
    const std::string script = absl::StrCat(
        "set -e; cd ", d,
        "; openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 "
        "-subj /CN=icecache-test-ca 2>/dev/null"
        "; printf 'subjectAltName=DNS:localhost,IP:127.0.0.1' > san.ext"
        "; for n in server client; do openssl req -newkey rsa:2048 -nodes -keyout $n.key "
        "-out $n.csr -subj /CN=localhost 2>/dev/null; openssl x509 -req -in $n.csr -CA ca.pem "
        "-CAkey ca.key -CAcreateserial -out $n.pem -days 2 -extfile san.ext 2>/dev/null; done");
    absl::StatusOr<RunResult> r = RunCommand({"/bin/sh", "-c", script}, d);
    ASSERT_TRUE(r.ok() && r->exit_code == 0) << (r.ok() ? r->err : r.status().ToString());
  }
  std::shared_ptr<grpc::ChannelCredentials> TlsCredentials(bool with_client_cert) {
    grpc::SslCredentialsOptions o;
    o.pem_root_certs = ReadFile(dir_.path() + "/ca.pem");
    if (with_client_cert) {
      o.pem_private_key = ReadFile(dir_.path() + "/client.key");
      o.pem_cert_chain = ReadFile(dir_.path() + "/client.pem");
    }
    return grpc::SslCredentials(o);
  }
};

TEST_F(TcpTest, PlaintextTcpServesHealthButNotTheControlApi) {
  StartDaemon({"--tcp=127.0.0.1:0"});
  auto ch = Tcp(grpc::InsecureChannelCredentials(), TcpAddress());
  EXPECT_THAT(GetStats(ch), GrpcStatusIs(grpc::StatusCode::UNAUTHENTICATED,
                                         HasSubstr("the control API over TCP needs TLS")));
  grpc::health::v1::HealthCheckRequest hreq;
  grpc::health::v1::HealthCheckResponse hresp;
  ASSERT_TRUE(grpc::health::v1::Health::NewStub(ch)
                  ->Check(ContextWithDeadline(3).get(), hreq, &hresp)
                  .ok());
  EXPECT_EQ(hresp.status(), grpc::health::v1::HealthCheckResponse::SERVING);
}

TEST_F(TcpTest, InsecureTcpIsForLoopbackOnly) {
  absl::StatusOr<RunResult> r =
      RunCommand({IcecachedBinary(), "--socket=" + dir_.path() + "/x.sock", "--metrics-port=-1",
                  "--tcp=0.0.0.0:0", "--tcp-insecure"},
                 dir_.path());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->exit_code, 2);
  EXPECT_THAT(r->err, HasSubstr("--tcp-insecure serves the control API in plaintext and is "
                                "allowed on a loopback address only"));
  StartDaemon({"--tcp=127.0.0.1:0", "--tcp-insecure"});
  EXPECT_TRUE(GetStats(Tcp(grpc::InsecureChannelCredentials(), TcpAddress())).ok());
}

TEST_F(TcpTest, TlsServesTheControlApiAndNeverTokenCalls) {
  MakeCertificates();
  const std::string d = dir_.path();
  StartDaemon(
      {"--tcp=127.0.0.1:0", "--tls-cert=" + d + "/server.pem", "--tls-key=" + d + "/server.key"});
  const std::string address = TcpAddress();
  auto tls = Tcp(TlsCredentials(false), address);
  EXPECT_TRUE(GetStats(tls).ok());
  EXPECT_FALSE(GetStats(Tcp(grpc::InsecureChannelCredentials(), address)).ok());
  // A valid token over TCP is still refused: no kernel-checked uid there.
  auto a = daemon_->Attach();
  ASSERT_TRUE(a.ok());
  v1::ListSequencesResponse list;
  EXPECT_THAT(
      v1::IceCache::NewStub(tls)->ListSequences(ContextWithToken((*a)->token()).get(), {}, &list),
      GrpcStatusIs(grpc::StatusCode::PERMISSION_DENIED,
                   HasSubstr("served only on the daemon's unix socket")));
  v1::GetConfigResponse c;
  ASSERT_TRUE(daemon_->stub().GetConfig(ContextWithDeadline().get(), {}, &c).ok());
  EXPECT_TRUE(c.tcp_tls());
  EXPECT_FALSE(c.tcp_client_auth());
}

TEST_F(TcpTest, MutualTlsRequiresAClientCertificate) {
  MakeCertificates();
  const std::string d = dir_.path();
  StartDaemon({"--tcp=127.0.0.1:0", "--tls-cert=" + d + "/server.pem",
               "--tls-key=" + d + "/server.key", "--tls-client-ca=" + d + "/ca.pem"});
  const std::string address = TcpAddress();
  EXPECT_TRUE(GetStats(Tcp(TlsCredentials(true), address)).ok());
  EXPECT_FALSE(GetStats(Tcp(TlsCredentials(false), address)).ok());
}

// ------------------------------------------------------------------ socket access

TEST_F(SecurityTest, SocketModeAndGroupAreWhatTheFlagsSay) {
  if (!IsRoot()) GTEST_SKIP() << "needs root to hand the sockets to another group";
  StartDaemon({"--socket-mode=0660", absl::StrCat("--socket-group=", kNobody)});
  for (const std::string& path :
       {daemon_->socket_path(), AttachSocketPath(daemon_->socket_path())}) {
    struct stat st {};
    ASSERT_EQ(::stat(path.c_str(), &st), 0) << path;
    EXPECT_TRUE(S_ISSOCK(st.st_mode));
    EXPECT_EQ(st.st_mode & 0777, 0660u) << path;
    EXPECT_EQ(st.st_gid, static_cast<gid_t>(kNobody)) << path;
  }
  v1::GetConfigResponse c;
  ASSERT_TRUE(daemon_->stub().GetConfig(ContextWithDeadline().get(), {}, &c).ok());
  EXPECT_EQ(c.socket_mode(), 0660u);
}

// ------------------------------------------------------------------ control API limits

TEST_F(SecurityTest, ControlCallsAreRateLimitedPerCaller) {
  StartDaemon({"--control-rate=20"});
  int ok = 0, limited = 0;
  const auto begin = std::chrono::steady_clock::now();
  for (int i = 0; i < 100; ++i) {
    v1::GetStatsResponse r;
    const grpc::Status s = daemon_->stub().GetStats(ContextWithDeadline().get(), {}, &r);
    if (s.ok()) ++ok;
    if (s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
      ++limited;
      EXPECT_THAT(s.error_message(), HasSubstr("at most 20 per second"));
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
  // The burst is one second's worth (20); the harness's own readiness calls spend a little of
  // it before the loop starts.
  EXPECT_GE(ok, 15);
  // The burst (one second's worth) plus what refills while the loop runs (a loaded machine
  // runs the loop for longer; the bound follows the time it took).
  EXPECT_LE(ok, 20 + static_cast<int>(20 * seconds) + 1) << "in " << seconds << " s";
  EXPECT_GE(limited, 1);
  EXPECT_EQ(ok + limited, 100);
}

TEST_F(SecurityTest, SequencesPerClientAreCapped) {
  StartDaemon({"--max-sequences-per-client=3"});
  auto a = daemon_->Attach();
  ASSERT_TRUE(a.ok());
  for (int i = 0; i < 3; ++i) Create(**a);
  v1::CreateSequenceRequest req;
  *req.mutable_geometry() = WorkloadGeometry({});
  v1::CreateSequenceResponse resp;
  EXPECT_THAT(
      daemon_->stub().CreateSequence(ContextWithToken((*a)->token()).get(), req, &resp),
      GrpcStatusIs(grpc::StatusCode::RESOURCE_EXHAUSTED, HasSubstr("maximum of 3 sequences")));
  // Another client has its own allowance.
  auto b = daemon_->Attach();
  ASSERT_TRUE(b.ok());
  Create(**b);
}

TEST_F(SecurityTest, AnUnparsableRequestGetsInvalidArgument) {
  StartDaemon();
  grpc::GenericStub generic(daemon_->channel());
  const char garbage[] = "\xff\xff\xff\xff not a protobuf";
  grpc::Slice slice(garbage, sizeof(garbage));
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  grpc::Status status;
  generic.UnaryCall(&ctx, "/icecache.v1.IceCache/CreateSequence", grpc::StubOptions(), &request,
                    &response, [&](grpc::Status s) {
                      std::lock_guard<std::mutex> lock(mu);
                      status = s;
                      done = true;
                      cv.notify_all();
                    });
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return done; });
  EXPECT_THAT(status, GrpcStatusIs(grpc::StatusCode::INVALID_ARGUMENT,
                                   HasSubstr("not a valid icecache.v1.CreateSequenceRequest")));
}

// ------------------------------------------------------------------ hostile clients

TEST_F(SecurityTest, AClientThatKeepsMakingProtocolErrorsIsThrottledThenDetached) {
  StartDaemon();
  auto bad = daemon_->Attach(), good = daemon_->Attach();
  ASSERT_TRUE(bad.ok() && good.ok());
  // Queue entries naming no slot, as fast as the client can write them.
  const absl::Time start = absl::Now();
  bool detached = false;
  while (absl::Now() - start < absl::Seconds(8)) {
    for (int i = 0; i < 32; ++i) AttachmentTestPeer::SubmitRaw(**bad, 9999);
    absl::SleepFor(absl::Milliseconds(2));
    if ((*bad)->Nop().code() == absl::StatusCode::kUnavailable) {
      detached = true;
      break;
    }
  }
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  EXPECT_TRUE(detached) << "still attached after " << seconds << " s";
  EXPECT_LT(seconds, 6.0);
  absl::StatusOr<std::string> m = Metrics();
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(MetricValue(*m, "icecache_clients_evicted_total{reason=\"protocol_errors\"}"), 1.0);
  // The well-behaved client never noticed.
  EXPECT_TRUE(RunWorkload(**good, daemon_->stub(), WorkloadOptions{}).ok());
}

// Seconds of CPU the process has used (user + system).
double CpuSeconds(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/stat"));
  std::string line;
  std::getline(in, line);
  const size_t close = line.rfind(')');
  std::vector<std::string> f = absl::StrSplit(line.substr(close + 2), ' ');
  double utime = 0, stime = 0;
  (void)absl::SimpleAtod(f[11], &utime);
  (void)absl::SimpleAtod(f[12], &stime);
  return (utime + stime) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

TEST_F(SecurityTest, ALyingQueueTailCostsNoCpu) {
  StartDaemon();
  auto a = daemon_->Attach();
  ASSERT_TRUE(a.ok());
  ASSERT_OK((*a)->Nop());
  absl::SleepFor(absl::Milliseconds(200));
  (*a)->header()->sq_tail.fetch_add(1u << 31);
  const double before = CpuSeconds(daemon_->process().pid());
  absl::SleepFor(absl::Seconds(1));
  const double used = CpuSeconds(daemon_->process().pid()) - before;
  EXPECT_LT(used, 0.1) << "the daemon burnt " << used << " s of CPU in 1 s";
  absl::StatusOr<std::string> m = Metrics();
  ASSERT_TRUE(m.ok());
  EXPECT_GE(MetricValue(*m, "icecache_protocol_errors_total"), 1.0);
  // The client's ring works again from where the daemon resynchronised.
  EXPECT_OK((*a)->Nop());
}

// A client writes NaN into its staging buffer right after submitting a prefill: the daemon
// copies the keys before it validates and uses them, so the prefill either saw finite keys
// (and the pages hold them) or is refused; NaN never reaches the index or a page.
TEST_F(SecurityTest, KeysChangedAfterSubmitNeverReachTheIndex) {
  StartDaemon();
  auto a = daemon_->Attach();
  ASSERT_TRUE(a.ok());
  WorkloadOptions w;
  w.layers = 1;
  w.tokens = 2000;
  w.appends = 0;
  const eval::Trace t = WorkloadTrace(w);
  const uint64_t row = uint64_t{w.head_dim} * 2;
  int accepted = 0, refused = 0;
  for (int trial = 0; trial < 16; ++trial) {
    const std::string h = Create(**a, w);
    absl::StatusOr<abi::StageResponse> st = (*a)->Stage(h, w.tokens);
    ASSERT_TRUE(st.ok()) << st.status();
    absl::StatusOr<uint8_t*> base = (*a)->Address(st->buffer, st->bytes);
    ASSERT_TRUE(base.ok());
    for (uint32_t kv = 0; kv < w.kv_heads; ++kv) {
      std::memcpy(*base + kv * w.tokens * row, t.Keys(0, kv).data, w.tokens * row);
      std::memcpy(*base + st->v_offset + kv * w.tokens * row, t.Values(0, kv).data, w.tokens * row);
    }
    absl::StatusOr<uint32_t> slot =
        (*a)->SubmitStaged(abi::kOpPrefill, h, 0, st->buffer, w.tokens, 0);
    ASSERT_TRUE(slot.ok());
    // Scribble NaN (fp16 0x7e00) over the keys until the prefill is answered.
    auto* keys = reinterpret_cast<volatile uint16_t*>(*base);
    const uint64_t n = uint64_t{w.kv_heads} * w.tokens * w.head_dim;
    uint64_t i = trial * 7919;
    while (!(*a)->Done(*slot)) keys[i++ % n] = 0x7e00;
    const absl::Status done = (*a)->Finish(*slot);
    if (!done.ok()) {
      EXPECT_THAT(done, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not finite")));
      ++refused;
      continue;
    }
    ++accepted;
    // Every key in every page the daemon selects is finite.
    std::vector<float> q(w.kv_heads * w.group * w.head_dim, 0.5f);
    // The answer: 1000 references per KV head, then the tail partials (the daemon's default
    // tail estimate; abi.h).
    absl::StatusOr<uint32_t> submitted = (*a)->SubmitSelect(h, 0, q.data(), q.size(), 1000);
    ASSERT_TRUE(submitted.ok()) << submitted.status();
    std::vector<float> tail;
    absl::StatusOr<std::vector<abi::SelectedPageRef>> pages = (*a)->FinishSelect(
        *submitted, uint64_t{w.kv_heads} * 1000,
        uint64_t{w.kv_heads} * w.group * abi::TailPartialFloats(w.head_dim), &tail);
    ASSERT_TRUE(pages.ok()) << pages.status();
    for (const abi::SelectedPageRef& p : *pages) {
      if (p.segment == abi::kNoSegment) continue;
      uint32_t page_bytes = 0;
      absl::StatusOr<const uint8_t*> frame = (*a)->Frame(p.segment, p.frame, &page_bytes);
      ASSERT_TRUE(frame.ok());
      const auto* k = reinterpret_cast<const uint16_t*>(*frame);
      for (uint32_t j = 0; j < p.valid * w.head_dim; ++j) {
        ASSERT_NE(k[j] & 0x7c00, 0x7c00) << "a non-finite key reached page " << p.frame;
      }
    }
  }
  std::printf("prefills with keys scribbled after submit: %d accepted, %d refused\n", accepted,
              refused);
  EXPECT_EQ(accepted + refused, 16);
}

// ------------------------------------------------------------------ accounting

// The limit is exactly the control segment of one client and the promises of three sequences:
// the three are admitted and run to max_tokens (every layer's prompt staged at once, beyond
// the prefill depth: the extra stages wait rather than fail; then appends to max_tokens,
// selects) without one refusal, the account stays exactly at the limit, and a fourth sequence
// is refused at creation.
TEST_F(SecurityTest, ThreeSequencesFillTheLimitExactlyAndNeverFailMidway) {
  WorkloadOptions w;
  w.layers = 4;
  w.tokens = 2048;
  w.appends = 3;
  const uint32_t prompt = w.tokens - w.appends * 16;
  // Learn the promise and the control segment from a daemon with room to spare.
  StartDaemon({}, "1GiB");
  uint64_t control = 0, promise = 0;
  {
    auto probe = daemon_->Attach();
    ASSERT_TRUE(probe.ok());
    control = Stats().memory_used_bytes();
    v1::CreateSequenceRequest req;
    *req.mutable_geometry() = WorkloadGeometry(w);
    v1::CreateSequenceResponse resp;
    ASSERT_TRUE(
        daemon_->stub().CreateSequence(ContextWithToken((*probe)->token()).get(), req, &resp).ok());
    promise = resp.sequence().kv_bytes();
  }
  const uint64_t limit = control + 3 * promise;
  StartDaemon({}, std::to_string(limit));
  auto a = daemon_->Attach();
  ASSERT_TRUE(a.ok());
  Attachment& at = **a;
  const eval::Trace t = WorkloadTrace(w);
  const uint64_t row = uint64_t{w.head_dim} * 2;
  auto fill = [&](const abi::StageResponse& st, uint32_t layer, uint32_t from, uint32_t n) {
    absl::StatusOr<uint8_t*> base = at.Address(st.buffer, st.bytes);
    ASSERT_TRUE(base.ok());
    for (uint32_t h = 0; h < w.kv_heads; ++h) {
      std::memcpy(*base + uint64_t{h} * n * row,
                  static_cast<const uint8_t*>(t.Keys(layer, h).data) + from * row, n * row);
      std::memcpy(*base + st.v_offset + uint64_t{h} * n * row,
                  static_cast<const uint8_t*>(t.Values(layer, h).data) + from * row, n * row);
    }
  };
  auto stage_response = [&](uint32_t slot) {
    abi::StageResponse r{};
    std::memcpy(&r, at.payload(slot), sizeof(r));
    return r;
  };
  // Admission: the three promises fill the limit to the byte; a fourth is refused.
  std::vector<std::string> handles;
  for (int s = 0; s < 3; ++s) {
    handles.push_back(Create(at, w));
    ASSERT_FALSE(handles.back().empty());
  }
  const v1::GetStatsResponse full = Stats();
  EXPECT_EQ(full.memory_used_bytes(), limit);
  EXPECT_EQ(full.memory_limit_bytes(), limit);
  v1::CreateSequenceRequest req;
  *req.mutable_geometry() = WorkloadGeometry(w);
  v1::CreateSequenceResponse resp;
  EXPECT_THAT(daemon_->stub().CreateSequence(ContextWithToken(at.token()).get(), req, &resp),
              GrpcStatusIs(grpc::StatusCode::RESOURCE_EXHAUSTED, HasSubstr("memory limit")));
  for (const std::string& h : handles) {
    // Every layer's prompt staged at once.
    std::vector<uint32_t> stages;
    for (uint32_t l = 0; l < w.layers; ++l) {
      absl::StatusOr<uint32_t> i = at.AcquireSlot();
      ASSERT_TRUE(i.ok());
      abi::SlotHeader* slot = at.slot(*i);
      slot->op = abi::kOpStage;
      std::memset(slot->handle, 0, sizeof(slot->handle));
      std::memcpy(slot->handle, h.data(), h.size());
      slot->tokens = prompt;
      slot->payload_bytes = 0;
      at.Submit(*i);
      stages.push_back(*i);
    }
    absl::SleepFor(absl::Milliseconds(300));
    int waiting = 0;
    for (uint32_t i : stages) waiting += at.Done(i) ? 0 : 1;
    EXPECT_EQ(waiting, 2) << "stages beyond the prefill depth (2 layers) wait";
    std::vector<uint32_t> prefills;
    for (uint32_t l = 0; l < w.layers; ++l) {
      ASSERT_OK(at.Wait(stages[l], absl::Seconds(60)));
      const abi::StageResponse st = stage_response(stages[l]);
      at.ReleaseSlot(stages[l]);
      fill(st, l, 0, prompt);
      absl::StatusOr<uint32_t> p = at.SubmitStaged(abi::kOpPrefill, h, l, st.buffer, prompt, 0);
      ASSERT_TRUE(p.ok());
      prefills.push_back(*p);
    }
    for (uint32_t p : prefills) ASSERT_OK(at.Finish(p));
    // Appends up to max_tokens, a select after each.
    std::vector<float> q(w.kv_heads * w.group * w.head_dim, 0.25f);
    for (uint32_t page = 0; page < w.appends; ++page) {
      for (uint32_t l = 0; l < w.layers; ++l) {
        absl::StatusOr<abi::StageResponse> st = at.Stage(h, 16);
        ASSERT_TRUE(st.ok()) << st.status();
        fill(*st, l, prompt + page * 16, 16);
        ASSERT_OK(at.Append(h, l, st->buffer, 16, prompt + page * 16));
        ASSERT_TRUE(at.Select(h, l, q.data(), q.size(), 0).ok());
      }
    }
  }
  // Not one refusal midway (the fourth creation is the only one), and once prefilled the
  // promises shrank to what the rest of each sequence can need.
  const v1::GetStatsResponse after = Stats();
  EXPECT_EQ(after.memory_rejections_total(), 1u);
  EXPECT_LT(after.memory_used_bytes(), limit);
  std::printf("limit %llu B = control %llu + 3 x promise %llu; after the runs %llu B in use\n",
              static_cast<unsigned long long>(limit), static_cast<unsigned long long>(control),
              static_cast<unsigned long long>(promise),
              static_cast<unsigned long long>(after.memory_used_bytes()));
}

// A sequence whose layers all stay on the accelerator still costs its fixed overhead: the
// limit bounds how many such sequences exist.
TEST_F(SecurityTest, AllFullKvSequencesAreCharged) {
  StartDaemon({}, "64MiB");
  auto a = daemon_->Attach();
  ASSERT_TRUE(a.ok());
  WorkloadOptions w;
  v1::SequenceGeometry g = WorkloadGeometry(w);
  g.set_full_kv_layers(g.num_layers());
  v1::CreateSequenceRequest req;
  *req.mutable_geometry() = g;
  v1::CreateSequenceResponse resp;
  ASSERT_TRUE(
      daemon_->stub().CreateSequence(ContextWithToken((*a)->token()).get(), req, &resp).ok());
  EXPECT_EQ(resp.sequence().kv_bytes(), 16u << 10);
}

// One HTTP/2 frame: 24-bit length, type, flags, stream id.
std::string Http2Frame(uint8_t type, uint8_t flags, uint32_t stream, const std::string& payload) {
  std::string f;
  const uint32_t n = static_cast<uint32_t>(payload.size());
  f += static_cast<char>(n >> 16);
  f += static_cast<char>(n >> 8);
  f += static_cast<char>(n);
  f += static_cast<char>(type);
  f += static_cast<char>(flags);
  for (int shift = 24; shift >= 0; shift -= 8) f += static_cast<char>((stream >> shift) & 0x7f);
  return f + payload;
}

// An HPACK literal header field without indexing, new name (lengths under 128).
std::string HpackLiteral(const std::string& name, const std::string& value) {
  return std::string(1, '\0') + static_cast<char>(name.size()) + name +
         static_cast<char>(value.size()) + value;
}

// A raw HTTP/2 connection to the control socket that opens `streams` gRPC calls, each an
// unfinished message declared `message_bytes` long, and writes their bodies for as long as
// flow control lets it within `deadline`; it never authenticates. Returns the bytes written.
uint64_t UnfinishedMessages(const std::string& socket_path, int streams, uint32_t message_bytes,
                            absl::Time deadline) {
  const int fd = ConnectRaw(socket_path);
  if (fd < 0 || ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK) != 0) {
    if (fd >= 0) ::close(fd);
    return 0;
  }
  uint64_t written = 0;
  // Written whole or not at all, until the deadline; what the daemon sends is drained.
  auto send_all = [&](const std::string& bytes) {
    size_t at = 0;
    char sink[65536];
    while (at < bytes.size()) {
      while (::recv(fd, sink, sizeof(sink), MSG_DONTWAIT) > 0) {
      }
      const ssize_t n = ::send(fd, bytes.data() + at, bytes.size() - at, MSG_NOSIGNAL);
      if (n > 0) {
        at += static_cast<size_t>(n);
        written += static_cast<uint64_t>(n);
        continue;
      }
      if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return false;
      if (absl::Now() > deadline) return false;
      absl::SleepFor(absl::Milliseconds(2));
    }
    return true;
  };
  const std::string headers =
      HpackLiteral(":method", "POST") + HpackLiteral(":scheme", "http") +
      HpackLiteral(":path", "/icecache.v1.IceCache/GetStats") + HpackLiteral(":authority", "x") +
      HpackLiteral("content-type", "application/grpc") + HpackLiteral("te", "trailers");
  bool open = send_all(std::string("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") + Http2Frame(4, 0, 0, "") +
                       Http2Frame(4, 1, 0, ""));
  const std::string chunk(16000, '\0');
  for (int i = 0; open && i < streams; ++i) {
    const uint32_t id = 1 + 2 * static_cast<uint32_t>(i);
    std::string prefix(5, '\0');
    for (int b = 0; b < 4; ++b) prefix[1 + b] = static_cast<char>(message_bytes >> (24 - 8 * b));
    open = send_all(Http2Frame(1, 4, id, headers) + Http2Frame(0, 0, id, prefix));
    for (uint64_t sent = 0; open && sent + chunk.size() < message_bytes; sent += chunk.size()) {
      open = send_all(Http2Frame(0, 0, id, chunk));
    }
  }
  // Held open a moment: what the daemon buffered for it is counted before it goes.
  absl::SleepFor(absl::Milliseconds(300));
  ::close(fd);
  return written;
}

// What a control connection makes the daemon hold before any handler sees a call is bounded:
// streams per connection, the size of a message and the control transport's memory. Eight
// connections of 64 streams, each an unfinished 1 MB message, never authenticated: before the
// bounds the daemon took them all (329 MiB resident at --memory-limit=64MiB; 1000 streams of
// 4 MB on one connection: 3.6 GiB); with them it stays near its own size, and still serves.
TEST_F(SecurityTest, UnfinishedControlMessagesCannotGrowTheDaemonPastItsBounds) {
  StartDaemon({}, "64MiB");
  // A client attached before the attack: it is still served after it (the daemon may close
  // its control connection under the transport's memory bound; the next call makes it again).
  ClientOptions co;
  co.socket = daemon_->socket_path();
  co.mode = ExecutionMode::kCpu;
  co.reconnect_timeout = absl::Seconds(30);
  auto client = Client::Attach(co);
  ASSERT_TRUE(client.ok()) << client.status();
  SequenceOptions so;
  so.num_layers = 2;
  so.num_q_heads = 4;
  so.num_kv_heads = 2;
  so.head_dim = 64;
  so.dtype = DType::kFP16;
  so.max_tokens = 512;
  so.label = "before";
  ASSERT_TRUE((*client)->CreateSequence(so).ok());  // its control connection is open
  const pid_t pid = daemon_->process().pid();
  const uint64_t before = PeakResidentBytes(pid);
  ASSERT_GT(before, 0u);
  const absl::Time deadline = absl::Now() + absl::Seconds(4);
  std::vector<std::thread> attackers;
  std::atomic<uint64_t> written{0};
  for (int c = 0; c < 8; ++c) {
    attackers.emplace_back(
        [&] { written += UnfinishedMessages(daemon_->socket_path(), 64, 1000000, deadline); });
  }
  for (std::thread& t : attackers) t.join();
  const uint64_t peak = PeakResidentBytes(pid);
  std::printf("unfinished control messages: %llu MiB written, daemon peak %llu MiB (+%llu)\n",
              static_cast<unsigned long long>(written.load() >> 20),
              static_cast<unsigned long long>(peak >> 20),
              static_cast<unsigned long long>((peak - before) >> 20));
  EXPECT_GT(written.load(), uint64_t{1} << 20) << "the attack never got going";
  EXPECT_LT(peak, before + (uint64_t{160} << 20))
      << "the daemon held " << ((peak - before) >> 20) << " MiB for " << (written.load() >> 20)
      << " MiB of unfinished messages";
  ASSERT_TRUE(daemon_->process().Running());
  const absl::Time start = absl::Now();
  so.label = "after";
  auto seq = (*client)->CreateSequence(so);
  EXPECT_TRUE(seq.ok()) << seq.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  EXPECT_EQ((*client)->recovery().recoveries, 0u);
  // A message larger than a control request can be is refused as such.
  v1::CreateSequenceRequest big;
  big.set_label(std::string(size_t{2} << 20, 'x'));
  v1::CreateSequenceResponse resp;
  auto channel = grpc::CreateChannel(daemon_->target(), grpc::InsecureChannelCredentials());
  auto stub = v1::IceCache::NewStub(channel);
  auto ctx = ContextWithDeadline();
  ctx->set_wait_for_ready(true);
  const grpc::Status st = stub->CreateSequence(ctx.get(), big, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << st.error_message();
}

// A daemon out of file descriptors closes the connections it cannot take instead of spinning
// on them: accept4 failed EMFILE, left the connection in the backlog, and poll reported it
// again at once (a core at 100% and 76 MB of log in 3 s, with local users holding idle control
// connections against a descriptor limit of 128). Both accept loops, the control socket's and
// the attach socket's. It serves again once descriptors are free.
TEST_F(SecurityTest, ADaemonOutOfDescriptorsShedsConnectionsInsteadOfSpinning) {
  DaemonConfig config;
  config.wrapper = {"/usr/bin/prlimit", "--nofile=64:64"};
  auto d = DaemonProcess::Start(dir_.path(), config);
  ASSERT_TRUE(d.ok()) << d.status();
  daemon_ = std::move(*d);
  const pid_t pid = daemon_->process().pid();
  // Idle HTTP/2 connections (preface and SETTINGS, then nothing): gRPC keeps them open.
  const std::string hello =
      std::string("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") + Http2Frame(4, 0, 0, "");
  std::vector<int> held;
  for (int i = 0; i < 60; ++i) {
    const int fd = ConnectRaw(daemon_->socket_path());
    ASSERT_GE(fd, 0) << std::strerror(errno);
    ASSERT_EQ(::send(fd, hello.data(), hello.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(hello.size()));
    held.push_back(fd);
  }
  absl::SleepFor(absl::Milliseconds(500));  // every connection taken or shed
  double cpu = CpuSeconds(pid);
  size_t log = daemon_->process().Stderr().size();
  absl::SleepFor(absl::Seconds(2));
  EXPECT_LT(CpuSeconds(pid) - cpu, 0.3) << "the daemon spun while out of descriptors";
  EXPECT_LT(daemon_->process().Stderr().size() - log, size_t{4096});
  EXPECT_TRUE(
      absl::StrContains(daemon_->process().Stderr(), "control accept: out of file descriptors"));
  // Attach connections now find no descriptor either: each is shed (closed), none spins.
  const std::string attach = AttachSocketPath(daemon_->socket_path());
  std::vector<int> attaching;
  for (int i = 0; i < 16; ++i) {
    const int fd = ConnectRaw(attach);
    ASSERT_GE(fd, 0) << std::strerror(errno);
    attaching.push_back(fd);
  }
  absl::SleepFor(absl::Milliseconds(500));
  cpu = CpuSeconds(pid);
  log = daemon_->process().Stderr().size();
  absl::SleepFor(absl::Seconds(2));
  EXPECT_LT(CpuSeconds(pid) - cpu, 0.3) << "the attach loop spun while out of descriptors";
  EXPECT_LT(daemon_->process().Stderr().size() - log, size_t{4096});
  EXPECT_TRUE(
      absl::StrContains(daemon_->process().Stderr(), "attach accept: out of file descriptors"));
  for (int fd : attaching) {
    EXPECT_GE(SecondsUntilClosed(fd, 5), 0.0) << "an attach connection was neither served nor shed";
    ::close(fd);
  }
  for (int fd : held) ::close(fd);
  auto channel = grpc::CreateChannel(daemon_->target(), grpc::InsecureChannelCredentials());
  auto stub = v1::IceCache::NewStub(channel);
  auto ctx = ContextWithDeadline(10);
  ctx->set_wait_for_ready(true);
  v1::GetConfigResponse cfg;
  const grpc::Status st = stub->GetConfig(ctx.get(), v1::GetConfigRequest(), &cfg);
  EXPECT_TRUE(st.ok()) << st.error_code() << " " << st.error_message();
  // And clients attach again.
  absl::StatusOr<std::unique_ptr<Attachment>> a = AttachWithin(absl::Seconds(10));
  EXPECT_TRUE(a.ok()) << a.status();
}

// Connections to the control socket that never begin HTTP/2 held one of their uid's places
// for as long as their peer kept them open (gRPC starts no handshake deadline on a connection
// handed to it by descriptor): a stuck process of the engine's uid could lock the engine out
// of the control API. Now they are held before gRPC sees them and closed at the handshake
// timeout, and the uid's next call is served.
TEST_F(SecurityTest, ControlConnectionsThatNeverSpeakAreClosedAtTheHandshakeTimeout) {
  StartDaemon({"--handshake-timeout=1s", "--max-control-connections-per-uid=9"});
  Stats();  // the test's own channel is open: one of the uid's 9 places
  const absl::Time start = absl::Now();
  std::vector<int> silent;
  for (int i = 0; i < 8; ++i) {
    const int fd = ConnectRaw(daemon_->socket_path());
    ASSERT_GE(fd, 0) << std::strerror(errno);
    silent.push_back(fd);
  }
  // The uid's places are taken: a new channel of the same uid is refused at accept while the
  // silent ones are held.
  auto channel = grpc::CreateChannel(daemon_->target(), grpc::InsecureChannelCredentials());
  auto stub = v1::IceCache::NewStub(channel);
  v1::GetConfigResponse cfg;
  const grpc::Status locked_out =
      stub->GetConfig(ContextWithDeadline(0.3).get(), v1::GetConfigRequest(), &cfg);
  const double locked_at = absl::ToDoubleSeconds(absl::Now() - start);
  if (locked_at < 0.9) {  // only meaningful while the silent ones are surely held
    EXPECT_EQ(locked_out.error_code(), grpc::StatusCode::UNAVAILABLE) << locked_out.error_message();
  }
  for (int fd : silent) {
    ASSERT_GE(SecondsUntilClosed(fd, 10), 0.0) << "a silent connection stayed open";
    const double closed_at = absl::ToDoubleSeconds(absl::Now() - start);
    EXPECT_GT(closed_at, 0.9);
    EXPECT_LT(closed_at, 4.0);
    ::close(fd);
  }
  absl::StatusOr<std::string> m = Metrics();
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(MetricValue(*m, "icecache_control_preface_timeouts_total"), 8.0);
  EXPECT_EQ(MetricValue(*m, "icecache_control_bad_prefaces_total"), 0.0);
  EXPECT_GE(MetricValue(*m, "icecache_control_connections_refused_total"), 1.0);
  // Their places are free again: the same uid is served.
  auto ctx = ContextWithDeadline(10);
  ctx->set_wait_for_ready(true);
  const grpc::Status served = stub->GetConfig(ctx.get(), v1::GetConfigRequest(), &cfg);
  EXPECT_TRUE(served.ok()) << served.error_code() << " " << served.error_message();
  EXPECT_TRUE(absl::StrContains(daemon_->process().Stderr(),
                                "control connection(s) that did not begin HTTP/2 within 1s"));
}

// Something other than HTTP/2 is closed as soon as its first bytes show it, before gRPC sees
// it; part of the preface then silence waits out the timeout, part of it then the end of the
// peer's writing is closed at once; a preface that comes in two pieces is handed over whole,
// with its bytes, and the daemon answers its SETTINGS.
TEST_F(SecurityTest, TheControlSocketTakesOnlyTheHttp2Preface) {
  StartDaemon({"--handshake-timeout=1s"});
  const std::string preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
  const int http1 = ConnectRaw(daemon_->socket_path());
  ASSERT_GE(http1, 0);
  const std::string get = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
  ASSERT_EQ(::send(http1, get.data(), get.size(), MSG_NOSIGNAL), static_cast<ssize_t>(get.size()));
  const double http1_closed = SecondsUntilClosed(http1, 10);
  EXPECT_GE(http1_closed, 0.0);
  EXPECT_LT(http1_closed, 0.5);
  ::close(http1);

  const int half = ConnectRaw(daemon_->socket_path());
  ASSERT_GE(half, 0);
  ASSERT_EQ(::send(half, preface.data(), 10, MSG_NOSIGNAL), 10);
  const double half_closed = SecondsUntilClosed(half, 10);
  EXPECT_GT(half_closed, 0.8);
  EXPECT_LT(half_closed, 4.0);
  ::close(half);

  // Part of the preface, then the peer stops writing (shutdown) or goes away (close): it can
  // never be whole, so it is closed at once, not at the timeout (a closed one used to be
  // reported by poll on every turn until then).
  const int stopped = ConnectRaw(daemon_->socket_path());
  ASSERT_GE(stopped, 0);
  ASSERT_EQ(::send(stopped, preface.data(), 10, MSG_NOSIGNAL), 10);
  ASSERT_EQ(::shutdown(stopped, SHUT_WR), 0);
  const double stopped_closed = SecondsUntilClosed(stopped, 10);
  EXPECT_GE(stopped_closed, 0.0);
  EXPECT_LT(stopped_closed, 0.5);
  ::close(stopped);
  const pid_t pid = daemon_->process().pid();
  const double cpu = CpuSeconds(pid);
  const int gone = ConnectRaw(daemon_->socket_path());
  ASSERT_GE(gone, 0);
  ASSERT_EQ(::send(gone, preface.data(), 10, MSG_NOSIGNAL), 10);
  ::close(gone);
  absl::SleepFor(absl::Seconds(1.5));  // past the timeout
  EXPECT_LT(CpuSeconds(pid) - cpu, 0.3) << "the daemon spun on a peer that went away";

  const int split = ConnectRaw(daemon_->socket_path());
  ASSERT_GE(split, 0);
  ASSERT_EQ(::send(split, preface.data(), 10, MSG_NOSIGNAL), 10);
  absl::SleepFor(absl::Milliseconds(200));
  const std::string rest = preface.substr(10) + Http2Frame(4, 0, 0, "");
  ASSERT_EQ(::send(split, rest.data(), rest.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(rest.size()));
  // gRPC's first frame is its SETTINGS (type 4 on stream 0).
  timeval tv{};
  tv.tv_sec = 5;
  ::setsockopt(split, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  unsigned char frame[9] = {};
  ASSERT_EQ(::recv(split, frame, sizeof(frame), MSG_WAITALL), 9) << std::strerror(errno);
  EXPECT_EQ(frame[3], 4);
  EXPECT_EQ(frame[5] | frame[6] | frame[7] | frame[8], 0);
  // Past the handshake timeout it is gRPC's and stays open.
  EXPECT_EQ(SecondsUntilClosed(split, 2), -1.0);
  ::close(split);

  absl::StatusOr<std::string> m = Metrics();
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(MetricValue(*m, "icecache_control_bad_prefaces_total"), 3.0);
  EXPECT_EQ(MetricValue(*m, "icecache_control_preface_timeouts_total"), 1.0);
}

// Refusals are logged at most once per 10 s with their count: any local uid can connect to
// both sockets, and one line per refused connection (as before) let it write the daemon's log
// as fast as it could reconnect. 300 control connections over the uid's limit and 300 attaches
// over its client limit: every one refused and counted, two lines of log.
TEST_F(SecurityTest, RefusedConnectionsAreLoggedOncePerPeriodNotOneLineEach) {
  StartDaemon({"--max-control-connections-per-uid=1", "--max-clients-per-uid=1"});
  Stats();  // the test's own channel holds the uid's one control place
  auto held = daemon_->Attach();
  ASSERT_TRUE(held.ok()) << held.status();  // and its one client place
  const size_t log_before = daemon_->process().Stderr().size();
  for (int i = 0; i < 300; ++i) {
    const int fd = ConnectRaw(daemon_->socket_path());
    ASSERT_GE(fd, 0) << std::strerror(errno);
    EXPECT_GE(SecondsUntilClosed(fd, 5), 0.0);  // closed at accept
    ::close(fd);
  }
  for (int i = 0; i < 300; ++i) {
    EXPECT_THAT(daemon_->Attach(), StatusIs(absl::StatusCode::kResourceExhausted,
                                            HasSubstr("has its maximum of 1 attached clients")));
  }
  absl::StatusOr<std::string> m = Metrics();
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(MetricValue(*m, "icecache_control_connections_refused_total"), 300.0);
  EXPECT_EQ(MetricValue(*m, "icecache_attach_total{result=\"refused\"}"), 300.0);
  const std::string log = daemon_->process().Stderr().substr(log_before);
  EXPECT_LT(log.size(), size_t{1024}) << log.substr(0, 2048);
  EXPECT_THAT(log, HasSubstr("refused: it holds 1 already; 1 refused since the last report"));
  EXPECT_THAT(log, HasSubstr("has its maximum of 1 attached clients (1 refused since the last"));
}

}  // namespace
}  // namespace icecache::testing
