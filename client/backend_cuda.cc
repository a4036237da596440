// The CUDA backend: device memory, mapped host registrations and the kernel launchers.
// Compiled only in CUDA builds; CPU-only builds get the stubs at the end.
#include "client/backend.h"

#if defined(ICECACHE_HAVE_CUDA)
#include <cuda_runtime_api.h>

#include <functional>
#include <memory>

#include "absl/strings/str_cat.h"
#include "kernels/attention_cuda.h"
#include "kernels/gather_cuda.h"
#include "kernels/kv_copy_cuda.h"
#endif

namespace icecache::client_internal {

#if defined(ICECACHE_HAVE_CUDA)
namespace {

absl::Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  const absl::StatusCode code = e == cudaErrorMemoryAllocation
                                    ? absl::StatusCode::kResourceExhausted
                                : e == cudaErrorInvalidValue ? absl::StatusCode::kInvalidArgument
                                                             : absl::StatusCode::kInternal;
  return absl::Status(code, absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

cudaStream_t S(void* stream) { return static_cast<cudaStream_t>(stream); }

class CudaMarker : public Marker {
 public:
  ~CudaMarker() override {
    if (event != nullptr) cudaEventDestroy(event);
  }
  cudaEvent_t event = nullptr;
};

class CudaBackend : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {}
  ExecutionMode mode() const override { return ExecutionMode::kCuda; }

  absl::Status Bind() { return CudaStatus(cudaSetDevice(device_), "cudaSetDevice"); }

  absl::StatusOr<void*> Allocate(size_t bytes) override {
    if (absl::Status s = Bind(); !s.ok()) return s;
    void* p = nullptr;
    if (absl::Status s = CudaStatus(cudaMalloc(&p, bytes == 0 ? 256 : bytes), "cudaMalloc");
        !s.ok()) {
      return s;
    }
    if (absl::Status s = CudaStatus(cudaMemset(p, 0, bytes == 0 ? 256 : bytes), "cudaMemset");
        !s.ok()) {
      cudaFree(p);
      return s;
    }
    return p;
  }
  void Free(void* p) override {
    if (p != nullptr) cudaFree(p);
  }
  absl::StatusOr<void*> AllocateHost(size_t bytes) override {
    void* p = nullptr;
    if (absl::Status s = CudaStatus(
            cudaHostAlloc(&p, bytes == 0 ? 256 : bytes, cudaHostAllocPortable), "cudaHostAlloc");
        !s.ok()) {
      return s;
    }
    return p;
  }
  void FreeHost(void* p) override {
    if (p != nullptr) cudaFreeHost(p);
  }
  absl::StatusOr<void*> RegisterHost(void* base, size_t bytes) override {
    if (absl::Status s = Bind(); !s.ok()) return s;
    if (absl::Status s = CudaStatus(
            cudaHostRegister(base, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable),
            "cudaHostRegister");
        !s.ok()) {
      return s;
    }
    void* device = nullptr;
    if (absl::Status s =
            CudaStatus(cudaHostGetDevicePointer(&device, base, 0), "cudaHostGetDevicePointer");
        !s.ok()) {
      cudaHostUnregister(base);
      return s;
    }
    return device;
  }
  void UnregisterHost(void* base) override { cudaHostUnregister(base); }

  absl::Status Copy(void* dst, const void* src, size_t bytes, void* stream) override {
    if (bytes == 0) return absl::OkStatus();
    return CudaStatus(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, S(stream)),
                      "cudaMemcpyAsync");
  }
  absl::Status Copy2D(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                      size_t height, void* stream) override {
    if (width == 0 || height == 0) return absl::OkStatus();
    return CudaStatus(
        cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, cudaMemcpyDefault, S(stream)),
        "cudaMemcpy2DAsync");
  }
  absl::Status AppendKv(const AppendKvParams& p, void* stream) override {
    return CudaStatus(LaunchAppendKv(p, S(stream)), "append kernel");
  }
  absl::Status WriteStaging(const WriteStagingParams& p, void* stream) override {
    return CudaStatus(LaunchWriteStaging(p, S(stream)), "staging kernel");
  }
  absl::Status Gather(const GatherItem* items, uint32_t n, uint64_t page_bytes,
                      void* stream) override {
    return CudaStatus(LaunchGatherPages(items, n, page_bytes, S(stream)), "gather kernel");
  }
  absl::Status Attention(const DecodeAttentionParams& p, uint32_t splits, void* scratch,
                         void* stream) override {
    return CudaStatus(LaunchDecodeAttention(p, static_cast<float*>(scratch), splits, S(stream)),
                      "attention kernel");
  }
  size_t AttentionScratchBytes(const DecodeAttentionParams& p, uint32_t splits) const override {
    return DecodeAttentionScratchFloats(p, splits) * sizeof(float);
  }

  absl::StatusOr<std::unique_ptr<Marker>> CreateMarker() override {
    auto m = std::make_unique<CudaMarker>();
    if (absl::Status s = CudaStatus(cudaEventCreate(&m->event), "cudaEventCreate"); !s.ok()) {
      return s;
    }
    return std::unique_ptr<Marker>(std::move(m));
  }
  absl::Status Record(Marker* m, void* stream) override {
    return CudaStatus(cudaEventRecord(static_cast<CudaMarker*>(m)->event, S(stream)),
                      "cudaEventRecord");
  }
  absl::Status WaitMarker(Marker* m) override {
    return CudaStatus(cudaEventSynchronize(static_cast<CudaMarker*>(m)->event),
                      "cudaEventSynchronize");
  }
  absl::StatusOr<double> ElapsedUs(Marker* begin, Marker* end) override {
    if (absl::Status s = WaitMarker(end); !s.ok()) return s;
    float ms = 0;
    if (absl::Status s =
            CudaStatus(cudaEventElapsedTime(&ms, static_cast<CudaMarker*>(begin)->event,
                                            static_cast<CudaMarker*>(end)->event),
                       "cudaEventElapsedTime");
        !s.ok()) {
      return s;
    }
    return 1000.0 * ms;
  }
  absl::Status HostCallback(void* stream, std::function<void()> fn) override {
    auto* heap = new std::function<void()>(std::move(fn));
    const cudaError_t e = cudaLaunchHostFunc(
        S(stream),
        [](void* p) {
          std::unique_ptr<std::function<void()>> f(static_cast<std::function<void()>*>(p));
          (*f)();
        },
        heap);
    if (e != cudaSuccess) delete heap;
    return CudaStatus(e, "cudaLaunchHostFunc");
  }
  absl::Status Synchronize(void* stream) override {
    return CudaStatus(cudaStreamSynchronize(S(stream)), "cudaStreamSynchronize");
  }

 private:
  const int device_;
};

}  // namespace

bool CudaDeviceUsable(int device) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return device >= 0 && device < count;
}

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(int device) {
  if (!CudaDeviceUsable(device)) {
    return absl::FailedPreconditionError(absl::StrCat("CUDA device ", device, " is not usable"));
  }
  auto backend = std::make_unique<CudaBackend>(device);
  if (absl::Status s = backend->Bind(); !s.ok()) return absl::FailedPreconditionError(s.message());
  return std::unique_ptr<Backend>(std::move(backend));
}

#else  // CPU-only build

bool CudaDeviceUsable(int) { return false; }

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(int) {
  return absl::FailedPreconditionError("libicecache_client was built without CUDA");
}

#endif

}  // namespace icecache::client_internal
