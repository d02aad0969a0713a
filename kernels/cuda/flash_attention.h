// defines: the flash attention launchers of the CUDA backend, tf::cuda::flash_attention_* (built by
// nvcc) and their tf::simt twins (the same sources on the SIMT simulator), and
// flash_attention_supports: bf16 tensor-core attention (mma.sync + ldmatrix + cp.async) with f32
// online softmax, the CUDA backend's default attention. The plain tiled kernels of attention.cu
// stay as the device reference and serve the shapes these do not take.
#pragma once

#include <cstdint>

#include "kernels/ops.h"

namespace tf {

// Whether the flash kernels take this head dimension (64, 80, 96 or 128). Any batch, sequence
// length, GQA ratio and document layout is taken.
constexpr bool flash_attention_supports(int head_dim) {
  return head_dim == 64 || head_dim == 80 || head_dim == 96 || head_dim == 128;
}

#define TF_FLASH_ATTENTION_LAUNCHERS                                                                         \
  /* attention_forward's contract (kernels/op_signatures.inc): q, k, v f32, rounded to bf16 for the */       \
  /* tensor cores; out and lse f32 */                                                                        \
  void flash_attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,       \
                               const int32_t* doc_ids, const AttentionShape& s);                             \
  /* attention_backward's contract: dq, dk, dv += gradients */                                               \
  void flash_attention_backward(float* dq, float* dk, float* dv, const float* d_out, const float* q,         \
                                const float* k, const float* v, const float* out, const float* lse,          \
                                const int32_t* doc_ids, const AttentionShape& s);                            \
  /* attention_cached_forward's contract (KV-cache decode) */                                                \
  void flash_attention_cached_forward(                                                                       \
      float* out, const float* q, const float* k_cache, const float* v_cache, int64_t n_past, int64_t n_new, \
      int n_heads, int n_kv_heads, int head_dim, float scale, int window, float softcap = 0.0f);

namespace cuda {
TF_FLASH_ATTENTION_LAUNCHERS
}
namespace simt {
TF_FLASH_ATTENTION_LAUNCHERS
}
#undef TF_FLASH_ATTENTION_LAUNCHERS

}  // namespace tf
