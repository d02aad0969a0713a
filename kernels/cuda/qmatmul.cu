// defines: tf::cuda::qmatmul_supports / qmatmul_forward / qmatmul_backward_input (built by nvcc) and
// their tf::simt twins (this source compiled as host C++ against the simulator): the fused
// dequantize + tensor-core matmul over a quantized frozen weight, forward (y = x W^T) and input
// gradient (dx = dy W) from the same blocks; qmatmul_scratch, the rt::scratch of either.
//
// Both directions are one GEMM C[m, n] = A[m, k] B[k, n] + beta C on mma.sync m16n8k16 bf16 with f32
// accumulation, where A is the activations (x or dy) and B is W or W^T. The weight tile a block
// needs at a k step is always a rectangle of W itself, W[r0 .., c0 ..], decoded 8 consecutive
// columns at a time (kernels/cuda/quant_decode.h) to bf16 in shared memory, rows along W's rows:
// the forward reads it as B [n, k] (ldmatrix as stored), the input gradient as B [k, n] (ldmatrix
// .trans), so neither direction needs a transposed copy of the weight.
//
// The activations are f32; a pre-pass converts them once per call to bf16 in rt::scratch, padded
// with zeros to whole tiles, and the GEMM streams that copy with cp.async. Converting on load
// instead would redo the conversion, and read twice the bytes, once per column tile of the output
// (a block re-reads its rows of A for every n0), and would put synchronous loads in the loop that
// the asynchronous copies keep free for the weight's decode.
#include <algorithm>
#include <cstdint>

#include "kernels/cpu/ref/linear.h"
#include "kernels/cuda/kernel_common.h"
#include "kernels/cuda/port.h"
#include "kernels/cuda/qmatmul.h"
#include "kernels/cuda/quant_decode.h"
#include "kernels/cuda/runtime.h"
#include "kernels/cuda/scratch_plan.h"
#include "src/core/dtype.h"
#include "src/core/error.h"

namespace tf::TF_PORT_BACKEND {

namespace {

// One block of kThreads computes a kM x kN tile of C in steps of kK along k, double-buffered: the
// cp.async copies of A for step t+1 fly while the block decodes the weight tile of t+1 into the
// other stage and multiplies step t. Its warps form a kWarpsM x kWarpsN grid, each owning a kWarpM x kWarpN
// sub-tile as (kWarpM / 16) x (kWarpN / 8) mma tiles. 128 tokens per block let one decode of a
// weight element serve 128 rows of the product, which is what makes the decode affordable at the
// token counts of training. Shared rows are padded by 8 elements (16 bytes) so that the eight row
// addresses of one ldmatrix fall in different banks.
struct QmmTile {
  static constexpr int kM = 128, kN = 64, kK = 32;
  static constexpr int kWarpsM = 4, kWarpsN = 2;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kWarpM = kM / kWarpsM, kWarpN = kN / kWarpsN;
  static constexpr int kMmaM = kWarpM / 16, kMmaN = kWarpN / 8;
  static constexpr int kPad = 8;
  static constexpr int kChunk = 8;  // bf16 per 16-byte copy, and weight columns per decode
  static constexpr int kLdA = kK + kPad;
  // The bf16 copy of the activations holds at most this many elements (32 MiB) per pass.
  static constexpr int64_t kPassElems = int64_t(1) << 24;
};
static_assert(QmmTile::kWarpM % 16 == 0 && QmmTile::kWarpN % 16 == 0 && QmmTile::kK % 16 == 0,
              "warp tiles are whole m16 tiles and pairs of n8 tiles; k steps whole k16 steps");

constexpr int kSlotActivations = 55;  // rt::scratch slot of the bf16 activations

// dst[r, c] = bf16(src[r * cols + c]) for r < rows, c < cols, and 0 elsewhere in [rows_pad, ld].
__global__ void activations_to_bf16_kernel(port::gptr<uint16_t> dst, int64_t ld, int64_t rows_pad,
                                           port::gptr<const float> src, int64_t rows, int64_t cols) {
  constexpr int kChunk = QmmTile::kChunk;
  for (int64_t i = grid_first(); i < rows_pad * ld / kChunk; i += grid_stride()) {
    const int64_t r = i / (ld / kChunk), c = i % (ld / kChunk) * kChunk;
    float v[kChunk];
    TF_UNROLL
    for (int j = 0; j < kChunk; ++j) {
      v[j] = 0.0f;
      if (r < rows && c + j < cols) v[j] = src[r * cols + c + j];
    }
    port::ptr_cast<uint4>(dst + r * ld + c)[0] = make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]),
                                                            pack_bf16(v[4], v[5]), pack_bf16(v[6], v[7]));
  }
}

