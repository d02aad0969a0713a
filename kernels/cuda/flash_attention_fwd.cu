// defines: tf::cuda::flash_attention_forward / flash_attention_cached_forward (built by nvcc) and
// their tf::simt twins (this source compiled as host C++ against the simulator): causal GQA
// attention with document ids, a sliding window and logit soft-capping on bf16 tensor cores (mma.sync
// m16n8k16 fed by ldmatrix, K and V tiles double-buffered by cp.async) with an f32 online softmax, saving the
// natural-log lse; and flash_attention_forward_scratch, the rt::scratch the forward asks for.
//
// A pre-pass writes bf16 copies of q, k and v into scratch: the activations arrive as f32, and a
// bf16 copy is what cp.async can move into shared memory in 16-byte chunks that ldmatrix then
// reads as fragments; converting while staging would need register round trips on every tile
// instead of once per element. The cost is one extra read of f32 and write of bf16 per element.
//
// A block owns kBlockM rows of one kv head g of one sequence, where row r is the pair
// (token r / group, query head g * group + r % group): the query heads that share a kv head are
// packed into the rows of the mma tiles, so every K and V tile is read once for the whole group,
// and decoding one token with a GQA group of 4 fills 4 rows rather than 1. Each of the block's
// warps owns 16 rows; S = Q K^T of a key tile stays in its accumulators, is masked, exponentiated
// and rounded to bf16 straight into the A fragments of O += P V (the layouts coincide), so P never
// goes through shared memory. Key tiles that no row may see (past the diagonal, before the sliding
// window of the block's first token, or sharing no document with the block's rows) are not
// loaded; tiles wholly below the diagonal, inside every row's window and within one document skip
// the per-element mask.
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

// rt::scratch slots: the bf16 copies of q, k, v, and the document-id range of each key tile.
constexpr int kSlotQ = 40, kSlotK = 41, kSlotV = 42, kSlotDocRange = 43;
constexpr int64_t kMaxBlocks = (int64_t(1) << 31) - 1;  // gridDim.x
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.69314718055994531f;

// Keys per tile, for every head dimension: the document ranges are kept per key tile.
constexpr int kKeyTile = 64;

// Every tile size of the forward, per head dimension. Shared rows are padded by 8 bf16 (16 bytes):
// row strides of 144, 176, 208 and 272 bytes are odd multiples of 16, so the eight row addresses
// of one ldmatrix fall in different banks.
template <int kHeadDim>
struct FlashForwardTraits {
  static_assert(kHeadDim % 16 == 0, "the head dimension is a whole number of mma k-steps");
  static constexpr int kBlockM = 64;  // rows (token, query head) per block
  static constexpr int kBlockN = kKeyTile;
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kLd = kHeadDim + 8;
  static constexpr int kDimSteps = kHeadDim / 16;  // k-steps of S = Q K^T
  static constexpr int kKeySteps = kBlockN / 16;   // k-steps of O += P V
  static constexpr int kScoreTiles = kBlockN / 8;  // n8 tiles of S
  static constexpr int kOutTiles = kHeadDim / 8;   // n8 tiles of O
  static constexpr int kChunks = kHeadDim / 8;     // 16-byte chunks per row
  static constexpr int kQElems = kBlockM * kLd;
  static constexpr int kKvElems = kBlockN * kLd;
  // Q once, K and V twice (double buffer).
  static constexpr size_t kSmemBytes = sizeof(uint16_t) * size_t(kQElems + 4 * kKvElems);
  static_assert(kBlockM <= kKeyTile, "a block's tokens span at most two key tiles");
};

// Sequences lie one after another: q, out and lse have q_seq tokens per sequence, k, v and doc
// kv_seq, and a sequence's query token i sits at key position pos0 + i (0 in training, n_past in
// decoding), attending to keys 0 .. pos0 + i, or with window W > 0 to pos0 + i - W + 1 .. pos0 + i.
struct FlashArgs {
  port::gptr<float> out;
  port::gptr<float> lse;  // null in decoding
  port::gptr<const uint16_t> q, k, v;
  port::gptr<const int32_t> doc;        // null without document ids
  port::gptr<const int32_t> doc_range;  // per (sequence, key tile): min and max document id
  int64_t q_seq, kv_seq, pos0;
  int n_heads, n_kv_heads;
  float scale_log2;  // scale * log2(e): the softmax runs in powers of two
  int window;
  // Soft-capping with a cap c: scale / c and c * log2(e), the score becoming c tanh(scale s / c);
  // both 0 without a cap.
  float cap_in = 0.0f, cap_log2 = 0.0f;
};

