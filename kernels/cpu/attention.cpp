// defines: tf::cpu::attention_forward, tf::cpu::attention_backward (and how it goes through the tiles:
// attention_backward_single_pass, attention_backward_thread_floats), tf::cpu::attention_cached_forward
//
// Flash-attention on the CPU: queries and keys are processed in tiles of kBlockQ x kBlockK, the
// forward keeps a running max and sum per query row (online softmax), and the backward recomputes
// each tile's probabilities from the saved log-sum-exp, so no seq x seq matrix is ever stored.
// Tiles that the causal mask, the sliding window or the document ids rule out entirely are
// skipped: the key loops start at the first tile a window reaches and stop at the last. Soft-capped
// scores (Gemma 2) are capped in the tile right after they are formed, before the mask.
// A row's arithmetic is the same whatever tiles its neighbours bring in: a tile the mask leaves a
// row none of adds exactly nothing to it.
//
// Every output element is written by exactly one task and each task sums in a fixed order, so the
// results are bit-identical for any thread count: the forward runs one task per (batch, head,
// query block); the backward either runs one pass with a task per (batch, kv head) that owns dk/dv
// of its keys and dq of its query heads, or, when that leaves too few tasks for the threads, two:
// a task per (batch, kv head, key block) that owns dk/dv of those keys, then a task per (batch,
// head, query block) that owns dq. The two ways add every tile in the same order, so the choice
// (attention_backward_single_pass, by the thread count) leaves the bits as they are.
#include "kernels/cpu/attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kernels/cpu/ref/attention.h"
#include "kernels/ops.h"
#include "src/core/alloc.h"
#include "src/core/pool.h"

