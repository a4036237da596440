// GPU tests of the sparse paged decode attention and the K/V copy kernels against their CPU
// references: the same sweeps as the CPU tests (dtypes, head dims, GQA groups, ragged page
// fills, long lists split many ways), poisoned outputs, NaN checks, exact equality for the
// copies. Skipped without a GPU.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstring>
#include <map>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention_cuda.h"
#include "kernels/kv_copy_cuda.h"
#include "tests/kernels/attention_case.h"

namespace icecache {
namespace {

using testing::AddVirtualTail;
using testing::Case;
using testing::Decode;
using testing::MakeCase;

bool HaveGpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define SKIP_WITHOUT_GPU() \
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device visible"

// Device memory freed at scope exit.
struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) {
    if (cudaMalloc(&ptr, bytes == 0 ? 16 : bytes) != cudaSuccess) ptr = nullptr;
  }
  ~DeviceBuffer() {
    if (ptr != nullptr) cudaFree(ptr);
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr);
  }
};

// Copies a Case's rows, chunks, offsets and query to the device and runs the kernel; returns
// the output rows (poisoned first with 0xFFFF, a NaN in both dtypes).
struct GpuRun {
  std::vector<std::unique_ptr<DeviceBuffer>> owned;
  cudaError_t launch = cudaSuccess;
  std::vector<uint16_t> out;
};

