// icecache_test_client: a real client process for the integration tests.
//
//   --socket=PATH --mode=workload [--seed=N] [--tokens=N]   run the scripted workload, print
//                                                           its selections, exit 0
//   --socket=PATH --mode=attach                             attach and exit 0 ("attached")
//   --socket=PATH --mode=hold-prefill [--tokens=N]          submit a large prefill, print
//                                                           "submitted", then wait forever
//   --socket=PATH --mode=async-decode                       the client library, one step
//                                                           ahead: prefill 2 layers, decode
//                                                           17 steps, print "in-flight
//                                                           <handle>" with a select and a
//                                                           hand-over in flight, wait forever
//   --socket=PATH --mode=hold-silent --connections=N        connect N times to the attach
//                                                           socket, send nothing, print
//                                                           "held N", then wait forever
//   --socket=PATH --mode=use-token --token=T                ListSequences and CreateSequence
//                                                           on the control socket with
//                                                           someone's token; print each code
//   --socket=PATH --mode=churn --seconds=S [--sequences=N]  attach, run the workload on N
//                                                           sequences, detach; again until S
//                                                           seconds pass; print "cycles C
//                                                           errors E" (and each error)
//   --as-uid=UID                                            drop to this uid (and gid) first
// Errors print "error: <code>: <message>" and exit 3.
#include <grp.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/paths.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "icecache/attachment.h"
#include "icecache/client.h"
#include "tests/integration/client_data.h"
#include "tests/support/workload.h"

ABSL_FLAG(std::string, socket, "", "The daemon's control socket.");
ABSL_FLAG(std::string, mode, "workload",
          "workload | attach | hold-prefill | async-decode | hold-silent | use-token | churn");
ABSL_FLAG(uint64_t, seed, 1, "Workload seed.");
ABSL_FLAG(uint32_t, tokens, 3000, "Workload tokens.");
ABSL_FLAG(int, as_uid, -1, "Drop privileges to this uid/gid before attaching.");
ABSL_FLAG(uint32_t, connections, 64, "hold-silent: connections to hold.");
ABSL_FLAG(std::string, token, "", "use-token: the attachment token to present.");
ABSL_FLAG(double, seconds, 10, "churn: how long to keep cycling.");
ABSL_FLAG(uint32_t, sequences, 4, "churn: sequences per attachment.");

namespace {

int Fail(const absl::Status& s) {
  std::printf("error: %s: %s\n", absl::StatusCodeToString(s.code()).c_str(),
              std::string(s.message()).c_str());
  std::fflush(stdout);
  return 3;
}

// Decodes one step ahead until a select and a window hand-over are in flight, then waits to
// be killed.
int AsyncDecode(const std::string& socket) {
  using icecache::testing::Data;
  const Data data = icecache::testing::MakeData(2, 2, 2, 64, 1100, icecache::DType::kBF16);
  icecache::ClientOptions co;
  co.socket = socket;
  co.mode = icecache::ExecutionMode::kCpu;
  auto client = icecache::Client::Attach(co);
  if (!client.ok()) return Fail(client.status());
  icecache::SequenceOptions so;
  so.num_layers = 2;
  so.num_q_heads = data.q_heads();
  so.num_kv_heads = data.kv;
  so.head_dim = data.d;
  so.dtype = data.dtype;
  so.max_tokens = data.tokens;
  so.budget_tokens = 128;
  so.full_kv_layers = 0;
  so.selection = icecache::SelectionMode::kAsync;
  auto seq = (*client)->CreateSequence(so);
  if (!seq.ok()) return Fail(seq.status());
  constexpr uint32_t kPrompt = 1000;
  for (uint32_t l = 0; l < 2; ++l) {
    absl::Status s = (*seq)->Prefill(l, data.K(l, 0), data.V(l, 0), kPrompt);
    if (!s.ok()) return Fail(s);
  }
  std::vector<uint16_t> out(size_t{data.q_heads()} * data.d);
  for (uint32_t step = 0; step <= 16; ++step) {  // steps 0 and 16 hand a window page over
    for (uint32_t l = 0; l < 2; ++l) {
      const std::vector<uint16_t> q = data.Query(l, step);
      absl::Status s = (*seq)->Decode(l, q.data(), data.K(l, kPrompt + step),
                                      data.V(l, kPrompt + step), out.data());
      if (!s.ok()) return Fail(s);
    }
  }
  std::printf("in-flight %s\n", (*seq)->handle().c_str());
  std::fflush(stdout);
  while (true) std::this_thread::sleep_for(std::chrono::seconds(1));
}

std::string CodeName(grpc::StatusCode code) {
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

// Connections that never send their attach request (a hostile or stuck process).
int HoldSilent(const std::string& control_socket) {
  const std::string path = icecache::AttachSocketPath(control_socket);
  std::vector<int> held;
  for (uint32_t i = 0; i < absl::GetFlag(FLAGS_connections); ++i) {
    const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), std::min(path.size(), sizeof(addr.sun_path) - 1));
    if (fd >= 0 && ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
      held.push_back(fd);
    } else if (fd >= 0) {
      ::close(fd);
    }
  }
  std::printf("held %zu\n", held.size());
  std::fflush(stdout);
  while (true) std::this_thread::sleep_for(std::chrono::seconds(1));
}

