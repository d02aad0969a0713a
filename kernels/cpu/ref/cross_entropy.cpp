#include "kernels/cpu/ref/cross_entropy.h"

#include "kernels/cpu/ref/element.h"

namespace tf::ref {

double lm_head_cross_entropy(float* d_h, int64_t* n_valid, const float* h, WeightRef W,
                             const int32_t* targets, int64_t n_tokens, float grad_scale) {
  const auto w = [&W](int64_t v, int64_t d) { return element_f32(W.data, W.dtype, v * W.cols + d); };
  return lm_head_cross_entropy_loops(d_h, n_valid, h, w, W.rows, W.cols, targets, n_tokens, grad_scale);
}

}  // namespace tf::ref