namespace tf::cpu {

namespace {

// 64 x 64 tiles: a score row fits in eight AVX2 (four AVX-512) registers, and a thread's tiles for
// head_dim 128 stay inside L2 (about 200 KiB).
constexpr int kBlockQ = 64;
constexpr int kBlockK = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Strides and pointers of one call, in elements.
struct Geometry {
  int64_t seq, n_heads, n_kv_heads, head_dim, group;
  int64_t q_row, kv_row;  // distance between consecutive tokens in q (and d_out, out) and in k, v
  float scale;
  int window;
  float softcap;
  explicit Geometry(const AttentionShape& s)
      : seq(s.seq),
        n_heads(s.n_heads),
        n_kv_heads(s.n_kv_heads),
        head_dim(s.head_dim),
        group(s.n_heads / s.n_kv_heads),
        q_row(int64_t(s.n_heads) * s.head_dim),
        kv_row(int64_t(s.n_kv_heads) * s.head_dim),
        scale(s.scale),
        window(s.window),
        softcap(s.softcap) {}
};

// A tile: query positions [q0, q0 + nq) against key positions [k0, k0 + nk) of one sequence.
struct Tile {
  int64_t q0, nq, k0, nk;
};

enum class TileMask { Skip, Full, Partial };

// What the causal mask, the window and the document ids leave of a tile. doc is the sequence's doc
// ids or null.
TileMask classify(const int32_t* doc, const Tile& t, int window) {
  if (t.k0 > t.q0 + t.nq - 1) return TileMask::Skip;
  if (t.k0 + t.nk - 1 < ref::window_start(t.q0, window)) return TileMask::Skip;
  const bool causal_full = t.k0 + t.nk - 1 <= t.q0 && t.k0 >= ref::window_start(t.q0 + t.nq - 1, window);
  if (!doc) return causal_full ? TileMask::Full : TileMask::Partial;
  const auto [qmin, qmax] = std::minmax_element(doc + t.q0, doc + t.q0 + t.nq);
  const auto [kmin, kmax] = std::minmax_element(doc + t.k0, doc + t.k0 + t.nk);
  if (*qmax < *kmin || *kmax < *qmin) return TileMask::Skip;
  const bool one_doc = *qmin == *qmax && *kmin == *kmax && *qmin == *kmin;
  return causal_full && one_doc ? TileMask::Full : TileMask::Partial;
}

// dst[d][c] = src row c (stride src_row), zero-padded to kBlockK columns so score rows always have
// the full, compile-time width.
void transpose_block(float* dst, const float* src, int64_t src_row, int64_t n, int64_t head_dim) {
  for (int64_t d = 0; d < head_dim; ++d) {
    float* out = dst + d * kBlockK;
    for (int64_t c = 0; c < n; ++c) out[c] = src[c * src_row + d];
    for (int64_t c = n; c < kBlockK; ++c) out[c] = 0.0f;
  }
}

// S[r][c] = scale * sum_d A[r][d] * Bt[d][c] for r < n_rows, all kBlockK columns. A's rows are
// strided (rows of q or d_out); Bt is a transposed key or value block. Four rows by 16 columns
// at a time: eight AVX2 accumulators that stay in registers across the head_dim loop.
void tile_scores(float* S, const float* A, int64_t a_row, int64_t n_rows, const float* Bt, int64_t head_dim,
                 float scale) {
  constexpr int kRows = 4, kCols = 16;
  for (int64_t r0 = 0; r0 < n_rows; r0 += kRows) {
    const int64_t nr = std::min<int64_t>(kRows, n_rows - r0);
    // Rows past n_rows repeat the last one: their sums are computed and dropped.
    const float* a[kRows];
    for (int i = 0; i < kRows; ++i) a[i] = A + (r0 + std::min<int64_t>(i, nr - 1)) * a_row;
    for (int c0 = 0; c0 < kBlockK; c0 += kCols) {
      float acc[kRows][kCols] = {};
      for (int64_t d = 0; d < head_dim; ++d) {
        const float* bt = Bt + d * kBlockK + c0;
        for (int i = 0; i < kRows; ++i) {
          const float x = a[i][d];
#pragma omp simd
          for (int c = 0; c < kCols; ++c) acc[i][c] += x * bt[c];
        }
      }
      for (int64_t i = 0; i < nr; ++i) {
        float* srow = S + (r0 + i) * kBlockK + c0;
#pragma omp simd
        for (int c = 0; c < kCols; ++c) srow[c] = scale * acc[i][c];
      }
    }
  }
}

// S[r][c] = cap * tanh(S[r][c] / cap) for r < n_rows, c < nk (a cap of 0 leaves S as it is).
void cap_scores(float* S, int64_t n_rows, int64_t nk, float cap) {
  if (cap <= 0) return;
  const float inv = 1.0f / cap;
  for (int64_t r = 0; r < n_rows; ++r) {
    float* srow = S + r * kBlockK;
    for (int64_t c = 0; c < nk; ++c) srow[c] = cap * std::tanh(srow[c] * inv);
  }
}

// acc[i][:] += sum_j C(i, j) * src[j][:] for i < n_acc, j < n_src, with C(i, j) = C[i * ci + j * cj].
// Four source rows per pass give four FMAs per load and store of the accumulator row.
void accumulate_rows(float* acc, int64_t n_acc, const float* C, int64_t ci, int64_t cj, const float* src,
                     int64_t src_row, int64_t n_src, int64_t head_dim) {
  for (int64_t i = 0; i < n_acc; ++i) {
    float* __restrict a = acc + i * head_dim;
    const float* c = C + i * ci;
    int64_t j = 0;
    for (; j + 4 <= n_src; j += 4) {
      const float c0 = c[j * cj], c1 = c[(j + 1) * cj], c2 = c[(j + 2) * cj], c3 = c[(j + 3) * cj];
      if (c0 == 0.0f && c1 == 0.0f && c2 == 0.0f && c3 == 0.0f) continue;
      const float* __restrict s0 = src + j * src_row;
      const float* __restrict s1 = s0 + src_row;
      const float* __restrict s2 = s1 + src_row;
      const float* __restrict s3 = s2 + src_row;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) a[d] += c0 * s0[d] + c1 * s1[d] + c2 * s2[d] + c3 * s3[d];
    }
    for (; j < n_src; ++j) {
      const float c0 = c[j * cj];
      const float* __restrict s0 = src + j * src_row;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) a[d] += c0 * s0[d];
    }
  }
}

// Sets the scores of pairs the mask forbids to -inf (their probabilities become exactly 0).
void mask_scores(float* S, const int32_t* doc, const Tile& t, int window) {
  for (int64_t r = 0; r < t.nq; ++r) {
    float* s = S + r * kBlockK;
    for (int64_t c = 0; c < t.nk; ++c) {
      if (!ref::attention_allowed(doc, t.q0 + r, t.k0 + c, window)) s[c] = kNegInf;
    }
  }
}

// Scratch of the calling thread, kept across calls and grown on demand (one buffer per purpose), so
// the training step does not allocate in every attention call.
enum ScratchSlot { kSlotTiles, kSlotDelta, kSlotCached, kSlotCount };
float* scratch_floats(ScratchSlot slot, size_t floats) {
  thread_local Buffer buffers[kSlotCount];
  return static_cast<float*>(grow_scratch(buffers[slot], floats * sizeof(float)));
}

