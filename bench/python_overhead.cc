// python_overhead: the C++ side of the Python binding's overhead benchmark
// (bench/python_overhead.py runs this and the same loop through the icecache package against
// one daemon, in the same run, and reports the difference).
//
// Each round creates a sequence, prefills --prompt tokens, decodes --steps tokens of one layer
// timing every Sequence::Decode call, and drops it. Per call it records the wall time and the
// part of it outside the library's own measurement of the step (wall - last_decode().total_us):
// the decode's work varies from call to call (and with the machine's load) far more than a
// binding's few microseconds, so the binding's cost is compared on that remainder, call by
// call. Medians (and mean, p90 of the wall time) as JSON on stdout. --offloaded: the layer is
// offloaded (a select round trip to the daemon per call), else it keeps its whole KV in the client
// (no daemon in the loop: the cheapest decode, where a binding's overhead shows most).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "icecache/client.h"

ABSL_FLAG(std::string, socket, "", "The icecached to attach to.");
ABSL_FLAG(uint32_t, q_heads, 8, "Query heads.");
ABSL_FLAG(uint32_t, kv_heads, 2, "KV heads.");
ABSL_FLAG(uint32_t, head_dim, 64, "Head dimension.");
ABSL_FLAG(uint32_t, prompt, 64, "Prompt tokens per round.");
ABSL_FLAG(uint32_t, steps, 100, "Decode calls per round.");
ABSL_FLAG(uint32_t, rounds, 20, "Rounds (a fresh sequence each).");
ABSL_FLAG(bool, offloaded, false, "Decode an offloaded layer (select round trip per call).");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  using Clock = std::chrono::steady_clock;
  icecache::ClientOptions co;
  co.socket = absl::GetFlag(FLAGS_socket);
  co.mode = icecache::ExecutionMode::kCpu;
  co.cpu_threads = 1;
  auto client = icecache::Client::Attach(co);
  if (!client.ok()) {
    std::fprintf(stderr, "python_overhead: %s\n", client.status().ToString().c_str());
    return 1;
  }
  const uint32_t hq = absl::GetFlag(FLAGS_q_heads), hk = absl::GetFlag(FLAGS_kv_heads),
                 d = absl::GetFlag(FLAGS_head_dim), prompt = absl::GetFlag(FLAGS_prompt),
                 steps = absl::GetFlag(FLAGS_steps);
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint16_t> bits(0x3000, 0x3c00);  // fp16 in [0.125, 1)
  auto fill = [&](std::vector<uint16_t>& v) {
    for (uint16_t& x : v) x = bits(rng);
  };
  std::vector<uint16_t> k(uint64_t{prompt} * hk * d), v(k.size()), q(hq * d), kn(hk * d),
      vn(hk * d), out(hq * d);
  fill(k), fill(v), fill(q), fill(kn), fill(vn);
  std::vector<double> us, outside;
  for (uint32_t r = 0; r < absl::GetFlag(FLAGS_rounds); ++r) {
    icecache::SequenceOptions o;
    o.num_layers = 1;
    o.num_q_heads = hq;
    o.num_kv_heads = hk;
    o.head_dim = d;
    o.dtype = icecache::DType::kFP16;
    o.max_tokens = prompt + steps;
    o.full_kv_layers = absl::GetFlag(FLAGS_offloaded) ? 0 : 1;
    auto seq = (*client)->CreateSequence(o);
    if (!seq.ok()) {
      std::fprintf(stderr, "python_overhead: %s\n", seq.status().ToString().c_str());
      return 1;
    }
    if (auto s = (*seq)->Prefill(0, k.data(), v.data(), prompt); !s.ok()) {
      std::fprintf(stderr, "python_overhead: %s\n", s.ToString().c_str());
      return 1;
    }
    for (uint32_t i = 0; i < steps; ++i) {
      const auto t0 = Clock::now();
      absl::Status s = (*seq)->Decode(0, q.data(), kn.data(), vn.data(), out.data());
      const auto t1 = Clock::now();
      if (!s.ok()) {
        std::fprintf(stderr, "python_overhead: %s\n", s.ToString().c_str());
        return 1;
      }
      us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
      outside.push_back(us.back() - (*seq)->last_decode().total_us);
    }
  }
  std::vector<double> sorted = us;
  std::sort(sorted.begin(), sorted.end());
  double mean = 0;
  for (double x : us) mean += x;
  mean /= static_cast<double>(us.size());
  std::sort(outside.begin(), outside.end());
  std::printf(
      "{\"calls\": %zu, \"median_us\": %.3f, \"mean_us\": %.3f, \"p90_us\": %.3f, "
      "\"median_outside_us\": %.3f}\n",
      us.size(), sorted[sorted.size() / 2], mean, sorted[sorted.size() * 9 / 10],
      outside[outside.size() / 2]);
  return 0;
}
