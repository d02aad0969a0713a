// defines: tf::cpu::quant_gemv (small-batch matmul straight from quantized blocks)
#include "kernels/cpu/quant_gemv.h"

#include <algorithm>

#include "src/core/error.h"
#include "src/core/parallel.h"

namespace tf::cpu {
namespace {

// Elements dequantized at a time by the portable version: one k-quant super-block, eight of the
// 32-element formats, four NF4 / INT8 scale blocks; 1 KiB that stays in L1.
constexpr int64_t kPortableChunk = 256;
// Independent partial sums per dot product, so the compiler can keep them in one vector register.
constexpr int kLanes = 16;

void portable_rows(float* y, const float* x, const WeightRef& W, int64_t n_tokens, float beta,
                   int64_t r_begin, int64_t r_end) {
  float w[kPortableChunk];
  float acc[kQuantGemvMaxTokens][kLanes];
  for (int64_t r = r_begin; r < r_end; ++r) {
    for (int64_t t = 0; t < n_tokens; ++t) std::fill(acc[t], acc[t] + kLanes, 0.0f);
    for (int64_t c0 = 0; c0 < W.cols; c0 += kPortableChunk) {
      const int64_t n = std::min(kPortableChunk, W.cols - c0);
      dequantize_weight_tile(w, n, W, r, 1, c0, n);
      for (int64_t t = 0; t < n_tokens; ++t) {
        const float* xt = x + t * W.cols + c0;
        for (int64_t k = 0; k < n; ++k) acc[t][k % kLanes] += w[k] * xt[k];
      }
    }
    for (int64_t t = 0; t < n_tokens; ++t) {
      float dot = 0.0f;
      for (int l = 0; l < kLanes; ++l) dot += acc[t][l];
      float& out = y[t * W.rows + r];
      out = beta == 0.0f ? dot : dot + beta * out;
    }
  }
}

}  // namespace

void quant_gemv(float* y, const float* x, const WeightRef& W, int64_t n_tokens, float beta) {
  TF_CHECK(is_quantized(W.dtype), "quant_gemv: weight dtype ", dtype_name(W.dtype), " is not quantized");
  TF_CHECK(n_tokens >= 0 && n_tokens <= kQuantGemvMaxTokens, "quant_gemv: ", n_tokens,
           " tokens, expected 0 to ", kQuantGemvMaxTokens);
  TF_CHECK(W.rows >= 0 && W.cols >= 0, "quant_gemv: weight shape ", W.rows, " x ", W.cols, " is negative");
  // Checks the block geometry and the scales once, before any thread starts.
  if (W.rows > 0 && W.cols > 0) {
    float probe[kPortableChunk];
    const int64_t n = std::min(kPortableChunk, W.cols);
    dequantize_weight_tile(probe, n, W, 0, 1, 0, n);
  }
  // Rows per task: enough work to be worth a thread hand-off, and each task's rows contiguous.
  constexpr int64_t kRowsPerTask = 16;
  const int64_t tasks = (W.rows + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel for schedule(static) if (W.rows * W.cols >= kMinParallelElems)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t r0 = task * kRowsPerTask, r1 = std::min(W.rows, r0 + kRowsPerTask);
    portable_rows(y, x, W, n_tokens, beta, r0, r1);
  }
}

}  // namespace tf::cpu
