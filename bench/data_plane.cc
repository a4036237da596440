// Data-plane overhead and throughput, against the real daemon (a subprocess, the same binary
// users run) over its real shared-memory rings:
//   - NOP round trip through the ring (submit, doorbell/poll, completion futex);
//   - select of one layer (every KV head, k = 12) through the ring, against the same search
//     called directly in this process on an identical index: the difference is the ring's cost;
//   - selects per second with 1, 2, 4 and 8 concurrent clients (each its own attachment and
//     sequence, one thread each).
//
//   build/bench/data_plane [--tokens=32768] [--out=DIR]
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <numeric>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "bench/bench_output.h"
#include "common/flags_compat.h"
#include "common/thread_pool.h"
#include "eval/in_memory_pages.h"
#include "eval/layer_index.h"
#include "eval/local_daemon.h"
#include "eval/synthetic.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "icecache/attachment.h"
#include "icecache/v1/icecache.grpc.pb.h"
#include "selection/index_factory.h"

ABSL_FLAG(uint32_t, tokens, 32768, "Tokens per KV head of the benchmark sequence.");
ABSL_FLAG(uint32_t, kv_heads, 8, "KV heads (8B shape: 8).");
ABSL_FLAG(uint32_t, group, 4, "Query heads per KV head (8B shape: 4).");
ABSL_FLAG(uint32_t, iterations, 2000, "Timed round trips per measurement.");
ABSL_FLAG(double, seconds, 3.0, "Duration of each throughput measurement.");
ABSL_FLAG(std::string, out, "bench/results", "Directory for JSON/CSV results.");

namespace {

using namespace icecache;
using SteadyClock = std::chrono::steady_clock;

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * v.size()))];
}

std::unique_ptr<eval::LocalDaemon> StartDaemon() {
  auto d = eval::LocalDaemon::Start(eval::IcecachedPath(ICECACHE_BENCH_ICECACHED_BIN));
  if (!d.ok()) {
    std::fprintf(stderr, "data_plane: %s\n", d.status().ToString().c_str());
    std::exit(1);
  }
  return std::move(*d);
}

struct Client {
  std::unique_ptr<Attachment> a;
  std::string handle;
};

