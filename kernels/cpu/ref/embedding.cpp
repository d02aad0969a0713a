#include "kernels/cpu/ref/embedding.h"

#include "kernels/cpu/ref/element.h"
#include "kernels/ops.h"

namespace tf::ref {

void embedding_forward(float* out, const int32_t* tokens, int64_t n_tokens, WeightRef table) {
  const auto read = [&table](int64_t v, int64_t d) {
    return element_f32(table.data, table.dtype, v * table.cols + d);
  };
  embedding_forward_loops(out, tokens, n_tokens, read, table.rows, table.cols);
}

void embedding_backward(float* d_table, const float* d_out, const int32_t* tokens, int64_t n_tokens,
                        int64_t vocab, int64_t dim) {
  embedding_backward<float>(d_table, d_out, tokens, n_tokens, vocab, dim);
}

}  // namespace tf::ref
