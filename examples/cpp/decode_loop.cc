// A decode loop through icecached: prefill a prompt's K/V per layer, then decode (CPU mode,
// fp16; a real engine passes its own tensors, device pointers and a stream in CUDA mode).
//   decode_loop [SOCKET]
#include <cstdio>
#include <vector>

#include "icecache/client.h"

int main(int argc, char** argv) {
  const uint32_t layers = 4, hq = 8, hk = 2, d = 64, prompt = 1000, steps = 32;
  auto client = icecache::Client::Attach(
      {.socket = argc > 1 ? argv[1] : "", .mode = icecache::ExecutionMode::kCpu});
  if (!client.ok()) return std::fprintf(stderr, "%s\n", client.status().ToString().c_str()), 1;
  auto seq = (*client)->CreateSequence({.num_layers = layers,
                                        .num_q_heads = hq,
                                        .num_kv_heads = hk,
                                        .head_dim = d,
                                        .dtype = icecache::DType::kFP16,
                                        .max_tokens = prompt + steps,
                                        .budget_tokens = 128});
  if (!seq.ok()) return std::fprintf(stderr, "%s\n", seq.status().ToString().c_str()), 1;
  std::vector<uint16_t> k(prompt * hk * d, 0x3800), v(k), q(hq * d, 0x3c00), out(hq * d);
  for (uint32_t l = 0; l < layers; ++l) (void)(*seq)->Prefill(l, k.data(), v.data(), prompt);
  for (uint32_t step = 0; step < steps; ++step) {
    for (uint32_t l = 0; l < layers; ++l) {
      absl::Status s = (*seq)->Decode(l, q.data(), k.data(), v.data(), out.data());
      if (!s.ok()) return std::fprintf(stderr, "%s\n", s.ToString().c_str()), 1;
    }
  }
  const icecache::ClientCounters c = (*client)->counters();
  std::printf("decoded %u steps x %u layers; %u tokens attended in the last; hit rate %.2f\n",
              steps, layers, (*seq)->last_decode().attended_tokens, c.hit_rate());
  return 0;
}
