#include "model/blas.h"

#include <cblas.h>
#include <cpuid.h>
#include <unistd.h>

#include <cstdlib>
#include <vector>

#include "absl/strings/str_cat.h"

namespace icecache::model {
namespace {

// The core type OpenBLAS should use on this CPU, or nullptr to leave its choice alone.
const char* CoreTypeForThisCpu() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return nullptr;
  const bool avx2 = (ebx >> 5) & 1;
  const bool avx512f = (ebx >> 16) & 1, avx512dq = (ebx >> 17) & 1;
  const bool avx512bw = (ebx >> 30) & 1, avx512vl = (ebx >> 31) & 1;
  unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  __get_cpuid(1, &a1, &b1, &c1, &d1);
  const bool fma = (c1 >> 12) & 1;
  const bool osxsave = (c1 >> 27) & 1;
  if (!osxsave) return nullptr;
  // The OS must save the wide registers (XCR0: SSE, AVX, and for AVX-512 opmask/ZMM state).
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool ymm = (xcr0_lo & 0x6) == 0x6;
  const bool zmm = (xcr0_lo & 0xe6) == 0xe6;
  if (avx512f && avx512dq && avx512bw && avx512vl && zmm) return "SkylakeX";
  if (avx2 && fma && ymm) return "Haswell";
  return nullptr;
}

}  // namespace

void EnsureBlasKernel(int argc, char** argv) {
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) return;
  const char* core = CoreTypeForThisCpu();
  if (core == nullptr) return;
  if (::setenv("OPENBLAS_CORETYPE", core, 1) != 0) return;
  std::vector<char*> args(argv, argv + argc);
  args.push_back(nullptr);
  ::execv("/proc/self/exe", args.data());
  // execv returned: carry on with OpenBLAS's own choice.
}

std::string BlasDescription() {
  return absl::StrCat("OpenBLAS ", openblas_get_corename(), ", ", openblas_get_num_threads(),
                      " threads");
}

void SetBlasThreads(int threads) { openblas_set_num_threads(threads); }

}  // namespace icecache::model
