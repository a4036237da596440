// Where libicecache_client runs its data and kernels.
#pragma once

#include <cstdint>

namespace icecache {

enum class ExecutionMode : uint8_t {
  kAuto,  // kCuda when a CUDA device is usable (and the library was built with CUDA), else kCpu
  kCpu,   // host memory, the kernels' CPU references (tests, CI, machines without a GPU)
  kCuda,  // device memory, the CUDA kernels; the arena registered with cudaHostRegister
};
const char* ExecutionModeName(ExecutionMode mode);

}  // namespace icecache
