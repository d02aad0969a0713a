// defines: tf::GemmBf16Args, tf::cuda::gemm_bf16_mma (CUDA backend) and tf::simt::gemm_bf16_mma
// (the same kernel source run on the SIMT simulator): C = A * op(B) on mma.sync tensor cores,
// bf16 inputs, f32 accumulation and output
#pragma once

#include <cstdint>

namespace tf {

// Row-major matrices in device memory (sim::DeviceBuffer memory for tf::simt): A [m, k] bf16;
// B [n, k] bf16 when b_is_nk (a weight as nn.Linear stores it: C = A B^T), else [k, n]; C [m, n]
// f32, overwritten. Tiles move in 16-byte chunks, so k and (for B [k, n]) n must be multiples of 8
// and A and B 16-byte aligned.
struct GemmBf16Args {
  const uint16_t* a;
  const uint16_t* b;
  float* c;
  int m, n, k;
  bool b_is_nk;
};

namespace cuda {
void gemm_bf16_mma(const GemmBf16Args& args);
}
namespace simt {
void gemm_bf16_mma(const GemmBf16Args& args);
}

}  // namespace tf