// Control calls with a token this process did not get (one leaked from another uid).
int UseToken(const std::string& control_socket) {
  auto channel = grpc::CreateChannel("unix:" + control_socket, grpc::InsecureChannelCredentials());
  auto stub = icecache::v1::IceCache::NewStub(channel);
  const std::string token = absl::GetFlag(FLAGS_token);
  auto context = [&] {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    ctx->AddMetadata(icecache::abi::kTokenMetadataKey, token);
    return ctx;
  };
  icecache::v1::ListSequencesResponse list;
  const grpc::Status ls = stub->ListSequences(context().get(), {}, &list);
  std::printf("list: %s: %s\n", CodeName(ls.error_code()).c_str(), ls.error_message().c_str());
  icecache::v1::CreateSequenceRequest req;
  *req.mutable_geometry() = icecache::testing::WorkloadGeometry({});
  icecache::v1::CreateSequenceResponse resp;
  const grpc::Status cs = stub->CreateSequence(context().get(), req, &resp);
  std::printf("create: %s: %s\n", CodeName(cs.error_code()).c_str(), cs.error_message().c_str());
  icecache::v1::GetStatsResponse stats;
  const grpc::Status gs = stub->GetStats(context().get(), {}, &stats);
  std::printf("stats: %s\n", CodeName(gs.error_code()).c_str());
  std::fflush(stdout);
  return 0;
}

