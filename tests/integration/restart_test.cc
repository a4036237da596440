// A daemon crash costs no offloaded token: the real icecached is SIGKILLed at a random moment
// of a decode (mid-request included), a successor starts on the same socket, and the client
// library, on its own, reattaches, hands back its arena, has every sequence restored from
// the pages it holds and resubmits what was in flight. Every step's output is compared
// bitwise with an uninterrupted run of the same inputs.
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "icecache/client.h"
#include "tests/integration/client_data.h"
#include "tests/support/daemon_process.h"
#include "tests/support/status_matchers.h"

namespace icecache::testing {
namespace {

constexpr uint32_t kLayers = 4, kFullKv = 1, kKv = 2, kGroup = 2, kDim = 64;
constexpr uint32_t kPrompt = 512, kSteps = 80;

DaemonConfig Config() {
  DaemonConfig c;
  // A planned stop drains for up to the grace (2 s here; the default is 10 s).
  c.extra_args = {"--recall-sample-every=0", "--shutdown-grace=2s", "--log-level=info"};
  return c;
}

SequenceOptions Options(SelectionMode selection) {
  SequenceOptions o;
  o.selection = selection;
  o.num_layers = kLayers;
  o.num_q_heads = kKv * kGroup;
  o.num_kv_heads = kKv;
  o.head_dim = kDim;
  o.dtype = DType::kBF16;
  o.max_tokens = kPrompt + kSteps;
  o.page_size = 16;
  o.sink_tokens = 16;
  o.window_tokens = 32;
  o.budget_tokens = 112;  // 4 selected pages per KV head: selection decides the output
  o.full_kv_layers = kFullKv;
  o.label = "restart-test";
  return o;
}

// Prompt-major K/V of one layer: [tokens][kv][d].
std::vector<uint16_t> Rows(const std::vector<uint16_t>& all, uint32_t first, uint32_t count) {
  const size_t row = size_t{kKv} * kDim;
  return std::vector<uint16_t>(all.begin() + first * row, all.begin() + (first + count) * row);
}

struct RunResult {
  std::vector<std::vector<uint16_t>> outputs;  // [step * layers + layer] -> [q_heads][d]
  ClientRecovery recovery;
  std::string error;
};

// Prefill + kSteps decode steps of every layer against the daemon at `socket`.
// `before_decode` (optional) runs before each Decode call (the crash thread starts there).
RunResult Decode(const Data& data, const std::string& socket, SelectionMode selection,
                 const std::function<void(uint32_t step, uint32_t layer)>& before_decode) {
  RunResult run;
  ClientOptions co;
  co.socket = socket;
  co.mode = ExecutionMode::kCpu;
  co.reconnect_timeout = absl::Seconds(30);
  auto client = Client::Attach(co);
  if (!client.ok()) {
    run.error = client.status().ToString();
    return run;
  }
  auto seq = (*client)->CreateSequence(Options(selection));
  if (!seq.ok()) {
    run.error = seq.status().ToString();
    return run;
  }
  for (uint32_t l = 0; l < kLayers; ++l) {
    const auto k = Rows(data.k[l], 0, kPrompt), v = Rows(data.v[l], 0, kPrompt);
    absl::Status st = (*seq)->Prefill(l, k.data(), v.data(), kPrompt);
    if (!st.ok()) {
      run.error = st.ToString();
      return run;
    }
  }
  std::vector<uint16_t> out(size_t{kKv} * kGroup * kDim);
  for (uint32_t s = 0; s < kSteps; ++s) {
    for (uint32_t l = 0; l < kLayers; ++l) {
      const std::vector<uint16_t> q = data.Query(l, s);
      if (before_decode) before_decode(s, l);
      absl::Status st =
          (*seq)->Decode(l, q.data(), data.K(l, kPrompt + s), data.V(l, kPrompt + s), out.data());
      if (!st.ok()) {
        run.error = absl::StrCat("step ", s, " layer ", l, ": ", st.ToString());
        return run;
      }
      run.outputs.push_back(out);
    }
  }
  run.recovery = (*client)->recovery();
  return run;
}

class RestartTest : public ::testing::Test {
 protected:
  void SetUp() override {
    data_ = MakeData(kLayers, kKv, kGroup, kDim, kPrompt + kSteps, DType::kBF16);
  }
  void Trials(int signal, SelectionMode selection, int trials, uint32_t seed);
  Data data_;
};

// `trials` runs, each ending its daemon with `signal` at a random moment of the decode and
// starting a successor on the same socket; every output compared bitwise with an
// uninterrupted run in the same selection mode.
void RestartTest::Trials(int signal, SelectionMode selection, int trials, uint32_t seed) {
  TempDir ref_dir;
  auto ref_daemon = DaemonProcess::Start(ref_dir.path(), Config());
  ASSERT_TRUE(ref_daemon.ok()) << ref_daemon.status();
  auto t0 = std::chrono::steady_clock::now();
  const RunResult reference =
      Decode(data_, (*ref_daemon)->socket_path(), selection, [&](uint32_t s, uint32_t l) {
        if (s == 0 && l == 0) t0 = std::chrono::steady_clock::now();
      });
  // One layer's decode, on average: the kills land within one.
  const double layer_us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
      (kSteps * kLayers);
  ASSERT_EQ(reference.error, "");
  ASSERT_EQ(reference.outputs.size(), size_t{kSteps} * kLayers);
  EXPECT_EQ(reference.recovery.recoveries, 0u);

  std::mt19937 rng(seed);
  std::vector<double> stalls;
  for (int trial = 0; trial < trials; ++trial) {
    SCOPED_TRACE(absl::StrCat("trial ", trial));
    TempDir dir;
    auto first = DaemonProcess::Start(dir.path(), Config());
    ASSERT_TRUE(first.ok()) << first.status();
    // At a random layer of a random step (never the last step, so that the client talks to
    // the daemon after the kill whatever the machine's load), a random part of a layer's time
    // later: mid-request or between requests.
    const uint32_t kill_step = std::uniform_int_distribution<uint32_t>(0, kSteps - 2)(rng);
    const uint32_t kill_layer = std::uniform_int_distribution<uint32_t>(0, kLayers - 1)(rng);
    const int64_t delay_us =
        std::uniform_int_distribution<int64_t>(0, static_cast<int64_t>(layer_us))(rng);
    std::unique_ptr<DaemonProcess> second;
    std::string restart_error;
    std::thread crash;
    absl::Notification signalled;
    const RunResult run =
        Decode(data_, (*first)->socket_path(), selection, [&](uint32_t s, uint32_t l) {
          // The last step waits for the signal: on a loaded machine the crash thread may wake
          // only after the decode (the drop that followed would then find the daemon gone and
          // forget the sequence, with nothing left to recover).
          if (s == kSteps - 1 && l == 0) signalled.WaitForNotification();
          if (s != kill_step || l != kill_layer) return;
          crash = std::thread([&] {
            std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
            (*first)->process().Signal(signal);
            signalled.Notify();
            (void)(*first)->process().Wait(absl::Seconds(30));
            auto d = DaemonProcess::Start(dir.path(), Config());
            if (d.ok()) {
              second = std::move(*d);
            } else {
              restart_error = d.status().ToString();
            }
          });
        });
    crash.join();
    ASSERT_EQ(restart_error, "");
    ASSERT_EQ(run.error, "");
    ASSERT_EQ(run.outputs.size(), reference.outputs.size());
    for (size_t i = 0; i < run.outputs.size(); ++i) {
      ASSERT_EQ(std::memcmp(run.outputs[i].data(), reference.outputs[i].data(),
                            run.outputs[i].size() * sizeof(uint16_t)),
                0)
          << "step " << i / kLayers << " layer " << i % kLayers << " differs";
    }
    EXPECT_EQ(run.recovery.recoveries, 1u);
    EXPECT_EQ(run.recovery.lost_sequences, 0u);
    EXPECT_EQ(run.recovery.restored_sequences, 1u);
    stalls.push_back(run.recovery.last_stall_seconds);
  }
  std::sort(stalls.begin(), stalls.end());
  std::printf("restart (signal %d, %s): %zu recoveries of %d, stall p50 %.3f s, max %.3f s\n",
              signal, SelectionModeName(selection), stalls.size(), trials,
              stalls[stalls.size() / 2], stalls.back());
}

TEST_F(RestartTest, SigkillAtRandomMomentsLosesNoTokenAndEveryOutputIsBitwiseTheSame) {
  Trials(SIGKILL, SelectionMode::kSync, 20, 20261129);
}

// A planned stop (SIGTERM: the daemon drains, answers "shutting down", exits) and a new
// binary, with selection one step ahead (prefetched selects in flight are asked again).
TEST_F(RestartTest, PlannedStopWithSelectionAheadLosesNothingEither) {
  Trials(SIGTERM, SelectionMode::kAsync, 4, 7);
}

}  // namespace
}  // namespace icecache::testing