// c[m, n] = a[m, k] op(W) + beta c, op(W) = W^T when kForward (n = W.rows, k = W.cols), else W
// (n = W.cols, k = W.rows). a is bf16 [gridDim.y * kM, lda], zero past row m and column k, lda a
// multiple of kK. beta 0 never reads c.
template <DType T, bool kForward>
__global__ void __launch_bounds__(QmmTile::kThreads)
    qmatmul_kernel(port::gptr<float> c, port::gptr<const uint16_t> a, int64_t lda, QuantWeight w, int m,
                   int n, int k, float beta) {
  using Tile = QmmTile;
  constexpr int kStageA = Tile::kM * Tile::kLdA;
  // The weight tile W[r0 .. r0 + kWRows, c0 .. c0 + kWCols]: forward [n][k], input gradient [k][n].
  constexpr int kWRows = kForward ? Tile::kN : Tile::kK, kWCols = kForward ? Tile::kK : Tile::kN;
  constexpr int kLdW = kWCols + Tile::kPad;
  constexpr int kStageW = kWRows * kLdW;
  TF_SHARED(uint16_t, a_tile, 2 * kStageA);
  TF_SHARED(uint16_t, w_tile, 2 * kStageW);
  const int tid = int(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / Tile::kWarpsN * Tile::kWarpM, warp_n = warp % Tile::kWarpsN * Tile::kWarpN;
  const int m0 = int(blockIdx.y) * Tile::kM, n0 = int(blockIdx.x) * Tile::kN;

  auto load_a = [&](int kt, int stage) {
    const int k0 = kt * Tile::kK;
    for (int i = tid; i < Tile::kM * Tile::kK / Tile::kChunk; i += Tile::kThreads) {
      const int row = i / (Tile::kK / Tile::kChunk), col = i % (Tile::kK / Tile::kChunk) * Tile::kChunk;
      port::cp_async_16(a_tile + stage * kStageA + row * Tile::kLdA + col,
                        a + (int64_t(m0 + row) * lda + int64_t(k0 + col)));
    }
  };
  // Weight elements past W's edge are zeros, so the edge tiles multiply like whole ones (A is zero
  // there too, but stale shared memory could hold a NaN or an infinity).
  auto decode_w = [&](int kt, int stage) {
    const int64_t r0 = kForward ? n0 : int64_t(kt) * Tile::kK, c0 = kForward ? int64_t(kt) * Tile::kK : n0;
    for (int i = tid; i < kWRows * kWCols / Tile::kChunk; i += Tile::kThreads) {
      const int row = i / (kWCols / Tile::kChunk), col = i % (kWCols / Tile::kChunk) * Tile::kChunk;
      uint32_t packed[4] = {0, 0, 0, 0};
      if (r0 + row < w.rows && c0 + col < w.cols) decode8_bf16<T>(w, r0 + row, c0 + col, packed);
      port::ptr_cast<uint4>(w_tile + stage * kStageW + row * kLdW + col)[0] =
          make_uint4(packed[0], packed[1], packed[2], packed[3]);
    }
  };

  float acc[Tile::kMmaM][Tile::kMmaN][4] = {};
  const int k_tiles = (k + Tile::kK - 1) / Tile::kK;
  load_a(0, 0);
  port::cp_async_commit();
  decode_w(0, 0);
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int stage = kt & 1;
    port::cp_async_wait<0>();
    // One barrier per step orders both ways: this step's copies and decodes before anyone reads
    // them, and every read of the other stage (the previous step) before the next step's copies
    // and decodes overwrite it, which are issued right after, to fly during this step's multiply.
    __syncthreads();
    if (kt + 1 < k_tiles) {
      load_a(kt + 1, stage ^ 1);
      port::cp_async_commit();
      decode_w(kt + 1, stage ^ 1);
    }
    const port::sptr<uint16_t> as = a_tile + stage * kStageA;
    const port::sptr<uint16_t> ws = w_tile + stage * kStageW;
    TF_UNROLL
    for (int kk = 0; kk < Tile::kK; kk += 16) {
      // ldmatrix.x4 matrices: A rows 0-7 / 8-15 of columns kk..kk+7, then the same of kk+8..kk+15,
      // the order of the A fragment's registers a0a1, a2a3, a4a5, a6a7.
      uint32_t af[Tile::kMmaM][4], bf[Tile::kMmaN][2];
      TF_UNROLL
      for (int mi = 0; mi < Tile::kMmaM; ++mi) {
        port::ldmatrix<4>(af[mi], as + (warp_m + mi * 16 + lane % 16) * Tile::kLdA + kk + lane / 16 * 8);
      }
      // Each x4 covers two n8 tiles: (k 0-7, k 8-15) of the first, then of the second. Forward, the
      // tile is [n][k] and a B fragment's column of k is a stored row; backward it is [k][n] and
      // .trans turns its stored rows of n into fragment columns.
      TF_UNROLL
      for (int np = 0; np < Tile::kMmaN / 2; ++np) {
        uint32_t r[4];
        if constexpr (kForward) {
          port::ldmatrix<4>(
              r, ws + (warp_n + np * 16 + lane % 8 + lane / 16 * 8) * kLdW + kk + lane / 8 % 2 * 8);
        } else {
          port::ldmatrix<4, true>(
              r, ws + (kk + lane % 8 + lane / 8 % 2 * 8) * kLdW + warp_n + np * 16 + lane / 16 * 8);
        }
        bf[2 * np][0] = r[0];
        bf[2 * np][1] = r[1];
        bf[2 * np + 1][0] = r[2];
        bf[2 * np + 1][1] = r[3];
      }
      TF_UNROLL
      for (int mi = 0; mi < Tile::kMmaM; ++mi) {
        TF_UNROLL
        for (int ni = 0; ni < Tile::kMmaN; ++ni)
          port::mma_m16n8k16_bf16(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
      }
    }
  }

  // Accumulator fragment: lane holds rows lane/4 and lane/4 + 8, columns 2(lane%4) and +1.
  const int group = lane / 4, in_group = lane % 4;
  TF_UNROLL
  for (int mi = 0; mi < Tile::kMmaM; ++mi) {
    TF_UNROLL
    for (int ni = 0; ni < Tile::kMmaN; ++ni) {
      TF_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int row = m0 + warp_m + mi * 16 + group + (i >= 2 ? 8 : 0);
        const int col = n0 + warp_n + ni * 8 + in_group * 2 + (i & 1);
        if (row >= m || col >= n) continue;
        const port::gptr<float> out = c + (int64_t(row) * n + col);
        if (beta == 0.0f) {
          out[0] = acc[mi][ni][i];
        } else {
          const float old = out[0];
          out[0] = acc[mi][ni][i] + beta * old;
        }
      }
    }
  }
}

