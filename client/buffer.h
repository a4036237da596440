// Working memory (or pinned host memory) owned through a Backend (internal to
// libicecache_client). Move-only; frees on destruction.
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "client/backend.h"

namespace icecache::client_internal {

class Buffer {
 public:
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept
      : backend_(o.backend_), ptr_(o.ptr_), bytes_(o.bytes_), host_(o.host_) {
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  ~Buffer() { Reset(); }

  // `bytes` of working memory (on_host: pinned host memory for the host to write and the
  // stream to copy), zero-filled. Frees what the buffer held before.
  absl::Status Allocate(Backend* backend, size_t bytes, bool on_host = false) {
    Reset();
    backend_ = backend;
    host_ = on_host;
    absl::StatusOr<void*> p = on_host ? backend->AllocateHost(bytes) : backend->Allocate(bytes);
    if (!p.ok()) return p.status();
    ptr_ = *p;
    bytes_ = bytes;
    return absl::OkStatus();
  }
  void Reset() {
    if (ptr_ != nullptr) host_ ? backend_->FreeHost(ptr_) : backend_->Free(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }

  void* ptr() const { return ptr_; }
  uint8_t* bytes() const { return static_cast<uint8_t*>(ptr_); }
  size_t size() const { return bytes_; }

 private:
  Backend* backend_ = nullptr;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  bool host_ = false;
};

}  // namespace icecache::client_internal
