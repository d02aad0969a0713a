// defines: tf::ref::linear_forward, tf::ref::linear_backward_input (one row of W dequantized at a
// time by tf::ref::dequantize_weight_tile, then plain loops summing in double)
#include "kernels/cpu/ref/linear.h"

#include <vector>

#include "kernels/ops.h"

namespace tf::ref {

void linear_forward(float* y, const float* x, WeightRef W, int64_t n_tokens, float beta) {
  check_linear("linear_forward", y, x, W, n_tokens, true);
  const int64_t rows = W.rows, cols = W.cols;
  std::vector<float> w_row(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    if (cols > 0) dequantize_weight_tile(w_row.data(), cols, W, r, 1, 0, cols);
    for (int64_t i = 0; i < n_tokens; ++i) {
      double acc = 0;
      for (int64_t c = 0; c < cols; ++c) acc += double(x[i * cols + c]) * double(w_row[size_t(c)]);
      float& out = y[i * rows + r];
      out = beta == 0.0f ? float(acc) : float(acc + double(beta) * double(out));
    }
  }
}

void linear_backward_input(float* dx, const float* dy, WeightRef W, int64_t n_tokens, float beta) {
  check_linear("linear_backward_input", dx, dy, W, n_tokens, false);
  const int64_t rows = W.rows, cols = W.cols;
  std::vector<float> w_row(static_cast<size_t>(cols));
  std::vector<double> acc(static_cast<size_t>(n_tokens * cols), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    if (cols > 0) dequantize_weight_tile(w_row.data(), cols, W, r, 1, 0, cols);
    for (int64_t i = 0; i < n_tokens; ++i) {
      const double g = dy[i * rows + r];
      for (int64_t c = 0; c < cols; ++c) acc[size_t(i * cols + c)] += g * double(w_row[size_t(c)]);
    }
  }
  for (int64_t i = 0; i < n_tokens * cols; ++i) {
    const double a = acc[size_t(i)];
    dx[i] = beta == 0.0f ? float(a) : float(a + double(beta) * double(dx[i]));
  }
}

}  // namespace tf::ref
