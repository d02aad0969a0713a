// defines: the quantized cases of the CUDA backend's ops that read a frozen weight
// (kernels/cuda/dequant.cu), tf::cuda:: and tf::simt:: quant_tile_rows, quant_linear_forward,
// quant_linear_backward_input, dequantize_quant_tile and quant_embedding_forward: the weight stays in
// device memory as stored and is decoded a bounded tile of rows at a time into rt::scratch. A plain
// header, so host code (the GPU benchmark) can time the dequantize + cuBLASLt path on its own.
#pragma once

#include <cstdint>

#include "kernels/ops.h"

namespace tf {

#define TF_DEQUANT_LAUNCHERS                                                                               \
  /* Rows of W a dequantized tile holds: at most 2^24 elements (32 MiB of bf16), at least one row. */      \
  int64_t quant_tile_rows(const WeightRef& W);                                                             \
  /* linear_forward (y = x W^T + beta y) and linear_backward_input (dx = dy W + beta dx) over a */         \
  /* quantized W, tile_rows rows of W dequantized to bf16 at a time and multiplied by blas::gemm with */   \
  /* x or dy rounded to bf16, f32 accumulation; linear_* pass quant_tile_rows(W) where the fused */        \
  /* kernel (kernels/cuda/qmatmul.h) does not take W. */                                                   \
  void quant_linear_forward(float* y, const float* x, const WeightRef& W, int64_t n_tokens, float beta,    \
                            int64_t tile_rows);                                                            \
  void quant_linear_backward_input(float* dx, const float* dy, const WeightRef& W, int64_t n_tokens,       \
                                   float beta, int64_t tile_rows);                                         \
  /* dequantize_weight_tile's quantized case: rows [r0, r0 + n_rows) x cols [c0, c0 + n_cols) to f32. */   \
  void dequantize_quant_tile(float* dst, int64_t ld_dst, const WeightRef& W, int64_t r0, int64_t n_rows,   \
                             int64_t c0, int64_t n_cols);                                                  \
  /* embedding_forward's quantized case: out[n] = table[tokens[n]] decoded, the tokens already checked. */ \
  void quant_embedding_forward(float* out, const int32_t* tokens, int64_t n_tokens, const WeightRef& table);

namespace cuda {
TF_DEQUANT_LAUNCHERS
}
namespace simt {
TF_DEQUANT_LAUNCHERS
}
#undef TF_DEQUANT_LAUNCHERS

}  // namespace tf
