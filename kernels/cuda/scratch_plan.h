// defines: the device scratch of the CUDA backend's op launchers from shapes alone, declared for both
// builds (tf::cuda:: and tf::simt::): each *_scratch records into a ScratchNeeds the rt::scratch
// requests one call of the launcher of that name makes, each from the same sizing function the
// launcher passes to rt::scratch, so the prediction and the allocation cannot drift; and
// plan_scratch, every request of a run of a ScratchShape.
#pragma once

#include <cstdint>

#include "kernels/backend.h"
#include "kernels/ops.h"
#include "kernels/scratch_shape.h"

namespace tf {

#define TF_SCRATCH_SIZING                                                                               \
  /* matmul (kernels/cuda/matmul.cu): A [M, K] and B [K, N] of dtypes a and b */                        \
  void matmul_scratch(ScratchNeeds& s, DType a, DType b, int64_t M, int64_t N, int64_t K);              \
  /* linear_forward / linear_backward_input over W (as placed on the device) for n_tokens rows */       \
  void linear_forward_scratch(ScratchNeeds& s, const WeightRef& W, int64_t n_tokens);                   \
  void linear_backward_input_scratch(ScratchNeeds& s, const WeightRef& W, int64_t n_tokens);            \
  /* the dequantize + cuBLASLt path (kernels/cuda/dequant.cu), forward or input gradient */             \
  void quant_linear_scratch(ScratchNeeds& s, const WeightRef& W, int64_t n_tokens, bool forward);       \
  /* the fused quantized matmul (kernels/cuda/qmatmul.cu), forward or input gradient */                 \
  void qmatmul_scratch(ScratchNeeds& s, const WeightRef& W, int64_t n_tokens, bool forward);            \
  /* lm_head_cross_entropy with some counted target, with the gradient (grad) or not */                 \
  void lm_head_cross_entropy_scratch(ScratchNeeds& s, const WeightRef& W, int64_t n_tokens, bool grad); \
  void embedding_forward_scratch(ScratchNeeds& s);                                                      \
  void sum_squares_scratch(ScratchNeeds& s, int64_t n);                                                 \
  /* the plain (tiled f32) attention's backward; its forward takes none */                              \
  void attention_backward_scratch(ScratchNeeds& s, const AttentionShape& shape);                        \
  /* the flash kernels, with document ids (docs) or not */                                              \
  void flash_attention_forward_scratch(ScratchNeeds& s, const AttentionShape& shape, bool docs);        \
  void flash_attention_backward_scratch(ScratchNeeds& s, const AttentionShape& shape, bool docs);       \
  /* Every request of a training step (shape.train) or a forward pass of `shape`, whose matrices are */ \
  /* given as placed, attention run by `attention` (Flash or Plain; cuDNN's workspace is its own). */   \
  ScratchNeeds plan_scratch(const ScratchShape& shape, AttentionKernel attention);

namespace cuda {
TF_SCRATCH_SIZING
}
namespace simt {
TF_SCRATCH_SIZING
}
#undef TF_SCRATCH_SIZING

}  // namespace tf
