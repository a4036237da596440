// The CPU backend: host memory and the kernels' CPU references.
#include <chrono>
#include <cstdlib>
#include <cstring>

#include "client/backend.h"
#include "common/thread_pool.h"

namespace icecache::client_internal {
namespace {

class CpuMarker : public Marker {
 public:
  std::chrono::steady_clock::time_point at{};
};

class CpuBackend : public Backend {
 public:
  explicit CpuBackend(uint32_t threads) : pool_(threads) {}
  ExecutionMode mode() const override { return ExecutionMode::kCpu; }

  absl::StatusOr<void*> Allocate(size_t bytes) override {
    const size_t rounded = (bytes + 255) / 256 * 256;
    void* p = std::aligned_alloc(256, rounded == 0 ? 256 : rounded);
    if (p == nullptr) return absl::ResourceExhaustedError("host allocation failed");
    std::memset(p, 0, rounded == 0 ? 256 : rounded);
    return p;
  }
  void Free(void* p) override { std::free(p); }
  absl::StatusOr<void*> AllocateHost(size_t bytes) override { return Allocate(bytes); }
  void FreeHost(void* p) override { std::free(p); }
  absl::StatusOr<void*> RegisterHost(void* base, size_t) override { return base; }
  void UnregisterHost(void*) override {}

  absl::Status Copy(void* dst, const void* src, size_t bytes, void*) override {
    if (bytes != 0) std::memmove(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status Copy2D(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                      size_t height, void*) override {
    for (size_t r = 0; r < height; ++r) {
      std::memcpy(static_cast<uint8_t*>(dst) + r * dpitch,
                  static_cast<const uint8_t*>(src) + r * spitch, width);
    }
    return absl::OkStatus();
  }
  absl::Status AppendKv(const AppendKvParams& p, void*) override {
    return AppendKvCpu(p) ? absl::OkStatus()
                          : absl::InvalidArgumentError("append: bad K/V row arguments");
  }
  absl::Status WriteStaging(const WriteStagingParams& p, void*) override {
    return WriteStagingCpu(p) ? absl::OkStatus()
                              : absl::InvalidArgumentError("staging copy: bad arguments");
  }
  absl::Status Gather(const GatherItem* items, uint32_t n, uint64_t page_bytes, void*) override {
    if (n == 0) return absl::OkStatus();
    return GatherPagesCpu(items, n, page_bytes)
               ? absl::OkStatus()
               : absl::InvalidArgumentError("gather: bad page arguments");
  }
  absl::Status Attention(const DecodeAttentionParams& p, uint32_t, void*, void*) override {
    if (!DecodeAttentionCpu(p, &pool_)) {
      const char* why = ValidateDecodeAttention(p);
      return absl::InvalidArgumentError(why != nullptr ? why : "attention: bad arguments");
    }
    return absl::OkStatus();
  }
  size_t AttentionScratchBytes(const DecodeAttentionParams&, uint32_t) const override { return 0; }

  absl::StatusOr<std::unique_ptr<Marker>> CreateMarker() override {
    return std::unique_ptr<Marker>(new CpuMarker());
  }
  absl::Status Record(Marker* m, void*) override {
    static_cast<CpuMarker*>(m)->at = std::chrono::steady_clock::now();
    return absl::OkStatus();
  }
  absl::Status WaitMarker(Marker*) override { return absl::OkStatus(); }
  absl::StatusOr<double> ElapsedUs(Marker* begin, Marker* end) override {
    return std::chrono::duration<double, std::micro>(static_cast<CpuMarker*>(end)->at -
                                                     static_cast<CpuMarker*>(begin)->at)
        .count();
  }
  absl::Status HostCallback(void*, std::function<void()> fn) override {
    fn();
    return absl::OkStatus();
  }
  absl::Status Synchronize(void*) override { return absl::OkStatus(); }

 private:
  ThreadPool pool_;
};

}  // namespace

std::unique_ptr<Backend> CreateCpuBackend(uint32_t threads) {
  return std::make_unique<CpuBackend>(threads);
}

}  // namespace icecache::client_internal