// Attaches, creates a one-layer sequence and prefills it with the trace's layer 0.
Client MakeClient(const std::string& socket, v1::IceCache::Stub& stub, const eval::Trace& t) {
  Client c;
  Attachment::Options o;
  o.socket = socket;
  c.a = std::move(*Attachment::Attach(o));
  v1::CreateSequenceRequest req;
  v1::SequenceGeometry* g = req.mutable_geometry();
  g->set_num_layers(1);
  g->set_num_kv_heads(t.num_kv_heads);
  g->set_num_q_heads(t.num_q_heads);
  g->set_head_dim(t.head_dim);
  g->set_dtype(v1::DTYPE_BF16);
  g->set_max_tokens(t.num_tokens);
  g->set_full_kv_layers(0);
  v1::CreateSequenceResponse resp;
  grpc::ClientContext ctx;
  ctx.AddMetadata(icecache::abi::kTokenMetadataKey, c.a->token());
  grpc::Status s = stub.CreateSequence(&ctx, req, &resp);
  if (!s.ok()) {
    std::fprintf(stderr, "CreateSequence: %s\n", s.error_message().c_str());
    std::exit(1);
  }
  c.handle = resp.sequence().handle();
  const uint32_t n = t.num_tokens;
  const uint64_t row = uint64_t{t.head_dim} * 2;
  icecache::abi::StageResponse st = *c.a->Stage(c.handle, n);
  uint8_t* base = *c.a->Address(st.buffer, st.bytes);
  for (uint32_t h = 0; h < t.num_kv_heads; ++h) {
    std::memcpy(base + uint64_t{h} * n * row, t.Keys(0, h).data, n * row);
    std::memcpy(base + st.v_offset + uint64_t{h} * n * row, t.Values(0, h).data, n * row);
  }
  absl::Status p = c.a->Prefill(c.handle, 0, st.buffer, n, 0);
  if (!p.ok()) {
    std::fprintf(stderr, "prefill: %s\n", std::string(p.message()).c_str());
    std::exit(1);
  }
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args = NormalizeFlagNames(argc, argv);
  std::vector<char*> ptrs = ArgvPointers(args);
  absl::ParseCommandLine(static_cast<int>(args.size()), ptrs.data());
  icecache::bench::PrepareOutDir(absl::GetFlag(FLAGS_out), "data_plane");
  const uint32_t iterations = absl::GetFlag(FLAGS_iterations);

  eval::SyntheticOptions so;
  so.num_tokens = absl::GetFlag(FLAGS_tokens);
  so.head_dim = 128;
  so.num_kv_heads = absl::GetFlag(FLAGS_kv_heads);
  so.group_size = absl::GetFlag(FLAGS_group);
  so.num_queries = 16;
  so.kv_type = index::ElemType::kBF16;
  so.num_clusters = std::max<uint32_t>(96, so.num_tokens / 256);
  std::fprintf(stderr, "generating %u tokens x %u KV heads...\n", so.num_tokens, so.num_kv_heads);
  const eval::Trace t = eval::GenerateSynthetic(so);
  std::vector<float> queries(uint64_t{t.num_q_heads} * t.head_dim);
  for (uint32_t h = 0; h < t.num_q_heads; ++h) {
    std::copy_n(t.Query(0, h, 0), t.head_dim, queries.begin() + uint64_t{h} * t.head_dim);
  }

  auto daemon = StartDaemon();
  auto channel =
      grpc::CreateChannel("unix:" + daemon->socket(), grpc::InsecureChannelCredentials());
  auto stub = v1::IceCache::NewStub(channel);
  std::fprintf(stderr, "prefilling through the daemon...\n");
  Client c = MakeClient(daemon->socket(), *stub, t);

  // NOP round trips.
  std::vector<double> nop;
  for (uint32_t i = 0; i < iterations; ++i) {
    const auto t0 = SteadyClock::now();
    (void)c.a->Nop();
    nop.push_back(std::chrono::duration<double, std::micro>(SteadyClock::now() - t0).count());
  }

  // The same index in this process, searched the same way (all heads on a pool as large as
  // the daemon's).
  ThreadPool pool(0);
  const index::IndexGeometry g{t.head_dim, index::ElemType::kBF16, 16};
  std::vector<std::unique_ptr<eval::InMemoryPages>> pages;
  std::vector<const index::PageReader*> readers;
  std::vector<std::unique_ptr<eval::InMemoryPages::Writer>> writers;
  std::vector<index::PageWriter*> writer_ptrs;
  std::vector<index::KeyBatch> batches;
  std::vector<uint32_t> positions(t.num_tokens);
  std::iota(positions.begin(), positions.end(), 0u);
  for (uint32_t h = 0; h < t.num_kv_heads; ++h) {
    pages.push_back(std::make_unique<eval::InMemoryPages>(g, false));
    readers.push_back(pages.back().get());
    writers.push_back(
        std::make_unique<eval::InMemoryPages::Writer>(pages.back().get(), t.Keys(0, h), nullptr));
    writer_ptrs.push_back(writers.back().get());
    batches.push_back({t.Keys(0, h), positions.data()});
  }
  eval::LayerIndex layer(g, *selection::Preset(selection::kDefaultPreset), t.num_kv_heads,
                         t.group_size(), readers, &pool);
  (void)layer.Build(batches, writer_ptrs);

  std::vector<double> ring, direct;
  std::vector<std::vector<index::SelectedPage>> out;
  for (uint32_t i = 0; i < iterations / 4; ++i) {
    auto t0 = SteadyClock::now();
    (void)c.a->Select(c.handle, 0, queries.data(), queries.size(), 12);
    auto t1 = SteadyClock::now();
    (void)layer.Search(queries.data(), 12, &out);
    auto t2 = SteadyClock::now();
    ring.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    direct.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count());
  }

  // Throughput: N clients selecting as fast as they can.
  struct Row {
    int clients;
    double selects_per_s;
    double p50_us;
  };
  std::vector<Row> rows;
  for (int n : {1, 2, 4, 8}) {
    std::vector<Client> clients;
    for (int i = 0; i < n; ++i) clients.push_back(MakeClient(daemon->socket(), *stub, t));
    std::atomic<bool> go{false}, stop{false};
    std::atomic<uint64_t> done{0};
    std::vector<std::vector<double>> lat(n);
    std::vector<std::thread> threads;
    for (int i = 0; i < n; ++i) {
      threads.emplace_back([&, i] {
        while (!go.load()) std::this_thread::yield();
        while (!stop.load()) {
          const auto t0 = SteadyClock::now();
          (void)clients[i].a->Select(clients[i].handle, 0, queries.data(), queries.size(), 12);
          lat[i].push_back(
              std::chrono::duration<double, std::micro>(SteadyClock::now() - t0).count());
          done.fetch_add(1);
        }
      });
    }
    const auto t0 = SteadyClock::now();
    go.store(true);
    std::this_thread::sleep_for(std::chrono::duration<double>(absl::GetFlag(FLAGS_seconds)));
    stop.store(true);
    for (auto& th : threads) th.join();
    const double secs = std::chrono::duration<double>(SteadyClock::now() - t0).count();
    std::vector<double> all;
    for (auto& l : lat) all.insert(all.end(), l.begin(), l.end());
    rows.push_back({n, done.load() / secs, Percentile(all, 0.5)});
  }

  const double ring_p50 = Percentile(ring, 0.5), direct_p50 = Percentile(direct, 0.5);
  std::printf(
      "data plane: one layer of %u tokens x %u KV heads (%u query heads, dim %u, bf16), "
      "k=12; daemon subprocess, %u cores\n\n",
      t.num_tokens, t.num_kv_heads, t.num_q_heads, t.head_dim, std::thread::hardware_concurrency());
  std::printf("%-34s %10s %10s\n", "", "p50 us", "p99 us");
  std::printf("%-34s %10.1f %10.1f\n", "nop round trip (ring)", Percentile(nop, 0.5),
              Percentile(nop, 0.99));
  std::printf("%-34s %10.1f %10.1f\n", "select through the ring", ring_p50, Percentile(ring, 0.99));
  std::printf("%-34s %10.1f %10.1f\n", "select in process (same index)", direct_p50,
              Percentile(direct, 0.99));
  std::printf("%-34s %10.1f\n", "ring overhead (p50 difference)", ring_p50 - direct_p50);
  std::printf("\n%8s %14s %12s\n", "clients", "selects/s", "p50 us");
  for (const Row& r : rows)
    std::printf("%8d %14.0f %12.1f\n", r.clients, r.selects_per_s, r.p50_us);

  const std::string out_dir = absl::GetFlag(FLAGS_out);
  std::ofstream json(out_dir + "/data_plane.json");
  json << "{\n  \"tokens\": " << t.num_tokens << ", \"kv_heads\": " << t.num_kv_heads
       << ", \"q_heads\": " << t.num_q_heads
       << ", \"cores\": " << std::thread::hardware_concurrency()
       << ",\n  \"nop_us_p50\": " << Percentile(nop, 0.5)
       << ", \"nop_us_p99\": " << Percentile(nop, 0.99)
       << ",\n  \"select_ring_us_p50\": " << ring_p50
       << ", \"select_ring_us_p99\": " << Percentile(ring, 0.99)
       << ",\n  \"select_direct_us_p50\": " << direct_p50
       << ", \"select_direct_us_p99\": " << Percentile(direct, 0.99)
       << ",\n  \"ring_overhead_us_p50\": " << ring_p50 - direct_p50 << ",\n  \"throughput\": [";
  std::ofstream csv(out_dir + "/data_plane_throughput.csv");
  csv << "clients,selects_per_s,p50_us\n";
  for (size_t i = 0; i < rows.size(); ++i) {
    json << (i ? ", " : "") << "{\"clients\": " << rows[i].clients
         << ", \"selects_per_s\": " << rows[i].selects_per_s << ", \"p50_us\": " << rows[i].p50_us
         << "}";
    csv << rows[i].clients << ',' << rows[i].selects_per_s << ',' << rows[i].p50_us << '\n';
  }
  json << "]\n}\n";
  icecache::bench::CloseResult(json, out_dir + "/data_plane.json", "data_plane");
  icecache::bench::CloseResult(csv, out_dir + "/data_plane_throughput.csv", "data_plane");
  std::printf("\nwrote %s/data_plane.json and data_plane_throughput.csv\n", out_dir.c_str());
  return 0;
}
