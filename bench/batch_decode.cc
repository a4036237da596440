// Batched decode (Client::DecodeBatch) against the same steps as single-sequence calls
// (Sequence::Decode, one per sequence), through the real icecached and the client library (CPU
// mode here; CUDA where a GPU is), in one run: B sequences of one 8B-shaped offloaded layer
// (8 KV heads x GQA 4, d 128, bf16) of --tokens prompt tokens each, for every B of --batches.
// Per (B, path): the wall time of a step (p50), tokens per second, the time per sequence, and
// the daemon's CPU time per token (from /proc over the timed steps). The batch path sends one
// select request per step for the whole batch and runs one gather and one attention for it;
// its per-sequence overhead should not grow with B.
//
//   build/bench/batch_decode [--batches=1,4,16,64] [--tokens=32768] [--steps=16] [--out=DIR]
//
// The sequences are prefilled once (the largest batch's); batch B uses the first B. Each
// sequence decodes the same layer data; lengths differ by the time the larger batches run
// (every step appends one token to each sequence that takes part), so the batch is varlen.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/bench_output.h"
#include "bench/decode_workload.h"
#include "common/flags_compat.h"
#include "eval/local_daemon.h"
#include "icecache/client.h"
#include "selection/index_factory.h"

ABSL_FLAG(std::string, batches, "1,4,16,64", "Batch sizes.");
ABSL_FLAG(uint32_t, tokens, 32768, "Prompt tokens of each sequence.");
ABSL_FLAG(uint32_t, steps, 16, "Timed decode steps per (batch, path), after --warmup.");
ABSL_FLAG(uint32_t, warmup, 2, "Untimed decode steps first.");
ABSL_FLAG(std::string, mode, "cpu", "Client mode: auto, cpu or cuda.");
ABSL_FLAG(std::string, memory_limit, "20GiB", "The daemon's --memory-limit.");
ABSL_FLAG(std::string, out, "bench/results", "Directory for JSON/CSV results.");

namespace {

using namespace icecache;
using bench::kDim;
using bench::kGroup;
using bench::kKvHeads;
using Clock = std::chrono::steady_clock;

void Check(const absl::Status& s, const std::string& what) {
  if (!s.ok()) {
    std::fprintf(stderr, "batch_decode: %s: %s\n", what.c_str(), s.ToString().c_str());
    std::exit(1);
  }
}

struct Row {
  uint32_t batch = 0;
  std::string path;  // "single" or "batch"
  double step_ms_p50 = 0;
  double tokens_per_s = 0;
  double us_per_sequence = 0;
  double daemon_cpu_ms_per_token = 0;
};

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args = NormalizeFlagNames(argc, argv);
  std::vector<char*> ptrs = ArgvPointers(args);
  absl::ParseCommandLine(static_cast<int>(args.size()), ptrs.data());
  const std::string out_dir = absl::GetFlag(FLAGS_out);
  bench::PrepareOutDir(out_dir, "batch_decode");
  const absl::StatusOr<ExecutionMode> exec = bench::ParseExecutionMode(absl::GetFlag(FLAGS_mode));
  Check(exec.status(), "--mode");
  std::vector<uint32_t> batches;
  for (absl::string_view b : absl::StrSplit(absl::GetFlag(FLAGS_batches), ',', absl::SkipEmpty())) {
    uint32_t v = 0;
    if (!absl::SimpleAtoi(b, &v) || v == 0) {
      Check(absl::InvalidArgumentError(std::string(b)), "--batches");
    }
    batches.push_back(v);
  }
  if (batches.empty()) Check(absl::InvalidArgumentError("no batch size"), "--batches");
  const uint32_t max_batch = *std::max_element(batches.begin(), batches.end());
  const uint32_t tokens = absl::GetFlag(FLAGS_tokens);
  const uint32_t steps = absl::GetFlag(FLAGS_steps), warmup = absl::GetFlag(FLAGS_warmup);
  // Every (batch, path) appends warmup + steps tokens to each sequence taking part.
  const uint32_t appended = static_cast<uint32_t>(batches.size()) * 2 * (warmup + steps) + 1;
  const uint32_t max_tokens = tokens + appended + 1;

