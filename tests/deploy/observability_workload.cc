// icecache_observability_workload: the real client library driving a real icecached, for the
// end-to-end observability test (tests/deploy/observability_e2e.py), and a probe of what the
// TCP control listener answers without a client token.
//
//   --mode=workload --socket=PATH --out=FILE
//       Attaches in CPU mode, creates a sequence, prefills every layer and decodes --steps
//       steps (select + fetch + attention each offloaded layer and step: cache hits and misses,
//       fetched bytes, window pages handed over to the daemon's index), paced so that a
//       Prometheus scraping every second sees the counters move. Also makes two control calls
//       fail on purpose: one INVALID_ARGUMENT (a geometry without KV heads) and one
//       RESOURCE_EXHAUSTED (a sequence larger than the memory limit). Then writes its own
//       counters as JSON to FILE, prints "ready", and keeps the client attached and the
//       sequence alive until its standard input closes.
//   --mode=tcp-exposure --address=HOST:PORT
//       Calls every service on the TCP listener without a token and prints, as JSON, the status
//       code of each call (and the services reflection lists).
// Exit status 0 when the run went as described, 1 otherwise (the reason on stderr).
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "icecache/attachment.h"
#include "icecache/client.h"
#include "icecache/v1/icecache.grpc.pb.h"
#include "proto/icecache/v1/abi.h"
#include "tests/integration/client_data.h"

ABSL_FLAG(std::string, mode, "workload", "workload | tcp-exposure");
ABSL_FLAG(std::string, socket, "", "The daemon's control socket (workload).");
ABSL_FLAG(std::string, address, "", "The daemon's TCP control address host:port (tcp-exposure).");
ABSL_FLAG(std::string, out, "", "Where the workload writes its counters (JSON).");
ABSL_FLAG(uint32_t, prompt, 1500, "Prompt tokens.");
ABSL_FLAG(uint32_t, steps, 48, "Decode steps (every layer each step).");
ABSL_FLAG(uint32_t, step_pause_ms, 40, "Pause between decode steps.");

namespace {

namespace v1 = ::icecache::v1;

constexpr uint32_t kLayers = 3, kKvHeads = 2, kGroup = 2, kHeadDim = 64, kFullKvLayers = 1;

int Fail(const std::string& what, const absl::Status& s) {
  std::cerr << "icecache_observability_workload: " << what << ": " << s << "\n";
  return 1;
}

std::string CodeName(grpc::StatusCode code) {
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

// One control call without a token; returns the status code's name.
template <typename Request, typename Response, typename Method>
std::string Call(v1::IceCache::Stub& stub, Method method, const Request& request) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  Response response;
  return CodeName((stub.*method)(&ctx, request, &response).error_code());
}

std::string Health(const std::shared_ptr<grpc::Channel>& channel, const std::string& service) {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  const grpc::Status s = stub->Check(&ctx, request, &response);
  if (!s.ok()) return CodeName(s.error_code());
  return grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status());
}

std::vector<std::string> ReflectionServices(const std::shared_ptr<grpc::Channel>& channel,
                                            std::string* code) {
  auto stub = grpc::reflection::v1alpha::ServerReflection::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  auto stream = stub->ServerReflectionInfo(&ctx);
  grpc::reflection::v1alpha::ServerReflectionRequest request;
  request.set_list_services("*");
  std::vector<std::string> names;
  grpc::reflection::v1alpha::ServerReflectionResponse response;
  if (stream->Write(request) && stream->Read(&response)) {
    for (const auto& s : response.list_services_response().service()) names.push_back(s.name());
  }
  stream->WritesDone();
  *code = CodeName(stream->Finish().error_code());
  return names;
}

std::string Quoted(const std::string& s) { return absl::StrCat("\"", s, "\""); }