// Per-thread tiles for the threads of one parallel region, carved from the caller's scratch.
class Scratch {
 public:
  Scratch(size_t floats_per_thread, int n_threads)
      : stride_((floats_per_thread + 15) / 16 * 16),
        base_(scratch_floats(kSlotTiles, stride_ * size_t(n_threads))) {}
  float* thread(int t) { return base_ + stride_ * size_t(t); }

 private:
  size_t stride_;
  float* base_;
};

int64_t blocks(int64_t n, int64_t block) {
  return (n + block - 1) / block;
}

// The first key tile (its first position) that query position i reaches.
int64_t first_key_tile(int64_t i, int window) {
  return ref::window_start(i, window) / kBlockK * kBlockK;
}

// One past the last query position that sees a key at or before position j.
int64_t query_end(int64_t j, int window, int64_t seq) {
  return window > 0 ? std::min<int64_t>(seq, j + window) : seq;
}

// The running state of online softmax for up to max_rows query rows, carved from caller scratch
// (max_rows * (D + 2) floats): the unnormalized output O [rows][D] and each row's running max and
// running sum of exp(score - max).
class OnlineSoftmax {
 public:
  static size_t floats(int64_t max_rows, int64_t D) { return size_t(max_rows * (D + 2)); }
  OnlineSoftmax(float* mem, int64_t max_rows, int64_t D)
      : O_(mem), row_max_(mem + max_rows * D), row_sum_(row_max_ + max_rows), D_(D) {}

  void reset(int64_t rows) {
    std::fill(O_, O_ + rows * D_, 0.0f);
    std::fill(row_max_, row_max_ + rows, kNegInf);
    std::fill(row_sum_, row_sum_ + rows, 0.0f);
  }

  // Folds in a tile of masked scores S [rows][kBlockK] against nk keys whose values are rows of
  // vblk (stride v_row): what was accumulated so far is rescaled to the new running max, S becomes
  // exp(S - max) (0 in rows that the mask leaves no key of this tile), and O += S V.
  void add_tile(float* S, int64_t rows, int64_t nk, const float* vblk, int64_t v_row) {
    for (int64_t r = 0; r < rows; ++r) {
      float* srow = S + r * kBlockK;
      float tile_max = kNegInf;
      for (int64_t c = 0; c < nk; ++c) tile_max = std::max(tile_max, srow[c]);
      if (tile_max == kNegInf) {  // the mask leaves this row no key of the tile
        std::fill(srow, srow + nk, 0.0f);
        continue;
      }
      const float new_max = std::max(row_max_[r], tile_max);
      const float rescale = std::exp(row_max_[r] - new_max);
      float sum = 0.0f;
      for (int64_t c = 0; c < nk; ++c) {
        srow[c] = std::exp(srow[c] - new_max);
        sum += srow[c];
      }
      row_sum_[r] = row_sum_[r] * rescale + sum;
      row_max_[r] = new_max;
      if (rescale != 1.0f) {
        float* o = O_ + r * D_;
#pragma omp simd
        for (int64_t d = 0; d < D_; ++d) o[d] *= rescale;
      }
    }
    accumulate_rows(O_, rows, S, kBlockK, 1, vblk, v_row, nk, D_);
  }

  // Row r's attention output O / sum into out.
  void store(int64_t r, float* out) const {
    const float inv = 1.0f / row_sum_[r];
    for (int64_t d = 0; d < D_; ++d) out[d] = O_[r * D_ + d] * inv;
  }

  float lse(int64_t r) const {
    return row_max_[r] + std::log(row_sum_[r]);
  }

 private:
  float* O_;
  float* row_max_;
  float* row_sum_;
  int64_t D_;
};

// The work of a task that owns one (batch, head, query block): the forward's tasks and those of the
// backward's dq pass. qb varies fastest, so long (late) and short (early) query blocks interleave in
// the queue.
struct QueryBlockTask {
  int64_t b, h, kvh, q0, nq, tok0;
  const int32_t* doc;  // the sequence's doc ids, or null
  QueryBlockTask(int64_t task, const Geometry& g, int64_t n_qb, const int32_t* doc_ids)
      : b(task / (g.n_heads * n_qb)),
        h(task / n_qb % g.n_heads),
        kvh(h / g.group),
        q0(task % n_qb * kBlockQ),
        nq(std::min<int64_t>(kBlockQ, g.seq - q0)),
        tok0(b * g.seq),
        doc(doc_ids ? doc_ids + tok0 : nullptr) {}
};

}  // namespace

