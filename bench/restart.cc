// What a daemon crash costs an engine, at the 8B shape: a 32-layer (2 full-KV) x 8 KV head
// (GQA 4, d 128, bf16) sequence of --tokens prompt tokens through the real icecached and the
// client library; during decode the daemon is SIGKILLed at --kills random moments and a
// successor started on the same socket (the client recovers on its own: reattach, restore
// from the arena it holds, resubmit). Side by side in the same run: the prompt's prefill (a
// full re-prefill is what an engine without recovery must do, and it needs the prompt's K/V,
// which an engine that offloaded them no longer has: a forward pass over the prompt again).
//
//   build/bench/restart [--tokens=32768] [--layers=32] [--kills=3] [--steps=24] [--out=DIR]
//
// Reports per kill: the client's stall (from finding the daemon gone to resubmission:
// reconnect + restore of every layer + resubmit), the wall time of the decode step that
// absorbed it, and the step time without a crash; p50 and max; the ratio to the prefill.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "bench/bench_output.h"
#include "bench/decode_workload.h"
#include "common/flags_compat.h"
#include "eval/local_daemon.h"
#include "icecache/client.h"
#include "selection/index_factory.h"

ABSL_FLAG(uint32_t, tokens, 32768, "Prompt tokens.");
ABSL_FLAG(uint32_t, layers, 32, "Layers (8B: 32).");
ABSL_FLAG(uint32_t, full_kv_layers, 2, "Leading full-KV layers.");
ABSL_FLAG(uint32_t, distinct_layers, 4, "Layers of distinct synthetic data (others reuse them).");
ABSL_FLAG(uint32_t, kills, 3, "Daemon SIGKILLs during the decode.");
ABSL_FLAG(uint32_t, steps, 24, "Decode steps (the kills land inside them).");
ABSL_FLAG(std::string, mode, "cpu", "Client mode: auto, cpu or cuda.");
ABSL_FLAG(std::string, memory_limit, "20GiB", "--memory-limit of the daemon.");
ABSL_FLAG(std::string, out, "bench/results", "Directory for JSON/CSV results.");

namespace {

using namespace icecache;
using Clock = std::chrono::steady_clock;
using bench::kDim;
using bench::kGroup;
using bench::kKvHeads;

void Check(const absl::Status& s, const std::string& what) {
  if (!s.ok()) {
    std::fprintf(stderr, "restart: %s: %s\n", what.c_str(), s.ToString().c_str());
    std::exit(1);
  }
}

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args = NormalizeFlagNames(argc, argv);
  std::vector<char*> ptrs = ArgvPointers(args);
  absl::ParseCommandLine(static_cast<int>(args.size()), ptrs.data());
  const std::string out_dir = absl::GetFlag(FLAGS_out);
  bench::PrepareOutDir(out_dir, "restart");
  const absl::StatusOr<ExecutionMode> exec = bench::ParseExecutionMode(absl::GetFlag(FLAGS_mode));
  Check(exec.status(), "--mode");
  const uint32_t tokens = absl::GetFlag(FLAGS_tokens), layers = absl::GetFlag(FLAGS_layers);
  const uint32_t full_kv = absl::GetFlag(FLAGS_full_kv_layers);
  const uint32_t steps = absl::GetFlag(FLAGS_steps), kills = absl::GetFlag(FLAGS_kills);
  const uint32_t distinct = std::max(1u, absl::GetFlag(FLAGS_distinct_layers));

  auto started = eval::LocalDaemon::Start(
      eval::IcecachedPath(ICECACHE_BENCH_ICECACHED_BIN),
      {absl::StrCat("--memory-limit=", absl::GetFlag(FLAGS_memory_limit))});
  Check(started.status(), "start icecached");
  std::unique_ptr<eval::LocalDaemon> daemon = std::move(*started);
  ClientOptions co;
  co.socket = daemon->socket();
  co.mode = *exec;
  co.reconnect_timeout = absl::Minutes(10);
  auto client = Client::Attach(co);
  Check(client.status(), "attach");
  std::printf(
      "restart: 8B shape (%u layers, %u full-KV, %u KV heads x GQA %u, d %u, bf16), %u prompt "
      "tokens, %u kills in %u decode steps; client in %s mode, daemon preset %s, %ld cores\n",
      layers, full_kv, kKvHeads, kGroup, kDim, tokens, kills, steps,
      ExecutionModeName((*client)->mode()), std::string(selection::kDefaultPreset).c_str(),
      ::sysconf(_SC_NPROCESSORS_ONLN));
  std::fflush(stdout);