int TcpExposure(const std::string& address) {
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(5))) {
    return Fail("connect", absl::UnavailableError(absl::StrCat("nothing answers at ", address)));
  }
  auto stub = v1::IceCache::NewStub(channel);
  std::vector<std::pair<std::string, std::string>> codes;
  codes.emplace_back("Health.Check", Health(channel, ""));
  codes.emplace_back("Health.Check(icecache.v1.IceCache)", Health(channel, "icecache.v1.IceCache"));
  codes.emplace_back("GetStats", Call<v1::GetStatsRequest, v1::GetStatsResponse>(
                                     *stub, &v1::IceCache::Stub::GetStats, v1::GetStatsRequest()));
  codes.emplace_back("GetConfig",
                     Call<v1::GetConfigRequest, v1::GetConfigResponse>(
                         *stub, &v1::IceCache::Stub::GetConfig, v1::GetConfigRequest()));
  v1::CreateSequenceRequest create;
  v1::SequenceGeometry* g = create.mutable_geometry();
  g->set_num_layers(1);
  g->set_num_q_heads(1);
  g->set_num_kv_heads(1);
  g->set_head_dim(64);
  g->set_dtype(v1::DTYPE_BF16);
  g->set_max_tokens(64);
  codes.emplace_back("CreateSequence", Call<v1::CreateSequenceRequest, v1::CreateSequenceResponse>(
                                           *stub, &v1::IceCache::Stub::CreateSequence, create));
  codes.emplace_back("ListSequences",
                     Call<v1::ListSequencesRequest, v1::ListSequencesResponse>(
                         *stub, &v1::IceCache::Stub::ListSequences, v1::ListSequencesRequest()));
  v1::GetSequenceRequest get;
  get.set_handle("seq_00000000000000000000000000000000");
  codes.emplace_back("GetSequence", Call<v1::GetSequenceRequest, v1::GetSequenceResponse>(
                                        *stub, &v1::IceCache::Stub::GetSequence, get));
  v1::DropSequenceRequest drop;
  drop.set_handle("seq_00000000000000000000000000000000");
  codes.emplace_back("DropSequence", Call<v1::DropSequenceRequest, v1::DropSequenceResponse>(
                                         *stub, &v1::IceCache::Stub::DropSequence, drop));
  // A made-up token is no better than none.
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata(icecache::abi::kTokenMetadataKey, "00000000000000000000000000000000");
    v1::CreateSequenceResponse response;
    codes.emplace_back("CreateSequence(made-up token)",
                       CodeName(stub->CreateSequence(&ctx, create, &response).error_code()));
  }
  std::string reflection_code;
  const std::vector<std::string> services = ReflectionServices(channel, &reflection_code);
  codes.emplace_back("ServerReflection.ListServices", reflection_code);

  std::vector<std::string> fields;
  for (const auto& [call, code] : codes)
    fields.push_back(absl::StrCat(Quoted(call), ": ", Quoted(code)));
  std::vector<std::string> quoted;
  for (const std::string& s : services) quoted.push_back(Quoted(s));
  std::printf("{\"codes\": {%s}, \"reflection_services\": [%s]}\n",
              absl::StrJoin(fields, ", ").c_str(), absl::StrJoin(quoted, ", ").c_str());
  return 0;
}

