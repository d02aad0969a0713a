// defines: tf::cuda::flash_attention_backward (built by nvcc) and its tf::simt twin (this source
// compiled as host C++ against the simulator): attention's backward in the FlashAttention-2 style on
// bf16 tensor cores (mma.sync m16n8k16 + ldmatrix + cp.async), causal, GQA, document ids, a
// sliding window, logit soft-capping; and
// flash_attention_backward_scratch, the rt::scratch it asks for.
//
// A pre-pass writes bf16 copies of q, k, v and d_out into device scratch, so that the main kernels
// stream 16-byte cp.async chunks of ready mma operands instead of converting every tile they read
// (each q, dO row is read once per key tile and each k, v row once per query tile). It also writes,
// per (sequence, head, position) and padded to whole tiles, lse * log2(e) and
// delta = rowsum(bf16(d_out) * out): delta is what the softmax gradient subtracts, sum_j P_j dP_j,
// which equals dO . out only for the dO that dP is computed from, hence the rounded one.
//
// Then two kernels recompute S = scale Q K^T and P = exp(S - lse) tile by tile (never a seq x seq
// matrix), with dP = dO V^T and dS = P (dP - delta) (soft-capped: S = c tanh(scale Q K^T / c), and
// dS times the cap's derivative 1 - tanh^2):
// - dk, dv: a block per (key tile, kv head, sequence) holds its K and V tiles and walks every
//   query head of the GQA group and every query tile from the diagonal to the last one whose
//   window reaches the key tile, accumulating dV += P^T dO and dK += dS^T Q in registers;
// - dq: a block per (query tile, head, sequence) walks the key tiles from the first its window
//   reaches up to the diagonal, accumulating dQ += dS K.
// Every output element is owned by one lane of one block, which sums its terms in a fixed order and
// adds the total to the output once: no atomics, and the same bits for any scheduling. P and dS
// are rounded to bf16 for their mma; everything else accumulates in f32.
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kernels/cpu/ref/attention.h"
#include "kernels/cuda/flash_attention.h"
#include "kernels/cuda/kernel_common.h"
#include "kernels/cuda/port.h"
#include "kernels/cuda/runtime.h"
#include "kernels/cuda/scratch_plan.h"
#include "src/core/error.h"