void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const int32_t* doc_ids, const AttentionShape& s) {
  ref::check_attention_shape(s);
  const Geometry g(s);
  const int64_t D = g.head_dim;
  const int64_t n_qb = blocks(g.seq, kBlockQ);
  const int64_t n_tasks = int64_t(s.batch) * g.n_heads * n_qb;
  if (n_tasks == 0) return;
  const int n_threads = omp_get_max_threads();
  // Kt [D][kBlockK], S [kBlockQ][kBlockK], then the online softmax state of kBlockQ rows.
  Scratch scratch(size_t(D * kBlockK + kBlockQ * kBlockK) + OnlineSoftmax::floats(kBlockQ, D), n_threads);

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < n_tasks; ++task) {
    const QueryBlockTask qt(task, g, n_qb, doc_ids);
    const int64_t q0 = qt.q0, nq = qt.nq, tok0 = qt.tok0;
    const float* qblk = q + (tok0 + q0) * g.q_row + qt.h * D;

    float* Kt = scratch.thread(omp_get_thread_num());
    float* S = Kt + D * kBlockK;
    OnlineSoftmax acc(S + kBlockQ * kBlockK, kBlockQ, D);
    acc.reset(nq);

    for (int64_t k0 = first_key_tile(q0, g.window); k0 < q0 + nq; k0 += kBlockK) {
      const Tile t{q0, nq, k0, std::min<int64_t>(kBlockK, g.seq - k0)};
      const TileMask mask = classify(qt.doc, t, g.window);
      if (mask == TileMask::Skip) continue;
      const float* kblk = k + (tok0 + k0) * g.kv_row + qt.kvh * D;
      const float* vblk = v + (tok0 + k0) * g.kv_row + qt.kvh * D;
      transpose_block(Kt, kblk, g.kv_row, t.nk, D);
      tile_scores(S, qblk, g.q_row, nq, Kt, D, g.scale);
      cap_scores(S, nq, t.nk, g.softcap);
      if (mask == TileMask::Partial) mask_scores(S, qt.doc, t, g.window);
      acc.add_tile(S, nq, t.nk, vblk, g.kv_row);
    }

    for (int64_t r = 0; r < nq; ++r) {
      const int64_t tok = tok0 + q0 + r;
      acc.store(r, out + tok * g.q_row + qt.h * D);
      lse[tok * g.n_heads + qt.h] = acc.lse(r);
    }
  }
}

