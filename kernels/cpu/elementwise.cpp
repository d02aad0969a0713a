// defines: the fast elementwise ops (tf::cpu::add_inplace, add_bias, fill, scale_inplace, copy,
//          sum_squares, dropout_forward): OpenMP loops above kMinParallelElems, dropout masks from
//          sixteen Philox blocks at a time
#include <algorithm>
#include <cstring>

#include "kernels/cpu/float_weight.h"
#include "kernels/ops.h"
#include "src/core/error.h"
#include "src/core/parallel.h"
#include "src/core/rng.h"

namespace tf::cpu {

void add_inplace(float* y, const float* x, int64_t n) {
#pragma omp parallel for if (n >= kMinParallelElems) schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void add_bias(float* y, WeightRef bias, int64_t rows, int64_t width) {
  with_float_weight("add_bias: bias", bias, width, [&](auto b) {
#pragma omp parallel for if (rows * width >= kMinParallelElems) schedule(static)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < width; ++c) y[r * width + c] += b(c);
  });
}

void fill(float* x, float value, int64_t n) {
  std::fill(x, x + n, value);
}

void scale_inplace(float* x, float s, int64_t n) {
#pragma omp parallel for if (n >= kMinParallelElems) schedule(static)
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

void copy(float* dst, const float* src, int64_t n) {
  std::memcpy(dst, src, size_t(n) * sizeof(float));
}

double sum_squares(const float* x, int64_t n) {
  return ordered_sum(n, [x](int64_t i) { return double(x[i]) * double(x[i]); });
}

// Element i draws word i % 4 of Philox block i / 4 (Philox::uniform(i)), the blocks computed
// kBatch at a time in vector lanes and every word used: one scalar block per element made the
// masks a third of a training step. The groups are aligned in the mask (from index 0), so that the
// rows of a larger input starting at `first` draw the same words as that input does.
void dropout_forward(float* out, const float* x, int64_t n, float p, uint64_t seed, uint64_t stream,
                     uint64_t first) {
  TF_CHECK(p >= 0 && p < 1, "dropout_forward: p must be in [0, 1), got ", p);
  if (n <= 0) return;
  const Philox rng(seed, stream);
  const float keep_scale = 1.0f / (1.0f - p);
  constexpr uint64_t kElems = 4 * Philox::kBatch;
  const uint64_t g0 = first / kElems, g1 = (first + uint64_t(n) + kElems - 1) / kElems;
#pragma omp parallel for if (n >= kMinParallelElems) schedule(static)
  for (uint64_t g = g0; g < g1; ++g) {
    uint32_t words[4][Philox::kBatch];
    rng.blocks(g * Philox::kBatch, words);
    uint32_t element[kElems];
    for (int b = 0; b < Philox::kBatch; ++b)
      for (int w = 0; w < 4; ++w) element[4 * b + w] = words[w][b];
    const uint64_t e0 = std::max(g * kElems, first), e1 = std::min((g + 1) * kElems, first + uint64_t(n));
    for (uint64_t e = e0; e < e1; ++e) {
      const uint64_t i = e - first;
      out[i] = uint_to_unit_float(element[e - g * kElems]) < p ? 0.0f : x[i] * keep_scale;
    }
  }
}

}  // namespace tf::cpu
