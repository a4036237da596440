// Where the client's data and kernels live: the small environment interface the client's
// logic runs against (CONVENTIONS 12). The CUDA backend puts working memory on the device and
// launches the kernels; the CPU backend keeps everything in host memory and runs the kernels'
// CPU references (the same page layout, the same descriptors) on a thread pool. Everything
// above this interface is shared by both modes.
//
// Ordering: calls taking a stream enqueue in order on it (the CPU backend runs them at once).
// Internal to libicecache_client.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "icecache/execution_mode.h"
#include "kernels/attention.h"
#include "kernels/gather.h"
#include "kernels/kv_copy.h"

namespace icecache::client_internal {

// A point in a stream's work, for the host to wait on and to time between.
class Marker {
 public:
  virtual ~Marker() = default;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual ExecutionMode mode() const = 0;

  // Working memory (device memory in CUDA mode), zero-filled, 256-byte aligned.
  virtual absl::StatusOr<void*> Allocate(size_t bytes) = 0;
  virtual void Free(void* p) = 0;
  // Host memory for descriptors the host writes and the stream copies (pinned).
  virtual absl::StatusOr<void*> AllocateHost(size_t bytes) = 0;
  virtual void FreeHost(void* p) = 0;

  // Makes [base, base + bytes) of host memory (an arena segment) readable and writable by
  // the kernels; returns the address the kernels use for `base` (identity on the CPU).
  virtual absl::StatusOr<void*> RegisterHost(void* base, size_t bytes) = 0;
  virtual void UnregisterHost(void* base) = 0;

  // Copies between any two of: working memory, registered or pinned host memory, and the
  // caller's tensors (device memory in CUDA mode).
  virtual absl::Status Copy(void* dst, const void* src, size_t bytes, void* stream) = 0;
  // `height` rows of `width` bytes, rows `spitch` / `dpitch` bytes apart.
  virtual absl::Status Copy2D(void* dst, size_t dpitch, const void* src, size_t spitch,
                              size_t width, size_t height, void* stream) = 0;

  // The kernels (descriptor arrays in working memory).
  virtual absl::Status AppendKv(const AppendKvParams& p, void* stream) = 0;
  virtual absl::Status WriteStaging(const WriteStagingParams& p, void* stream) = 0;
  virtual absl::Status Gather(const GatherItem* items, uint32_t num_items, uint64_t page_bytes,
                              void* stream) = 0;
  // `scratch`: AttentionScratchBytes(p, splits) of working memory.
  virtual absl::Status Attention(const DecodeAttentionParams& p, uint32_t splits, void* scratch,
                                 void* stream) = 0;
  virtual size_t AttentionScratchBytes(const DecodeAttentionParams& p, uint32_t splits) const = 0;

  virtual absl::StatusOr<std::unique_ptr<Marker>> CreateMarker() = 0;
  virtual absl::Status Record(Marker* marker, void* stream) = 0;
  // Blocks until the work before the marker's last Record is done.
  virtual absl::Status WaitMarker(Marker* marker) = 0;
  // Microseconds between two recorded markers (waits for `end`).
  virtual absl::StatusOr<double> ElapsedUs(Marker* begin, Marker* end) = 0;
  virtual absl::Status Synchronize(void* stream) = 0;
  // Runs `fn` on the host once the stream's work before it is done (CUDA: cudaLaunchHostFunc
  // on a driver thread; CPU: at once, on the calling thread). `fn` must not call the backend
  // or CUDA.
  virtual absl::Status HostCallback(void* stream, std::function<void()> fn) = 0;
};

std::unique_ptr<Backend> CreateCpuBackend(uint32_t threads);
// FAILED_PRECONDITION when the library has no CUDA or the device is not usable.
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(int device);
// Whether a CUDA device is usable (false in CPU-only builds).
bool CudaDeviceUsable(int device);

}  // namespace icecache::client_internal