namespace {

// The probabilities P = exp(S - lse) of one tile into S and dS = P * (dP - delta) into dP, from
// the scaled (and capped), masked scores of the query rows qblk against the transposed keys Kt and from
// dP = dO V^T of the d_out rows doblk against the transposed values Vt. lse_rows and delta_rows
// point at the tile's first query row (stride n_heads). Both backward passes call this, so they
// see the same P. Under a cap c, dS is taken back through it to the scaled score: times
// 1 - tanh^2 = 1 - (S / c)^2 of the capped S.
void tile_softmax_grad(float* S, float* dP, const Tile& t, TileMask mask, const int32_t* doc,
                       const float* qblk, const float* doblk, const float* Kt, const float* Vt,
                       const float* lse_rows, const float* delta_rows, const Geometry& g) {
  tile_scores(S, qblk, g.q_row, t.nq, Kt, g.head_dim, g.scale);
  cap_scores(S, t.nq, t.nk, g.softcap);
  if (mask == TileMask::Partial) mask_scores(S, doc, t, g.window);
  tile_scores(dP, doblk, g.q_row, t.nq, Vt, g.head_dim, 1.0f);
  for (int64_t r = 0; r < t.nq; ++r) {
    const float l = lse_rows[r * g.n_heads];
    const float dl = delta_rows[r * g.n_heads];
    float* p = S + r * kBlockK;
    float* dp = dP + r * kBlockK;
    if (g.softcap > 0) {
      const float inv = 1.0f / g.softcap;
      for (int64_t c = 0; c < t.nk; ++c) {
        // A masked score is -inf: its P is 0, and so is its dS (not 0 times an infinite derivative).
        const float th = p[c] == kNegInf ? 0.0f : p[c] * inv;
        p[c] = std::exp(p[c] - l);
        dp[c] = p[c] * (dp[c] - dl) * (1.0f - th * th);
      }
      continue;
    }
    for (int64_t c = 0; c < t.nk; ++c) {
      p[c] = std::exp(p[c] - l);
      dp[c] = p[c] * (dp[c] - dl);
    }
  }
}

// dK and dV of the key block at k0 (nk keys) += the tile's P^T dO and dS^T Q: the query rows qblk and
// d_out rows doblk of the tile t whose P and dS tile_softmax_grad left in S and dP.
void add_key_grads(float* dK, float* dV, const float* S, const float* dP, const Tile& t, const float* qblk,
                   const float* doblk, const Geometry& g) {
  accumulate_rows(dV, t.nk, S, 1, kBlockK, doblk, g.q_row, t.nq, g.head_dim);
  accumulate_rows(dK, t.nk, dP, 1, kBlockK, qblk, g.q_row, t.nq, g.head_dim);
}

// dk and dv of nk keys from token tok of kv head kvh += scale * dK and dV (rows of head_dim).
void store_key_grads(float* dk, float* dv, const float* dK, const float* dV, int64_t tok, int64_t nk,
                     int64_t kvh, const Geometry& g) {
  const int64_t D = g.head_dim;
  for (int64_t c = 0; c < nk; ++c) {
    float* dkr = dk + (tok + c) * g.kv_row + kvh * D;
    float* dvr = dv + (tok + c) * g.kv_row + kvh * D;
    for (int64_t d = 0; d < D; ++d) {
      dkr[d] += g.scale * dK[c * D + d];
      dvr[d] += dV[c * D + d];
    }
  }
}

// dq of nq query rows from (token, head) row row0 += scale * dQ.
void store_query_grad(float* dq, const float* dQ, int64_t row0, int64_t nq, const Geometry& g) {
  const int64_t D = g.head_dim;
  for (int64_t r = 0; r < nq; ++r) {
    float* dqr = dq + (row0 + r * g.n_heads) * D;
    for (int64_t d = 0; d < D; ++d) dqr[d] += g.scale * dQ[r * D + d];
  }
}

// The pointers of one backward call.
struct BackwardArgs {
  float *dq, *dk, *dv;
  const float *d_out, *q, *k, *v, *lse, *delta;
  const int32_t* doc_ids;
  int64_t batch;
};

// One task per (batch, kv head), taking each tile once: the transposed keys and values of the whole
// sequence are formed first; then for every query head of the group and query block in turn, the
// tiles of its keys in order add to dQ of the block and to dK and dV of the sequence. Each dK and
// dV row receives its tiles in the order pass 1 of backward_two_passes adds them (head, then query
// block), and each dQ block in the order of its pass 2 (key block), so the bits are theirs.
void backward_single_pass(const BackwardArgs& a, const Geometry& g, Scratch& scratch) {
  const int64_t D = g.head_dim, n_kb = blocks(g.seq, kBlockK);
  const int64_t n_tasks = a.batch * g.n_kv_heads;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < n_tasks; ++task) {
    const int64_t b = task / g.n_kv_heads, kvh = task % g.n_kv_heads, tok0 = b * g.seq;
    const int32_t* doc = a.doc_ids ? a.doc_ids + tok0 : nullptr;

    float* Kt = scratch.thread(omp_get_thread_num());
    float* Vt = Kt + n_kb * D * kBlockK;
    float* dK = Vt + n_kb * D * kBlockK;
    float* dV = dK + g.seq * D;
    float* S = dV + g.seq * D;
    float* dP = S + kBlockQ * kBlockK;
    float* dQ = dP + kBlockQ * kBlockK;
    for (int64_t kb = 0; kb < n_kb; ++kb) {
      const int64_t k0 = kb * kBlockK, nk = std::min<int64_t>(kBlockK, g.seq - k0);
      transpose_block(Kt + kb * D * kBlockK, a.k + (tok0 + k0) * g.kv_row + kvh * D, g.kv_row, nk, D);
      transpose_block(Vt + kb * D * kBlockK, a.v + (tok0 + k0) * g.kv_row + kvh * D, g.kv_row, nk, D);
    }
    std::fill(dK, dK + 2 * g.seq * D, 0.0f);

    for (int64_t h = kvh * g.group; h < (kvh + 1) * g.group; ++h) {
      for (int64_t q0 = 0; q0 < g.seq; q0 += kBlockQ) {
        const int64_t nq = std::min<int64_t>(kBlockQ, g.seq - q0);
        const int64_t row0 = (tok0 + q0) * g.n_heads + h;
        const float* qblk = a.q + row0 * D;
        const float* doblk = a.d_out + row0 * D;
        std::fill(dQ, dQ + nq * D, 0.0f);
        for (int64_t k0 = first_key_tile(q0, g.window); k0 < q0 + nq; k0 += kBlockK) {
          const Tile t{q0, nq, k0, std::min<int64_t>(kBlockK, g.seq - k0)};
          const TileMask mask = classify(doc, t, g.window);
          if (mask == TileMask::Skip) continue;
          const int64_t kb = k0 / kBlockK;
          tile_softmax_grad(S, dP, t, mask, doc, qblk, doblk, Kt + kb * D * kBlockK, Vt + kb * D * kBlockK,
                            a.lse + row0, a.delta + row0, g);
          add_key_grads(dK + k0 * D, dV + k0 * D, S, dP, t, qblk, doblk, g);
          accumulate_rows(dQ, nq, dP, kBlockK, 1, a.k + (tok0 + k0) * g.kv_row + kvh * D, g.kv_row, t.nk, D);
        }
        store_query_grad(a.dq, dQ, row0, nq, g);
      }
    }
    store_key_grads(a.dk, a.dv, dK, dV, tok0, g.seq, kvh, g);
  }
}