  auto started = eval::LocalDaemon::Start(
      eval::IcecachedPath(ICECACHE_BENCH_ICECACHED_BIN),
      {absl::StrCat("--memory-limit=", absl::GetFlag(FLAGS_memory_limit))});
  Check(started.status(), "start icecached");
  std::unique_ptr<eval::LocalDaemon> daemon = std::move(*started);
  ClientOptions co;
  co.socket = daemon->socket();
  co.mode = *exec;
  auto client = Client::Attach(co);
  Check(client.status(), "attach");
  std::printf(
      "batch_decode: one 8B-shaped layer (%u KV heads x GQA %u, d %u, bf16), %u prompt tokens "
      "per sequence, batches %s; client in %s mode, daemon preset %s, %ld cores\n",
      kKvHeads, kGroup, kDim, tokens, absl::GetFlag(FLAGS_batches).c_str(),
      ExecutionModeName((*client)->mode()), std::string(selection::kDefaultPreset).c_str(),
      ::sysconf(_SC_NPROCESSORS_ONLN));
  std::fflush(stdout);

  const bench::LayerData d = bench::MakeLayer(max_tokens, 0, 64);
  const std::vector<std::vector<uint16_t>> queries = bench::Queries(d, appended, 0.83);
  const size_t q_elems = size_t{kKvHeads} * kGroup * kDim, kv_elems = size_t{kKvHeads} * kDim;

  std::vector<std::unique_ptr<Sequence>> seqs;
  const auto tp = Clock::now();
  for (uint32_t i = 0; i < max_batch; ++i) {
    SequenceOptions so;
    so.num_layers = 1;
    so.num_q_heads = kKvHeads * kGroup;
    so.num_kv_heads = kKvHeads;
    so.head_dim = kDim;
    so.dtype = DType::kBF16;
    so.max_tokens = max_tokens;
    so.full_kv_layers = 0;
    so.label = absl::StrCat("batch-decode-", i);
    auto seq = (*client)->CreateSequence(so);
    Check(seq.status(), "create sequence");
    Check((*seq)->Prefill(0, d.k.data(), d.v.data(), tokens), "prefill");
    seqs.push_back(std::move(*seq));
    std::printf("  prefilled %u/%u sequences (%.0f s)\r", i + 1, max_batch,
                std::chrono::duration<double>(Clock::now() - tp).count());
    std::fflush(stdout);
  }
  std::printf("\n");
  // The daemon builds each prompt's index in the background: one untimed step of every
  // sequence waits for all the builds, so that no build runs during the timed steps.
  std::vector<uint32_t> next_query(max_batch, 0);  // per sequence: steps decoded so far
  {
    std::vector<uint16_t> out(q_elems);
    for (uint32_t i = 0; i < max_batch; ++i) {
      const uint32_t pos = static_cast<uint32_t>(seqs[i]->tokens(0));
      Check(seqs[i]->Decode(0, queries[next_query[i]++].data(), &d.k[size_t{pos} * kv_elems],
                            &d.v[size_t{pos} * kv_elems], out.data()),
            "decode (waiting for the builds)");
    }
    std::printf("  every index built (%.0f s)\n",
                std::chrono::duration<double>(Clock::now() - tp).count());
  }

