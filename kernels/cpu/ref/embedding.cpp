// defines: tf::ref::embedding_forward (any table dtype, quantized included), tf::ref::embedding_backward
#include "kernels/cpu/ref/embedding.h"

#include "kernels/cpu/ref/element.h"
#include "kernels/ops.h"

namespace tf::ref {

void embedding_forward(float* out, const int32_t* tokens, int64_t n_tokens, WeightRef table) {
  if (!is_quantized(table.dtype)) {
    const auto read = [&table](int64_t v, int64_t d) {
      return element_f32(table.data, table.dtype, v * table.cols + d);
    };
    embedding_forward_loops(out, tokens, n_tokens, read, table.rows, table.cols);
    return;
  }
  // A row of a ggml table is whole blocks; an NF4 / INT8 row may start inside a scale block and
  // inside a byte. The tile dequantizer reads both.
  check_tokens("embedding_forward", tokens, n_tokens, table.rows);
  for (int64_t n = 0; n < n_tokens; ++n)
    dequantize_weight_tile(out + n * table.cols, table.cols, table, tokens[n], 1, 0, table.cols);
}

void embedding_backward(float* d_table, const float* d_out, const int32_t* tokens, int64_t n_tokens,
                        int64_t vocab, int64_t dim) {
  embedding_backward<float>(d_table, d_out, tokens, n_tokens, vocab, dim);
}

}  // namespace tf::ref
