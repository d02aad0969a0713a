// defines: tf::cuda:: and tf::simt:: plan_scratch, every rt::scratch request of a training step or a
// forward pass from its shapes: the same calls the model makes, each sized by its launcher's own
// sizing function (kernels/cuda/scratch_plan.h).
#include "kernels/cuda/blas.h"
#include "kernels/cuda/port.h"
#include "kernels/cuda/scratch_plan.h"

namespace tf::TF_PORT_BACKEND {

ScratchNeeds plan_scratch(const ScratchShape& shape, AttentionKernel attention) {
  TF_CHECK(attention == AttentionKernel::Flash || attention == AttentionKernel::Plain,
           "plan_scratch: the attention kernel must be flash or plain, got ", attention_name(attention));
  ScratchNeeds s;
  const int64_t n = shape.max_tokens();
  const bool train = shape.train;
  embedding_forward_scratch(s);
  // A step with recomputation runs each block's forward twice, with the same sizes.
  for (const WeightRef& w : shape.projections) {
    linear_forward_scratch(s, w, n);
    if (train) linear_backward_input_scratch(s, w, n);
  }
  for (const WeightRef& w : shape.mlp_projections) {
    linear_forward_scratch(s, w, shape.mlp_tokens());
    if (train) linear_backward_input_scratch(s, w, shape.mlp_tokens());
  }
  // The adapters' products are f32 by f32: the GEMM's workspace alone.
  if (shape.lora_params > 0) blas::gemm_scratch(s);
  const AttentionShape a{shape.batch, shape.seq, shape.n_heads, shape.n_kv_heads, shape.head_dim, 1.0f};
  if (attention == AttentionKernel::Flash) {
    flash_attention_forward_scratch(s, a, shape.doc_ids);
    if (train) flash_attention_backward_scratch(s, a, shape.doc_ids);
  } else if (train) {
    attention_backward_scratch(s, a);
  }
  lm_head_cross_entropy_scratch(s, shape.lm_head, shape.loss_tokens(), train);
  if (train) sum_squares_scratch(s, shape.lora_params);
  return s;
}

}  // namespace tf::TF_PORT_BACKEND
