// A batched decode loop through icecached: four sequences of different prompt lengths, each
// prefilled per layer, then decoded together, one Client::DecodeBatch per layer and step (CPU
// mode, fp16; a real engine passes its own tensors, device pointers and a stream in CUDA mode).
//   decode_loop [SOCKET]
#include <cstdio>
#include <memory>
#include <vector>

#include "icecache/client.h"

int main(int argc, char** argv) {
  const uint32_t layers = 4, hq = 8, hk = 2, d = 64, batch = 4, steps = 32;
  const uint32_t prompts[batch] = {1000, 600, 1400, 800};
  auto client = icecache::Client::Attach(
      {.socket = argc > 1 ? argv[1] : "", .mode = icecache::ExecutionMode::kCpu});
  if (!client.ok()) return std::fprintf(stderr, "%s\n", client.status().ToString().c_str()), 1;
  std::vector<std::unique_ptr<icecache::Sequence>> owned;
  std::vector<icecache::Sequence*> seqs;
  std::vector<uint16_t> k(1400 * hk * d, 0x3800), v(k);  // a prompt's K/V: [token][kv][d]
  for (uint32_t i = 0; i < batch; ++i) {
    auto seq = (*client)->CreateSequence({.num_layers = layers,
                                          .num_q_heads = hq,
                                          .num_kv_heads = hk,
                                          .head_dim = d,
                                          .dtype = icecache::DType::kFP16,
                                          .max_tokens = prompts[i] + steps,
                                          .budget_tokens = 128});
    if (!seq.ok()) return std::fprintf(stderr, "%s\n", seq.status().ToString().c_str()), 1;
    for (uint32_t l = 0; l < layers; ++l) {
      absl::Status s = (*seq)->Prefill(l, k.data(), v.data(), prompts[i]);
      if (!s.ok()) return std::fprintf(stderr, "%s\n", s.ToString().c_str()), 1;
    }
    seqs.push_back(seq->get());
    owned.push_back(std::move(*seq));
  }
  // The engine's batch: q and out [batch][hq][d], the new tokens' K and V [batch][hk][d].
  std::vector<uint16_t> q(batch * hq * d, 0x3c00), out(q.size()), kn(batch * hk * d, 0x3800);
  for (uint32_t step = 0; step < steps; ++step) {
    for (uint32_t l = 0; l < layers; ++l) {
      absl::Status s = (*client)->DecodeBatch(l, seqs, q.data(), kn.data(), kn.data(), out.data());
      if (!s.ok()) return std::fprintf(stderr, "%s\n", s.ToString().c_str()), 1;
    }
  }
  const icecache::ClientCounters c = (*client)->counters();
  std::printf(
      "decoded %u steps x %u layers x %u sequences; %u tokens attended in the last; "
      "hit rate %.2f\n",
      steps, layers, batch, seqs[0]->last_decode().attended_tokens, c.hit_rate());
  return 0;
}
