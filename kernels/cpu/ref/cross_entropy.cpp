// defines: tf::ref::lm_head_cross_entropy (the double-precision loops of cross_entropy.h over W's
// elements; a quantized W is read through tf::ref::dequantize_weight_tile one row at a time)
#include "kernels/cpu/ref/cross_entropy.h"

#include <vector>

#include "kernels/cpu/ref/element.h"
#include "kernels/cpu/ref/linear.h"

namespace tf::ref {

double lm_head_cross_entropy(float* d_h, int64_t* n_valid, const float* h, WeightRef W,
                             const int32_t* targets, int64_t n_tokens, float grad_scale, float softcap) {
  if (!is_quantized(W.dtype)) {
    const auto w = [&W](int64_t v, int64_t d) { return element_f32(W.data, W.dtype, v * W.cols + d); };
    return lm_head_cross_entropy_loops(d_h, n_valid, h, w, W.rows, W.cols, targets, n_tokens, grad_scale,
                                       softcap);
  }
  check_linear("lm_head_cross_entropy", h, h, W, n_tokens, true);
  // The loops read W row by row, so one dequantized row at a time serves them.
  std::vector<float> row(static_cast<size_t>(W.cols));
  int64_t row_index = -1;
  const auto w = [&](int64_t v, int64_t d) {
    if (v != row_index) {
      dequantize_weight_tile(row.data(), W.cols, W, v, 1, 0, W.cols);
      row_index = v;
    }
    return row[size_t(d)];
  };
  return lm_head_cross_entropy_loops(d_h, n_valid, h, w, W.rows, W.cols, targets, n_tokens, grad_scale,
                                     softcap);
}

}  // namespace tf::ref
