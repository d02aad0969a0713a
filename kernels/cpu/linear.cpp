// defines: tf::cpu::linear_forward, tf::cpu::linear_backward_input (f32 / bf16 / f16 weights
// through tf::cpu::matmul; a quantized weight dequantized one bounded row tile at a time into
// per-thread scratch and multiplied with OpenBLAS sgemm, or through tf::cpu::quant_gemv when there
// are only a few tokens)
#include "kernels/cpu/ref/linear.h"

#include <cblas.h>

#include <algorithm>

#include "kernels/cpu/quant_gemv.h"
#include "kernels/ops.h"
#include "src/core/alloc.h"

namespace tf::cpu {
namespace {

// A dequantized tile holds at most this many f32 (4 MiB, inside the last-level cache): at >= 512
// tokens sgemm does >= 1024 flops on every element dequantized into it, so the dequantization is a
// small fraction of the product, and the bound holds whatever the matrix size.
constexpr int64_t kTileElems = int64_t(1) << 20;
// Longest run of one row in a tile, so that a tile still has >= 64 rows when rows are long.
constexpr int64_t kMaxTileCols = 16384;
// Scratch for the dequantized tile, one per calling thread, allocated on first use and reused by
// every later call.
float* tile_scratch() {
  thread_local Buffer buffer;
  if (!buffer.data()) buffer = Buffer(size_t(kTileElems) * sizeof(float), MemTag::Workspace, false);
  return buffer.as<float>();
}

struct TileShape {
  int64_t rows, cols;
};

// Whole rows when they fit kMaxTileCols, else runs of whole blocks (ggml blocks lie along the row,
// so a tile may only start and end on one); as many rows as then fit in kTileElems.
TileShape tile_shape(const WeightRef& W) {
  const int64_t block = dtype_block_elems(W.dtype);
  const int64_t cols = W.cols <= kMaxTileCols ? W.cols : kMaxTileCols / block * block;
  return {std::min(W.rows, std::max<int64_t>(1, kTileElems / cols)), cols};
}

// out[n, width] = beta * out, with beta 0 overwriting (a product over an empty inner dimension).
void scale_rows(float* out, int64_t n, int64_t width, float beta) {
  for (int64_t i = 0; i < n * width; ++i) out[i] = beta == 0.0f ? 0.0f : beta * out[i];
}

}  // namespace

// Each tile's product is one sgemm, whose bits repeat at a fixed thread count (see matmul.cpp), and
// the tiles are fixed by the shape: so are these results. K (the columns) is split only for rows
// longer than kMaxTileCols, each part summed into y: beta applies with the first part only.
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
  const TileShape ts = tile_shape(W);
  float* tile = tile_scratch();
  for (int64_t c0 = 0; c0 < cols; c0 += ts.cols) {
    const int64_t cn = std::min(ts.cols, cols - c0);
    for (int64_t r0 = 0; r0 < rows; r0 += ts.rows) {
      const int64_t rn = std::min(ts.rows, rows - r0);
      dequantize_weight_tile(tile, cn, W, r0, rn, c0, cn);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n_tokens), int(rn), int(cn), 1.0f, x + c0,
                  int(cols), tile, int(cn), c0 == 0 ? beta : 1.0f, y + r0, int(rows));
    }
  }
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
  const TileShape ts = tile_shape(W);
  float* tile = tile_scratch();
  for (int64_t c0 = 0; c0 < cols; c0 += ts.cols) {
    const int64_t cn = std::min(ts.cols, cols - c0);
    for (int64_t r0 = 0; r0 < rows; r0 += ts.rows) {
      const int64_t rn = std::min(ts.rows, rows - r0);
      dequantize_weight_tile(tile, cn, W, r0, rn, c0, cn);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(n_tokens), int(cn), int(rn), 1.0f, dy + r0,
                  int(rows), tile, int(cn), r0 == 0 ? beta : 1.0f, dx + c0, int(cols));
    }
  }
}

}  // namespace tf::cpu
