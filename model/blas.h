// OpenBLAS set-up for the model's matrix products.
//
// Debian's OpenBLAS picks its kernel by CPU model. On virtual machines that report a generic
// model name ("Intel(R) Xeon(R) Processor") it falls back to its oldest kernel (Prescott):
// measured on the 2-core development VM, sgemm 512x1536x576 runs at 21 GFLOP/s with it, 63
// with the Haswell kernel and 126 with SkylakeX, on the same machine. OpenBLAS reads
// OPENBLAS_CORETYPE once, when it is loaded, so a program that wants the right kernel sets it
// before the library initialises: EnsureBlasKernel re-executes the program with the variable
// set from the CPU's actual features (unless the user set it).
#pragma once

#include <string>

namespace icecache::model {

// Call first thing in main(). When OPENBLAS_CORETYPE is unset and the CPU supports AVX-512
// (F, BW, DQ, VL) or AVX2 + FMA, sets it to SkylakeX or Haswell and re-executes
// /proc/self/exe with the same arguments; returns (doing nothing) otherwise, or when the
// re-exec fails.
void EnsureBlasKernel(int argc, char** argv);

// "OpenBLAS <core>, <n> threads".
std::string BlasDescription();

// Threads OpenBLAS uses for one product.
void SetBlasThreads(int threads);

}  // namespace icecache::model