int64_t round_up(int64_t v, int64_t to) {
  return (v + to - 1) / to * to;
}

// Why the fused kernels cannot take W, or nullptr when they can.
const char* unsupported_reason(const WeightRef& W) {
  if (!is_quantized(W.dtype)) return "it is not quantized";
  if (W.rows < 1 || W.cols < 1) return "it is empty";
  const bool flat = W.dtype == DType::NF4 || W.dtype == DType::INT8;
  if (!flat && W.cols % dtype_block_elems(W.dtype) != 0) return "its rows are not whole blocks";
  if (W.cols % QmmTile::kChunk != 0) return "its rows are not a multiple of 8 elements";
  if (flat && W.scales.absmax == nullptr) return "it has no absmax";
  return nullptr;
}

// The bf16 activations of one pass: rows of lda elements (k rounded up to whole k steps), whole
// tiles of kM rows, at least one, at most pass_elems elements of them when pass_elems holds more
// than one tile.
struct Pass {
  Pass(int64_t k, int64_t n_tokens, int64_t pass_elems)
      : lda(round_up(k, QmmTile::kK)),
        rows(std::min(std::max<int64_t>(pass_elems / lda / QmmTile::kM, 1) * QmmTile::kM,
                      round_up(n_tokens, QmmTile::kM))) {}
  size_t bytes() const { return size_t(rows * lda) * sizeof(uint16_t); }
  int64_t lda, rows;
};

}  // namespace