  std::vector<bench::LayerData> data;
  for (uint32_t i = 0; i < distinct; ++i)
    data.push_back(bench::MakeLayer(tokens + steps + 1, i, 8));
  std::vector<std::vector<std::vector<uint16_t>>> queries;
  for (const bench::LayerData& d : data) queries.push_back(bench::Queries(d, steps, 0.83));

  SequenceOptions so;
  so.num_layers = layers;
  so.num_q_heads = kKvHeads * kGroup;
  so.num_kv_heads = kKvHeads;
  so.head_dim = kDim;
  so.dtype = DType::kBF16;
  so.max_tokens = tokens + steps + 1;
  so.full_kv_layers = full_kv;
  so.label = "restart-bench";
  auto seq = (*client)->CreateSequence(so);
  Check(seq.status(), "create sequence");
  const size_t kv_elems = size_t{kKvHeads} * kDim;
  const auto tp = Clock::now();
  for (uint32_t l = 0; l < layers; ++l) {
    const bench::LayerData& d = data[l % distinct];
    Check((*seq)->Prefill(l, d.k.data(), d.v.data(), tokens), absl::StrCat("prefill ", l));
  }
  // The prefill is asynchronous: the first decode step waits for every layer's build.
  std::vector<uint16_t> out(size_t{kKvHeads} * kGroup * kDim);
  auto decode_step = [&](uint32_t s) {
    for (uint32_t l = 0; l < layers; ++l) {
      const bench::LayerData& d = data[l % distinct];
      Check((*seq)->Decode(l, queries[l % distinct][s].data(), d.k.data() + (tokens + s) * kv_elems,
                           d.v.data() + (tokens + s) * kv_elems, out.data()),
            absl::StrCat("decode step ", s, " layer ", l));
    }
  };
  decode_step(0);
  const double prefill_s = Seconds(tp, Clock::now());
  std::printf("prefill (every layer built, first step decoded): %.2f s\n", prefill_s);
  std::fflush(stdout);

