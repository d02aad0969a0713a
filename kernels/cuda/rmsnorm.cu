// defines: the CUDA backend's rmsnorm, tf::cuda:: and tf::simt:: rmsnorm_forward and rmsnorm_backward
// (one block per row, sums in a fixed order; d_weight summed over rows in row order per column)
#include <cmath>
#include <cstdint>

#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/kernel_common.h"
#include "kernels/cuda/port.h"
#include "src/core/error.h"

namespace tf::TF_PORT_BACKEND {

namespace {

constexpr int kRowThreads = 128;

// Blocks step through the rows; a block's threads stride through its row and meet in block_sum,
// which every thread of the block reaches (the row loop's bounds are the same for all of them).
template <typename W>
__global__ void rmsnorm_forward_kernel(port::gptr<float> out, port::gptr<float> rstd,
                                       port::gptr<const float> x,
                                       port::gptr<const typename W::Storage> weight, int64_t rows,
                                       int64_t dim, float eps) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const port::gptr<const float> xr = x + r * dim;
    float sum_sq = 0.0f;
    for (int64_t i = threadIdx.x; i < dim; i += kRowThreads) {
      const float xi = xr[i];
      sum_sq += xi * xi;
    }
    const float total = block_sum<kRowThreads>(sum_sq);
    // IEEE division and square root (nvcc's defaults without --use_fast_math), as on the CPU.
    const float rs = 1.0f / sqrtf(total / float(dim) + eps);
    if (threadIdx.x == 0) rstd[r] = rs;
    for (int64_t i = threadIdx.x; i < dim; i += kRowThreads) {
      const float xi = xr[i];
      const typename W::Storage wi = weight[i];
      out[r * dim + i] = (xi * rs) * W::widen(wi);
    }
  }
}

// dx_j += r w_j g_j - x_j r^3 / dim * sum_i g_i w_i x_i (the reference's derivation), in the CPU's
// order of operations.
template <typename W>
__global__ void rmsnorm_backward_kernel(port::gptr<float> dx, port::gptr<const float> d_out,
                                        port::gptr<const float> x,
                                        port::gptr<const typename W::Storage> weight,
                                        port::gptr<const float> rstd, int64_t rows, int64_t dim) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const port::gptr<const float> xr = x + r * dim, gr = d_out + r * dim;
    float dot = 0.0f;
    for (int64_t i = threadIdx.x; i < dim; i += kRowThreads) {
      const float gi = gr[i], xi = xr[i];
      const typename W::Storage wi = weight[i];
      dot += gi * W::widen(wi) * xi;
    }
    const float total = block_sum<kRowThreads>(dot);
    const float rs = rstd[r];
    const float c = rs * rs * rs / float(dim) * total;
    for (int64_t i = threadIdx.x; i < dim; i += kRowThreads) {
      const float gi = gr[i], xi = xr[i], dxi = dx[r * dim + i];
      const typename W::Storage wi = weight[i];
      dx[r * dim + i] = dxi + (rs * W::widen(wi) * gi - xi * c);
    }
  }
}

// One thread per column adds its rows in row order, then once into d_weight, as the CPU does: no
// two threads share an element and the order is fixed.
__global__ void rmsnorm_weight_grad_kernel(port::gptr<float> d_weight, port::gptr<const float> d_out,
                                           port::gptr<const float> x, port::gptr<const float> rstd,
                                           int64_t rows, int64_t dim) {
  for (int64_t i = grid_first(); i < dim; i += grid_stride()) {
    float acc = 0.0f;
    for (int64_t r = 0; r < rows; ++r) {
      const float gi = d_out[r * dim + i], xi = x[r * dim + i], rs = rstd[r];
      acc += gi * xi * rs;
    }
    const float dwi = d_weight[i];
    d_weight[i] = dwi + acc;
  }
}

int64_t row_blocks(int64_t rows) {
  return std::min(kMaxElementBlocks, rows);
}

void check_weight(const WeightRef& weight, int64_t dim) {
  TF_CHECK(weight.rows * weight.cols == dim, "rmsnorm weight has ", weight.rows, "x", weight.cols,
           " elements, expected ", dim);
}

}  // namespace

void rmsnorm_forward(float* out, float* rstd, const float* x, WeightRef weight, int64_t rows, int64_t dim,
                     float eps) {
  check_weight(weight, dim);
  with_stored_weight("rmsnorm weight", weight, [&](auto w) {
    using W = decltype(w);
    if (rows <= 0) return;
    port::launch(rmsnorm_forward_kernel<W>,
                 on_current_stream("rmsnorm_forward", row_blocks(rows), kRowThreads), out, rstd, x,
                 static_cast<const typename W::Storage*>(weight.data), rows, dim, eps);
  });
}

void rmsnorm_backward(float* dx, float* d_weight, const float* d_out, const float* x, WeightRef weight,
                      const float* rstd, int64_t rows, int64_t dim) {
  check_weight(weight, dim);
  with_stored_weight("rmsnorm weight", weight, [&](auto w) {
    using W = decltype(w);
    if (rows <= 0) return;
    port::launch(rmsnorm_backward_kernel<W>,
                 on_current_stream("rmsnorm_backward", row_blocks(rows), kRowThreads), dx, d_out, x,
                 static_cast<const typename W::Storage*>(weight.data), rstd, rows, dim);
  });
  if (d_weight && rows > 0 && dim > 0) {
    port::launch(rmsnorm_weight_grad_kernel,
                 on_current_stream("rmsnorm_weight_grad", element_blocks(dim), kElementThreads), d_weight,
                 d_out, x, rstd, rows, dim);
  }
}

}  // namespace tf::TF_PORT_BACKEND
