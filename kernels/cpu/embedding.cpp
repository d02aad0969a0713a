// defines: tf::cpu::embedding_forward, tf::cpu::embedding_backward
#include "kernels/cpu/ref/embedding.h"

#include <algorithm>

#include "kernels/cpu/ref/element.h"
#include "kernels/ops.h"
#include "src/core/error.h"

namespace tf::cpu {
namespace {
// Columns per task in the backward scatter; 64 floats = one 256-byte run per row touched.
constexpr int64_t kBackwardColumnBlock = 64;
}  // namespace

void embedding_forward(float* out, const int32_t* tokens, int64_t n_tokens, WeightRef table) {
  TF_CHECK(table.dtype != DType::I32, "embedding_forward: table dtype ", dtype_name(table.dtype),
           " is not f32, bf16, f16 or a quantized type");
  ref::check_tokens("embedding_forward", tokens, n_tokens, table.rows);
  const int64_t dim = table.cols;
  if (is_quantized(table.dtype)) {
    // Nothing may throw inside the parallel loop: the table's geometry and scales are checked by
    // dequantizing the first row here.
    if (n_tokens == 0) return;
    dequantize_weight_tile(out, dim, table, tokens[0], 1, 0, dim);
#pragma omp parallel for schedule(static)
    for (int64_t n = 1; n < n_tokens; ++n)
      dequantize_weight_tile(out + n * dim, dim, table, tokens[n], 1, 0, dim);
    return;
  }
  const char* base = static_cast<const char*>(table.data);
  const int64_t row_bytes = dim * int64_t(dtype_size(table.dtype));
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < n_tokens; ++n)
    widen_to_f32(out + n * dim, base + tokens[n] * row_bytes, table.dtype, dim);
}

// Repeated tokens add into the same row, so the work is split by columns rather than tokens: no
// two threads touch the same element, and each element sums its tokens in order, exactly as the
// reference does.
void embedding_backward(float* d_table, const float* d_out, const int32_t* tokens, int64_t n_tokens,
                        int64_t vocab, int64_t dim) {
  ref::check_tokens("embedding_backward", tokens, n_tokens, vocab);
  const int64_t blocks = (dim + kBackwardColumnBlock - 1) / kBackwardColumnBlock;
#pragma omp parallel for schedule(static) if (n_tokens * dim >= (int64_t(1) << 16))
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t c0 = blk * kBackwardColumnBlock;
    const int64_t c1 = std::min(dim, c0 + kBackwardColumnBlock);
    for (int64_t n = 0; n < n_tokens; ++n) {
      float* dst = d_table + tokens[n] * dim;
      const float* src = d_out + n * dim;
      for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
    }
  }
}

}  // namespace tf::cpu