// Pass 1: dk and dv, one task per (batch, kv head, key block), over every query head of the group.
// Pass 2: dq, one task per (batch, head, query block), recomputing P and dS tile by tile.
void backward_two_passes(const BackwardArgs& a, const Geometry& g, Scratch& scratch) {
  const int64_t D = g.head_dim;
  const int64_t n_qb = blocks(g.seq, kBlockQ), n_kb = blocks(g.seq, kBlockK);
  const int64_t n_kv_tasks = a.batch * g.n_kv_heads * n_kb;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < n_kv_tasks; ++task) {
    const int64_t b = task / (g.n_kv_heads * n_kb), kvh = task / n_kb % g.n_kv_heads, kb = task % n_kb;
    const int64_t k0 = kb * kBlockK, nk = std::min<int64_t>(kBlockK, g.seq - k0);
    const int64_t tok0 = b * g.seq;
    const int32_t* doc = a.doc_ids ? a.doc_ids + tok0 : nullptr;

    float* Kt = scratch.thread(omp_get_thread_num());
    float* Vt = Kt + D * kBlockK;
    float* S = Vt + D * kBlockK;
    float* dP = S + kBlockQ * kBlockK;
    float* dK = dP + kBlockQ * kBlockK;
    float* dV = dK + kBlockK * D;
    transpose_block(Kt, a.k + (tok0 + k0) * g.kv_row + kvh * D, g.kv_row, nk, D);
    transpose_block(Vt, a.v + (tok0 + k0) * g.kv_row + kvh * D, g.kv_row, nk, D);
    std::fill(dK, dK + nk * D, 0.0f);
    std::fill(dV, dV + nk * D, 0.0f);

    const int64_t q_end = query_end(k0 + nk - 1, g.window, g.seq);
    for (int64_t h = kvh * g.group; h < (kvh + 1) * g.group; ++h) {
      for (int64_t q0 = k0 / kBlockQ * kBlockQ; q0 < q_end; q0 += kBlockQ) {
        const Tile t{q0, std::min<int64_t>(kBlockQ, g.seq - q0), k0, nk};
        const TileMask mask = classify(doc, t, g.window);
        if (mask == TileMask::Skip) continue;
        const int64_t row0 = (tok0 + q0) * g.n_heads + h;
        const float* qblk = a.q + row0 * D;
        const float* doblk = a.d_out + row0 * D;
        tile_softmax_grad(S, dP, t, mask, doc, qblk, doblk, Kt, Vt, a.lse + row0, a.delta + row0, g);
        add_key_grads(dK, dV, S, dP, t, qblk, doblk, g);
      }
    }
    store_key_grads(a.dk, a.dv, dK, dV, tok0 + k0, nk, kvh, g);
  }

  const int64_t n_q_tasks = a.batch * g.n_heads * n_qb;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < n_q_tasks; ++task) {
    const QueryBlockTask qt(task, g, n_qb, a.doc_ids);
    const int64_t q0 = qt.q0, nq = qt.nq, tok0 = qt.tok0;
    const int64_t row0 = (tok0 + q0) * g.n_heads + qt.h;
    const float* qblk = a.q + row0 * D;
    const float* doblk = a.d_out + row0 * D;

    float* Kt = scratch.thread(omp_get_thread_num());
    float* Vt = Kt + D * kBlockK;
    float* S = Vt + D * kBlockK;
    float* dP = S + kBlockQ * kBlockK;
    float* dQ = dP + kBlockQ * kBlockK;
    std::fill(dQ, dQ + nq * D, 0.0f);

    for (int64_t k0 = first_key_tile(q0, g.window); k0 < q0 + nq; k0 += kBlockK) {
      const Tile t{q0, nq, k0, std::min<int64_t>(kBlockK, g.seq - k0)};
      const TileMask mask = classify(qt.doc, t, g.window);
      if (mask == TileMask::Skip) continue;
      const float* kblk = a.k + (tok0 + k0) * g.kv_row + qt.kvh * D;
      const float* vblk = a.v + (tok0 + k0) * g.kv_row + qt.kvh * D;
      transpose_block(Kt, kblk, g.kv_row, t.nk, D);
      transpose_block(Vt, vblk, g.kv_row, t.nk, D);
      tile_softmax_grad(S, dP, t, mask, qt.doc, qblk, doblk, Kt, Vt, a.lse + row0, a.delta + row0, g);
      accumulate_rows(dQ, nq, dP, kBlockK, 1, kblk, g.kv_row, t.nk, D);
    }
    store_query_grad(a.dq, dQ, row0, nq, g);
  }
}

}  // namespace