bool qmatmul_supports(const WeightRef& W) {
  return unsupported_reason(W) == nullptr;
}

void qmatmul_scratch(ScratchNeeds& s, const WeightRef& W, int64_t n_tokens, bool forward) {
  if (n_tokens == 0 || unsupported_reason(W)) return;
  s.need(kSlotActivations, "the fused quantized matmul's bf16 activations",
         Pass(forward ? W.cols : W.rows, n_tokens, QmmTile::kPassElems).bytes());
}

// Each pass converts whole tiles of kM token rows, at least one, at most pass_elems elements of them
// when pass_elems holds more than one tile.
void qmatmul_in_passes(float* out, const float* in, WeightRef W, int64_t n_tokens, float beta, bool forward,
                       int64_t pass_elems) {
  const char* op = forward ? "qmatmul_forward" : "qmatmul_backward_input";
  ref::check_linear(op, out, in, W, n_tokens, forward);
  const char* why = unsupported_reason(W);
  TF_CHECK(why == nullptr, op, ": the fused quantized matmul cannot take the ", W.rows, " x ", W.cols, " ",
           dtype_name(W.dtype), " weight: ", why);
  TF_CHECK(pass_elems > 0, op, ": passes of ", pass_elems, " elements");
  const int64_t n = forward ? W.rows : W.cols, k = forward ? W.cols : W.rows;
  if (n_tokens == 0) return;
  const Pass pass(k, n_tokens, pass_elems);
  const int64_t lda = pass.lda, pass_rows = pass.rows;
  auto* a = static_cast<uint16_t*>(rt::scratch(kSlotActivations, pass.bytes()));
  const QuantWeight w = quant_weight(W, op);  // uploads this file's decode tables too
  with_quant_dtype(W.dtype, [&](auto tag) {
    constexpr DType kType = decltype(tag)::value;
    const auto kernel = forward ? qmatmul_kernel<kType, true> : qmatmul_kernel<kType, false>;
    for (int64_t t0 = 0; t0 < n_tokens; t0 += pass_rows) {
      const int64_t rows = std::min(pass_rows, n_tokens - t0), rows_pad = round_up(rows, QmmTile::kM);
      port::launch(activations_to_bf16_kernel,
                   on_current_stream("qmatmul_activations_to_bf16",
                                     element_blocks(rows_pad * lda / QmmTile::kChunk), kElementThreads),
                   a, lda, rows_pad, in + t0 * k, rows, k);
      const dim3 grid(unsigned((n + QmmTile::kN - 1) / QmmTile::kN), unsigned(rows_pad / QmmTile::kM));
      port::launch(kernel, port::LaunchConfig{op, grid, dim3(QmmTile::kThreads), 0, rt::current_stream()},
                   out + t0 * n, a, lda, w, int(rows), int(n), int(k), beta);
    }
  });
}

void qmatmul_forward(float* y, const float* x, WeightRef W, int64_t n_tokens, float beta) {
  qmatmul_in_passes(y, x, W, n_tokens, beta, true, QmmTile::kPassElems);
}

void qmatmul_backward_input(float* dx, const float* dy, WeightRef W, int64_t n_tokens, float beta) {
  qmatmul_in_passes(dx, dy, W, n_tokens, beta, false, QmmTile::kPassElems);
}

}  // namespace tf::TF_PORT_BACKEND
