// defines: tf::cpu::linear_forward, tf::cpu::linear_backward_input (f32 / bf16 / f16 weights
// through tf::cpu::matmul; a quantized weight dequantized one bounded tile at a time into
// per-thread scratch and multiplied with OpenBLAS sgemm, or through tf::cpu::quant_gemv /
// quant_gemv_t when there are only a few tokens)
#include "kernels/cpu/ref/linear.h"

#include <cblas.h>

#include <algorithm>

#include "kernels/cpu/quant_gemv.h"
#include "kernels/ops.h"
#include "src/core/alloc.h"

namespace tf::cpu {
namespace {

// A dequantized tile holds at most this many f32 (16 MiB, inside the last-level cache). Every
// sgemm call packs all the activations it reads, so x (or dy) is repacked once per tile and that
// cost falls as tiles grow: on a [4096 x 4096] weight at 512 and 4096 tokens (one thread, CPU
// time), 4 MiB tiles of whole rows took 1.1-1.2x the f32 GEMM, 16 MiB ones 1.01-1.06x. At >= 512
// tokens sgemm does >= 1024 flops per element dequantized, so the dequantization adds little.
constexpr int64_t kTileElems = int64_t(1) << 22;
// A weight larger than one tile is cut into tiles of kTileCols columns (a multiple of every block)
// and kTileElems / kTileCols rows: square tiles balance the repacking of the activations, once per
// row tile, against the accumulation of the output over column runs.
constexpr int64_t kTileCols = 2048;
static_assert(kTileCols % 256 == 0, "tiles must start and end on whole ggml blocks");

struct TileShape {
  int64_t rows, cols;
};

TileShape tile_shape(const WeightRef& W) {
  if (W.rows * W.cols <= kTileElems) return {W.rows, W.cols};
  const int64_t cols = std::min(W.cols, kTileCols);
  return {std::min(W.rows, kTileElems / cols), cols};
}

// Scratch for the dequantized tiles, one per calling thread, kept across calls: it grows only
// when a larger tile first appears, and never past kTileElems.
float* tile_scratch(const TileShape& ts) {
  thread_local Buffer buffer;
  return static_cast<float*>(grow_scratch(buffer, size_t(ts.rows * ts.cols) * sizeof(float)));
}

// out[n, width] = beta * out, with beta 0 overwriting (a product over an empty inner dimension).
void scale_rows(float* out, int64_t n, int64_t width, float beta) {
  for (int64_t i = 0; i < n * width; ++i) out[i] = beta == 0.0f ? 0.0f : beta * out[i];
}

// Calls fn(tile, r0, rn, c0, cn) for every tile of W in a fixed order (column runs outer, row tiles
// inner), the tile holding W[r0 .. r0 + rn, c0 .. c0 + cn] dequantized to f32 with leading dimension cn.
template <typename Fn>
void for_each_tile(const WeightRef& W, Fn&& fn) {
  const TileShape ts = tile_shape(W);
  float* tile = tile_scratch(ts);
  for (int64_t c0 = 0; c0 < W.cols; c0 += ts.cols) {
    const int64_t cn = std::min(ts.cols, W.cols - c0);
    for (int64_t r0 = 0; r0 < W.rows; r0 += ts.rows) {
      const int64_t rn = std::min(ts.rows, W.rows - r0);
      dequantize_weight_tile(tile, cn, W, r0, rn, c0, cn);
      fn(static_cast<const float*>(tile), r0, rn, c0, cn);
    }
  }
}

}  // namespace

// Each tile's product is one sgemm, whose bits repeat at a fixed thread count (see matmul.cpp), and
// the tiles are fixed by the shape: so are these results. K (the columns) is split into runs of
// kTileCols for a weight larger than one tile, each run summed into y: beta applies with the first.
void linear_forward(float* y, const float* x, WeightRef W, int64_t n_tokens, float beta) {
  ref::check_linear("linear_forward", y, x, W, n_tokens, true);
  const int64_t rows = W.rows, cols = W.cols;
  if (n_tokens == 0 || rows == 0) return;
  if (cols == 0) {
    scale_rows(y, n_tokens, rows, beta);
    return;
  }
  if (!is_quantized(W.dtype)) {
    matmul(y, rows, {x, DType::F32, cols, false}, {W.data, W.dtype, cols, true}, n_tokens, rows, cols, 1.0f,
           beta);
    return;
  }
  if (n_tokens <= kQuantGemvMaxTokens) {
    quant_gemv(y, x, W, n_tokens, beta);
    return;
  }
  for_each_tile(W, [&](const float* tile, int64_t r0, int64_t rn, int64_t c0, int64_t cn) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n_tokens), int(rn), int(cn), 1.0f, x + c0,
                int(cols), tile, int(cn), c0 == 0 ? beta : 1.0f, y + r0, int(rows));
  });
}

// dx[:, c0..] accumulates dy[:, r0..] Wtile over the row tiles: beta applies with the first.
void linear_backward_input(float* dx, const float* dy, WeightRef W, int64_t n_tokens, float beta) {
  ref::check_linear("linear_backward_input", dx, dy, W, n_tokens, false);
  const int64_t rows = W.rows, cols = W.cols;
  if (n_tokens == 0 || cols == 0) return;
  if (rows == 0) {
    scale_rows(dx, n_tokens, cols, beta);
    return;
  }
  if (!is_quantized(W.dtype)) {
    matmul(dx, cols, {dy, DType::F32, rows, false}, {W.data, W.dtype, cols, false}, n_tokens, cols, rows,
           1.0f, beta);
    return;
  }
  if (n_tokens <= kQuantGemvMaxTokens) {
    quant_gemv_t(dx, dy, W, n_tokens, beta);
    return;
  }
  for_each_tile(W, [&](const float* tile, int64_t r0, int64_t rn, int64_t c0, int64_t cn) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(n_tokens), int(cn), int(rn), 1.0f, dy + r0,
                int(rows), tile, int(cn), r0 == 0 ? beta : 1.0f, dx + c0, int(cols));
  });
}

}  // namespace tf::cpu