bool attention_backward_single_pass(const AttentionShape& s, int threads) {
  // One pass forms five products a tile and two passes seven (the scores and dP twice); one pass
  // runs in ceil(tasks / threads) rounds of equal tasks where two passes keep the threads busy.
  const int64_t tasks = int64_t(s.batch) * s.n_kv_heads, t = std::max(threads, 1);
  const int64_t rounds = (tasks + t - 1) / t;
  return 5 * rounds * t <= 7 * tasks;
}

size_t attention_backward_thread_floats(const AttentionShape& s, int threads) {
  const size_t D = size_t(s.head_dim);
  if (attention_backward_single_pass(s, threads)) {
    const size_t padded = size_t(blocks(s.seq, kBlockK)) * kBlockK;
    // Kt, Vt [blocks][D][kBlockK]; dK, dV [seq][D]; S and dP [kBlockQ][kBlockK]; dQ [kBlockQ][D].
    return 2 * padded * D + 2 * size_t(s.seq) * D + 2 * kBlockQ * kBlockK + kBlockQ * D;
  }
  // Kt, Vt [D][kBlockK]; S and dP [kBlockQ][kBlockK]; dK and dV [kBlockK][D], or dQ [kBlockQ][D].
  return 2 * D * kBlockK + 2 * kBlockQ * kBlockK + 2 * kBlockK * D;
}

void attention_backward(float* dq, float* dk, float* dv, const float* d_out, const float* q, const float* k,
                        const float* v, const float* out, const float* lse, const int32_t* doc_ids,
                        const AttentionShape& s) {
  ref::check_attention_shape(s);
  const Geometry g(s);
  const int64_t D = g.head_dim;
  const int64_t n_tokens = int64_t(s.batch) * g.seq;
  if (n_tokens == 0) return;
  const int n_threads = omp_get_max_threads();

  // delta[t, h] = dO . O, the row sums of P * dP that the softmax backward subtracts.
  float* delta = scratch_floats(kSlotDelta, size_t(n_tokens * g.n_heads));
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n_tokens * g.n_heads; ++i) {
    const float* o = out + i * D;
    const float* go = d_out + i * D;
    float acc = 0.0f;
    for (int64_t d = 0; d < D; ++d) acc += o[d] * go[d];
    delta[i] = acc;
  }

  static_assert(kBlockQ == kBlockK, "the accumulators are sized for either block");
  Scratch scratch(attention_backward_thread_floats(s, n_threads), n_threads);
  const BackwardArgs a{dq, dk, dv, d_out, q, k, v, lse, delta, doc_ids, s.batch};
  if (attention_backward_single_pass(s, n_threads)) {
    backward_single_pass(a, g, scratch);
  } else {
    backward_two_passes(a, g, scratch);
  }
}

// ---- attention_cached_forward --------------------------------------------------------------
//
// A task owns query rows: some query heads of one kv group at a block of query positions, so the
// heads that share a kv head read each key and value once per task (a decoding step is bound by
// streaming the cache). The group's heads are split over more tasks only when there would be
// fewer tasks than threads. Every row's arithmetic is independent of which other rows share its
// task, and keys go in kBlockK tiles aligned to position 0 (from the first a window reaches), so
// the results are bit-identical for any thread count.
namespace {

// S[r][c] = scale * A_r . K_c for n_rows rows of A (stride a_row) against nk key rows (stride
// k_row), read in place. For few query positions per task (decoding) this beats tile_scores: it
// skips the strided transpose of every key tile (measured 1.5x faster for one token against 4096
// cached keys, 32 heads, 8 kv heads, head_dim 128).
void row_scores(float* S, const float* A, int64_t a_row, int64_t n_rows, const float* K, int64_t k_row,
                int64_t nk, int64_t head_dim, float scale) {
  for (int64_t c = 0; c < nk; ++c) {
    const float* __restrict kc = K + c * k_row;
    for (int64_t r = 0; r < n_rows; ++r) {
      const float* __restrict a = A + r * a_row;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < head_dim; ++d) dot += a[d] * kc[d];
      S[r * kBlockK + c] = scale * dot;
    }
  }
}

}  // namespace