int Workload(const std::string& socket, const std::string& out_path) {
  const uint32_t prompt = absl::GetFlag(FLAGS_prompt), steps = absl::GetFlag(FLAGS_steps);
  const auto pause = std::chrono::milliseconds(absl::GetFlag(FLAGS_step_pause_ms));
  const icecache::testing::Data data = icecache::testing::MakeData(
      kLayers, kKvHeads, kGroup, kHeadDim, prompt + steps, icecache::DType::kBF16);

  icecache::ClientOptions co;
  co.socket = socket;
  co.mode = icecache::ExecutionMode::kCpu;
  co.cpu_threads = 2;
  auto client = icecache::Client::Attach(co);
  if (!client.ok()) return Fail("attach", client.status());

  icecache::SequenceOptions so;
  so.num_layers = kLayers;
  so.num_q_heads = data.q_heads();
  so.num_kv_heads = kKvHeads;
  so.head_dim = kHeadDim;
  so.dtype = icecache::DType::kBF16;
  so.max_tokens = prompt + steps;
  so.page_size = 16;
  so.sink_tokens = 16;
  so.window_tokens = 16;
  so.budget_tokens = 128;
  so.full_kv_layers = kFullKvLayers;
  so.label = "observability-e2e";
  auto seq = (*client)->CreateSequence(so);
  if (!seq.ok()) return Fail("create sequence", seq.status());
  icecache::Sequence& s = **seq;
  for (uint32_t l = 0; l < kLayers; ++l) {
    absl::Status st = s.Prefill(l, data.K(l, 0), data.V(l, 0), prompt);
    if (!st.ok()) return Fail(absl::StrCat("prefill layer ", l), st);
  }
  std::vector<uint16_t> out(size_t{data.q_heads()} * kHeadDim);
  for (uint32_t step = 0; step < steps; ++step) {
    for (uint32_t l = 0; l < kLayers; ++l) {
      const std::vector<uint16_t> q = data.Query(l, step);
      absl::Status st =
          s.Decode(l, q.data(), data.K(l, prompt + step), data.V(l, prompt + step), out.data());
      if (!st.ok()) return Fail(absl::StrCat("decode step ", step, " layer ", l), st);
    }
    std::this_thread::sleep_for(pause);
  }

  // Two control calls that fail on purpose, with the client's own token: the daemon counts
  // them by code, and the memory one as a rejection.
  int invalid_argument = 0, resource_exhausted = 0;
  {
    auto channel = grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials());
    auto stub = v1::IceCache::NewStub(channel);
    v1::CreateSequenceRequest bad;
    v1::SequenceGeometry* g = bad.mutable_geometry();
    g->set_num_layers(1);
    g->set_num_q_heads(2);
    g->set_num_kv_heads(0);  // required
    g->set_head_dim(64);
    g->set_dtype(v1::DTYPE_BF16);
    g->set_max_tokens(64);
    grpc::ClientContext ctx;
    ctx.AddMetadata(icecache::abi::kTokenMetadataKey, (*client)->attachment().token());
    v1::CreateSequenceResponse response;
    const grpc::Status gs = stub->CreateSequence(&ctx, bad, &response);
    if (gs.error_code() != grpc::StatusCode::INVALID_ARGUMENT) {
      return Fail("geometry without KV heads",
                  absl::InternalError(
                      absl::StrCat("expected INVALID_ARGUMENT, got ", CodeName(gs.error_code()))));
    }
    ++invalid_argument;
  }
  {
    icecache::SequenceOptions huge = so;
    huge.num_layers = 1024;
    huge.num_q_heads = 64;
    huge.num_kv_heads = 64;
    huge.head_dim = 256;
    huge.max_tokens = uint64_t{1} << 24;  // 64 TiB of KV: never fits
    huge.label = "observability-e2e-too-large";
    auto too_large = (*client)->CreateSequence(huge);
    if (too_large.status().code() != absl::StatusCode::kResourceExhausted) {
      return Fail("sequence over the memory limit",
                  absl::InternalError(absl::StrCat("expected RESOURCE_EXHAUSTED, got ",
                                                   too_large.status().ToString())));
    }
    ++resource_exhausted;
  }

  const icecache::ClientCounters c = (*client)->counters();
  std::ofstream out_file(out_path);
  out_file << "{\"cache_hits\": " << c.cache_hits << ", \"cache_misses\": " << c.cache_misses
           << ", \"fetched_bytes\": " << c.fetched_bytes
           << ", \"fetch_nanoseconds\": " << c.fetch_nanoseconds
           << ", \"decode_steps\": " << c.decode_steps << ", \"steps\": " << steps
           << ", \"layers\": " << kLayers << ", \"offloaded_layers\": " << kLayers - kFullKvLayers
           << ", \"q_heads\": " << data.q_heads() << ", \"kv_heads\": " << kKvHeads
           << ", \"prompt\": " << prompt << ", \"invalid_argument_calls\": " << invalid_argument
           << ", \"resource_exhausted_calls\": " << resource_exhausted << "}\n";
  out_file.close();
  if (!out_file) return Fail("write " + out_path, absl::InternalError("write failed"));
  std::printf("ready\n");
  std::fflush(stdout);
  // Stay attached (one client, one live sequence) until the test closes our stdin.
  std::string line;
  while (std::getline(std::cin, line)) {
  }
  seq->reset();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::string mode = absl::GetFlag(FLAGS_mode);
  if (mode == "tcp-exposure") return TcpExposure(absl::GetFlag(FLAGS_address));
  if (mode == "workload") {
    if (absl::GetFlag(FLAGS_socket).empty() || absl::GetFlag(FLAGS_out).empty()) {
      return Fail("flags", absl::InvalidArgumentError("--socket and --out are required"));
    }
    return Workload(absl::GetFlag(FLAGS_socket), absl::GetFlag(FLAGS_out));
  }
  return Fail("flags", absl::InvalidArgumentError("--mode must be workload or tcp-exposure"));
}
