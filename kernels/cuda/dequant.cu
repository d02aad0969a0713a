// defines: the quantized cases of the CUDA backend's ops that read a frozen weight (tf::cuda:: and
// tf::simt:: quant_linear_forward, quant_linear_backward_input, dequantize_quant_tile,
// quant_embedding_forward, declared in kernels/cuda/dequant.h): the weight stays in device
// memory as stored and is decoded a bounded tile of rows at a time, to bf16 in rt::scratch for
// blas::gemm, or to f32 for dequantize_weight_tile and embedding rows; quant_linear_scratch, the
// rt::scratch of the first two
#include <algorithm>
#include <cstdint>

#include "kernels/cuda/dequant.h"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/kernel_common.h"
#include "kernels/cuda/port.h"
#include "kernels/cuda/quant_decode.h"
#include "kernels/cuda/runtime.h"
#include "kernels/cuda/scratch_plan.h"
#include "src/core/dtype.h"
#include "src/core/error.h"

namespace tf::TF_PORT_BACKEND {

namespace {

// rt::scratch slot of the bf16 tile of W's rows.
constexpr int kSlotTile = 50;
// A dequantized tile holds at most this many elements (32 MiB of bf16), whatever the weight's size.
constexpr int64_t kTileElems = int64_t(1) << 24;

// dst[r, :] = bf16(W[r0 + r, :]) for r < n_rows, eight columns (16 bytes) per step of a thread.
template <DType T>
__global__ void rows_to_bf16_kernel(port::gptr<uint4> dst, QuantWeight w, int64_t r0, int64_t n_rows) {
  const int64_t groups_per_row = w.cols / 8;
  for (int64_t g = grid_first(); g < n_rows * groups_per_row; g += grid_stride()) {
    uint32_t p[4];
    decode8_bf16<T>(w, r0 + g / groups_per_row, g % groups_per_row * 8, p);
    dst[g] = make_uint4(p[0], p[1], p[2], p[3]);
  }
}

// dst[r * ld + c - c0] = W[r0 + r, c] for c in [c0, c0 + n_cols): each thread decodes a group of 8
// columns and keeps those inside the range (a range may start or end inside a group).
template <DType T>
__global__ void tile_to_f32_kernel(port::gptr<float> dst, int64_t ld, QuantWeight w, int64_t r0,
                                   int64_t n_rows, int64_t c0, int64_t n_cols) {
  const int64_t g0 = c0 / 8, per_row = (c0 + n_cols + 7) / 8 - g0;
  for (int64_t g = grid_first(); g < n_rows * per_row; g += grid_stride()) {
    const int64_t r = g / per_row, col = (g0 + g % per_row) * 8;
    float v[8];
    decode8<T>(w, r0 + r, col, v);
    for (int k = 0; k < 8; ++k) {
      const int64_t c = col + k;
      if (c >= c0 && c < c0 + n_cols) dst[r * ld + c - c0] = v[k];
    }
  }
}

// Block b decodes the rows of tokens b, b + gridDim.x, ...; its threads take groups of 8 columns.
template <DType T>
__global__ void embedding_rows_kernel(port::gptr<float> out, port::gptr<const int32_t> tokens,
                                      int64_t n_tokens, QuantWeight w) {
  for (int64_t n = blockIdx.x; n < n_tokens; n += gridDim.x) {
    const int64_t row = tokens[n];
    for (int64_t col = int64_t(threadIdx.x) * 8; col < w.cols; col += int64_t(blockDim.x) * 8) {
      float v[8];
      decode8<T>(w, row, col, v);
      for (int k = 0; k < 8; ++k) out[n * w.cols + col + k] = v[k];
    }
  }
}

// dst (packed rows of W.cols bf16) = rows [r0, r0 + n_rows) of W.
void rows_to_bf16(const char* op, uint16_t* dst, const WeightRef& W, int64_t r0, int64_t n_rows) {
  const QuantWeight q = quant_weight(W, op);
  TF_CHECK(r0 >= 0 && n_rows >= 0 && r0 + n_rows <= W.rows, op, ": rows [", r0, ", ", r0 + n_rows,
           ") outside a weight of ", W.rows, " rows");
  if (n_rows == 0 || W.cols == 0) return;
  with_quant_dtype(W.dtype, [&](auto tag) {
    constexpr DType T = decltype(tag)::value;
    port::launch(rows_to_bf16_kernel<T>,
                 on_current_stream(op, element_blocks(n_rows * W.cols / 8), kElementThreads),
                 reinterpret_cast<uint4*>(dst), q, r0, n_rows);
  });
}

size_t tile_bytes(const WeightRef& W, int64_t tile_rows) {
  return size_t(std::min(tile_rows, W.rows) * std::max<int64_t>(W.cols, 1)) * 2;
}

uint16_t* tile_scratch(const WeightRef& W, int64_t tile_rows) {
  return static_cast<uint16_t*>(rt::scratch(kSlotTile, tile_bytes(W, tile_rows)));
}

}  // namespace

int64_t quant_tile_rows(const WeightRef& W) {
  return std::clamp<int64_t>(kTileElems / std::max<int64_t>(W.cols, 1), 1, std::max<int64_t>(W.rows, 1));
}

// y[:, r0 .. r0 + rn) = x W[r0 .. r0 + rn)^T + beta y for each tile of rows: matmul rounds x to
// bf16 (relative 2^-8) against the bf16 tile (the dequantized value rounded once, 2^-8), f32 sums.
void quant_linear_forward(float* y, const float* x, const WeightRef& W, int64_t n_tokens, float beta,
                          int64_t tile_rows) {
  const char* op = "linear_forward";
  quant_weight(W, op);
  TF_CHECK(tile_rows > 0, op, ": tiles of ", tile_rows, " rows");
  if (n_tokens == 0 || W.rows == 0) return;
  uint16_t* tile = tile_scratch(W, tile_rows);
  const int64_t ld = std::max<int64_t>(1, W.cols);
  for (int64_t r0 = 0; r0 < W.rows; r0 += tile_rows) {
    const int64_t rn = std::min(tile_rows, W.rows - r0);
    rows_to_bf16(op, tile, W, r0, rn);
    matmul(y + r0, W.rows, MatOperand{x, DType::F32, ld, false}, MatOperand{tile, DType::BF16, ld, true},
           n_tokens, rn, W.cols, 1.0f, beta);
  }
}

// dx = sum over tiles of dy[:, r0 .. r0 + rn) W[r0 .. r0 + rn), the first tile adding beta dx; the
// precisions of quant_linear_forward.
void quant_linear_backward_input(float* dx, const float* dy, const WeightRef& W, int64_t n_tokens, float beta,
                                 int64_t tile_rows) {
  const char* op = "linear_backward_input";
  quant_weight(W, op);
  TF_CHECK(tile_rows > 0, op, ": tiles of ", tile_rows, " rows");
  if (n_tokens == 0 || W.cols == 0) return;
  if (W.rows == 0) {
    // No rows to add: dx = beta dx, a product over K = 0.
    matmul(dx, W.cols, MatOperand{dy, DType::F32, 1, false}, MatOperand{nullptr, DType::BF16, W.cols, false},
           n_tokens, W.cols, 0, 1.0f, beta);
    return;
  }
  uint16_t* tile = tile_scratch(W, tile_rows);
  for (int64_t r0 = 0; r0 < W.rows; r0 += tile_rows) {
    const int64_t rn = std::min(tile_rows, W.rows - r0);
    rows_to_bf16(op, tile, W, r0, rn);
    matmul(dx, W.cols, MatOperand{dy + r0, DType::F32, W.rows, false},
           MatOperand{tile, DType::BF16, W.cols, false}, n_tokens, W.cols, rn, 1.0f, r0 == 0 ? beta : 1.0f);
  }
}

// The passes' products take the tile of rows as the B operand of matmul: a full tile and the last,
// shorter one.
void quant_linear_scratch(ScratchNeeds& s, const WeightRef& W, int64_t n_tokens, bool forward) {
  if (n_tokens == 0 || W.rows == 0 || W.cols == 0) return;
  const int64_t tile_rows = quant_tile_rows(W);
  s.need(kSlotTile, "the bf16 tile of a dequantized weight", tile_bytes(W, tile_rows));
  for (const int64_t rn : {std::min(tile_rows, W.rows), W.rows % tile_rows}) {
    if (rn == 0) continue;
    if (forward)
      matmul_scratch(s, DType::F32, DType::BF16, n_tokens, rn, W.cols);
    else
      matmul_scratch(s, DType::F32, DType::BF16, n_tokens, W.cols, rn);
  }
}

void dequantize_quant_tile(float* dst, int64_t ld_dst, const WeightRef& W, int64_t r0, int64_t n_rows,
                           int64_t c0, int64_t n_cols) {
  const char* op = "dequantize_weight_tile";
  const QuantWeight q = quant_weight(W, op);
  if (W.dtype != DType::NF4 && W.dtype != DType::INT8) {
    const int64_t block = dtype_block_elems(W.dtype);
    TF_CHECK(c0 % block == 0 && (n_cols % block == 0 || c0 + n_cols == W.cols), op, ": columns [", c0, ", ",
             c0 + n_cols, ") of a ", dtype_name(W.dtype), " weight do not start and end on blocks of ",
             block);
  }
  if (n_rows == 0 || n_cols == 0) return;
  const int64_t groups = n_rows * ((c0 + n_cols + 7) / 8 - c0 / 8);
  with_quant_dtype(W.dtype, [&](auto tag) {
    constexpr DType T = decltype(tag)::value;
    port::launch(tile_to_f32_kernel<T>, on_current_stream(op, element_blocks(groups), kElementThreads), dst,
                 ld_dst, q, r0, n_rows, c0, n_cols);
  });
}

void quant_embedding_forward(float* out, const int32_t* tokens, int64_t n_tokens, const WeightRef& table) {
  const QuantWeight q = quant_weight(table, "embedding_forward: table");
  if (n_tokens <= 0 || table.cols == 0) return;
  // A warp or more per block, no more threads than groups of 8 columns beyond that.
  const int threads = int(std::clamp<int64_t>((table.cols / 8 + 31) / 32 * 32, 32, kElementThreads));
  with_quant_dtype(table.dtype, [&](auto tag) {
    constexpr DType T = decltype(tag)::value;
    port::launch(embedding_rows_kernel<T>,
                 on_current_stream("embedding_forward", std::min(n_tokens, kMaxElementBlocks), threads), out,
                 tokens, n_tokens, q);
  });
}

}  // namespace tf::TF_PORT_BACKEND
