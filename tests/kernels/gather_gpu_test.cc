// GPU tests of the gather kernel against its CPU reference: exact equality, poisoned
// destinations, pages read from mapped (registered) host memory. Skipped without a GPU.
#include <cuda_runtime_api.h>

#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/gather.h"
#include "kernels/gather_cuda.h"

namespace icecache {
namespace {

bool HaveGpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define SKIP_WITHOUT_GPU() \
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device visible"

TEST(GatherPagesGpu, MatchesCpuReferenceFromMappedHostMemory) {
  SKIP_WITHOUT_GPU();
  for (uint64_t page_bytes : {16u, 4096u, 8192u, 65536u + 16u}) {
    const uint32_t src_pages = 301, n = 97;
    const uint64_t src_size = page_bytes * src_pages;
    void* host = nullptr;
    ASSERT_EQ(cudaHostAlloc(&host, src_size, cudaHostAllocMapped), cudaSuccess);
    uint8_t* src = static_cast<uint8_t*>(host);
    std::mt19937 rng(static_cast<uint32_t>(page_bytes));
    for (uint64_t i = 0; i < src_size; ++i) src[i] = static_cast<uint8_t>(rng());
    void* src_dev = nullptr;
    ASSERT_EQ(cudaHostGetDevicePointer(&src_dev, host, 0), cudaSuccess);

    void* dst_raw = nullptr;
    ASSERT_EQ(cudaMalloc(&dst_raw, page_bytes * n), cudaSuccess);
    uint8_t* dst = static_cast<uint8_t*>(dst_raw);
    ASSERT_EQ(cudaMemset(dst, 0xCD, page_bytes * n), cudaSuccess);  // poison

    std::vector<uint32_t> pick(src_pages);
    std::iota(pick.begin(), pick.end(), 0);
    std::shuffle(pick.begin(), pick.end(), rng);
    std::vector<GatherItem> items(n), ref_items(n);
    std::vector<uint8_t> expected(page_bytes * n);
    for (uint32_t i = 0; i < n; ++i) {
      items[i] = {static_cast<uint8_t*>(src_dev) + pick[i] * page_bytes, dst + i * page_bytes};
      ref_items[i] = {src + pick[i] * page_bytes, expected.data() + i * page_bytes};
    }
    ASSERT_TRUE(GatherPagesCpu(ref_items.data(), n, page_bytes));
    void* items_raw = nullptr;
    ASSERT_EQ(cudaMalloc(&items_raw, n * sizeof(GatherItem)), cudaSuccess);
    GatherItem* items_dev = static_cast<GatherItem*>(items_raw);
    ASSERT_EQ(cudaMemcpy(items_dev, items.data(), n * sizeof(GatherItem), cudaMemcpyHostToDevice),
              cudaSuccess);
    ASSERT_EQ(LaunchGatherPages(items_dev, n, page_bytes, nullptr), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<uint8_t> got(page_bytes * n);
    ASSERT_EQ(cudaMemcpy(got.data(), dst, got.size(), cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(std::memcmp(got.data(), expected.data(), got.size()), 0) << page_bytes;
    cudaFree(items_dev);
    cudaFree(dst);
    cudaFreeHost(host);
  }
}

TEST(GatherPagesGpu, RejectsBadSizesWithoutLaunching) {
  SKIP_WITHOUT_GPU();
  EXPECT_EQ(LaunchGatherPages(nullptr, 1, 16, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchGatherPages(nullptr, 0, 0, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchGatherPages(nullptr, 0, 24, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchGatherPages(nullptr, 0, 16, nullptr), cudaSuccess);
}

}  // namespace
}  // namespace icecache
