// Sparse paged decode attention: one new token's queries of every query head attend, per KV
// head, over a list of chunks (contiguous runs of K and V rows: the sink, the window, and each
// selected page with its own valid count). GQA: query head q uses KV head q / group.
// bf16 or fp16 in and out, fp32 accumulation, head_dim 64, 128 or 256.
//
// Three pieces (CONVENTIONS 6): this header (plain C++: the shared descriptors and the CPU
// reference), attention.cuh (device code), attention.cu (the launcher, attention_cuda.h).
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "kernels/head_dim.h"

namespace icecache {

class ThreadPool;

// A run of `count` rows of one KV head: K rows at k, V rows at v, each [count][head_dim]
// dense elements of the params' dtype. A page is the chunk {base, base + half_bytes, valid}
// (kernels/page_layout.h).
struct AttentionChunk {
  const void* k;
  const void* v;
  uint32_t count;
  uint32_t reserved;
};

struct DecodeAttentionParams {
  const void* q;                  // [num_q_heads][head_dim]
  void* out;                      // [num_q_heads][head_dim]
  const AttentionChunk* chunks;   // KV head h's chunks: [chunk_offsets[h], chunk_offsets[h+1])
  const uint32_t* chunk_offsets;  // [num_kv_heads + 1]
  uint32_t num_q_heads = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kBF16;
  float scale = 0;  // softmax scale, usually 1/sqrt(head_dim)
  // Estimated softmax partials of what the chunks leave out (tail estimation,
  // selection/tail.h), or nullptr: [num_q_heads][2 + head_dim] fp32, per query head
  //   max, sum, acc[head_dim]
  // in the units of the scaled logits (proto/icecache/v1/abi.h "Tail estimate"). Merged after
  // the softmax over the chunks: with (m_f, sum_f, acc_f) the chunks' own partial and
  // M = max(m_f, max), out = (acc_f e^(m_f-M) + acc e^(max-M)) / (sum_f e^(m_f-M) + sum e^(max-M)).
  // A head whose partial's sum is 0 is unchanged; a KV head with no rows outputs acc / sum.
  // Host memory for the CPU reference, device memory for the kernel.
  const float* tail = nullptr;
};

// What is wrong with `p` (a static string), or nullptr when it is valid: non-null pointers,
// a supported head dim, num_q_heads a multiple of num_kv_heads, offsets non-decreasing.
const char* ValidateDecodeAttention(const DecodeAttentionParams& p);

// CPU reference with the kernel's semantics over host pointers: for every query head, the
// softmax over all its KV head's chunk rows, in fp32, merged with its tail partial when
// p.tail is set, written to out in the dtype. A KV head with no rows (and no tail) writes
// zeros. Heads run on `pool` when given. Returns false (writing nothing)
// when ValidateDecodeAttention fails.
bool DecodeAttentionCpu(const DecodeAttentionParams& p, ThreadPool* pool = nullptr);

}  // namespace icecache