GpuRun RunOnGpu(const Case& c, uint32_t splits) {
  GpuRun run;
  std::map<const void*, std::pair<size_t, uint8_t*>> moved;  // host buffer -> (bytes, device)
  for (const auto& b : c.buffers) {
    auto d = std::make_unique<DeviceBuffer>(b.size() * 2);
    cudaMemcpy(d->ptr, b.data(), b.size() * 2, cudaMemcpyHostToDevice);
    moved[b.data()] = {b.size() * 2, d->as<uint8_t>()};
    run.owned.push_back(std::move(d));
  }
  auto to_device = [&](const void* p) -> const void* {
    auto it = moved.upper_bound(p);
    --it;
    return it->second.second +
           (static_cast<const uint8_t*>(p) - static_cast<const uint8_t*>(it->first));
  };
  std::vector<AttentionChunk> chunks = c.chunks;
  for (AttentionChunk& ch : chunks) {
    ch.k = to_device(ch.k);
    ch.v = to_device(ch.v);
  }
  auto chunks_d = std::make_unique<DeviceBuffer>(chunks.size() * sizeof(AttentionChunk));
  auto offsets_d = std::make_unique<DeviceBuffer>(c.offsets.size() * 4);
  auto q_d = std::make_unique<DeviceBuffer>(c.q.size() * 2);
  auto out_d = std::make_unique<DeviceBuffer>(c.q.size() * 2);
  cudaMemcpy(chunks_d->ptr, chunks.data(), chunks.size() * sizeof(AttentionChunk),
             cudaMemcpyHostToDevice);
  cudaMemcpy(offsets_d->ptr, c.offsets.data(), c.offsets.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(q_d->ptr, c.q.data(), c.q.size() * 2, cudaMemcpyHostToDevice);
  cudaMemset(out_d->ptr, 0xFF, c.q.size() * 2);
  DecodeAttentionParams p = c.params;
  p.q = q_d->ptr;
  p.out = out_d->ptr;
  p.chunks = chunks_d->as<AttentionChunk>();
  p.chunk_offsets = offsets_d->as<uint32_t>();
  auto tail_d = std::make_unique<DeviceBuffer>(c.tail.size() * sizeof(float));
  if (c.params.tail != nullptr) {
    cudaMemcpy(tail_d->ptr, c.tail.data(), c.tail.size() * sizeof(float), cudaMemcpyHostToDevice);
    p.tail = tail_d->as<float>();
  }
  DeviceBuffer scratch(DecodeAttentionScratchFloats(p, splits) * sizeof(float));
  run.launch = LaunchDecodeAttention(p, scratch.as<float>(), splits, nullptr);
  cudaDeviceSynchronize();
  run.out.resize(c.q.size());
  cudaMemcpy(run.out.data(), out_d->ptr, c.q.size() * 2, cudaMemcpyDeviceToHost);
  for (auto* d : {&chunks_d, &offsets_d, &q_d, &out_d, &tail_d}) run.owned.push_back(std::move(*d));
  return run;
}

class DecodeAttentionGpuTest
    : public ::testing::TestWithParam<std::tuple<DType, uint32_t, uint32_t>> {};

TEST_P(DecodeAttentionGpuTest, MatchesCpuReference) {
  SKIP_WITHOUT_GPU();
  const auto [dtype, d, group] = GetParam();
  for (uint32_t pages : {0u, 1u, 5u, 23u, 300u}) {
    for (uint32_t splits : {1u, 4u, 64u}) {
      Case c = MakeCase(dtype, d, 3, group, pages, d * 7 + group * 13 + pages);
      ASSERT_TRUE(DecodeAttentionCpu(c.params));
      const GpuRun run = RunOnGpu(c, splits);
      ASSERT_EQ(run.launch, cudaSuccess) << cudaGetErrorString(run.launch);
      ASSERT_EQ(cudaGetLastError(), cudaSuccess);
      // Both accumulate in fp32; the order differs, so allow a couple of output ulps.
      const double tol = dtype == DType::kBF16 ? 1.6e-2 : 2.5e-3;
      for (size_t i = 0; i < c.out.size(); ++i) {
        const float got = Decode(run.out[i], dtype), want = Decode(c.out[i], dtype);
        ASSERT_FALSE(std::isnan(got))
            << "element " << i << " pages " << pages << " splits " << splits;
        ASSERT_NEAR(got, want, tol * (1.0 + std::fabs(want)))
            << "element " << i << " pages " << pages << " splits " << splits;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Sweep, DecodeAttentionGpuTest,
                         ::testing::Combine(::testing::Values(DType::kBF16, DType::kFP16),
                                            ::testing::Values(64u, 128u, 256u),
                                            ::testing::Values(1u, 4u, 7u)),
                         [](const auto& p) {
                           return std::string(DTypeName(std::get<0>(p.param))) + "_d" +
                                  std::to_string(std::get<1>(p.param)) + "_g" +
                                  std::to_string(std::get<2>(p.param));
                         });

TEST(DecodeAttentionGpu, EmptyHeadWritesZerosAndBadParamsLaunchNothing) {
  SKIP_WITHOUT_GPU();
  Case c = MakeCase(DType::kFP16, 64, 2, 2, 3, 5);
  // KV head 1 gets no chunks.
  c.chunks.resize(c.offsets[1]);
  c.offsets[2] = c.offsets[1];
  ASSERT_TRUE(DecodeAttentionCpu(c.params));
  const GpuRun run = RunOnGpu(c, 2);
  ASSERT_EQ(run.launch, cudaSuccess);
  for (uint32_t i = 2 * 64; i < 4 * 64; ++i) EXPECT_EQ(Decode(run.out[i], DType::kFP16), 0.f);

  Case bad = MakeCase(DType::kBF16, 96, 2, 2, 1, 6);  // head_dim 96 is not instantiated
  const GpuRun refused = RunOnGpu(bad, 1);
  EXPECT_EQ(refused.launch, cudaErrorInvalidValue);
  for (uint16_t v : refused.out) ASSERT_EQ(v, 0xFFFF) << "a refused launch wrote output";
  Case too_many = MakeCase(DType::kBF16, 64, 1, 1, 1, 7);
  EXPECT_EQ(RunOnGpu(too_many, 65).launch, cudaErrorInvalidValue);
}

// Tail partials merged by the combine kernel: equal to the CPU reference (itself tested
// against float64 over the virtual tokens), for every split count; empty partials (every
// other head here) change nothing; a KV head with no rows outputs its tail's acc / sum.
TEST(DecodeAttentionGpu, TailPartialsMatchTheCpuReference) {
  SKIP_WITHOUT_GPU();
  for (DType dtype : {DType::kBF16, DType::kFP16}) {
    for (uint32_t d : {64u, 128u, 256u}) {
      for (uint32_t pages : {0u, 7u, 300u}) {
        for (uint32_t splits : {1u, 4u, 64u}) {
          Case c = MakeCase(dtype, d, 3, 4, pages, d + pages);
          if (pages == 0) {
            c.chunks.resize(c.offsets[2]);
            c.offsets[3] = c.offsets[2];  // KV head 2: no rows
          }
          AddVirtualTail(c, 16, d * 3 + pages, pages == 300 ? 3.0 : -1.0, /*empty_every=*/2);
          ASSERT_TRUE(DecodeAttentionCpu(c.params));
          const GpuRun run = RunOnGpu(c, splits);
          ASSERT_EQ(run.launch, cudaSuccess) << cudaGetErrorString(run.launch);
          const double tol = dtype == DType::kBF16 ? 1.6e-2 : 2.5e-3;
          for (size_t i = 0; i < c.out.size(); ++i) {
            const float got = Decode(run.out[i], dtype), want = Decode(c.out[i], dtype);
            ASSERT_FALSE(std::isnan(got)) << i;
            ASSERT_NEAR(got, want, tol * (1.0 + std::fabs(want)))
                << "element " << i << " d " << d << " pages " << pages << " splits " << splits;
          }
        }
      }
    }
  }
}

TEST(KvCopyGpu, AppendAndStagingEqualTheirCpuReferencesExactly) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(3);
  for (uint32_t row : {128u, 256u, 512u}) {
    const uint32_t heads = 5, slots = 37, tokens = 41;
    // Append into slot 29 of a poisoned per-head buffer.
    std::vector<uint8_t> k_new(heads * row), v_new(heads * row);
    for (auto& b : k_new) b = static_cast<uint8_t>(rng());
    for (auto& b : v_new) b = static_cast<uint8_t>(rng());
    std::vector<uint8_t> k_ref(size_t{heads} * slots * row, 0xAB), v_ref(k_ref);
    ASSERT_TRUE(AppendKvCpu({k_new.data(), v_new.data(), k_ref.data(), v_ref.data(),
                             uint64_t{slots} * row, 29, heads, row}));
    DeviceBuffer kn(k_new.size()), vn(v_new.size()), kd(k_ref.size()), vd(v_ref.size());
    cudaMemcpy(kn.ptr, k_new.data(), k_new.size(), cudaMemcpyHostToDevice);
    cudaMemcpy(vn.ptr, v_new.data(), v_new.size(), cudaMemcpyHostToDevice);
    cudaMemset(kd.ptr, 0xAB, k_ref.size());
    cudaMemset(vd.ptr, 0xAB, v_ref.size());
    ASSERT_EQ(LaunchAppendKv(
                  {kn.ptr, vn.ptr, kd.ptr, vd.ptr, uint64_t{slots} * row, 29, heads, row}, nullptr),
              cudaSuccess);
    std::vector<uint8_t> k_got(k_ref.size()), v_got(v_ref.size());
    cudaMemcpy(k_got.data(), kd.ptr, k_got.size(), cudaMemcpyDeviceToHost);
    cudaMemcpy(v_got.data(), vd.ptr, v_got.size(), cudaMemcpyDeviceToHost);
    EXPECT_EQ(k_got, k_ref) << "row " << row;
    EXPECT_EQ(v_got, v_ref) << "row " << row;

    // Staging: token-major device rows to head-major mapped host memory, a token range into a
    // strided destination (as the client writes windows and sinks).
    std::vector<uint8_t> ks(size_t{tokens} * heads * row), vs(ks.size());
    for (auto& b : ks) b = static_cast<uint8_t>(rng());
    for (auto& b : vs) b = static_cast<uint8_t>(rng());
    const uint32_t begin = 7, count = 23, dst_rows = 30, dst_begin = 4;
    const uint64_t stride = uint64_t{dst_rows} * row;
    std::vector<uint8_t> ks_ref(heads * stride, 0xCD), vs_ref(ks_ref);
    WriteStagingParams sp{ks.data(), vs.data(), ks_ref.data(), vs_ref.data(), begin,
                          count,     heads,     row,           stride,        dst_begin};
    ASSERT_TRUE(WriteStagingCpu(sp));
    DeviceBuffer ksd(ks.size()), vsd(vs.size());
    cudaMemcpy(ksd.ptr, ks.data(), ks.size(), cudaMemcpyHostToDevice);
    cudaMemcpy(vsd.ptr, vs.data(), vs.size(), cudaMemcpyHostToDevice);
    void* host = nullptr;
    ASSERT_EQ(cudaHostAlloc(&host, 2 * heads * stride, cudaHostAllocMapped), cudaSuccess);
    std::memset(host, 0xCD, 2 * heads * stride);
    void* host_dev = nullptr;
    ASSERT_EQ(cudaHostGetDevicePointer(&host_dev, host, 0), cudaSuccess);
    sp.k_src = ksd.ptr;
    sp.v_src = vsd.ptr;
    sp.k_dst = host_dev;
    sp.v_dst = static_cast<uint8_t*>(host_dev) + heads * stride;
    ASSERT_EQ(LaunchWriteStaging(sp, nullptr), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(std::memcmp(host, ks_ref.data(), heads * stride), 0) << "row " << row;
    EXPECT_EQ(
        std::memcmp(static_cast<uint8_t*>(host) + heads * stride, vs_ref.data(), heads * stride), 0)
        << "row " << row;
    cudaFreeHost(host);

    // Bad arguments launch nothing.
    EXPECT_EQ(LaunchAppendKv({kn.ptr, vn.ptr, kd.ptr, vd.ptr, 0, 0, heads, row + 8}, nullptr),
              cudaErrorInvalidValue);
    EXPECT_EQ(LaunchWriteStaging({nullptr, vsd.ptr, kd.ptr, vd.ptr, 0, 1, heads, row}, nullptr),
              cudaErrorInvalidValue);
  }
}

}  // namespace
}  // namespace icecache
