// defines: tf::cpu::rmsnorm_forward, tf::cpu::rmsnorm_backward
#include <algorithm>
#include <cmath>

#include "kernels/cpu/float_weight.h"
#include "kernels/ops.h"
#include "src/core/error.h"

namespace tf::cpu {

namespace {

// d_weight is reduced over rows by column blocks of this width: each block is owned by one thread
// and summed in row order, so the result does not depend on the thread count.
constexpr int64_t kWeightColumns = 64;
// Below this many elements the OpenMP fork/join costs more than the loops.
constexpr int64_t kParallelMin = 1 << 15;

}  // namespace

void rmsnorm_forward(float* out, float* rstd, const float* x, WeightRef weight, int64_t rows, int64_t dim,
                     float eps) {
  const bool parallel = rows * dim >= kParallelMin;
  with_float_weight("rmsnorm weight", weight, dim, [&](auto w) {
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * dim;
      float* yr = out + r * dim;
      float sum_sq = 0.0f;
#pragma omp simd reduction(+ : sum_sq)
      for (int64_t i = 0; i < dim; ++i) sum_sq += xr[i] * xr[i];
      const float rs = 1.0f / std::sqrt(sum_sq / float(dim) + eps);
      rstd[r] = rs;
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) yr[i] = (xr[i] * rs) * w(i);
    }
  });
}

void rmsnorm_backward(float* dx, float* d_weight, const float* d_out, const float* x, WeightRef weight,
                      const float* rstd, int64_t rows, int64_t dim) {
  const bool parallel = rows * dim >= kParallelMin;
  with_float_weight("rmsnorm weight", weight, dim, [&](auto w) {
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * dim;
      const float* gr = d_out + r * dim;
      const float rs = rstd[r];
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < dim; ++i) dot += gr[i] * w(i) * xr[i];
      const float c = rs * rs * rs / float(dim) * dot;
      float* dxr = dx + r * dim;
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) dxr[i] += rs * w(i) * gr[i] - xr[i] * c;
    }
  });
  if (!d_weight) return;
  const int64_t n_blocks = (dim + kWeightColumns - 1) / kWeightColumns;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t c0 = blk * kWeightColumns, c1 = std::min(dim, c0 + kWeightColumns);
    float acc[kWeightColumns] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * dim;
      const float* gr = d_out + r * dim;
      const float rs = rstd[r];
#pragma omp simd
      for (int64_t i = c0; i < c1; ++i) acc[i - c0] += gr[i] * xr[i] * rs;
    }
    for (int64_t i = c0; i < c1; ++i) d_weight[i] += acc[i - c0];
  }
}

}  // namespace tf::cpu
