// defines: tf::ref::matmul_loops, tf::ref::matmul_backward_loops (plain loops over any scalar type,
// so tests can run them in double), tf::ref::OperandReader (op(X)[r, c] of a MatOperand, as f32)
#pragma once

#include <cstdint>

#include "kernels/cpu/ref/element.h"
#include "kernels/ops.h"

namespace tf::ref {

// Reads op(X)[r, c] of a stored operand: X is row-major with leading dimension ld, and op
// transposes it when trans is set.
struct OperandReader {
  MatOperand x;
  float operator()(int64_t r, int64_t c) const {
    return element_f32(x.data, x.dtype, x.trans ? c * x.ld + r : r * x.ld + c);
  }
};

// C[i, j] = alpha * sum_k a(i, k) * b(k, j) + beta * C[i, j]; a(i, k) = op(A)[i, k] and b(k, j) =
// op(B)[k, j]. The sum is accumulated in double and rounded to T once. As in BLAS, C is not read
// when beta is zero, so it may hold garbage.
template <typename T, typename ReadA, typename ReadB>
void matmul_loops(T* C, int64_t ldc, const ReadA& a, const ReadB& b, int64_t M, int64_t N, int64_t K, T alpha,
                  T beta) {
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += double(a(i, k)) * double(b(k, j));
      T& c = C[i * ldc + j];
      c = beta == T(0) ? T(double(alpha) * acc) : T(double(alpha) * acc + double(beta) * double(c));
    }
  }
}

// For C = op(A) op(B): dA += dC op(B)^T and dB += op(A)^T dC, where dA and dB are stored like A
// and B (leading dimensions lda / ldb, transposed when trans_a / trans_b). Either may be null.
template <typename T, typename ReadA, typename ReadB>
void matmul_backward_loops(T* dA, int64_t lda, bool trans_a, T* dB, int64_t ldb, bool trans_b, const T* dC,
                           int64_t ldc, const ReadA& a, const ReadB& b, int64_t M, int64_t N, int64_t K) {
  if (dA) {
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t k = 0; k < K; ++k) {
        double acc = 0;
        for (int64_t j = 0; j < N; ++j) acc += double(dC[i * ldc + j]) * double(b(k, j));
        T& g = dA[trans_a ? k * lda + i : i * lda + k];
        g = T(double(g) + acc);
      }
    }
  }
  if (dB) {
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t j = 0; j < N; ++j) {
        double acc = 0;
        for (int64_t i = 0; i < M; ++i) acc += double(a(i, k)) * double(dC[i * ldc + j]);
        T& g = dB[trans_b ? j * ldb + k : k * ldb + j];
        g = T(double(g) + acc);
      }
    }
  }
}

}  // namespace tf::ref
