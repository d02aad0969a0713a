// defines: tf::ref::embedding_forward_loops, tf::ref::embedding_backward (plain loops over any
// scalar type, so tests can run them in double), tf::ref::check_tokens (shared with the fast version)
#pragma once

#include <cstdint>

#include "src/core/error.h"

namespace tf::ref {

// A token id outside the table would read or write outside it; report the first with its position.
inline void check_tokens(const char* op, const int32_t* tokens, int64_t n_tokens, int64_t vocab) {
  for (int64_t i = 0; i < n_tokens; ++i) {
    TF_CHECK(tokens[i] >= 0 && tokens[i] < vocab, op, ": token id ", tokens[i], " at position ", i,
             " is outside the vocabulary [0, ", vocab, ")");
  }
}

// out[n, d] = table(tokens[n], d), where table(v, d) reads row v of the table.
template <typename T, typename ReadTable>
void embedding_forward_loops(T* out, const int32_t* tokens, int64_t n_tokens, const ReadTable& table,
                             int64_t vocab, int64_t dim) {
  check_tokens("embedding_forward", tokens, n_tokens, vocab);
  for (int64_t n = 0; n < n_tokens; ++n) {
    for (int64_t d = 0; d < dim; ++d) out[n * dim + d] = T(table(tokens[n], d));
  }
}

// d_table[tokens[n], d] += d_out[n, d], in token order.
template <typename T>
void embedding_backward(T* d_table, const T* d_out, const int32_t* tokens, int64_t n_tokens, int64_t vocab,
                        int64_t dim) {
  check_tokens("embedding_backward", tokens, n_tokens, vocab);
  for (int64_t n = 0; n < n_tokens; ++n) {
    for (int64_t d = 0; d < dim; ++d) d_table[tokens[n] * dim + d] += d_out[n * dim + d];
  }
}

}  // namespace tf::ref
