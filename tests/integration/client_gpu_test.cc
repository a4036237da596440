// The whole client flow in CUDA mode equals CPU mode: one real daemon, a CPU-mode client and a
// CUDA-mode client each running the same sequence (same K/V, same queries); every step's
// selection, hits, misses and attended rows must be identical and the outputs equal to float
// tolerance. Also checks that CUDA mode registers every arena segment. Skipped without a GPU.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "icecache/client.h"
#include "tests/integration/client_data.h"
#include "tests/support/daemon_process.h"
#include "tests/support/status_matchers.h"

namespace icecache::testing {
namespace {

bool HaveGpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

struct DeviceCopy {
  void* ptr = nullptr;
  DeviceCopy(const void* host, size_t bytes) {
    EXPECT_EQ(cudaMalloc(&ptr, bytes), cudaSuccess);
    if (host != nullptr) cudaMemcpy(ptr, host, bytes, cudaMemcpyHostToDevice);
  }
  ~DeviceCopy() { cudaFree(ptr); }
};

TEST(ClientGpu, CudaModeEqualsCpuMode) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device visible";
  TempDir dir;
  auto daemon = DaemonProcess::Start(dir.path(),
                                     DaemonConfig{"2GiB", false, {"--recall-sample-every=0"}, {}});
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  for (DType dtype : {DType::kBF16, DType::kFP16}) {
    for (uint32_t d : {64u, 128u}) {
      constexpr uint32_t kPrompt = 3000, kSteps = 48;
      const Data data = MakeData(3, 2, 4, d, kPrompt + kSteps, dtype, 11 + d);
      ClientOptions co;
      co.socket = (*daemon)->socket_path();
      co.mode = ExecutionMode::kCpu;
      auto cpu = Client::Attach(co);
      ASSERT_TRUE(cpu.ok()) << cpu.status();
      co.mode = ExecutionMode::kCuda;
      auto gpu = Client::Attach(co);
      ASSERT_TRUE(gpu.ok()) << gpu.status();
      ASSERT_EQ((*gpu)->mode(), ExecutionMode::kCuda);
      SequenceOptions so;
      so.num_layers = data.layers;
      so.num_q_heads = data.q_heads();
      so.num_kv_heads = data.kv;
      so.head_dim = d;
      so.dtype = dtype;
      so.max_tokens = data.tokens;
      so.budget_tokens = 256;
      so.full_kv_layers = 1;
      auto sc = (*cpu)->CreateSequence(so);
      auto sg = (*gpu)->CreateSequence(so);
      ASSERT_TRUE(sc.ok() && sg.ok());
      cudaStream_t stream;
      ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
      for (uint32_t l = 0; l < data.layers; ++l) {
        ASSERT_OK((*sc)->Prefill(l, data.K(l, 0), data.V(l, 0), kPrompt));
        DeviceCopy k(data.K(l, 0), size_t{kPrompt} * data.kv * d * 2);
        DeviceCopy v(data.V(l, 0), size_t{kPrompt} * data.kv * d * 2);
        ASSERT_OK((*sg)->Prefill(l, k.ptr, v.ptr, kPrompt, stream));
        ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      }
      const size_t q_elems = size_t{data.q_heads()} * d;
      DeviceCopy q_d(nullptr, q_elems * 2), out_d(nullptr, q_elems * 2);
      DeviceCopy kn(nullptr, size_t{data.kv} * d * 2), vn(nullptr, size_t{data.kv} * d * 2);
      std::vector<uint16_t> out_c(q_elems), out_g(q_elems);
      for (uint32_t step = 0; step < kSteps; ++step) {
        const uint32_t pos = kPrompt + step;
        for (uint32_t l = 0; l < data.layers; ++l) {
          const std::vector<uint16_t> q = data.Query(l, step / 4);  // queries repeat: hits
          ASSERT_OK((*sc)->Decode(l, q.data(), data.K(l, pos), data.V(l, pos), out_c.data()));
          cudaMemcpy(q_d.ptr, q.data(), q_elems * 2, cudaMemcpyHostToDevice);
          cudaMemcpy(kn.ptr, data.K(l, pos), size_t{data.kv} * d * 2, cudaMemcpyHostToDevice);
          cudaMemcpy(vn.ptr, data.V(l, pos), size_t{data.kv} * d * 2, cudaMemcpyHostToDevice);
          cudaMemset(out_d.ptr, 0xFF, q_elems * 2);  // poison
          ASSERT_OK((*sg)->Decode(l, q_d.ptr, kn.ptr, vn.ptr, out_d.ptr, stream));
          ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
          cudaMemcpy(out_g.data(), out_d.ptr, q_elems * 2, cudaMemcpyDeviceToHost);
          const DecodeBreakdown& bc = (*sc)->last_decode();
          const DecodeBreakdown& bg = (*sg)->last_decode();
          ASSERT_EQ(bg.attended_tokens, bc.attended_tokens) << "step " << step << " layer " << l;
          ASSERT_EQ(bg.hits, bc.hits);
          ASSERT_EQ(bg.misses, bc.misses);
          for (size_t i = 0; i < q_elems; ++i) {
            const float want = data.ToFloat(out_c[i]), got = data.ToFloat(out_g[i]);
            ASSERT_FALSE(std::isnan(got)) << "step " << step << " layer " << l << " elem " << i;
            ASSERT_NEAR(got, want, 2 * Tolerance(dtype, want))
                << "step " << step << " layer " << l << " elem " << i;
          }
          if (l == data.layers - 1 && step % 16 == 5) {
            for (uint32_t h = 0; h < data.kv; ++h) {
              auto rc = (*sc)->LastAttended(l, h);
              auto rg = (*sg)->LastAttended(l, h);
              ASSERT_TRUE(rc.ok() && rg.ok());
              ASSERT_EQ(rg->k, rc->k) << "attended K rows differ, head " << h;
              ASSERT_EQ(rg->v, rc->v) << "attended V rows differ, head " << h;
            }
          }
        }
      }
      const ClientCounters cc = (*cpu)->counters(), cg = (*gpu)->counters();
      EXPECT_EQ(cg.cache_hits, cc.cache_hits);
      EXPECT_EQ(cg.cache_misses, cc.cache_misses);
      EXPECT_EQ(cg.fetched_bytes, cc.fetched_bytes);
      EXPECT_GT(cg.fetch_nanoseconds, 0u);
      EXPECT_GT(cg.hit_rate(), 0.5);
      cudaStreamDestroy(stream);
    }
  }
}

}  // namespace
}  // namespace icecache::testing