// A healthy client that keeps attaching, working and detaching (the soak's).
int Churn(const std::string& control_socket) {
  auto channel = grpc::CreateChannel("unix:" + control_socket, grpc::InsecureChannelCredentials());
  auto stub = icecache::v1::IceCache::NewStub(channel);
  const absl::Time until = absl::Now() + absl::Seconds(absl::GetFlag(FLAGS_seconds));
  uint64_t cycles = 0, errors = 0;
  uint64_t seed = absl::GetFlag(FLAGS_seed);
  while (absl::Now() < until) {
    icecache::Attachment::Options o;
    o.socket = control_socket;
    absl::StatusOr<std::unique_ptr<icecache::Attachment>> a = icecache::Attachment::Attach(o);
    if (!a.ok()) {
      ++errors;
      std::printf("error: attach: %s\n", a.status().ToString().c_str());
      continue;
    }
    for (uint32_t s = 0; s < absl::GetFlag(FLAGS_sequences); ++s) {
      icecache::testing::WorkloadOptions w;
      w.seed = seed++;
      w.tokens = absl::GetFlag(FLAGS_tokens);
      absl::StatusOr<icecache::testing::Selections> got =
          icecache::testing::RunWorkload(**a, *stub, w);
      if (!got.ok()) {
        ++errors;
        std::printf("error: workload: %s\n", got.status().ToString().c_str());
      }
    }
    ++cycles;
    std::printf("cycle %llu\n", static_cast<unsigned long long>(cycles));
    std::fflush(stdout);
  }
  std::printf("cycles %llu errors %llu\n", static_cast<unsigned long long>(cycles),
              static_cast<unsigned long long>(errors));
  return errors == 0 ? 0 : 3;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int uid = absl::GetFlag(FLAGS_as_uid);
  if (uid >= 0) {
    if (::setgroups(0, nullptr) != 0 || ::setresgid(uid, uid, uid) != 0 ||
        ::setresuid(uid, uid, uid) != 0) {
      std::printf("error: cannot become uid %d: %s\n", uid, std::strerror(errno));
      return 4;
    }
  }
  const std::string mode = absl::GetFlag(FLAGS_mode);
  if (mode == "async-decode") return AsyncDecode(absl::GetFlag(FLAGS_socket));
  if (mode == "hold-silent") return HoldSilent(absl::GetFlag(FLAGS_socket));
  if (mode == "use-token") return UseToken(absl::GetFlag(FLAGS_socket));
  if (mode == "churn") return Churn(absl::GetFlag(FLAGS_socket));
  icecache::Attachment::Options o;
  o.socket = absl::GetFlag(FLAGS_socket);
  absl::StatusOr<std::unique_ptr<icecache::Attachment>> a = icecache::Attachment::Attach(o);
  if (!a.ok()) return Fail(a.status());
  if (mode == "attach") {
    std::printf("attached\n");
    return 0;
  }
  auto channel = grpc::CreateChannel("unix:" + o.socket, grpc::InsecureChannelCredentials());
  auto stub = icecache::v1::IceCache::NewStub(channel);
  icecache::testing::WorkloadOptions w;
  w.seed = absl::GetFlag(FLAGS_seed);
  w.tokens = absl::GetFlag(FLAGS_tokens);
  if (mode == "workload") {
    absl::StatusOr<icecache::testing::Selections> s = icecache::testing::RunWorkload(**a, *stub, w);
    if (!s.ok()) return Fail(s.status());
    std::printf("%s", icecache::testing::FormatSelections(*s).c_str());
    return 0;
  }
  if (mode == "hold-prefill") {
    w.layers = 1;
    w.appends = 0;
    w.head_dim = 128;
    w.kv_heads = 4;
    const icecache::eval::Trace t = icecache::testing::WorkloadTrace(w);
    icecache::v1::CreateSequenceRequest req;
    *req.mutable_geometry() = icecache::testing::WorkloadGeometry(w);
    icecache::v1::CreateSequenceResponse resp;
    grpc::ClientContext ctx;
    ctx.AddMetadata(icecache::abi::kTokenMetadataKey, (*a)->token());
    grpc::Status gs = stub->CreateSequence(&ctx, req, &resp);
    if (!gs.ok()) return Fail(absl::InternalError(gs.error_message()));
    const std::string handle = resp.sequence().handle();
    absl::StatusOr<icecache::abi::StageResponse> st = (*a)->Stage(handle, w.tokens);
    if (!st.ok()) return Fail(st.status());
    absl::StatusOr<uint8_t*> base = (*a)->Address(st->buffer, st->bytes);
    if (!base.ok()) return Fail(base.status());
    const uint64_t row = 128 * 2;
    for (uint32_t h = 0; h < 4; ++h) {
      std::memcpy(*base + uint64_t{h} * w.tokens * row, t.Keys(0, h).data, w.tokens * row);
      std::memcpy(*base + st->v_offset + uint64_t{h} * w.tokens * row, t.Values(0, h).data,
                  w.tokens * row);
    }
    absl::StatusOr<uint32_t> slot = (*a)->AcquireSlot();
    if (!slot.ok()) return Fail(slot.status());
    icecache::abi::SlotHeader* s = (*a)->slot(*slot);
    s->op = icecache::abi::kOpPrefill;
    std::memset(s->handle, 0, sizeof(s->handle));
    std::memcpy(s->handle, handle.data(), handle.size());
    s->layer = 0;
    s->tokens = w.tokens;
    s->staging = st->buffer;
    s->first_position = 0;
    (*a)->Submit(*slot);
    std::printf("submitted\n");
    std::fflush(stdout);
    while (true) std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  return Fail(absl::InvalidArgumentError(absl::StrCat("unknown mode ", mode)));
}
