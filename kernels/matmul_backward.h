// defines: tf::matmul_backward_by_products, the gradients of C = op(A) op(B) as two products of a
// backend's own matmul, so every backend's matmul_backward is the same orientation logic
#pragma once

#include <cstdint>

#include "kernels/ops.h"

namespace tf {

// With G = dC: dA += G op(B)^T, stored transposed (dA^T += op(B) G^T) when A is; likewise
// dB += op(A)^T G, or dB^T += G^T op(A). `matmul` has the op's signature.
template <typename Matmul>
void matmul_backward_by_products(Matmul&& matmul, float* dA, float* dB, const float* dC, int64_t ldc,
                                 MatOperand A, MatOperand B, int64_t M, int64_t N, int64_t K) {
  const MatOperand g{dC, DType::F32, ldc, false};
  const MatOperand g_t{dC, DType::F32, ldc, true};
  if (dA) {
    if (A.trans) {
      matmul(dA, A.ld, B, g_t, K, M, N, 1.0f, 1.0f);
    } else {
      MatOperand b_t = B;
      b_t.trans = !B.trans;
      matmul(dA, A.ld, g, b_t, M, K, N, 1.0f, 1.0f);
    }
  }
  if (dB) {
    if (B.trans) {
      matmul(dB, B.ld, g_t, A, N, K, M, 1.0f, 1.0f);
    } else {
      MatOperand a_t = A;
      a_t.trans = !A.trans;
      matmul(dB, B.ld, a_t, g, K, N, M, 1.0f, 1.0f);
    }
  }
}

}  // namespace tf
