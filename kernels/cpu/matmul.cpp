// defines: tf::cpu::matmul, tf::cpu::matmul_backward (OpenBLAS sgemm; bf16/f16 operands widened
// to f32 one bounded tile at a time, or under bf16 precision a bf16 operand multiplied as stored by
// tf::cpu::bf16_gemm, with its f32 partner rounded to bf16 one bounded tile at a time)
#include <cblas.h>

#include <algorithm>
#include <climits>

#include "kernels/cpu/bf16_gemm.h"
#include "kernels/cpu/ref/element.h"
#include "kernels/matmul_backward.h"
#include "kernels/ops.h"
#include "src/core/alloc.h"
#include "src/core/error.h"

namespace tf::cpu {
namespace {

// A widened tile holds at most this many f32 (4 MiB): a few hundred rows of a transformer weight,
// which sgemm then streams from cache, and a bound that holds whatever the matrix size.
constexpr int64_t kTileElems = int64_t(1) << 20;
// Longest run of one stored row in a tile, so that a tile still has >= 64 rows when rows are long.
constexpr int64_t kMaxTileRow = 16384;
// Smaller tiles are widened on the calling thread: a parallel region would cost more than it saves.
constexpr int64_t kParallelWidenElems = int64_t(1) << 15;

// Scratch for the widened tiles of A (0) and B (1), one pair per calling thread, allocated on first
// use and reused by every later call.
float* tile_scratch(int which) {
  thread_local Buffer buffers[2];
  Buffer& b = buffers[which];
  if (!b.data()) b = Buffer(size_t(kTileElems) * sizeof(float), MemTag::Workspace, false);
  return b.as<float>();
}

// Operand geometry: op(X) has an outer dimension (M for A, N for B) and the inner K. X is
// "outer-major" when its stored rows run along the outer index (A untransposed, B transposed).
int64_t stored_offset(const MatOperand& x, bool outer_major, int64_t o, int64_t k) {
  return outer_major ? o * x.ld + k : k * x.ld + o;
}

void check_operand(const char* name, const MatOperand& x, bool outer_major, int64_t outer, int64_t K) {
  TF_CHECK(x.dtype == DType::F32 || x.dtype == DType::BF16 || x.dtype == DType::F16, "matmul: operand ", name,
           " has dtype ", dtype_name(x.dtype), "; expected f32, bf16 or f16");
  const int64_t cols = outer_major ? K : outer;
  TF_CHECK(x.ld >= std::max<int64_t>(1, cols) && x.ld <= INT_MAX, "matmul: operand ", name,
           " has leading dimension ", x.ld, " but its stored rows hold ", cols, " elements");
  TF_CHECK(x.data != nullptr || outer == 0 || K == 0, "matmul: operand ", name, " is null");
}

// The stored sub-block of X holding op(X)[o0 .. o0+on, k0 .. k0+kn], widened to f32 in dst and
// returned as an operand of the same orientation.
MatOperand widen_tile(const MatOperand& x, bool outer_major, int64_t o0, int64_t on, int64_t k0, int64_t kn,
                      float* dst) {
  const int64_t rows = outer_major ? on : kn;
  const int64_t cols = outer_major ? kn : on;
  const char* first =
      static_cast<const char*>(x.data) + stored_offset(x, outer_major, o0, k0) * int64_t(dtype_size(x.dtype));
  const int64_t row_bytes = x.ld * int64_t(dtype_size(x.dtype));
#pragma omp parallel for schedule(static) if (rows * cols >= kParallelWidenElems)
  for (int64_t r = 0; r < rows; ++r) widen_to_f32(dst + r * cols, first + r * row_bytes, x.dtype, cols);
  return MatOperand{dst, DType::F32, cols, x.trans};
}

// As widen_tile, rounding an f32 operand's sub-block to bf16 in dst.
MatOperand narrow_tile(const MatOperand& x, bool outer_major, int64_t o0, int64_t on, int64_t k0, int64_t kn,
                       uint16_t* dst) {
  const int64_t rows = outer_major ? on : kn;
  const int64_t cols = outer_major ? kn : on;
  const float* first = static_cast<const float*>(x.data) + stored_offset(x, outer_major, o0, k0);
#pragma omp parallel for schedule(static) if (rows * cols >= kParallelWidenElems)
  for (int64_t r = 0; r < rows; ++r) round_to_bf16(dst + r * cols, first + r * x.ld, cols);
  return MatOperand{dst, DType::BF16, cols, x.trans};
}

// The stored sub-block of X starting at op(X)[o0, k0], in place.
MatOperand stored_block(const MatOperand& x, bool outer_major, int64_t o0, int64_t k0) {
  return MatOperand{
      static_cast<const char*>(x.data) + stored_offset(x, outer_major, o0, k0) * dtype_size(x.dtype), x.dtype,
      x.ld, x.trans};
}

// Assumed of OpenBLAS (0.3.21 measured): its threads own disjoint blocks of C, and a shape and a
// thread count always give the same blocks and the same K panels, so a fixed thread count repeats
// its bits. Another count may not: the threaded driver cuts K into other panels than the
// single-threaded one. So every product here (projections, LoRA dA and dB, the lm_head logits and
// d_h) and all that follows from it is reproducible at one thread count, not across counts.
void sgemm(float* C, int64_t ldc, const MatOperand& a, const MatOperand& b, int64_t M, int64_t N, int64_t K,
           float alpha, float beta) {
  cblas_sgemm(CblasRowMajor, a.trans ? CblasTrans : CblasNoTrans, b.trans ? CblasTrans : CblasNoTrans, int(M),
              int(N), int(K), alpha, static_cast<const float*>(a.data), int(a.ld),
              static_cast<const float*>(b.data), int(b.ld), beta, C, int(ldc));
}

// Tile length along K preferred by a narrow operand: whole stored rows (up to kMaxTileRow) when
// they run along K, otherwise as many stored rows as fit beside a full outer extent.
int64_t preferred_k_extent(bool outer_major, int64_t outer, int64_t K) {
  if (outer_major) return std::min(K, kMaxTileRow);
  return std::min(K, std::max<int64_t>(1, kTileElems / std::min(outer, kMaxTileRow)));
}

// Outer extent of a narrow operand's tile once the K extent kc is fixed; kc never exceeds
// preferred_k_extent, so the tile fits in kTileElems.
int64_t outer_extent(bool outer_major, int64_t outer, int64_t kc) {
  if (outer_major) return std::min(outer, std::max<int64_t>(1, kTileElems / kc));
  return std::min(outer, kMaxTileRow);
}

}  // namespace

void matmul(float* C, int64_t ldc, MatOperand A, MatOperand B, int64_t M, int64_t N, int64_t K, float alpha,
            float beta) {
  TF_CHECK(M >= 0 && N >= 0 && K >= 0 && M <= INT_MAX && N <= INT_MAX && K <= INT_MAX,
           "matmul: bad shape M=", M, " N=", N, " K=", K);
  const bool a_outer_major = !A.trans;
  const bool b_outer_major = B.trans;
  check_operand("A", A, a_outer_major, M, K);
  check_operand("B", B, b_outer_major, N, K);
  TF_CHECK(ldc >= std::max<int64_t>(1, N) && ldc <= INT_MAX, "matmul: ldc ", ldc, " is smaller than N ", N);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
    }
    return;
  }
  // Under bf16 precision a product with a bf16 operand (and no f16 one) runs in bf16: the bf16 operand
  // as stored, its f32 partner rounded a tile at a time. Otherwise the non-f32 operands are widened.
  const bool bf16 = matmul_precision() == MatmulPrecision::BF16 &&
                    (A.dtype == DType::BF16 || B.dtype == DType::BF16) && A.dtype != DType::F16 &&
                    B.dtype != DType::F16;
  const bool tile_a = bf16 ? A.dtype == DType::F32 : A.dtype != DType::F32;
  const bool tile_b = bf16 ? B.dtype == DType::F32 : B.dtype != DType::F32;
  if (!bf16 && !tile_a && !tile_b) {
    sgemm(C, ldc, A, B, M, N, K, alpha, beta);
    return;
  }
  int64_t kc = K;
  if (tile_a) kc = std::min(kc, preferred_k_extent(a_outer_major, M, K));
  if (tile_b) kc = std::min(kc, preferred_k_extent(b_outer_major, N, K));
  const int64_t mc = tile_a ? outer_extent(a_outer_major, M, kc) : M;
  const int64_t nc = tile_b ? outer_extent(b_outer_major, N, kc) : N;
  // At most one operand is rounded to bf16, into the scratch that widens a weight under f32: the
  // run's workspace is the same under either precision.
  float* a_tile = tile_a ? tile_scratch(bf16 ? 1 : 0) : nullptr;
  float* b_tile = tile_b ? tile_scratch(1) : nullptr;
  const auto tile = [&](const MatOperand& x, bool outer_major, int64_t o0, int64_t on, int64_t k0, int64_t kn,
                        float* dst) {
    return bf16 ? narrow_tile(x, outer_major, o0, on, k0, kn, reinterpret_cast<uint16_t*>(dst))
                : widen_tile(x, outer_major, o0, on, k0, kn, dst);
  };
  // K is split into chunks summed into C: beta applies with the first chunk only.
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t kn = std::min(kc, K - k0);
    const float chunk_beta = k0 == 0 ? beta : 1.0f;
    for (int64_t m0 = 0; m0 < M; m0 += mc) {
      const int64_t mn = std::min(mc, M - m0);
      const MatOperand a =
          tile_a ? tile(A, a_outer_major, m0, mn, k0, kn, a_tile) : stored_block(A, a_outer_major, m0, k0);
      for (int64_t n0 = 0; n0 < N; n0 += nc) {
        const int64_t nn = std::min(nc, N - n0);
        const MatOperand b =
            tile_b ? tile(B, b_outer_major, n0, nn, k0, kn, b_tile) : stored_block(B, b_outer_major, n0, k0);
        if (bf16) {
          bf16_gemm(C + m0 * ldc + n0, ldc, a, b, mn, nn, kn, alpha, chunk_beta);
        } else {
          sgemm(C + m0 * ldc + n0, ldc, a, b, mn, nn, kn, alpha, chunk_beta);
        }
      }
    }
  }
}

void matmul_backward(float* dA, float* dB, const float* dC, int64_t ldc, MatOperand A, MatOperand B,
                     int64_t M, int64_t N, int64_t K) {
  matmul_backward_by_products(matmul, dA, dB, dC, ldc, A, B, M, N, K);
}

}  // namespace tf::cpu
