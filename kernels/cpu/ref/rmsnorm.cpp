#include "kernels/cpu/ref/rmsnorm.h"

#include <vector>

namespace tf::ref {

namespace {
std::vector<float> widen(const WeightRef& w, int64_t dim) {
  TF_CHECK(w.rows * w.cols == dim, "rmsnorm weight has ", w.rows, "x", w.cols, " elements, expected ", dim);
  std::vector<float> out(static_cast<size_t>(dim));
  for (int64_t i = 0; i < dim; ++i) out[size_t(i)] = weight_element(w, i);
  return out;
}
}  // namespace

void rmsnorm_forward(float* out, float* rstd, const float* x, WeightRef weight, int64_t rows, int64_t dim,
                     float eps) {
  const std::vector<float> w = widen(weight, dim);
  rmsnorm_forward<float>(out, rstd, x, w.data(), rows, dim, eps);
}

void rmsnorm_backward(float* dx, float* d_weight, const float* d_out, const float* x, WeightRef weight,
                      const float* rstd, int64_t rows, int64_t dim) {
  const std::vector<float> w = widen(weight, dim);
  rmsnorm_backward<float>(dx, d_weight, d_out, x, w.data(), rstd, rows, dim);
}

}  // namespace tf::ref
