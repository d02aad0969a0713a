// defines: the dense GEMM the CUDA backend calls, declared for both builds: tf::cuda::blas
// (cuBLASLt) and tf::simt::blas (a host stand-in on simulated device memory that checks every
// operand range like a kernel access, so the backend code that calls cuBLASLt is what runs in
// simulation).
#pragma once

#include <cstdint>

#include "kernels/scratch_shape.h"

namespace tf::cuda::blas {
#include "kernels/cuda/blas_api.inc"
}  // namespace tf::cuda::blas
namespace tf::simt::blas {
#include "kernels/cuda/blas_api.inc"
}  // namespace tf::simt::blas