  // Steps without a crash first (the step time to compare with), then the kills, each in
  // its own step, at a random moment of it.
  std::vector<double> calm_ms, crash_step_s, stalls_s;
  std::mt19937 rng(11);
  uint32_t s = 1;
  for (; s < steps && s <= steps - kills - 1 && calm_ms.size() < 8; ++s) {
    const auto t0 = Clock::now();
    decode_step(s);
    calm_ms.push_back(Seconds(t0, Clock::now()) * 1e3);
  }
  std::sort(calm_ms.begin(), calm_ms.end());
  const double calm_p50 = calm_ms.empty() ? 0 : calm_ms[calm_ms.size() / 2];
  // One thread kills and restarts the daemon, and lives until the end: a daemon it starts
  // gets SIGTERM when the thread that forked it ends (LocalDaemon's PR_SET_PDEATHSIG).
  struct KillState {
    int64_t delay_us = -1;  // >= 0: a kill is asked for
    bool done = false, quit = false;
    absl::Status restarted;
  };
  absl::Mutex kill_mu;
  KillState ks;
  std::thread killer([&] {
    while (true) {
      int64_t delay;
      {
        absl::MutexLock lock(&kill_mu);
        kill_mu.Await(absl::Condition(
            +[](KillState* k) { return k->delay_us >= 0 || k->quit; }, &ks));
        if (ks.quit) return;
        delay = ks.delay_us;
        ks.delay_us = -1;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(delay));
      absl::Status st = daemon->Restart(SIGKILL, absl::Seconds(60));
      absl::MutexLock lock(&kill_mu);
      ks.restarted = st;
      ks.done = true;
    }
  });
  for (uint32_t k = 0; k < kills && s + 1 < steps; ++k, ++s) {
    const uint64_t before = (*client)->recovery().recoveries;
    const int64_t delay_us =
        std::uniform_int_distribution<int64_t>(0, static_cast<int64_t>(calm_p50 * 1e3 * 0.8))(rng);
    {
      absl::MutexLock lock(&kill_mu);
      ks.done = false;
      ks.delay_us = delay_us;
    }
    const auto t0 = Clock::now();
    decode_step(s);
    const double step_s = Seconds(t0, Clock::now());
    {
      absl::MutexLock lock(&kill_mu);
      kill_mu.Await(absl::Condition(&ks.done));
      Check(ks.restarted, "restart icecached");
    }
    const ClientRecovery r = (*client)->recovery();
    if (r.recoveries == before) {
      // The step ended before the kill: the next step finds the daemon gone.
      const auto t1 = Clock::now();
      decode_step(++s);
      crash_step_s.push_back(Seconds(t1, Clock::now()));
    } else {
      crash_step_s.push_back(step_s);
    }
    const ClientRecovery after = (*client)->recovery();
    if (after.lost_sequences != 0) Check(absl::DataLossError("a sequence was lost"), "restore");
    stalls_s.push_back(after.last_stall_seconds);
    std::printf("kill %u after %.1f ms: stall %.2f s, the step that absorbed it %.2f s\n", k + 1,
                delay_us / 1e3, after.last_stall_seconds, crash_step_s.back());
    std::fflush(stdout);
  }
  auto p50 = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v[v.size() / 2];
  };
  auto mx = [](const std::vector<double>& v) {
    return v.empty() ? 0.0 : *std::max_element(v.begin(), v.end());
  };
  const ClientRecovery total = (*client)->recovery();
  const std::string mode_name = ExecutionModeName((*client)->mode());
  std::printf(
      "\nrestart: %zu kills, %lu recoveries, %lu sequences restored, %lu lost, %lu requests "
      "resubmitted\n  stall p50 %.2f s, max %.2f s; the prefill of the same sequence %.2f s "
      "(stall / prefill %.2f); a calm step %.1f ms\n",
      stalls_s.size(), static_cast<unsigned long>(total.recoveries),
      static_cast<unsigned long>(total.restored_sequences),
      static_cast<unsigned long>(total.lost_sequences),
      static_cast<unsigned long>(total.resubmitted_requests), p50(stalls_s), mx(stalls_s),
      prefill_s, prefill_s > 0 ? p50(stalls_s) / prefill_s : 0, calm_p50);

  // The sequence and the client go while their daemon runs; then the killer thread.
  seq->reset();
  client->reset();
  {
    absl::MutexLock lock(&kill_mu);
    ks.quit = true;
  }
  killer.join();
  const std::string stem = out_dir + "/restart";
  std::ofstream csv(stem + ".csv");
  csv << "kill,stall_s,step_s\n";
  for (size_t i = 0; i < stalls_s.size(); ++i) {
    csv << i + 1 << "," << stalls_s[i] << "," << crash_step_s[i] << "\n";
  }
  std::ofstream json(stem + ".json");
  json << "{\"bench\":\"restart\",\"machine_cores\":" << ::sysconf(_SC_NPROCESSORS_ONLN)
       << ",\"mode\":\"" << mode_name << "\",\"tokens\":" << tokens << ",\"layers\":" << layers
       << ",\"full_kv_layers\":" << full_kv << ",\"kills\":" << stalls_s.size()
       << ",\"recoveries\":" << total.recoveries << ",\"lost_sequences\":" << total.lost_sequences
       << ",\"resubmitted\":" << total.resubmitted_requests << ",\"stall_s_p50\":" << p50(stalls_s)
       << ",\"stall_s_max\":" << mx(stalls_s) << ",\"prefill_s\":" << prefill_s
       << ",\"stall_over_prefill\":" << (prefill_s > 0 ? p50(stalls_s) / prefill_s : 0)
       << ",\"calm_step_ms_p50\":" << calm_p50 << ",\"crash_step_s\":[";
  for (size_t i = 0; i < crash_step_s.size(); ++i) json << (i ? "," : "") << crash_step_s[i];
  json << "]}\n";
  bench::CloseResult(csv, stem + ".csv", "restart");
  bench::CloseResult(json, stem + ".json", "restart");
  std::printf("wrote %s.{json,csv}\n", stem.c_str());
  return 0;
}