namespace tf::TF_PORT_BACKEND {

namespace {

// The backward's tile sizes. Four warps each own 16 rows of a 64-row tile (keys in the dk/dv
// kernel, queries in the dq kernel) and multiply them against a 64-row tile of the other side.
// Shared rows are padded by 8 bf16 (16 bytes), so that the eight 16-byte rows of one ldmatrix fall
// in different banks for every head dim taken (strides of 144, 176, 208 and 272 bytes).
template <int kHeadDim>
struct FlashBackwardTraits {
  static_assert(kHeadDim % 16 == 0, "the head dim is the k of m16n8k16 in S = Q K^T");
  static constexpr int kD = kHeadDim;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kTile = 16 * kWarps;  // rows of a query or key tile
  static constexpr int kLd = kD + 8;         // shared row stride in bf16
  // Queries a dk/dv warp multiplies at once, so that S^T and dP^T take 32 floats per lane beside
  // the kD of dK and dV: all 64 at once spilled more at head dim 128 (ptxas for sm_90: 140
  // bytes of spill loads against 92, and 24 against 76 with documents).
  static constexpr int kSlice = 32;
  static constexpr size_t kTileElems = size_t(kTile) * kLd;
  // dk/dv: K, V, and two stages of Q, dO, lse * log2(e) and delta.
  static constexpr size_t kDkdvSmem = 6 * kTileElems * sizeof(uint16_t) + 2 * 2 * kTile * sizeof(float);
  // dq: Q, dO, and two stages of K, V.
  static constexpr size_t kDqSmem = 6 * kTileElems * sizeof(uint16_t);
};

// rt::scratch slots: bf16 q and d_out, bf16 k and v, the per-row statistics, the tiles' document ranges.
constexpr int kScratchQdo = 45, kScratchKv = 46, kScratchStats = 47, kScratchDocRange = 48;
constexpr int kPrepThreads = 128;
constexpr int64_t kMaxBlocks = (int64_t(1) << 31) - 1;  // gridDim.x
constexpr float kLog2e = 1.4426950408889634f;

// The pre-pass's outputs and the inputs of the main kernels. Statistics are laid out
// [batch][n_heads][seq_pad] with seq_pad the sequence rounded up to whole tiles (0 past seq), so
// that a tile's 64 values are one aligned run that cp.async can copy.
struct BackwardParams {
  port::gptr<float> dq, dk, dv;
  port::gptr<const uint16_t> q, k, v, d_out;  // bf16 copies, layouts of the f32 inputs
  port::gptr<const float> lse2, delta;
  port::gptr<const int32_t> doc;        // [batch][seq], null without document ids
  port::gptr<const int32_t> doc_range;  // [batch][tiles][2]: smallest and largest id of a tile
  int64_t seq, seq_pad;
  int n_heads, n_kv_heads;
  float scale, scale_log2;
  int window;  // sliding window, 0 for none
  // Soft-capping with a cap c: scale / c and c * log2(e); both 0 without a cap.
  float cap_in, cap_log2;
};

// A raw score s = q.k as the exponent of its probability (minus lse), in powers of two, and the
// factor the cap gives its dS: scale s without a cap (factor 1), c tanh(scale s / c) with one.
__device__ __forceinline__ float score_log2(float s, const BackwardParams& p, float& slope) {
  if (p.cap_log2 > 0) {
    const float th = tanhf(s * p.cap_in);
    slope = 1.0f - th * th;
    return p.cap_log2 * th;
  }
  slope = 1.0f;
  return s * p.scale_log2;
}

// The first key position that query position qp sees (0 without a window).
__device__ __forceinline__ int64_t window_start(int64_t qp, int window) {
  return window > 0 && qp - window + 1 > 0 ? qp - window + 1 : 0;
}

__device__ __forceinline__ float bf16_value(uint16_t bits) {
  return __bfloat162float(__ushort_as_bfloat16(bits));
}

// ---- pre-pass -----------------------------------------------------------------------------------

// One warp per (sequence, head, position < seq_pad) row r = (b * n_heads + h) * seq_pad + i: the
// bf16 copies of the row's q and d_out, delta and lse * log2(e). Lanes take every 32nd element and
// add their partial sums by a butterfly, a fixed order.
__global__ void __launch_bounds__(kPrepThreads)
    flash_bwd_rows_kernel(port::gptr<uint16_t> qb, port::gptr<uint16_t> dob, port::gptr<float> lse2,
                          port::gptr<float> delta, port::gptr<const float> q, port::gptr<const float> d_out,
                          port::gptr<const float> out, port::gptr<const float> lse, int64_t seq,
                          int64_t seq_pad, int n_heads, int head_dim) {
  const int lane = int(threadIdx.x) % 32;
  const int64_t r = int64_t(blockIdx.x) * (kPrepThreads / 32) + int64_t(threadIdx.x) / 32;
  const int64_t i = r % seq_pad, h = r / seq_pad % n_heads, b = r / (seq_pad * n_heads);
  float acc = 0.0f;
  if (i < seq) {
    const int64_t row = ((b * seq + i) * n_heads + h) * head_dim;
    for (int d = lane; d < head_dim; d += 32) {
      const float x = q[row + d], g = d_out[row + d], o = out[row + d];
      const uint16_t gb = bf16_bits(g);
      qb[row + d] = bf16_bits(x);
      dob[row + d] = gb;
      acc += bf16_value(gb) * o;
    }
  }
  TF_UNROLL
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (lane == 0) {
    const float l = i < seq ? float(lse[(b * seq + i) * n_heads + h]) : 0.0f;
    delta[r] = acc;
    lse2[r] = l * kLog2e;
  }
}

__global__ void __launch_bounds__(kPrepThreads)
    flash_bwd_kv_kernel(port::gptr<uint16_t> kb, port::gptr<uint16_t> vb, port::gptr<const float> k,
                        port::gptr<const float> v, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * kPrepThreads;
  for (int64_t idx = int64_t(blockIdx.x) * kPrepThreads + int64_t(threadIdx.x); idx < n; idx += stride) {
    const float x = k[idx], y = v[idx];
    kb[idx] = bf16_bits(x);
    vb[idx] = bf16_bits(y);
  }
}

// One warp per (sequence, tile): the smallest and largest document id of the tile's positions.
__global__ void __launch_bounds__(kPrepThreads)
    flash_bwd_doc_range_kernel(port::gptr<int32_t> range, port::gptr<const int32_t> doc, int64_t seq,
                               int64_t n_tiles, int64_t n_ranges, int tile) {
  const int lane = int(threadIdx.x) % 32;
  const int64_t r = int64_t(blockIdx.x) * (kPrepThreads / 32) + int64_t(threadIdx.x) / 32;
  if (r >= n_ranges) return;  // whole warps
  const int64_t b = r / n_tiles, i0 = r % n_tiles * tile;
  int lo = 0x7fffffff, hi = -0x7fffffff - 1;
  for (int64_t i = i0 + lane; i < i0 + tile && i < seq; i += 32) {
    const int32_t id = doc[b * seq + i];
    lo = id < lo ? id : lo;
    hi = id > hi ? id : hi;
  }
  lo = __reduce_min_sync(0xffffffffu, lo);
  hi = __reduce_max_sync(0xffffffffu, hi);
  if (lane == 0) {
    range[2 * r] = lo;
    range[2 * r + 1] = hi;
  }
}

// ---- tiles ---------------------------------------------------------------------------------------

enum class TileKind { kSkip, kUnmasked, kMasked };

// How the (query tile qt, key tile kt) pair of sequence b is computed: skipped when the causal mask,
// the window or the documents hide all of it; without a mask when it lies wholly below the
// diagonal, inside every query's window, within the sequence and within one document; else element
// by element.
template <bool kDocs>
__device__ TileKind classify(const BackwardParams& p, int64_t b, int64_t qt, int64_t kt, int tile) {
  if (kt > qt || (kt + 1) * tile - 1 < window_start(qt * tile, p.window)) return TileKind::kSkip;
  bool masked =
      kt == qt || (qt + 1) * tile > p.seq || kt * tile < window_start((qt + 1) * tile - 1, p.window);
  if constexpr (kDocs) {
    const port::gptr<const int32_t> r = p.doc_range + b * (p.seq_pad / tile) * 2;
    const int32_t q_lo = r[2 * qt], q_hi = r[2 * qt + 1], k_lo = r[2 * kt], k_hi = r[2 * kt + 1];
    if (q_hi < k_lo || k_hi < q_lo) return TileKind::kSkip;
    masked = masked || q_lo != q_hi || k_lo != k_hi || q_lo != k_lo;
  }
  return masked ? TileKind::kMasked : TileKind::kUnmasked;
}

// Whether query position qp of a sequence attends to its key position kp; doc is the sequence's
// document ids. Positions at or past seq (a ragged last tile) attend to nothing.
template <bool kDocs>
__device__ bool allowed(port::gptr<const int32_t> doc, int64_t seq, int window, int64_t qp, int64_t kp) {
  if (kp > qp || qp >= seq || kp < window_start(qp, window)) return false;
  if constexpr (kDocs) {
    const int32_t dq = doc[qp], dk = doc[kp];
    return dq == dk;
  }
  return true;
}

// Rows [0, n_rows) of a tile of Tr::kTile rows of Tr::kD bf16 (rows row_stride apart in global memory)
// into shared rows Tr::kLd apart, by cp.async; later rows are zero-filled without being read, so
// that their scores and gradients are finite for the mask to drop.
template <typename Tr>
__device__ void load_tile(port::sptr<uint16_t> dst, port::gptr<const uint16_t> src, int64_t row_stride,
                          int n_rows) {
  constexpr int kChunksPerRow = Tr::kD / 8;
  for (int c = int(threadIdx.x); c < Tr::kTile * kChunksPerRow; c += Tr::kThreads) {
    const int row = c / kChunksPerRow, col = c % kChunksPerRow * 8;
    const bool inside = row < n_rows;
    port::cp_async_16(dst + (row * Tr::kLd + col), inside ? src + (row * row_stride + col) : src,
                      inside ? 16 : 0);
  }
}

// ---- warp-level products --------------------------------------------------------------------------
// Fragment layouts are the PTX ISA's (kernels/sim/fragments.h): lane l holds accumulator rows l/4
// and l/4 + 8, columns 2(l%4) and +1 of each n8 tile.

// acc[n] += A B^T for the 16 rows of A at a and the kCols rows of B at b (both Tr::kD long, rows
// Tr::kLd apart): a 16 x kCols product, n8 tile n holding columns 8n .. 8n + 7.
template <typename Tr, int kCols>
__device__ void mma_abt(float (&acc)[kCols / 8][4], port::sptr<uint16_t> a, port::sptr<uint16_t> b,
                        int lane) {
  TF_UNROLL
  for (int kc = 0; kc < Tr::kD / 16; ++kc) {
    // Matrices: rows 0-7 and 8-15 of columns 16kc .. +7, then of +8 .. +15: registers a0a1 .. a6a7.
    uint32_t af[4];
    port::ldmatrix<4>(af, a + ((lane % 16) * Tr::kLd + kc * 16 + lane / 16 * 8));
    TF_UNROLL
    for (int np = 0; np < kCols / 16; ++np) {
      // B is [n][k] in shared memory: an x4 holds (k 0-7, k 8-15) of n8 tile 2np, then of 2np + 1.
      uint32_t r[4];
      port::ldmatrix<4>(r, b + ((np * 16 + lane % 8 + lane / 16 * 8) * Tr::kLd + kc * 16 + lane / 8 % 2 * 8));
      const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
      port::mma_m16n8k16_bf16(acc[2 * np], af, b0, acc[2 * np]);
      port::mma_m16n8k16_bf16(acc[2 * np + 1], af, b1, acc[2 * np + 1]);
    }
  }
}

// The 16 x 8kTiles accumulator tiles c as bf16 A fragments of m16n8k16, af[j] holding columns
// 16j .. 16j + 15: the accumulator of n8 tiles 2j and 2j + 1 is already the A layout's two halves.
template <int kTiles>
__device__ void to_a_fragments(const float (&c)[kTiles][4], uint32_t (&af)[kTiles / 2][4]) {
  TF_UNROLL
  for (int j = 0; j < kTiles / 2; ++j) {
    af[j][0] = pack_bf16(c[2 * j][0], c[2 * j][1]);
    af[j][1] = pack_bf16(c[2 * j][2], c[2 * j][3]);
    af[j][2] = pack_bf16(c[2 * j + 1][0], c[2 * j + 1][1]);
    af[j][3] = pack_bf16(c[2 * j + 1][2], c[2 * j + 1][3]);
  }
}

// acc[n] += A B for A a 16 x kDepth tile in A fragments and B the kDepth x Tr::kD rows at b (rows
// Tr::kLd apart): n8 tile n of the 16 x kD product holds head-dim columns 8n .. 8n + 7.
template <typename Tr, int kDepth>
__device__ void mma_ab(float (&acc)[Tr::kD / 8][4], const uint32_t (&af)[kDepth / 16][4],
                       port::sptr<uint16_t> b, int lane) {
  TF_UNROLL
  for (int j = 0; j < kDepth / 16; ++j) {
    TF_UNROLL
    for (int np = 0; np < Tr::kD / 16; ++np) {
      // B is [k][n] in shared memory, so .trans: an x4 holds (k 0-7, k 8-15) of n8 tile 2np, then
      // of 2np + 1.
      uint32_t r[4];
      port::ldmatrix<4, true>(
          r, b + ((j * 16 + lane % 8 + lane / 8 % 2 * 8) * Tr::kLd + np * 16 + lane / 16 * 8));
      const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
      port::mma_m16n8k16_bf16(acc[2 * np], af[j], b0, acc[2 * np]);
      port::mma_m16n8k16_bf16(acc[2 * np + 1], af[j], b1, acc[2 * np + 1]);
    }
  }
}

// ---- dk and dv -----------------------------------------------------------------------------------

// One (head, query tile) step of a dk/dv warp: its 16 keys against the tile's queries, a slice of
// them at a time, as S^T and dP^T (keys x queries), then dV += P^T dO and dK += dS^T Q. stats holds
// the query tile's lse * log2(e), then its delta.
template <typename Tr, bool kMask, bool kDocs>
__device__ void dkdv_step(float (&dk)[Tr::kD / 8][4], float (&dv)[Tr::kD / 8][4], const BackwardParams& p,
                          port::sptr<uint16_t> ks, port::sptr<uint16_t> vs, port::sptr<uint16_t> qs,
                          port::sptr<uint16_t> dos, port::sptr<float> stats, port::gptr<const int32_t> doc,
                          int64_t i0, int64_t j0, int lane, int warp) {
  constexpr int kSlice = Tr::kSlice;
  // Not unrolled: unrolled, the compiler hoists the second slice's loads and spills more.
  for (int q0 = 0; q0 < Tr::kTile; q0 += kSlice) {
    float st[kSlice / 8][4] = {}, dpt[kSlice / 8][4] = {};
    mma_abt<Tr, kSlice>(st, ks + warp * 16 * Tr::kLd, qs + q0 * Tr::kLd, lane);
    mma_abt<Tr, kSlice>(dpt, vs + warp * 16 * Tr::kLd, dos + q0 * Tr::kLd, lane);
    TF_UNROLL
    for (int n = 0; n < kSlice / 8; ++n) {
      TF_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int query = q0 + n * 8 + lane % 4 * 2 + (e & 1), key = warp * 16 + lane / 4 + (e >= 2 ? 8 : 0);
        const float l2 = stats[query], dl = stats[Tr::kTile + query];
        float slope;
        float pv = exp2f(score_log2(st[n][e], p, slope) - l2);
        float ds = pv * (dpt[n][e] - dl) * slope;
        if (kMask && !allowed<kDocs>(doc, p.seq, p.window, i0 + query, j0 + key)) pv = ds = 0.0f;
        st[n][e] = pv;
        dpt[n][e] = ds;
      }
    }
    uint32_t pa[kSlice / 16][4], dsa[kSlice / 16][4];
    to_a_fragments<kSlice / 8>(st, pa);
    to_a_fragments<kSlice / 8>(dpt, dsa);
    mma_ab<Tr, kSlice>(dv, pa, dos + q0 * Tr::kLd, lane);
    mma_ab<Tr, kSlice>(dk, dsa, qs + q0 * Tr::kLd, lane);
  }
}

// dk, dv += the gradients of one key tile of one kv head: block x = (sequence * n_kv_heads + kv
// head) * tiles + key tile. Query tiles stream through two cp.async stages: the next step's copies
// fly while this one multiplies, with one barrier a step.
template <int kD, bool kDocs>
__global__ void __launch_bounds__(FlashBackwardTraits<kD>::kThreads) flash_dkdv_kernel(BackwardParams p) {
  using Tr = FlashBackwardTraits<kD>;
  constexpr int kTile = Tr::kTile;
  TF_DYNAMIC_SHARED(uint16_t, smem);
  const port::sptr<uint16_t> ks = smem, vs = ks + Tr::kTileElems, qs = vs + Tr::kTileElems,
                             dos = qs + 2 * Tr::kTileElems;
  const port::sptr<float> stats = port::ptr_cast<float>(dos + 2 * Tr::kTileElems);
  const int tid = int(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const int64_t n_tiles = p.seq_pad / kTile;
  // Low key tiles first: they meet the most query tiles.
  const int64_t kt = int64_t(blockIdx.x) % n_tiles;
  const int kvh = int(int64_t(blockIdx.x) / n_tiles % p.n_kv_heads);
  const int64_t b = int64_t(blockIdx.x) / (n_tiles * p.n_kv_heads);
  const int group = p.n_heads / p.n_kv_heads;
  const int64_t j0 = kt * kTile, kv_row = int64_t(p.n_kv_heads) * kD, q_row = int64_t(p.n_heads) * kD;
  const int64_t key0 = (b * p.seq + j0) * kv_row + int64_t(kvh) * kD;
  const int n_keys = int(p.seq - j0 < kTile ? p.seq - j0 : kTile);
  const port::gptr<const int32_t> doc = kDocs ? p.doc + b * p.seq : port::gptr<const int32_t>(nullptr);

  // Steps s = (head of the group, query tile from the diagonal on): queries before the key tile
  // see none of it, nor do those whose window starts after its last key.
  int64_t q_end = n_tiles;
  if (p.window > 0) {
    const int64_t last_query = (kt + 1) * kTile - 2 + p.window;  // the last that sees the last key
    q_end = last_query / kTile + 1 < n_tiles ? last_query / kTile + 1 : n_tiles;
  }
  const int64_t q_tiles = q_end - kt, n_steps = int64_t(group) * q_tiles;
  auto tile_of = [&](int64_t s) { return kt + s % q_tiles; };
  auto next_step = [&](int64_t s) {
    while (s < n_steps && classify<kDocs>(p, b, tile_of(s), kt, kTile) == TileKind::kSkip) ++s;
    return s;
  };
  auto load_queries = [&](int64_t s, int stage) {
    const int h = kvh * group + int(s / q_tiles);
    const int64_t i0 = tile_of(s) * kTile, row0 = ((b * p.seq + i0) * p.n_heads + h) * kD;
    const int n_rows = int(p.seq - i0 < kTile ? p.seq - i0 : kTile);
    load_tile<Tr>(qs + stage * Tr::kTileElems, p.q + row0, q_row, n_rows);
    load_tile<Tr>(dos + stage * Tr::kTileElems, p.d_out + row0, q_row, n_rows);
    const int64_t stat0 = (b * p.n_heads + h) * p.seq_pad + i0;
    if (tid < kTile / 4) {
      port::cp_async_16(stats + (stage * 2 * kTile + tid * 4), p.lse2 + (stat0 + tid * 4));
    } else if (tid < kTile / 2) {
      const int c = tid - kTile / 4;
      port::cp_async_16(stats + (stage * 2 * kTile + kTile + c * 4), p.delta + (stat0 + c * 4));
    }
  };

  load_tile<Tr>(ks, p.k + key0, kv_row, n_keys);
  load_tile<Tr>(vs, p.v + key0, kv_row, n_keys);
  int64_t s = next_step(0);
  if (s < n_steps) load_queries(s, 0);
  port::cp_async_commit();
  float dk[Tr::kD / 8][4] = {}, dv[Tr::kD / 8][4] = {};
  for (int stage = 0; s < n_steps; stage ^= 1) {
    port::cp_async_wait<0>();
    // Every thread's copies of this step have landed, and every thread is done with the previous
    // step, whose stage the next step's copies overwrite.
    __syncthreads();
    const int64_t s_next = next_step(s + 1);
    if (s_next < n_steps) {
      load_queries(s_next, stage ^ 1);
      port::cp_async_commit();
    }
    const int64_t qt = tile_of(s);
    const port::sptr<uint16_t> q_stage = qs + stage * Tr::kTileElems, do_stage = dos + stage * Tr::kTileElems;
    const port::sptr<float> st = stats + stage * 2 * kTile;
    if (classify<kDocs>(p, b, qt, kt, kTile) == TileKind::kMasked) {
      dkdv_step<Tr, true, kDocs>(dk, dv, p, ks, vs, q_stage, do_stage, st, doc, qt * kTile, j0, lane, warp);
    } else {
      dkdv_step<Tr, false, kDocs>(dk, dv, p, ks, vs, q_stage, do_stage, st, doc, qt * kTile, j0, lane, warp);
    }
    s = s_next;
  }

  TF_UNROLL
  for (int n = 0; n < Tr::kD / 8; ++n) {
    TF_UNROLL
    for (int e = 0; e < 4; ++e) {
      const int key = warp * 16 + lane / 4 + (e >= 2 ? 8 : 0), d = n * 8 + lane % 4 * 2 + (e & 1);
      if (key >= n_keys) continue;
      const int64_t at = key0 + key * kv_row + d;
      const float dk_old = p.dk[at], dv_old = p.dv[at];
      p.dk[at] = dk_old + p.scale * dk[n][e];
      p.dv[at] = dv_old + dv[n][e];
    }
  }
}

// ---- dq ------------------------------------------------------------------------------------------

// One key tile step of a dq warp: its 16 queries against the tile's keys, S and dP (queries x
// keys), then dQ += dS K. lse2 and delta are the warp's rows lane/4 and lane/4 + 8.
template <typename Tr, bool kMask, bool kDocs>
__device__ void dq_step(float (&dq)[Tr::kD / 8][4], const BackwardParams& p, port::sptr<uint16_t> qs,
                        port::sptr<uint16_t> dos, port::sptr<uint16_t> ks, port::sptr<uint16_t> vs,
                        const float (&lse2)[2], const float (&delta)[2], port::gptr<const int32_t> doc,
                        int64_t i0, int64_t j0, int lane, int warp) {
  float sc[Tr::kTile / 8][4] = {}, dp[Tr::kTile / 8][4] = {};
  mma_abt<Tr, Tr::kTile>(sc, qs + warp * 16 * Tr::kLd, ks, lane);
  mma_abt<Tr, Tr::kTile>(dp, dos + warp * 16 * Tr::kLd, vs, lane);
  TF_UNROLL
  for (int n = 0; n < Tr::kTile / 8; ++n) {
    TF_UNROLL
    for (int e = 0; e < 4; ++e) {
      const int query = warp * 16 + lane / 4 + (e >= 2 ? 8 : 0), key = n * 8 + lane % 4 * 2 + (e & 1);
      float slope;
      const float pv = exp2f(score_log2(sc[n][e], p, slope) - lse2[e / 2]);
      float ds = pv * (dp[n][e] - delta[e / 2]) * slope;
      if (kMask && !allowed<kDocs>(doc, p.seq, p.window, i0 + query, j0 + key)) ds = 0.0f;
      sc[n][e] = ds;
    }
  }
  uint32_t dsa[Tr::kTile / 16][4];
  to_a_fragments<Tr::kTile / 8>(sc, dsa);
  mma_ab<Tr, Tr::kTile>(dq, dsa, ks, lane);
}

// dq += the gradient of one query tile of one head: block x = (sequence * n_heads + head) * tiles +
// tiles - 1 - query tile (the longest rows of keys first). Key tiles stream through two cp.async
// stages.
template <int kD, bool kDocs>
__global__ void __launch_bounds__(FlashBackwardTraits<kD>::kThreads) flash_dq_kernel(BackwardParams p) {
  using Tr = FlashBackwardTraits<kD>;
  constexpr int kTile = Tr::kTile;
  TF_DYNAMIC_SHARED(uint16_t, smem);
  const port::sptr<uint16_t> qs = smem, dos = qs + Tr::kTileElems, ks = dos + Tr::kTileElems,
                             vs = ks + 2 * Tr::kTileElems;
  const int tid = int(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const int64_t n_tiles = p.seq_pad / kTile;
  const int64_t qt = n_tiles - 1 - int64_t(blockIdx.x) % n_tiles;
  const int h = int(int64_t(blockIdx.x) / n_tiles % p.n_heads);
  const int64_t b = int64_t(blockIdx.x) / (n_tiles * p.n_heads);
  const int kvh = h / (p.n_heads / p.n_kv_heads);
  const int64_t i0 = qt * kTile, kv_row = int64_t(p.n_kv_heads) * kD, q_row = int64_t(p.n_heads) * kD;
  const int64_t row0 = ((b * p.seq + i0) * p.n_heads + h) * kD;
  const int n_rows = int(p.seq - i0 < kTile ? p.seq - i0 : kTile);
  const port::gptr<const int32_t> doc = kDocs ? p.doc + b * p.seq : port::gptr<const int32_t>(nullptr);

  auto next_tile = [&](int64_t kt) {
    while (kt <= qt && classify<kDocs>(p, b, qt, kt, kTile) == TileKind::kSkip) ++kt;
    return kt;
  };
  auto load_keys = [&](int64_t kt, int stage) {
    const int64_t key0 = (b * p.seq + kt * kTile) * kv_row + int64_t(kvh) * kD;
    const int n_keys = int(p.seq - kt * kTile < kTile ? p.seq - kt * kTile : kTile);
    load_tile<Tr>(ks + stage * Tr::kTileElems, p.k + key0, kv_row, n_keys);
    load_tile<Tr>(vs + stage * Tr::kTileElems, p.v + key0, kv_row, n_keys);
  };

  load_tile<Tr>(qs, p.q + row0, q_row, n_rows);
  load_tile<Tr>(dos, p.d_out + row0, q_row, n_rows);
  int64_t kt = next_tile(window_start(i0, p.window) / kTile);
  if (kt <= qt) load_keys(kt, 0);
  port::cp_async_commit();
  // Rows past seq read the padding's zeros; the mask drops them.
  const int64_t stat0 = (b * p.n_heads + h) * p.seq_pad + i0 + warp * 16 + lane / 4;
  const float lse2[2] = {p.lse2[stat0], p.lse2[stat0 + 8]}, delta[2] = {p.delta[stat0], p.delta[stat0 + 8]};
  float dq[Tr::kD / 8][4] = {};
  for (int stage = 0; kt <= qt; stage ^= 1) {
    port::cp_async_wait<0>();
    __syncthreads();  // as in the dk/dv kernel: this step's tiles landed, the other stage is free
    const int64_t kt_next = next_tile(kt + 1);
    if (kt_next <= qt) {
      load_keys(kt_next, stage ^ 1);
      port::cp_async_commit();
    }
    const port::sptr<uint16_t> k_stage = ks + stage * Tr::kTileElems, v_stage = vs + stage * Tr::kTileElems;
    if (classify<kDocs>(p, b, qt, kt, kTile) == TileKind::kMasked) {
      dq_step<Tr, true, kDocs>(dq, p, qs, dos, k_stage, v_stage, lse2, delta, doc, i0, kt * kTile, lane,
                               warp);
    } else {
      dq_step<Tr, false, kDocs>(dq, p, qs, dos, k_stage, v_stage, lse2, delta, doc, i0, kt * kTile, lane,
                                warp);
    }
    kt = kt_next;
  }

  TF_UNROLL
  for (int n = 0; n < Tr::kD / 8; ++n) {
    TF_UNROLL
    for (int e = 0; e < 4; ++e) {
      const int r = warp * 16 + lane / 4 + (e >= 2 ? 8 : 0), d = n * 8 + lane % 4 * 2 + (e & 1);
      if (r >= n_rows) continue;
      const int64_t at = row0 + r * q_row + d;
      const float old = p.dq[at];
      p.dq[at] = old + p.scale * dq[n][e];
    }
  }
}

// ---- launch --------------------------------------------------------------------------------------

struct BackwardIo {
  float *dq, *dk, *dv;
  const float *d_out, *q, *k, *v, *out, *lse;
  const int32_t* doc_ids;
};

port::LaunchConfig on_stream(const char* name, int64_t blocks, int threads, size_t smem) {
  return port::LaunchConfig{name, dim3(unsigned(blocks)), dim3(unsigned(threads)), smem,
                            rt::current_stream()};
}

// The sizes of one call's scratch, for tiles of `tile` rows.
struct BackwardSizes {
  BackwardSizes(const AttentionShape& s, int64_t tile)
      : n_tiles((int64_t(s.seq) + tile - 1) / tile),
        seq_pad(n_tiles * tile),
        q_elems(int64_t(s.batch) * s.seq * s.n_heads * s.head_dim),
        kv_elems(int64_t(s.batch) * s.seq * s.n_kv_heads * s.head_dim),
        stat_rows(int64_t(s.batch) * s.n_heads * seq_pad),
        n_ranges(int64_t(s.batch) * n_tiles) {}
  size_t qdo_bytes() const { return size_t(2 * q_elems) * sizeof(uint16_t); }
  size_t kv_bytes() const { return size_t(2 * kv_elems) * sizeof(uint16_t); }
  size_t stats_bytes() const { return size_t(2 * stat_rows) * sizeof(float); }
  size_t doc_range_bytes() const { return size_t(2 * n_ranges) * sizeof(int32_t); }
  int64_t n_tiles, seq_pad, q_elems, kv_elems, stat_rows, n_ranges;
};

template <int kD>
void backward_scratch(ScratchNeeds& n, const AttentionShape& s, bool docs) {
  const BackwardSizes z(s, FlashBackwardTraits<kD>::kTile);
  n.need(kScratchQdo, "flash backward's bf16 q and d_out", z.qdo_bytes());
  n.need(kScratchKv, "flash backward's bf16 k and v", z.kv_bytes());
  n.need(kScratchStats, "flash backward's row statistics", z.stats_bytes());
  if (docs) n.need(kScratchDocRange, "flash backward's document ranges", z.doc_range_bytes());
}

template <int kD, bool kDocs>
void backward(const BackwardIo& io, const AttentionShape& s) {
  using Tr = FlashBackwardTraits<kD>;
  const BackwardSizes z(s, Tr::kTile);
  const int64_t batch = s.batch, seq = s.seq, n_tiles = z.n_tiles;
  const int64_t seq_pad = z.seq_pad;
  const int64_t q_elems = z.q_elems, kv_elems = z.kv_elems;
  const int64_t stat_rows = z.stat_rows;
  TF_CHECK(batch * s.n_heads * n_tiles <= kMaxBlocks && stat_rows / (kPrepThreads / 32) <= kMaxBlocks,
           "flash_attention_backward: ", batch, " sequences of ", seq, " tokens with ", s.n_heads,
           " heads are more (token, head) rows than one launch may have");

  auto* qdo = static_cast<uint16_t*>(rt::scratch(kScratchQdo, z.qdo_bytes()));
  auto* kv = static_cast<uint16_t*>(rt::scratch(kScratchKv, z.kv_bytes()));
  auto* stats = static_cast<float*>(rt::scratch(kScratchStats, z.stats_bytes()));
  int32_t* doc_range = nullptr;
  if constexpr (kDocs) {
    doc_range = static_cast<int32_t*>(rt::scratch(kScratchDocRange, z.doc_range_bytes()));
  }

  port::launch(flash_bwd_rows_kernel,
               on_stream("flash_attention_backward rows", stat_rows / (kPrepThreads / 32), kPrepThreads, 0),
               qdo, qdo + q_elems, stats, stats + stat_rows, io.q, io.d_out, io.out, io.lse, seq, seq_pad,
               s.n_heads, kD);
  const int64_t kv_blocks = (kv_elems + kPrepThreads - 1) / kPrepThreads;
  port::launch(
      flash_bwd_kv_kernel,
      on_stream("flash_attention_backward k v", kv_blocks < 4096 ? kv_blocks : 4096, kPrepThreads, 0), kv,
      kv + kv_elems, io.k, io.v, kv_elems);
  if constexpr (kDocs) {
    const int64_t n_ranges = batch * n_tiles, per_block = kPrepThreads / 32;
    port::launch(flash_bwd_doc_range_kernel,
                 on_stream("flash_attention_backward doc ranges", (n_ranges + per_block - 1) / per_block,
                           kPrepThreads, 0),
                 doc_range, io.doc_ids, seq, n_tiles, n_ranges, Tr::kTile);
  }

  const BackwardParams p{io.dq,
                         io.dk,
                         io.dv,
                         qdo,
                         kv,
                         kv + kv_elems,
                         qdo + q_elems,
                         stats,
                         stats + stat_rows,
                         io.doc_ids,
                         doc_range,
                         seq,
                         seq_pad,
                         s.n_heads,
                         s.n_kv_heads,
                         s.scale,
                         s.scale * kLog2e,
                         s.window,
                         s.softcap > 0 ? s.scale / s.softcap : 0.0f,
                         s.softcap * kLog2e};
  port::launch(flash_dkdv_kernel<kD, kDocs>,
               on_stream("flash_attention_backward dk dv", batch * s.n_kv_heads * n_tiles, Tr::kThreads,
                         Tr::kDkdvSmem),
               p);
  port::launch(
      flash_dq_kernel<kD, kDocs>,
      on_stream("flash_attention_backward dq", batch * s.n_heads * n_tiles, Tr::kThreads, Tr::kDqSmem), p);
}

}  // namespace

void flash_attention_backward(float* dq, float* dk, float* dv, const float* d_out, const float* q,
                              const float* k, const float* v, const float* out, const float* lse,
                              const int32_t* doc_ids, const AttentionShape& s) {
  ref::check_attention_shape(s);
  TF_CHECK(flash_attention_supports(s.head_dim), "flash_attention_backward: head_dim ", s.head_dim,
           " is not one the flash kernels take (64, 80, 96 or 128)");
  if (s.batch == 0 || s.seq == 0) return;
  const BackwardIo io{dq, dk, dv, d_out, q, k, v, out, lse, doc_ids};
  // The one place where the runtime flags become template parameters.
  const bool docs = doc_ids != nullptr;
  switch (s.head_dim) {
    case 64: return docs ? backward<64, true>(io, s) : backward<64, false>(io, s);
    case 80: return docs ? backward<80, true>(io, s) : backward<80, false>(io, s);
    case 96: return docs ? backward<96, true>(io, s) : backward<96, false>(io, s);
    default: return docs ? backward<128, true>(io, s) : backward<128, false>(io, s);
  }
}

void flash_attention_backward_scratch(ScratchNeeds& n, const AttentionShape& s, bool docs) {
  if (s.batch == 0 || s.seq == 0) return;
  switch (s.head_dim) {
    case 64: return backward_scratch<64>(n, s, docs);
    case 80: return backward_scratch<80>(n, s, docs);
    case 96: return backward_scratch<96>(n, s, docs);
    default: return backward_scratch<128>(n, s, docs);
  }
}

}  // namespace tf::TF_PORT_BACKEND
