// defines: tf::cpu::linear_forward, tf::cpu::linear_backward_input (f32 / bf16 / f16 weights
// through tf::cpu::matmul; a quantized weight dequantized one bounded tile at a time into
// per-thread scratch and multiplied with OpenBLAS sgemm, or under bf16 precision dequantized to bf16
// and multiplied by tf::cpu::bf16_gemm with the activations rounded to bf16, or through
// tf::cpu::quant_gemv / quant_gemv_t when there are only a few tokens)
#include "kernels/cpu/ref/linear.h"

#include <cblas.h>

#include <algorithm>

#include "kernels/cpu/bf16_gemm.h"
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

// As for_each_tile, with the tile dequantized to bf16 into the same scratch (half its bytes).
template <typename Fn>
void for_each_bf16_tile(const WeightRef& W, Fn&& fn) {
  const TileShape ts = tile_shape(W);
  auto* tile = reinterpret_cast<uint16_t*>(tile_scratch(ts));
  for (int64_t c0 = 0; c0 < W.cols; c0 += ts.cols) {
    const int64_t cn = std::min(ts.cols, W.cols - c0);
    for (int64_t r0 = 0; r0 < W.rows; r0 += ts.rows) {
      const int64_t rn = std::min(ts.rows, W.rows - r0);
      dequantize_weight_tile_bf16(tile, cn, W, r0, rn, c0, cn);
      fn(static_cast<const uint16_t*>(tile), r0, rn, c0, cn);
    }
  }
}

// The activations a bf16 product reads, rounded to bf16: at most this many elements at a time (4 MiB),
// the whole [tokens, run] slab when it fits, so that each is rounded once per tile column run.
constexpr int64_t kBf16SlabElems = int64_t(1) << 21;

// Rounds x[t0 .. t0 + tn, c0 .. c0 + cn] (leading dimension ld) to bf16 with leading dimension cn.
void round_slab(uint16_t* dst, const float* x, int64_t ld, int64_t t0, int64_t tn, int64_t c0, int64_t cn) {
#pragma omp parallel for schedule(static) if (tn * cn >= (int64_t(1) << 15))
  for (int64_t t = 0; t < tn; ++t) round_to_bf16(dst + t * cn, x + (t0 + t) * ld + c0, cn);
}

uint16_t* slab_scratch(int64_t elems) {
  thread_local Buffer buffer;
  return static_cast<uint16_t*>(grow_scratch(buffer, size_t(elems) * sizeof(uint16_t)));
}

// out[:, o0 .. o0 + on] (leading dimension ld_out) = in[:, i0 .. i0 + in_n] (leading dimension ld_in,
// rounded to bf16 in slabs of tokens) times the bf16 tile (row-major, ld_tile), transposed when
// `trans`; beta as in the op. The slab of `in` is rounded again only when the run it covers changes.
struct Bf16Slabs {
  int64_t n_tokens, tokens_per_slab;
  uint16_t* slab;
  int64_t rounded_i0 = -1;

  Bf16Slabs(int64_t n, int64_t width) : n_tokens(n) {
    tokens_per_slab = std::min(n, std::max<int64_t>(1, kBf16SlabElems / width));
    slab = slab_scratch(tokens_per_slab * width);
  }

  void product(float* out, int64_t ld_out, int64_t o0, int64_t on, const float* in, int64_t ld_in, int64_t i0,
               int64_t in_n, const uint16_t* tile, int64_t ld_tile, bool trans, float beta) {
    const bool whole = tokens_per_slab == n_tokens;
    for (int64_t t0 = 0; t0 < n_tokens; t0 += tokens_per_slab) {
      const int64_t tn = std::min(tokens_per_slab, n_tokens - t0);
      if (!whole || rounded_i0 != i0) round_slab(slab, in, ld_in, t0, tn, i0, in_n);
      rounded_i0 = i0;
      bf16_gemm(out + t0 * ld_out + o0, ld_out, {slab, DType::BF16, in_n, false},
                {tile, DType::BF16, ld_tile, trans}, tn, on, in_n, 1.0f, beta);
    }
  }
};

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
  if (matmul_precision() == MatmulPrecision::BF16) {
    Bf16Slabs slabs(n_tokens, tile_shape(W).cols);
    for_each_bf16_tile(W, [&](const uint16_t* tile, int64_t r0, int64_t rn, int64_t c0, int64_t cn) {
      slabs.product(y, rows, r0, rn, x, cols, c0, cn, tile, cn, true, c0 == 0 ? beta : 1.0f);
    });
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
  if (matmul_precision() == MatmulPrecision::BF16) {
    Bf16Slabs slabs(n_tokens, tile_shape(W).rows);
    for_each_bf16_tile(W, [&](const uint16_t* tile, int64_t r0, int64_t rn, int64_t c0, int64_t cn) {
      slabs.product(dx, cols, c0, cn, dy, rows, r0, rn, tile, cn, false, r0 == 0 ? beta : 1.0f);
    });
    return;
  }
  for_each_tile(W, [&](const float* tile, int64_t r0, int64_t rn, int64_t c0, int64_t cn) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(n_tokens), int(cn), int(rn), 1.0f, dy + r0,
                int(rows), tile, int(cn), r0 == 0 ? beta : 1.0f, dx + c0, int(cols));
  });
}

}  // namespace tf::cpu
