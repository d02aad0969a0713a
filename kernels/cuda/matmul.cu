// defines: the CUDA backend's dense products, tf::cuda:: and tf::simt:: matmul, matmul_backward,
// linear_forward, linear_backward_input (blas::gemm on cuBLASLt, operands of different types both
// converted to bf16 a bounded tile at a time; a quantized weight through kernels/cuda/dequant.cu)
// and dequantize_weight_tile (any storage dtype); a quantized weight multiplies through the fused
// kernel of kernels/cuda/qmatmul.cu where it takes the weight; matmul_scratch and linear_*_scratch,
// the rt::scratch each call asks for
#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/ref/linear.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/dequant.h"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/kernel_common.h"
#include "kernels/cuda/matmul.h"
#include "kernels/cuda/port.h"
#include "kernels/cuda/qmatmul.h"
#include "kernels/cuda/quant_decode.h"
#include "kernels/cuda/scratch_plan.h"
#include "kernels/matmul_backward.h"
#include "src/core/dtype.h"
#include "src/core/error.h"

namespace tf::TF_PORT_BACKEND {

namespace {

// rt::scratch slots of the bf16 copies of A and B.
constexpr int kSlotA = 11, kSlotB = 12;
// A converted tile holds at most this many bf16 (32 MiB), whatever the operand's size.
constexpr int64_t kTileElems = int64_t(1) << 24;

// Rows of op(X) (of `outer`, each K long) converted at a time, and the bytes of their bf16 tile.
int64_t tile_rows(int64_t tile_elems, int64_t outer, int64_t K) {
  return std::clamp<int64_t>(tile_elems / K, 1, outer);
}
size_t tile_bytes(int64_t rows, int64_t K) {
  return size_t(rows * K) * sizeof(uint16_t);
}

// dst[r * cols + c] = bf16(src[r * ld + c]) for r < rows, c < cols.
template <typename W>
__global__ void to_bf16_kernel(port::gptr<uint16_t> dst, port::gptr<const typename W::Storage> src,
                               int64_t ld, int64_t rows, int64_t cols) {
  for (int64_t i = grid_first(); i < rows * cols; i += grid_stride()) {
    const typename W::Storage v = src[i / cols * ld + i % cols];
    dst[i] = bf16_bits(W::widen(v));
  }
}

// dst[r * ld_dst + c] = src[r * ld_src + c] widened to f32.
template <typename W>
__global__ void to_f32_kernel(port::gptr<float> dst, int64_t ld_dst,
                              port::gptr<const typename W::Storage> src, int64_t ld_src, int64_t rows,
                              int64_t cols) {
  for (int64_t i = grid_first(); i < rows * cols; i += grid_stride()) {
    const typename W::Storage v = src[i / cols * ld_src + i % cols];
    dst[i / cols * ld_dst + i % cols] = W::widen(v);
  }
}

blas::ElemType elem_type(DType t) {
  return t == DType::F32    ? blas::ElemType::F32
         : t == DType::BF16 ? blas::ElemType::BF16
                            : blas::ElemType::F16;
}

// The stored rows of op(X) run along its outer index (M for A, N for B) when X is "outer-major":
// A untransposed, B transposed.
const void* offset(const MatOperand& x, bool outer_major, int64_t o0) {
  return static_cast<const char*>(x.data) + (outer_major ? o0 * x.ld : o0) * int64_t(dtype_size(x.dtype));
}

// op(X)[o0 .. o0 + on, all of K] converted to bf16 into dst, returned as an operand of the same
// orientation with a packed leading dimension.
MatOperand to_bf16(const MatOperand& x, bool outer_major, int64_t o0, int64_t on, int64_t K, uint16_t* dst) {
  const int64_t rows = outer_major ? on : K, cols = outer_major ? K : on;
  const WeightRef stored(offset(x, outer_major, o0), x.dtype, rows, cols);
  with_stored_weight("matmul operand", stored, [&](auto tag) {
    using S = decltype(tag);
    port::launch(to_bf16_kernel<S>,
                 on_current_stream("matmul_to_bf16", element_blocks(rows * cols), kElementThreads), dst,
                 static_cast<const typename S::Storage*>(stored.data), x.ld, rows, cols);
  });
  return MatOperand{dst, DType::BF16, cols, x.trans};
}

void gemm(float* C, int64_t ldc, const MatOperand& A, const MatOperand& B, int64_t M, int64_t N, int64_t K,
          float alpha, float beta) {
  blas::Gemm g;
  g.a = A.data;
  g.lda = A.ld;
  g.trans_a = A.trans;
  g.b = B.data;
  g.ldb = B.ld;
  g.trans_b = B.trans;
  g.type = elem_type(A.dtype);
  g.c = C;
  g.ldc = ldc;
  g.m = M;
  g.n = N;
  g.k = K;
  g.alpha = alpha;
  g.beta = beta;
  blas::gemm(g);
}

void check_operand(const char* name, const MatOperand& x, bool outer_major, int64_t outer, int64_t K) {
  TF_CHECK(x.dtype == DType::F32 || x.dtype == DType::BF16 || x.dtype == DType::F16, "matmul: operand ", name,
           " has dtype ", dtype_name(x.dtype), "; expected f32, bf16 or f16");
  const int64_t cols = outer_major ? K : outer;
  TF_CHECK(x.ld >= std::max<int64_t>(1, cols), "matmul: operand ", name, " has leading dimension ", x.ld,
           " but its stored rows hold ", cols, " elements");
  TF_CHECK(x.data != nullptr || outer == 0 || K == 0, "matmul: operand ", name, " is null");
}

// An f32 / bf16 / f16 WeightRef as the B operand of y = x W^T (trans) or dx = dy W.
MatOperand weight_operand(const WeightRef& W, bool trans) {
  return MatOperand{W.data, W.dtype, std::max<int64_t>(1, W.cols), trans};
}

}  // namespace

// Operands of one type go to blas::gemm as they are (f32 x f32 in f32, bf16 x bf16 and f16 x f16
// on tensor cores, all accumulating in f32). Mixed operands are both taken to bf16, which keeps
// f32's range: an f32 activation or gradient converted to f16 could overflow or flush to zero, so
// an f16 operand gives up its three extra mantissa bits instead. Each conversion rounds once,
// relative error 2^-8 per element. The converted operand is formed a tile of rows of op(X) at a
// time (at most kTileElems elements), so its scratch stays bounded for any size.
void matmul(float* C, int64_t ldc, MatOperand A, MatOperand B, int64_t M, int64_t N, int64_t K, float alpha,
            float beta) {
  matmul_in_tiles(C, ldc, A, B, M, N, K, alpha, beta, kTileElems);
}

void matmul_in_tiles(float* C, int64_t ldc, MatOperand A, MatOperand B, int64_t M, int64_t N, int64_t K,
                     float alpha, float beta, int64_t tile_elems) {
  TF_CHECK(tile_elems > 0, "matmul: tiles of ", tile_elems, " elements");
  TF_CHECK(M >= 0 && N >= 0 && K >= 0 && M <= INT_MAX && N <= INT_MAX && K <= INT_MAX,
           "matmul: bad shape M=", M, " N=", N, " K=", K);
  const bool a_outer_major = !A.trans, b_outer_major = B.trans;
  check_operand("A", A, a_outer_major, M, K);
  check_operand("B", B, b_outer_major, N, K);
  TF_CHECK(ldc >= std::max<int64_t>(1, N), "matmul: ldc ", ldc, " is smaller than N ", N);
  TF_CHECK(C != nullptr || M == 0 || N == 0, "matmul: C is null");
  if (M == 0 || N == 0) return;
  if (A.dtype == B.dtype || K == 0) {
    // With K = 0 nothing is read and C = beta * C; any one type serves.
    if (K == 0) B.dtype = A.dtype;
    gemm(C, ldc, A, B, M, N, K, alpha, beta);
    return;
  }
  const bool convert_a = A.dtype != DType::BF16, convert_b = B.dtype != DType::BF16;
  const int64_t mc = convert_a ? tile_rows(tile_elems, M, K) : M;
  const int64_t nc = convert_b ? tile_rows(tile_elems, N, K) : N;
  auto* a_tile = convert_a ? static_cast<uint16_t*>(rt::scratch(kSlotA, tile_bytes(mc, K))) : nullptr;
  auto* b_tile = convert_b ? static_cast<uint16_t*>(rt::scratch(kSlotB, tile_bytes(nc, K))) : nullptr;
  for (int64_t m0 = 0; m0 < M; m0 += mc) {
    const int64_t mn = std::min(mc, M - m0);
    MatOperand a{offset(A, a_outer_major, m0), A.dtype, A.ld, A.trans};
    if (convert_a) a = to_bf16(A, a_outer_major, m0, mn, K, a_tile);
    for (int64_t n0 = 0; n0 < N; n0 += nc) {
      const int64_t nn = std::min(nc, N - n0);
      MatOperand b{offset(B, b_outer_major, n0), B.dtype, B.ld, B.trans};
      if (convert_b) b = to_bf16(B, b_outer_major, n0, nn, K, b_tile);
      gemm(C + m0 * ldc + n0, ldc, a, b, mn, nn, K, alpha, beta);
    }
  }
}

void matmul_backward(float* dA, float* dB, const float* dC, int64_t ldc, MatOperand A, MatOperand B,
                     int64_t M, int64_t N, int64_t K) {
  matmul_backward_by_products(matmul, dA, dB, dC, ldc, A, B, M, N, K);
}

namespace {

// The fused kernel decodes W's blocks next to the tensor cores and never forms a dequantized copy;
// dequantize + cuBLASLt serves the weights it does not take. Neither has been timed on a GPU yet,
// so no crossover by shape is encoded (bench_gpu_kernels measures both).
bool fused_quantized(const WeightRef& W, int64_t n_tokens) {
  return n_tokens > 0 && qmatmul_supports(W);
}

}  // namespace

// y = x W^T + beta y: an f32 W multiplies in f32, a bf16 W with x converted to bf16, an f16 W with
// both converted (see matmul), a quantized W through the fused kernel, or else a dequantized bf16
// tile of rows at a time.
void linear_forward(float* y, const float* x, WeightRef W, int64_t n_tokens, float beta) {
  ref::check_linear("linear_forward", y, x, W, n_tokens, true);
  if (is_quantized(W.dtype) && fused_quantized(W, n_tokens)) return qmatmul_forward(y, x, W, n_tokens, beta);
  if (is_quantized(W.dtype)) return quant_linear_forward(y, x, W, n_tokens, beta, quant_tile_rows(W));
  const MatOperand w = weight_operand(W, true);
  matmul(y, std::max<int64_t>(1, W.rows), MatOperand{x, DType::F32, w.ld, false}, w, n_tokens, W.rows, W.cols,
         1.0f, beta);
}

// dx = dy W + beta dx, with the precisions of linear_forward.
void linear_backward_input(float* dx, const float* dy, WeightRef W, int64_t n_tokens, float beta) {
  ref::check_linear("linear_backward_input", dx, dy, W, n_tokens, false);
  if (is_quantized(W.dtype) && fused_quantized(W, n_tokens))
    return qmatmul_backward_input(dx, dy, W, n_tokens, beta);
  if (is_quantized(W.dtype))
    return quant_linear_backward_input(dx, dy, W, n_tokens, beta, quant_tile_rows(W));
  const MatOperand w = weight_operand(W, false);
  matmul(dx, w.ld, MatOperand{dy, DType::F32, std::max<int64_t>(1, W.rows), false}, w, n_tokens, W.cols,
         W.rows, 1.0f, beta);
}

void matmul_scratch(ScratchNeeds& s, DType a, DType b, int64_t M, int64_t N, int64_t K) {
  if (M == 0 || N == 0 || K == 0) return;
  blas::gemm_scratch(s);
  if (a == b) return;
  if (a != DType::BF16) s.need(kSlotA, "matmul's bf16 tile of A", tile_bytes(tile_rows(kTileElems, M, K), K));
  if (b != DType::BF16) s.need(kSlotB, "matmul's bf16 tile of B", tile_bytes(tile_rows(kTileElems, N, K), K));
}

void linear_forward_scratch(ScratchNeeds& s, const WeightRef& W, int64_t n_tokens) {
  if (is_quantized(W.dtype) && fused_quantized(W, n_tokens)) return qmatmul_scratch(s, W, n_tokens, true);
  if (is_quantized(W.dtype)) return quant_linear_scratch(s, W, n_tokens, true);
  matmul_scratch(s, DType::F32, W.dtype, n_tokens, W.rows, W.cols);
}

void linear_backward_input_scratch(ScratchNeeds& s, const WeightRef& W, int64_t n_tokens) {
  if (is_quantized(W.dtype) && fused_quantized(W, n_tokens)) return qmatmul_scratch(s, W, n_tokens, false);
  if (is_quantized(W.dtype)) return quant_linear_scratch(s, W, n_tokens, false);
  matmul_scratch(s, DType::F32, W.dtype, n_tokens, W.cols, W.rows);
}

void dequantize_weight_tile(float* dst, int64_t ld_dst, WeightRef W, int64_t r0, int64_t n_rows, int64_t c0,
                            int64_t n_cols) {
  TF_CHECK(r0 >= 0 && n_rows >= 0 && r0 + n_rows <= W.rows && c0 >= 0 && n_cols >= 0 && c0 + n_cols <= W.cols,
           "dequantize_weight_tile: rows [", r0, ", ", r0 + n_rows, ") x cols [", c0, ", ", c0 + n_cols,
           ") outside a ", W.rows, " x ", W.cols, " weight");
  TF_CHECK(ld_dst >= n_cols, "dequantize_weight_tile: ld_dst ", ld_dst, " < ", n_cols, " columns");
  if (is_quantized(W.dtype)) return dequantize_quant_tile(dst, ld_dst, W, r0, n_rows, c0, n_cols);
  if (n_rows == 0 || n_cols == 0) return;
  with_stored_weight("dequantize_weight_tile", W, [&](auto tag) {
    using S = decltype(tag);
    const auto* src = static_cast<const typename S::Storage*>(W.data) + r0 * W.cols + c0;
    port::launch(
        to_f32_kernel<S>,
        on_current_stream("dequantize_weight_tile", element_blocks(n_rows * n_cols), kElementThreads), dst,
        ld_dst, src, W.cols, n_rows, n_cols);
  });
}

}  // namespace tf::TF_PORT_BACKEND
