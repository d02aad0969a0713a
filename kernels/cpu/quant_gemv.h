// defines: tf::cpu::quant_gemv (y = x W^T + beta y for a few tokens, straight from quantized
//          blocks), tf::cpu::quant_gemv_t (dx = dy W + beta dx, likewise), tf::cpu::kQuantGemvMaxTokens
#pragma once

#include <cstdint>

#include "kernels/ops.h"

namespace tf::cpu {

// The most tokens quant_gemv takes. Up to here a matmul reads each weight block once per token
// group and is bound by the bytes of W, which quantized blocks keep few; past it, dequantizing tiles
// for sgemm wins.
constexpr int64_t kQuantGemvMaxTokens = 8;

// y[t, r] = sum_k x[t, k] W[r, k] + beta * y[t, r] for t < n_tokens <= kQuantGemvMaxTokens, x
// [n_tokens, W.cols] and y [n_tokens, W.rows] contiguous; beta 0 overwrites y (NaNs included). W is
// any quantized dtype. Each block is dequantized in registers and never stored; rows are split over
// threads, and each dot product is summed in f32 in an order that does not depend on the thread
// count.
void quant_gemv(float* y, const float* x, const WeightRef& W, int64_t n_tokens, float beta);

// dx[t, k] = sum_r dy[t, r] W[r, k] + beta * dx[t, k] for t < n_tokens <= kQuantGemvMaxTokens, dy
// [n_tokens, W.rows] and dx [n_tokens, W.cols] contiguous; beta 0 overwrites dx (NaNs included). W
// is any quantized dtype, decoded in registers as for quant_gemv. Columns are split over threads,
// and each element is summed in f32 over the rows in order, whatever the thread count.
void quant_gemv_t(float* dx, const float* dy, const WeightRef& W, int64_t n_tokens, float beta);

}  // namespace tf::cpu
