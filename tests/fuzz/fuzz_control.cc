// libFuzzer target: every control RPC's request. An in-process daemon (the real gRPC server,
// control socket listener and service) gets the input's bytes as the body of the method the
// first byte picks, under the identity the second byte picks (the client's token, an
// operator's, none, or a made-up one). Every call must end with a status (a body that does
// not parse: INVALID_ARGUMENT), never a crash or a sanitizer report; what a call created is
// dropped again so that inputs do not pile state up.
#include <algorithm>
#include <condition_variable>
#include <iterator>
#include <mutex>
#include <string>

#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/security/credentials.h"
#include "icecache/attachment.h"
#include "icecache/v1/icecache.grpc.pb.h"
#include "proto/icecache/v1/abi.h"
#include "server/core/clock.h"
#include "server/main/daemon.h"
#include "tests/fuzz/fuzz_support.h"

namespace icecache::fuzz {
namespace {

constexpr const char* kMethods[] = {"CreateSequence", "GetSequence", "ListSequences",
                                    "DropSequence",   "GetStats",    "GetConfig",
                                    "RestoreSequence"};

struct World {
  World() {
    const std::string dir = PrivateDir();
    DaemonOptions o;
    o.socket_path = dir + "/icecached.sock";
    o.metrics_port = -1;
    o.memory_limit_bytes = uint64_t{1} << 30;
    o.shutdown_grace = absl::ZeroDuration();
    o.workers = 1;
    o.control_rate = 0;
    o.log_level = "error";
    auto d = Daemon::Start(o, RealClock::Get());
    if (!d.ok()) ::abort();
    daemon = std::move(*d);
    Attachment::Options ao;
    ao.socket = o.socket_path;
    client = std::move(*Attachment::Attach(ao));
    ao.as_operator = true;
    op = std::move(*Attachment::Attach(ao));
    channel = grpc::CreateChannel("unix:" + o.socket_path, grpc::InsecureChannelCredentials());
    stub = std::make_unique<grpc::GenericStub>(channel);
  }
  std::unique_ptr<Daemon> daemon;
  std::unique_ptr<Attachment> client, op;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<grpc::GenericStub> stub;
};

World& TheWorld() {
  static World* w = new World();
  return *w;
}

grpc::Status Call(World& w, const std::string& method, const std::string& token,
                  const std::string& body, std::string* out) {
  grpc::Slice slice(body.data(), body.size());
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  if (!token.empty()) ctx.AddMetadata(abi::kTokenMetadataKey, token);
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  grpc::Status status;
  w.stub->UnaryCall(&ctx, "/icecache.v1.IceCache/" + method, grpc::StubOptions(), &request,
                    &response, [&](grpc::Status s) {
                      std::lock_guard<std::mutex> lock(mu);
                      status = std::move(s);
                      done = true;
                      cv.notify_all();
                    });
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return done; });
  if (status.ok() && out != nullptr) {
    std::vector<grpc::Slice> slices;
    (void)response.Dump(&slices);
    for (const grpc::Slice& s : slices)
      out->append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return status;
}

}  // namespace
}  // namespace icecache::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace icecache;
  if (size < 2) return 0;
  fuzz::World& w = fuzz::TheWorld();
  const std::string method = fuzz::kMethods[data[0] % std::size(fuzz::kMethods)];
  std::string token;
  switch (data[1] % 4) {
    case 0:
      token = w.client->token();
      break;
    case 1:
      token = w.op->token();
      break;
    case 2:
      break;
    default:
      // Made up from the input, in the printable ASCII a metadata value may hold (gRPC's client
      // asserts on anything else before the daemon sees it).
      for (size_t i = 1; i < std::min<size_t>(size, 41); ++i) {
        token.push_back(static_cast<char>(0x20 + data[i] % 95));
      }
  }
  const std::string body(reinterpret_cast<const char*>(data + 2), size - 2);
  std::string out;
  const grpc::Status s = fuzz::Call(w, method, token, body, &out);
  if (s.error_code() == grpc::StatusCode::UNIMPLEMENTED ||
      s.error_code() == grpc::StatusCode::UNKNOWN) {
    ::abort();  // every method is served, and every failure has its code
  }
  if (method == "CreateSequence" && s.ok()) {
    v1::CreateSequenceResponse created;
    if (!created.ParseFromString(out)) ::abort();
    v1::DropSequenceRequest drop;
    drop.set_handle(created.sequence().handle());
    if (!fuzz::Call(w, "DropSequence", token, drop.SerializeAsString(), nullptr).ok()) ::abort();
  }
  return 0;
}
