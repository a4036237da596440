// Launchers of the K/V copies. Available only in CUDA builds. Pointers device-visible, 16-byte
// aligned, row_bytes a multiple of 16; never allocate, never synchronize;
// cudaErrorInvalidValue (nothing launched) for bad arguments.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/kv_copy.h"

namespace icecache {

cudaError_t LaunchAppendKv(const AppendKvParams& p, cudaStream_t stream);
cudaError_t LaunchWriteStaging(const WriteStagingParams& p, cudaStream_t stream);

}  // namespace icecache