  std::vector<Row> rows;
  for (uint32_t b : batches) {
    std::vector<Sequence*> batch;
    for (uint32_t i = 0; i < b; ++i) batch.push_back(seqs[i].get());
    std::vector<uint16_t> q(q_elems * b), k(kv_elems * b), v(kv_elems * b), out(q_elems * b);
    for (const std::string path : {"single", "batch"}) {
      std::vector<double> step_ms;
      double cpu0 = 0;
      for (uint32_t step = 0; step < warmup + steps; ++step) {
        if (step == warmup) cpu0 = bench::ProcessCpuSeconds(daemon->pid());
        // Each sequence's next query and new token, laid out as the engine's batch.
        for (uint32_t i = 0; i < b; ++i) {
          const uint32_t pos = static_cast<uint32_t>(batch[i]->tokens(0));
          std::copy_n(queries[next_query[i]].data(), q_elems, q.begin() + q_elems * i);
          std::copy_n(&d.k[size_t{pos} * kv_elems], kv_elems, k.begin() + kv_elems * i);
          std::copy_n(&d.v[size_t{pos} * kv_elems], kv_elems, v.begin() + kv_elems * i);
          ++next_query[i];
        }
        const auto ts = Clock::now();
        if (path == "batch") {
          Check((*client)->DecodeBatch(0, batch, q.data(), k.data(), v.data(), out.data()),
                "decode batch");
        } else {
          for (uint32_t i = 0; i < b; ++i) {
            Check(batch[i]->Decode(0, &q[q_elems * i], &k[kv_elems * i], &v[kv_elems * i],
                                   &out[q_elems * i]),
                  "decode");
          }
        }
        if (step >= warmup) {
          step_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - ts).count());
        }
      }
      const double cpu = bench::ProcessCpuSeconds(daemon->pid()) - cpu0;
      Row r;
      r.batch = b;
      r.path = path;
      r.step_ms_p50 = bench::Percentile(step_ms, 0.5);
      r.tokens_per_s = r.step_ms_p50 > 0 ? b * 1000.0 / r.step_ms_p50 : 0;
      r.us_per_sequence = r.step_ms_p50 * 1000.0 / b;
      r.daemon_cpu_ms_per_token = cpu * 1000.0 / (static_cast<double>(steps) * b);
      rows.push_back(r);
      std::printf(
          "  batch %3u %-6s step p50 %8.2f ms | %8.1f tokens/s | %7.0f us per sequence | "
          "daemon CPU %.2f ms per token\n",
          b, path.c_str(), r.step_ms_p50, r.tokens_per_s, r.us_per_sequence,
          r.daemon_cpu_ms_per_token);
      std::fflush(stdout);
    }
    const Row& single = rows[rows.size() - 2];
    const Row& batched = rows.back();
    std::printf("  batch %3u: batch path / single calls, step time %.3f\n", b,
                single.step_ms_p50 > 0 ? batched.step_ms_p50 / single.step_ms_p50 : 0);
  }

  const std::string stem = out_dir + "/batch_decode";
  std::ofstream csv(stem + ".csv");
  std::ofstream json(stem + ".json");
  csv << "batch,path,step_ms_p50,tokens_per_s,us_per_sequence,daemon_cpu_ms_per_token,"
         "batch_over_single\n";
  json << "{\n  \"tokens\": " << tokens << ",\n  \"steps\": " << steps << ",\n  \"mode\": \""
       << ExecutionModeName((*client)->mode()) << "\",\n  \"rows\": [\n";
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    const Row& single = rows[i - (r.path == "batch" ? 1 : 0)];
    const double ratio = single.step_ms_p50 > 0 ? r.step_ms_p50 / single.step_ms_p50 : 0;
    csv << r.batch << "," << r.path << "," << r.step_ms_p50 << "," << r.tokens_per_s << ","
        << r.us_per_sequence << "," << r.daemon_cpu_ms_per_token << "," << ratio << "\n";
    json << "    {\"batch\": " << r.batch << ", \"path\": \"" << r.path
         << "\", \"step_ms_p50\": " << r.step_ms_p50 << ", \"tokens_per_s\": " << r.tokens_per_s
         << ", \"us_per_sequence\": " << r.us_per_sequence
         << ", \"daemon_cpu_ms_per_token\": " << r.daemon_cpu_ms_per_token
         << ", \"batch_over_single\": " << ratio << "}" << (i + 1 < rows.size() ? "," : "") << "\n";
  }
  json << "  ]\n}\n";
  bench::CloseResult(csv, stem + ".csv", "batch_decode");
  bench::CloseResult(json, stem + ".json", "batch_decode");
  std::printf("wrote %s.{json,csv}\n", stem.c_str());
  return 0;
}
