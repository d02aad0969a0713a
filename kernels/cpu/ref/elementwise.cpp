// defines: the reference elementwise ops (tf::ref::add_inplace, add_bias, fill, scale_inplace, copy,
//          sum_squares, dropout_forward, dropout_backward): one plain loop each
#include "kernels/cpu/ref/rmsnorm.h"
#include "kernels/ops.h"
#include "src/core/error.h"
#include "src/core/rng.h"

namespace tf::ref {

void add_inplace(float* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void add_bias(float* y, WeightRef bias, int64_t rows, int64_t width) {
  TF_CHECK(bias.rows * bias.cols == width, "add_bias: bias of ", bias.rows, " x ", bias.cols,
           " elements for rows of ", width);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < width; ++c) y[r * width + c] += weight_element(bias, c);
}

void fill(float* x, float value, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = value;
}

void scale_inplace(float* x, float s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

void copy(float* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

// Sequential, not chunked: the fast version's chunking is a choice the test checks it against.
double sum_squares(const float* x, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += double(x[i]) * double(x[i]);
  return s;
}

void dropout_forward(float* out, const float* x, int64_t n, float p, uint64_t seed, uint64_t stream,
                     uint64_t first) {
  TF_CHECK(p >= 0 && p < 1, "dropout_forward: p must be in [0, 1), got ", p);
  const Philox rng(seed, stream);
  for (int64_t i = 0; i < n; ++i)
    out[i] = rng.uniform(first + uint64_t(i)) < p ? 0.0f : x[i] * (1.0f / (1.0f - p));
}

void dropout_backward(float* dx, float* g, const float* x, int64_t n, float p, uint64_t seed, uint64_t stream,
                      uint64_t first) {
  TF_CHECK(p >= 0 && p < 1, "dropout_backward: p must be in [0, 1), got ", p);
  const Philox rng(seed, stream);
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = rng.uniform(first + uint64_t(i)) >= p;
    dx[i] += keep ? g[i] * (1.0f / (1.0f - p)) : 0.0f;
    g[i] = keep ? x[i] * (1.0f / (1.0f - p)) : 0.0f;
  }
}

}  // namespace tf::ref