// The first key position that the query at key position qp sees (0 without a window).
__device__ __forceinline__ int64_t flash_window_start(int64_t qp, int window) {
  return window > 0 && qp - window + 1 > 0 ? qp - window + 1 : 0;
}

template <int kHeadDim, bool kDocs>
__global__ void __launch_bounds__(FlashForwardTraits<kHeadDim>::kThreads) flash_forward_kernel(FlashArgs a) {
  using T = FlashForwardTraits<kHeadDim>;
  TF_DYNAMIC_SHARED(uint16_t, smem);
  const port::sptr<uint16_t> qs = smem, ks = qs + T::kQElems, vs = ks + 2 * T::kKvElems;
  const int tid = int(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const int group = a.n_heads / a.n_kv_heads;
  const int64_t rows = a.q_seq * group, n_tiles = (rows + T::kBlockM - 1) / T::kBlockM;
  const int64_t b = int64_t(blockIdx.x) / (n_tiles * a.n_kv_heads);
  const int g = int(int64_t(blockIdx.x) / n_tiles % a.n_kv_heads);
  // The last row tiles see the most keys: they go first.
  const int64_t r0 = (n_tiles - 1 - int64_t(blockIdx.x) % n_tiles) * T::kBlockM;
  const int64_t r_end = rows < r0 + T::kBlockM ? rows : r0 + T::kBlockM;
  const int64_t q_row = int64_t(a.n_heads) * kHeadDim, kv_row = int64_t(a.n_kv_heads) * kHeadDim;
  const int64_t i_first = r0 / group, i_last = (r_end - 1) / group;
  // The (token, head) index in lse of block row r.
  auto lse_index = [&](int64_t r) { return (b * a.q_seq + r / group) * a.n_heads + g * group + r % group; };
  const int64_t n_kt = (a.pos0 + i_last + 1 + T::kBlockN - 1) / T::kBlockN;  // tiles up to the diagonal
  const int64_t t_first = flash_window_start(a.pos0 + i_first, a.window) / T::kBlockN;

  // The document ids the block's rows hold lie in qr (the ranges of the at most two key
  // tiles their tokens span). A key tile whose range is disjoint holds no key any row may see.
  const int64_t n_doc_tiles = (a.kv_seq + kKeyTile - 1) / kKeyTile;
  struct DocRange {
    int32_t lo, hi;
  };
  auto doc_range = [&](int64_t t) {
    const int64_t at = 2 * (b * n_doc_tiles + t);
    return DocRange{a.doc_range[at], a.doc_range[at + 1]};
  };
  DocRange qr{0, 0};
  if (kDocs) {
    const int64_t t0 = (a.pos0 + i_first) / kKeyTile, t1 = (a.pos0 + i_last) / kKeyTile;
    qr = doc_range(t0);
    if (t1 != t0) {
      const DocRange r1 = doc_range(t1);
      qr.lo = r1.lo < qr.lo ? r1.lo : qr.lo;
      qr.hi = r1.hi > qr.hi ? r1.hi : qr.hi;
    }
  }
  auto visited = [&](int64_t t) {
    if (!kDocs) return true;
    const DocRange kr = doc_range(t);
    return kr.lo <= qr.hi && qr.lo <= kr.hi;
  };
  auto next_tile = [&](int64_t t) {
    do ++t;
    while (t < n_kt && !visited(t));
    return t;
  };
  // Below the diagonal and inside the window for every row of the block, and within one document.
  auto unmasked = [&](int64_t t) {
    if ((t + 1) * T::kBlockN - 1 > a.pos0 + i_first) return false;
    if (t * T::kBlockN < flash_window_start(a.pos0 + i_last, a.window)) return false;
    if (!kDocs) return true;
    const DocRange kr = doc_range(t);
    return kr.lo == kr.hi && qr.lo == qr.hi && kr.lo == qr.lo;
  };

  // Rows past the end are zero-filled (source size 0), so edge tiles need no special case in the
  // multiplies; their results are never stored.
  for (int c = tid; c < T::kBlockM * T::kChunks; c += T::kThreads) {
    const int r = c / T::kChunks, col = c % T::kChunks * 8;
    const int64_t row = r0 + r;
    const bool inside = row < rows;
    const int64_t at = (b * a.q_seq + row / group) * q_row + (g * group + row % group) * kHeadDim + col;
    port::cp_async_16(qs + r * T::kLd + col, inside ? a.q + at : a.q, inside ? 16 : 0);
  }
  auto load_kv = [&](int64_t t, int stage) {
    for (int c = tid; c < T::kBlockN * T::kChunks; c += T::kThreads) {
      const int r = c / T::kChunks, col = c % T::kChunks * 8;
      const int64_t key = t * T::kBlockN + r;
      const bool inside = key < a.kv_seq;
      const int64_t at = (b * a.kv_seq + key) * kv_row + g * kHeadDim + col;
      port::cp_async_16(ks + stage * T::kKvElems + r * T::kLd + col, inside ? a.k + at : a.k,
                        inside ? 16 : 0);
      port::cp_async_16(vs + stage * T::kKvElems + r * T::kLd + col, inside ? a.v + at : a.v,
                        inside ? 16 : 0);
    }
  };

  // This thread's accumulator rows: warp rows lane / 4 and lane / 4 + 8, at key position qp (-1
  // for rows past the end, which no key matches) and in document qdoc.
  int64_t qp[2];
  int32_t qdoc[2] = {0, 0};
  for (int ri = 0; ri < 2; ++ri) {
    const int64_t row = r0 + warp * 16 + lane / 4 + ri * 8;
    qp[ri] = row < rows ? a.pos0 + row / group : -1;
    if (kDocs && row < rows) qdoc[ri] = a.doc[b * a.kv_seq + qp[ri]];
  }
  // A warp whose rows all lie past the end (decoding a few rows) only helps load.
  const bool warp_active = r0 + warp * 16 < rows;

  float o[T::kOutTiles][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
  uint32_t qf[T::kDimSteps][4];

  int64_t t = visited(t_first) ? t_first : next_tile(t_first);
  if (t < n_kt) load_kv(t, 0);
  port::cp_async_commit();  // Q and the first K, V tile
  bool first = true;
  for (int stage = 0; t < n_kt; stage ^= 1) {
    const int64_t t_next = next_tile(t);
    if (t_next < n_kt) {
      load_kv(t_next, stage ^ 1);
      port::cp_async_commit();
      port::cp_async_wait<1>();
    } else {
      port::cp_async_wait<0>();
    }
    __syncthreads();  // every thread's copies of this stage (and of Q) have landed
    if (warp_active) {
      if (first) {
        // ldmatrix.x4 matrices: rows 0-7 / 8-15 of columns kk..kk+7, then of kk+8..kk+15, the
        // order of the A fragment's registers.
        TF_UNROLL
        for (int kk = 0; kk < T::kDimSteps; ++kk)
          port::ldmatrix<4>(qf[kk], qs + (warp * 16 + lane % 16) * T::kLd + kk * 16 + lane / 16 * 8);
      }
      const port::sptr<uint16_t> kst = ks + stage * T::kKvElems, vst = vs + stage * T::kKvElems;
      float s[T::kScoreTiles][4] = {};
      TF_UNROLL
      for (int kk = 0; kk < T::kDimSteps; ++kk) {
        // K rows are the B operand's columns: each x4 covers keys np*16 .. +15 as (k 0-7, k 8-15)
        // of the first n8 tile, then of the second.
        TF_UNROLL
        for (int np = 0; np < T::kScoreTiles / 2; ++np) {
          uint32_t r[4];
          port::ldmatrix<4>(r,
                            kst + (np * 16 + lane % 8 + lane / 16 * 8) * T::kLd + kk * 16 + lane / 8 % 2 * 8);
          const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
          port::mma_m16n8k16_bf16(s[2 * np], qf[kk], b0, s[2 * np]);
          port::mma_m16n8k16_bf16(s[2 * np + 1], qf[kk], b1, s[2 * np + 1]);
        }
      }
      // Accumulator element e of score tile j: row lane / 4 + 8 (e / 2), key j * 8 + 2 (lane % 4) + e % 2.
      const int64_t j0 = t * T::kBlockN;
      const bool masked = !unmasked(t);
      TF_UNROLL
      for (int j = 0; j < T::kScoreTiles; ++j) {
        TF_UNROLL
        for (int e = 0; e < 4; ++e) {
          float x = a.cap_log2 > 0 ? a.cap_log2 * tanhf(s[j][e] * a.cap_in) : s[j][e] * a.scale_log2;
          if (masked) {
            const int64_t kp = j0 + j * 8 + lane % 4 * 2 + e % 2;
            bool allowed = kp <= qp[e / 2] && kp >= flash_window_start(qp[e / 2], a.window);
            if (kDocs && allowed) {
              const int32_t kd = a.doc[b * a.kv_seq + kp];
              allowed = kd == qdoc[e / 2];
            }
            if (!allowed) x = -INFINITY;
          }
          s[j][e] = x;
        }
      }
      // Online softmax per row: the four lanes of a quad hold a row's columns.
      TF_UNROLL
      for (int ri = 0; ri < 2; ++ri) {
        float mx = row_max[ri];
        TF_UNROLL
        for (int j = 0; j < T::kScoreTiles; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * ri], s[j][2 * ri + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // A row that no key so far may see keeps max -inf; subtracting 0 then keeps exp2 at 0.
        const float base = mx == -INFINITY ? 0.0f : mx;
        const float factor = exp2f(row_max[ri] - base);
        row_max[ri] = mx;
        float sum = 0.0f;
        TF_UNROLL
        for (int j = 0; j < T::kScoreTiles; ++j) {
          TF_UNROLL
          for (int e = 2 * ri; e < 2 * ri + 2; ++e) {
            s[j][e] = exp2f(s[j][e] - base);
            sum += s[j][e];
          }
        }
        row_sum[ri] = row_sum[ri] * factor + sum;
        TF_UNROLL
        for (int d = 0; d < T::kOutTiles; ++d) {
          o[d][2 * ri] *= factor;
          o[d][2 * ri + 1] *= factor;
        }
      }
      // The A fragment of keys ks*16 .. +15 is score tiles 2 ks and 2 ks + 1 as they lie in the
      // accumulators: registers (row g, keys 0-7), (g + 8, 0-7), (g, 8-15), (g + 8, 8-15).
      TF_UNROLL
      for (int kk = 0; kk < T::kKeySteps; ++kk) {
        const uint32_t pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
        // V rows are the B operand's rows (keys): .trans gives (keys 0-7, keys 8-15) of dims
        // dp*16 .. +7, then of dp*16 + 8 .. +15.
        TF_UNROLL
        for (int dp = 0; dp < T::kOutTiles / 2; ++dp) {
          uint32_t r[4];
          port::ldmatrix<4, true>(
              r, vst + (kk * 16 + lane % 8 + lane / 8 % 2 * 8) * T::kLd + dp * 16 + lane / 16 * 8);
          const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
          port::mma_m16n8k16_bf16(o[2 * dp], pa, b0, o[2 * dp]);
          port::mma_m16n8k16_bf16(o[2 * dp + 1], pa, b1, o[2 * dp + 1]);
        }
      }
    }
    __syncthreads();  // the next tile's copies overwrite the stage just read
    t = t_next;
    first = false;
  }

  if (!warp_active) return;
  TF_UNROLL
  for (int ri = 0; ri < 2; ++ri) {
    float l = row_sum[ri];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int64_t row = r0 + warp * 16 + lane / 4 + ri * 8;
    if (row >= rows) continue;
    const int64_t at = (b * a.q_seq + row / group) * q_row + (g * group + row % group) * kHeadDim;
    TF_UNROLL
    for (int d = 0; d < T::kOutTiles; ++d) {
      const int col = d * 8 + lane % 4 * 2;
      a.out[at + col] = o[d][2 * ri] / l;
      a.out[at + col + 1] = o[d][2 * ri + 1] / l;
    }
    if (a.lse && lane % 4 == 0) a.lse[lse_index(row)] = row_max[ri] * kLn2 + logf(l);
  }
}

// dst[i] = bf16(src[i]) for i < n (a multiple of 8), rounding to nearest even: eight elements per
// thread, stored as one 16-byte vector.
__global__ void flash_to_bf16_kernel(port::gptr<uint16_t> dst, port::gptr<const float> src, int64_t n) {
  for (int64_t i = grid_first(); i < n / 8; i += grid_stride()) {
    float x[8];
    TF_UNROLL
    for (int e = 0; e < 8; ++e) x[e] = src[8 * i + e];
    port::ptr_cast<uint4>(dst + 8 * i)[0] = make_uint4(pack_bf16(x[0], x[1]), pack_bf16(x[2], x[3]),
                                                       pack_bf16(x[4], x[5]), pack_bf16(x[6], x[7]));
  }
}

// range[2 (b * n_tiles + t) + {0, 1}] = min and max of doc[b * seq + kKeyTile t ..] over the key
// tile's tokens, one thread per (sequence, tile).
__global__ void flash_doc_range_kernel(port::gptr<int32_t> range, port::gptr<const int32_t> doc,
                                       int64_t batch, int64_t seq) {
  const int64_t n_tiles = (seq + kKeyTile - 1) / kKeyTile;
  for (int64_t i = grid_first(); i < batch * n_tiles; i += grid_stride()) {
    const int64_t b = i / n_tiles, j0 = i % n_tiles * kKeyTile;
    const int64_t j1 = seq < j0 + kKeyTile ? seq : j0 + kKeyTile;
    int32_t lo = doc[b * seq + j0], hi = lo;
    for (int64_t j = j0 + 1; j < j1; ++j) {
      const int32_t d = doc[b * seq + j];
      lo = d < lo ? d : lo;
      hi = d > hi ? d : hi;
    }
    range[2 * i] = lo;
    range[2 * i + 1] = hi;
  }
}

// The elements of a call's q and k (or v), and its key tiles' document ranges.
struct ForwardSizes {
  ForwardSizes(int64_t batch, int64_t q_seq, int64_t kv_seq, int n_heads, int n_kv_heads, int head_dim)
      : q_elems(batch * q_seq * n_heads * head_dim),
        kv_elems(batch * kv_seq * n_kv_heads * head_dim),
        n_ranges(batch * ((kv_seq + kKeyTile - 1) / kKeyTile)) {}
  static size_t bf16_bytes(int64_t n) { return size_t(n) * sizeof(uint16_t); }
  size_t doc_range_bytes() const { return size_t(2 * n_ranges) * sizeof(int32_t); }
  int64_t q_elems, kv_elems, n_ranges;
};

// n is a multiple of 8: every head dimension the kernels take is.
const uint16_t* to_bf16_scratch(int slot, const float* src, int64_t n, const char* name) {
  auto* dst = static_cast<uint16_t*>(rt::scratch(slot, ForwardSizes::bf16_bytes(n)));
  port::launch(flash_to_bf16_kernel, on_current_stream(name, element_blocks(n / 8), kElementThreads), dst,
               src, n);
  return dst;
}

// The one place where the head dimension and the presence of document ids become template
// parameters: 8 instantiations of the kernel.
struct ForwardKernel {
  void (*kernel)(FlashArgs);
  size_t smem;
  int threads, block_m;
};

template <int kHeadDim>
ForwardKernel forward_kernel_for(bool docs) {
  using T = FlashForwardTraits<kHeadDim>;
  return {docs ? flash_forward_kernel<kHeadDim, true> : flash_forward_kernel<kHeadDim, false>, T::kSmemBytes,
          T::kThreads, T::kBlockM};
}

ForwardKernel forward_kernel(const char* name, int head_dim, bool docs) {
  switch (head_dim) {
    case 64: return forward_kernel_for<64>(docs);
    case 80: return forward_kernel_for<80>(docs);
    case 96: return forward_kernel_for<96>(docs);
    case 128: return forward_kernel_for<128>(docs);
    default: break;
  }
  TF_FAIL(name, " takes head_dim 64, 80, 96 or 128, got ", head_dim);
}

// Converts the q, k and v of `batch` sequences of a's geometry to bf16 and runs the forward on them.
void set_softcap(FlashArgs& a, float scale, float softcap) {
  a.cap_in = softcap > 0 ? scale / softcap : 0.0f;
  a.cap_log2 = softcap * kLog2e;
}

void run_forward(const char* name, FlashArgs a, const float* q, const float* k, const float* v, int64_t batch,
                 int head_dim) {
  const ForwardKernel fk = forward_kernel(name, head_dim, bool(a.doc));
  const int group = a.n_heads / a.n_kv_heads;
  const int64_t n_blocks = batch * a.n_kv_heads * ((a.q_seq * group + fk.block_m - 1) / fk.block_m);
  if (n_blocks == 0) return;
  TF_CHECK(n_blocks <= kMaxBlocks, name, ": ", n_blocks, " blocks of ", fk.block_m,
           " rows are more than one launch may have");
  const ForwardSizes z(batch, a.q_seq, a.kv_seq, a.n_heads, a.n_kv_heads, head_dim);
  a.q = to_bf16_scratch(kSlotQ, q, z.q_elems, "flash_attention q to bf16");
  a.k = to_bf16_scratch(kSlotK, k, z.kv_elems, "flash_attention k to bf16");
  a.v = to_bf16_scratch(kSlotV, v, z.kv_elems, "flash_attention v to bf16");
  if (a.doc) {
    const int64_t n_ranges = z.n_ranges;
    auto* range = static_cast<int32_t*>(rt::scratch(kSlotDocRange, z.doc_range_bytes()));
    port::launch(
        flash_doc_range_kernel,
        on_current_stream("flash_attention document ranges", element_blocks(n_ranges), kElementThreads),
        range, a.doc, batch, a.kv_seq);
    a.doc_range = range;
  }
  port::launch(fk.kernel,
               port::LaunchConfig{name, dim3(unsigned(n_blocks)), dim3(unsigned(fk.threads)), fk.smem,
                                  rt::current_stream()},
               a);
}

}  // namespace

void flash_attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                             const int32_t* doc_ids, const AttentionShape& s) {
  ref::check_attention_shape(s);
  FlashArgs a{out,   lse,   nullptr, nullptr,   nullptr,      doc_ids,          nullptr,
              s.seq, s.seq, 0,       s.n_heads, s.n_kv_heads, s.scale * kLog2e, s.window};
  set_softcap(a, s.scale, s.softcap);
  run_forward("flash_attention_forward", a, q, k, v, s.batch, s.head_dim);
}

void flash_attention_forward_scratch(ScratchNeeds& n, const AttentionShape& s, bool docs) {
  if (s.batch == 0 || s.seq == 0 || s.n_kv_heads == 0) return;
  const ForwardSizes z(s.batch, s.seq, s.seq, s.n_heads, s.n_kv_heads, s.head_dim);
  n.need(kSlotQ, "flash attention's bf16 q", ForwardSizes::bf16_bytes(z.q_elems));
  n.need(kSlotK, "flash attention's bf16 k", ForwardSizes::bf16_bytes(z.kv_elems));
  n.need(kSlotV, "flash attention's bf16 v", ForwardSizes::bf16_bytes(z.kv_elems));
  if (docs) n.need(kSlotDocRange, "flash attention's document ranges", z.doc_range_bytes());
}

void flash_attention_cached_forward(float* out, const float* q, const float* k_cache, const float* v_cache,
                                    int64_t n_past, int64_t n_new, int n_heads, int n_kv_heads, int head_dim,
                                    float scale, int window, float softcap) {
  ref::check_attention_cached_shape(n_past, n_new, n_heads, n_kv_heads, head_dim, window, softcap);
  FlashArgs a{out,   nullptr,        nullptr, nullptr, nullptr,    nullptr,        nullptr,
              n_new, n_past + n_new, n_past,  n_heads, n_kv_heads, scale * kLog2e, window};
  set_softcap(a, scale, softcap);
  run_forward("flash_attention_cached_forward", a, q, k_cache, v_cache, 1, head_dim);
}

}  // namespace tf::TF_PORT_BACKEND
