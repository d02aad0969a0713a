#include "kernels/cpu/ref/matmul.h"

namespace tf::ref {

void matmul(float* C, int64_t ldc, MatOperand A, MatOperand B, int64_t M, int64_t N, int64_t K, float alpha,
            float beta) {
  matmul_loops(C, ldc, OperandReader{A}, OperandReader{B}, M, N, K, alpha, beta);
}

void matmul_backward(float* dA, float* dB, const float* dC, int64_t ldc, MatOperand A, MatOperand B,
                     int64_t M, int64_t N, int64_t K) {
  matmul_backward_loops(dA, A.ld, A.trans, dB, B.ld, B.trans, dC, ldc, OperandReader{A}, OperandReader{B}, M,
                        N, K);
}

}  // namespace tf::ref
