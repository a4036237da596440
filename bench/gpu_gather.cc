// Fetch of scattered pages to the GPU (CUDA builds, needs a GPU): the gather kernel reading
// randomly chosen page frames straight from registered (mapped, pinned) host memory, the way
// the client fetches from the daemon's arena, against one bulk cudaMemcpyAsync of the same
// number of bytes from the same pinned memory (the PCIe ceiling), and against one
// cudaMemcpyAsync per page (what the gather replaces), in the same run. Medians of --reps.
//
//   build/bench/gpu_gather [--arena_gib=2] [--reps=30] [--out=DIR]
#include <cuda_runtime_api.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "bench/bench_output.h"
#include "bench/stats.h"
#include "common/flags_compat.h"
#include "kernels/gather.h"
#include "kernels/gather_cuda.h"

ABSL_FLAG(double, arena_gib, 2.0, "Registered host memory the pages are drawn from.");
ABSL_FLAG(int, reps, 30, "Timed repetitions per measurement.");
ABSL_FLAG(std::string, out, "bench/results", "Directory for the JSON results.");

namespace {

void Die(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

using icecache::bench::Median;

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args = icecache::NormalizeFlagNames(argc, argv);
  std::vector<char*> ptrs = icecache::ArgvPointers(args);
  absl::ParseCommandLine(static_cast<int>(args.size()), ptrs.data());
  icecache::bench::PrepareOutDir(absl::GetFlag(FLAGS_out), "gpu_gather");
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "gpu_gather: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  Die(cudaGetDeviceProperties(&prop, 0), "properties");
  const size_t arena = static_cast<size_t>(absl::GetFlag(FLAGS_arena_gib) * (1ull << 30));
  const int reps = absl::GetFlag(FLAGS_reps);
  // Shared anonymous memory registered like an arena segment (memfd mappings behave alike).
  void* host = ::mmap(nullptr, arena, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (host == MAP_FAILED) {
    std::perror("mmap");
    return 1;
  }
  std::memset(host, 1, arena);
  Die(cudaHostRegister(host, arena, cudaHostRegisterMapped | cudaHostRegisterPortable),
      "cudaHostRegister");
  void* host_dev = nullptr;
  Die(cudaHostGetDevicePointer(&host_dev, host, 0), "device pointer");
  cudaStream_t stream;
  Die(cudaStreamCreate(&stream), "stream");
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::printf("gpu_gather: %s, %.1f GiB registered\n", prop.name, arena / double(1ull << 30));
  std::printf("%10s %7s %12s %12s %12s %8s\n", "page_B", "pages", "gather_GB/s", "bulk_GB/s",
              "per_page_GB/s", "ratio");

  std::ofstream json(absl::GetFlag(FLAGS_out) + "/gpu_gather.json");
  json << "{\n  \"device\": \"" << prop.name << "\",\n  \"reps\": " << reps << ",\n  \"rows\": [";
  bool first = true;
  std::mt19937_64 rng(1);
  for (uint64_t page : {4096ull, 8192ull, 16384ull, 65536ull}) {
    for (uint32_t n : {96u, 768u, 3072u}) {
      const uint64_t frames = arena / page;
      if (n > frames) continue;
      std::vector<uint64_t> pick(frames);
      std::iota(pick.begin(), pick.end(), 0);
      std::shuffle(pick.begin(), pick.end(), rng);
      void* dst = nullptr;
      Die(cudaMalloc(&dst, n * page), "cudaMalloc");
      std::vector<icecache::GatherItem> items(n);
      for (uint32_t i = 0; i < n; ++i) {
        items[i] = {static_cast<uint8_t*>(host_dev) + pick[i] * page,
                    static_cast<uint8_t*>(dst) + uint64_t{i} * page};
      }
      void* items_d = nullptr;
      Die(cudaMalloc(&items_d, n * sizeof(icecache::GatherItem)), "cudaMalloc");
      Die(cudaMemcpy(items_d, items.data(), n * sizeof(icecache::GatherItem),
                     cudaMemcpyHostToDevice),
          "items");
      auto time = [&](auto&& enqueue) {
        std::vector<double> gbps;
        for (int r = 0; r < reps + 3; ++r) {
          cudaEventRecord(a, stream);
          enqueue();
          cudaEventRecord(b, stream);
          Die(cudaEventSynchronize(b), "sync");
          float ms = 0;
          cudaEventElapsedTime(&ms, a, b);
          if (r >= 3) gbps.push_back(double(n) * page / (ms * 1e6));
        }
        return Median(gbps);
      };
      const double gather = time([&] {
        Die(icecache::LaunchGatherPages(static_cast<icecache::GatherItem*>(items_d), n, page,
                                        stream),
            "gather");
      });
      // The bulk copy reads the same number of bytes from a contiguous pinned range.
      const double bulk = time([&] {
        Die(cudaMemcpyAsync(dst, host, n * page, cudaMemcpyHostToDevice, stream), "bulk");
      });
      const double per_page = time([&] {
        for (uint32_t i = 0; i < n; ++i) {
          cudaMemcpyAsync(static_cast<uint8_t*>(dst) + uint64_t{i} * page,
                          static_cast<uint8_t*>(host) + pick[i] * page, page,
                          cudaMemcpyHostToDevice, stream);
        }
      });
      std::printf("%10llu %7u %12.1f %12.1f %12.1f %8.3f\n", static_cast<unsigned long long>(page),
                  n, gather, bulk, per_page, gather / bulk);
      json << (first ? "" : ",") << "\n    {\"page_bytes\": " << page << ", \"pages\": " << n
           << ", \"gather_gbps\": " << gather << ", \"bulk_gbps\": " << bulk
           << ", \"per_page_memcpy_gbps\": " << per_page
           << ", \"gather_over_bulk\": " << gather / bulk << "}";
      first = false;
      cudaFree(items_d);
      cudaFree(dst);
    }
  }
  json << "\n  ]\n}\n";
  icecache::bench::CloseResult(json, absl::GetFlag(FLAGS_out) + "/gpu_gather.json", "gpu_gather");
  cudaHostUnregister(host);
  ::munmap(host, arena);
  return 0;
}
