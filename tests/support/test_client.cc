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
//   --as-uid=UID                                            drop to this uid (and gid) first
// Errors print "error: <code>: <message>" and exit 3.
#include <grp.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "icecache/attachment.h"
#include "icecache/client.h"
#include "tests/integration/client_data.h"
#include "tests/support/workload.h"

ABSL_FLAG(std::string, socket, "", "The daemon's control socket.");
ABSL_FLAG(std::string, mode, "workload", "workload | attach | hold-prefill | async-decode");
ABSL_FLAG(uint64_t, seed, 1, "Workload seed.");
ABSL_FLAG(uint32_t, tokens, 3000, "Workload tokens.");
ABSL_FLAG(int, as_uid, -1, "Drop privileges to this uid/gid before attaching.");

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
  if (absl::GetFlag(FLAGS_mode) == "async-decode") return AsyncDecode(absl::GetFlag(FLAGS_socket));
  icecache::Attachment::Options o;
  o.socket = absl::GetFlag(FLAGS_socket);
  absl::StatusOr<std::unique_ptr<icecache::Attachment>> a = icecache::Attachment::Attach(o);
  if (!a.ok()) return Fail(a.status());
  const std::string mode = absl::GetFlag(FLAGS_mode);
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
