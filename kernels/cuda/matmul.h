// defines: matmul_in_tiles, tf::cuda:: and tf::simt:: (kernels/cuda/matmul.cu): the backend's matmul
// with the size of its converted tiles given, so that a test can cut small products into many tiles
#pragma once

#include <cstdint>

#include "kernels/ops.h"

namespace tf::cuda {
// matmul(C, ldc, A, B, M, N, K, alpha, beta) converting mixed operands at most tile_elems
// elements at a time; matmul itself passes 2^24.
void matmul_in_tiles(float* C, int64_t ldc, MatOperand A, MatOperand B, int64_t M, int64_t N, int64_t K,
                     float alpha, float beta, int64_t tile_elems);
}  // namespace tf::cuda
namespace tf::simt {
void matmul_in_tiles(float* C, int64_t ldc, MatOperand A, MatOperand B, int64_t M, int64_t N, int64_t K,
                     float alpha, float beta, int64_t tile_elems);
}  // namespace tf::simt
