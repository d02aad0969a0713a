// defines: tf::ref::rmsnorm_forward<T>, tf::ref::rmsnorm_backward<T> (plain loops over any scalar
// type, so tests can run them in double), tf::ref::weight_to_f32 (widens a WeightRef's elements)
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/ops.h"
#include "src/core/error.h"

namespace tf::ref {

// Element i of a row-major WeightRef, widened to f32.
inline float weight_element(const WeightRef& w, int64_t i) {
  switch (w.dtype) {
    case DType::F32: return static_cast<const float*>(w.data)[i];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(w.data)[i]);
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(w.data)[i]);
    default: break;
  }
  TF_FAIL("weight dtype ", dtype_name(w.dtype), " is not a float type (f32, bf16, f16)");
}

// HF LlamaRMSNorm: out = (x * rsqrt(mean(x^2) + eps)) * weight, rstd[r] = rsqrt(mean(x^2) + eps).
template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* x, const T* weight, int64_t rows, int64_t dim, T eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    T sum_sq = 0;
    for (int64_t i = 0; i < dim; ++i) sum_sq += xr[i] * xr[i];
    const T rs = T(1) / std::sqrt(sum_sq / T(dim) + eps);
    rstd[r] = rs;
    for (int64_t i = 0; i < dim; ++i) out[r * dim + i] = (xr[i] * rs) * weight[i];
  }
}

// With y_i = x_i r w_i and r = (mean(x^2) + eps)^(-1/2), dr/dx_j = -r^3 x_j / dim, so
// dx_j = r w_j g_j - x_j r^3 / dim * sum_i g_i w_i x_i.
template <typename T>
void rmsnorm_backward(T* dx, T* d_weight, const T* d_out, const T* x, const T* weight, const T* rstd,
                      int64_t rows, int64_t dim) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    const T* gr = d_out + r * dim;
    const T rs = rstd[r];
    T dot = 0;
    for (int64_t i = 0; i < dim; ++i) dot += gr[i] * weight[i] * xr[i];
    for (int64_t i = 0; i < dim; ++i) {
      dx[r * dim + i] += rs * weight[i] * gr[i] - xr[i] * rs * rs * rs / T(dim) * dot;
      if (d_weight) d_weight[i] += gr[i] * xr[i] * rs;
    }
  }
}

}  // namespace tf::ref