void attention_cached_forward(float* out, const float* q, const float* k_cache, const float* v_cache,
                              int64_t n_past, int64_t n_new, int n_heads, int n_kv_heads, int head_dim,
                              float scale, int window, float softcap) {
  ref::check_attention_cached_shape(n_past, n_new, n_heads, n_kv_heads, head_dim, window, softcap);
  if (n_new == 0) return;
  const int64_t D = head_dim, H = n_heads, KV = n_kv_heads, group = H / KV;
  const int64_t q_row = H * D, kv_row = KV * D;
  // Query positions per task: about kBlockQ rows in all, and at least one position.
  const int64_t nq_max = std::max<int64_t>(1, kBlockQ / group);
  const int64_t n_qb = blocks(n_new, nq_max);
  const int n_threads = omp_get_max_threads();
  const int64_t head_slices = std::min<int64_t>(group, blocks(n_threads, KV * n_qb));
  const int64_t heads_per_task = blocks(group, head_slices);
  const int64_t n_slices = blocks(group, heads_per_task);
  const int64_t n_tasks = KV * n_slices * n_qb;
  const int64_t max_rows = heads_per_task * nq_max;
  // Kt [D][kBlockK], S [rows][kBlockK], then the online softmax state of the rows.
  const size_t scratch_size = size_t(D * kBlockK + max_rows * kBlockK) + OnlineSoftmax::floats(max_rows, D);

  pool_for(n_tasks, [&](int64_t task) {
    const int64_t kvh = task / (n_slices * n_qb), slice = task / n_qb % n_slices, qb = task % n_qb;
    const int64_t h0 = kvh * group + slice * heads_per_task;
    const int64_t nh = std::min(heads_per_task, (kvh + 1) * group - h0);
    const int64_t q0 = qb * nq_max, nq = std::min(nq_max, n_new - q0);
    const int64_t rows = nh * nq;  // row r is head h0 + r / nq at query position q0 + r % nq
    const int64_t first_pos = n_past + q0, n_keys = first_pos + nq;
    const float* kbase = k_cache + kvh * D;
    const float* vbase = v_cache + kvh * D;
    // Fewer than one 4-row block of tile_scores per head: score keys in place.
    const bool in_place = nq < 4;

    float* Kt = scratch_floats(kSlotCached, scratch_size);
    float* S = Kt + D * kBlockK;
    OnlineSoftmax acc(S + max_rows * kBlockK, max_rows, D);
    acc.reset(rows);

    // The last position's window starts last: tiles before that start hold keys some row may not see.
    const int64_t last_start = ref::window_start(n_keys - 1, window);
    for (int64_t k0 = first_key_tile(first_pos, window); k0 < n_keys; k0 += kBlockK) {
      const int64_t nk = std::min<int64_t>(kBlockK, n_keys - k0);
      const float* kblk = kbase + k0 * kv_row;
      if (!in_place) transpose_block(Kt, kblk, kv_row, nk, D);
      for (int64_t hh = 0; hh < nh; ++hh) {
        const float* qrows = q + (q0 * H + h0 + hh) * D;
        float* srows = S + hh * nq * kBlockK;
        if (in_place) {
          row_scores(srows, qrows, q_row, nq, kblk, kv_row, nk, D, scale);
        } else {
          tile_scores(srows, qrows, q_row, nq, Kt, D, scale);
        }
      }
      cap_scores(S, rows, nk, softcap);
      // Keys past a row's own position: only in the tiles that reach beyond the first position.
      if (k0 + nk - 1 > first_pos) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t pos = first_pos + r % nq;
          float* srow = S + r * kBlockK;
          for (int64_t c = std::max<int64_t>(0, pos + 1 - k0); c < nk; ++c) srow[c] = kNegInf;
        }
      }
      // Keys before a row's window: only in the tiles that start before the last row's window.
      if (k0 < last_start) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t start = ref::window_start(first_pos + r % nq, window);
          float* srow = S + r * kBlockK;
          for (int64_t c = 0; c < std::min<int64_t>(nk, start - k0); ++c) srow[c] = kNegInf;
        }
      }
      acc.add_tile(S, rows, nk, vbase + k0 * kv_row, kv_row);
    }

    for (int64_t r = 0; r < rows; ++r) {
      acc.store(r, out + ((q0 + r % nq) * H + h0 + r / nq) * D);
    }
  });
}

}  // namespace tf::cpu
