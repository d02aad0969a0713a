// defines: the fused dequantize + tensor-core matmul of the CUDA backend over quantized frozen
// weights, tf::cuda::qmatmul_* (built by nvcc) and their tf::simt twins (the same source on the SIMT
// simulator), and qmatmul_supports: the weight's blocks are decoded to bf16 in registers / shared
// memory and multiplied on mma.sync with f32 accumulation, forward and input gradient, never
// forming a dequantized copy of the matrix in device memory.
#pragma once

#include <cstdint>

#include "kernels/ops.h"

namespace tf {

#define TF_QMATMUL_LAUNCHERS                                                                          \
  /* Whether the fused kernels take this weight (its dtype and shape) */                              \
  bool qmatmul_supports(const WeightRef& W);                                                          \
  /* linear_forward's contract: y[n, W.rows] = x[n, W.cols] W^T + beta * y */                         \
  void qmatmul_forward(float* y, const float* x, WeightRef W, int64_t n_tokens, float beta);          \
  /* linear_backward_input's contract: dx[n, W.cols] = dy[n, W.rows] W + beta * dx, reading the */    \
  /* same blocks transposed */                                                                        \
  void qmatmul_backward_input(float* dx, const float* dy, WeightRef W, int64_t n_tokens, float beta); \
  /* Either of them (forward or not) converting the activations to bf16 in passes of at most */       \
  /* pass_elems elements (the launchers pass 2^24), so a test can cut a small product into many */    \
  void qmatmul_in_passes(float* out, const float* in, WeightRef W, int64_t n_tokens, float beta,      \
                         bool forward, int64_t pass_elems);

namespace cuda {
TF_QMATMUL_LAUNCHERS
}
namespace simt {
TF_QMATMUL_LAUNCHERS
}
#undef TF_QMATMUL_LAUNCHERS

}  // namespace tf
