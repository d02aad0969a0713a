// defines: tf::cuda::attention_forward / attention_backward / attention_cached_forward (built by
// nvcc) and their tf::simt twins (this source compiled as host C++ against the simulator): causal
// GQA attention with document ids, a sliding window and logit soft-capping as plain tiled f32
// kernels.
//
// Queries and keys go in tiles of kTileQ x kTileK held in shared memory with their rows of q, k, v
// (and d_out); the forward keeps a running max and sum per query row (online softmax) and the
// backward recomputes each tile's probabilities from the saved log-sum-exp, so no seq x seq matrix
// exists anywhere. Under a sliding window the tile loops start and stop at the tiles the window
// reaches. Every output element is owned by one thread of one block, which sums its terms
// in a fixed order: no atomics, and the bits do not depend on how threads or blocks are scheduled.
// The backward first computes delta = rowsum(d_out * out) into device scratch, then dk and dv with
// a block per (key tile, kv head, sequence) that walks every query head of the group, and dq with
// a block per (query tile, head, sequence). attention_backward_scratch: the rt::scratch of delta.
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kernels/cpu/ref/attention.h"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/port.h"
#include "kernels/cuda/runtime.h"
#include "kernels/cuda/scratch_plan.h"
#include "src/core/error.h"

namespace tf::TF_PORT_BACKEND {

namespace {

// 64 threads over 16 x 16 tiles: a score tile is four entries per thread, and a backward block of
// head_dim 128 (six 16 x 128 tiles of floats) takes 50 KiB of shared memory.
constexpr int kThreads = 64;
constexpr int kTileQ = 16;
constexpr int kTileK = 16;
constexpr int kScratchDelta = 30;                       // rt::scratch slot of the backward's delta
constexpr size_t kMaxSmemBytes = 227 * 1024;            // per block on sm_90, with the opt-in
constexpr int64_t kMaxBlocks = (int64_t(1) << 31) - 1;  // gridDim.x

template <typename T>
__device__ __forceinline__ T min_of(T a, T b) {
  return b < a ? b : a;
}

// dst[r * D + d] = src[r * src_row + d] for r < n_rows, d < D.
__device__ void load_rows(port::sptr<float> dst, port::gptr<const float> src, int64_t src_row, int n_rows,
                          int D) {
  for (int idx = int(threadIdx.x); idx < n_rows * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    const float x = src[r * src_row + d];
    dst[idx] = x;
  }
}

__device__ float dot(port::sptr<const float> a, port::sptr<const float> b, int D) {
  float acc = 0.0f;
  for (int d = 0; d < D; ++d) {
    const float x = a[d], y = b[d];
    acc += x * y;
  }
  return acc;
}

// The first key position that query position qp sees under a window (0 without one).
__device__ int64_t window_start(int64_t qp, int window) {
  return window > 0 && qp - window + 1 > 0 ? qp - window + 1 : 0;
}

// A scaled score soft-capped, cap * tanh(x / cap) (Gemma 2), or x when cap is 0.
__device__ float capped(float x, float cap) {
  return cap > 0 ? cap * tanhf(x / cap) : x;
}

// Whether the query at position qp may attend to the key at position kp of the same sequence;
// doc is that sequence's document ids (indexed by position) or null.
__device__ bool allowed(port::gptr<const int32_t> doc, int64_t qp, int64_t kp, int window) {
  if (kp > qp || kp < window_start(qp, window)) return false;
  if (!doc) return true;
  const int32_t dq = doc[qp], dk = doc[kp];
  return dq == dk;
}

// ---- forward (training and cached) --------------------------------------------------------------

// Sequences are laid out one after another: q, out, lse have q_seq rows per sequence, k, v and doc
// kv_seq rows, and the sequence's first query sits at key position pos0 (0 in training, n_past in
// decoding). Query i of a sequence attends to keys window_start(pos0 + i) .. pos0 + i.
struct ForwardArgs {
  port::gptr<float> out;
  port::gptr<float> lse;  // null in decoding
  port::gptr<const float> q, k, v;
  port::gptr<const int32_t> doc;  // null without document ids
  int64_t q_seq, kv_seq, pos0;
  int n_heads, n_kv_heads, head_dim;
  float scale;
  int window;
  float softcap;
};

// Shared floats of a forward block: Q and O tiles [kTileQ][D], K and V [kTileK][D], the
// probabilities [kTileQ][kTileK] and three per-row values.
size_t forward_smem_bytes(int D) {
  return sizeof(float) * (size_t(2 * kTileQ + 2 * kTileK) * size_t(D) + kTileQ * kTileK + 3 * kTileQ);
}

// The query tile a block of the forward or dq kernel owns: block x = (sequence b * n_heads + head h) *
// query tiles + tile, rows i0 .. i0 + nq of `seq`; kvh is h's kv head (GQA).
struct QueryTile {
  int64_t b, i0;
  int h, kvh, nq;
};
__device__ QueryTile query_tile(int64_t seq, int n_heads, int n_kv_heads) {
  const int64_t n_qt = (seq + kTileQ - 1) / kTileQ;
  QueryTile t;
  t.b = int64_t(blockIdx.x) / (n_qt * n_heads);
  t.h = int(int64_t(blockIdx.x) / n_qt % n_heads);
  t.kvh = t.h / (n_heads / n_kv_heads);
  t.i0 = int64_t(blockIdx.x) % n_qt * kTileQ;
  t.nq = int(min_of<int64_t>(kTileQ, seq - t.i0));
  return t;
}

__global__ void __launch_bounds__(kThreads) attention_forward_kernel(ForwardArgs a) {
  TF_DYNAMIC_SHARED(float, smem);
  const int D = a.head_dim, tid = int(threadIdx.x);
  const QueryTile qt = query_tile(a.q_seq, a.n_heads, a.n_kv_heads);
  const int64_t b = qt.b, i0 = qt.i0;
  const int h = qt.h, kvh = qt.kvh, nq = qt.nq;
  const int64_t q_row = int64_t(a.n_heads) * D, kv_row = int64_t(a.n_kv_heads) * D;
  const port::gptr<const float> kseq = a.k + b * a.kv_seq * kv_row + kvh * D;
  const port::gptr<const float> vseq = a.v + b * a.kv_seq * kv_row + kvh * D;
  const port::gptr<const int32_t> doc = a.doc ? a.doc + b * a.kv_seq : port::gptr<const int32_t>(nullptr);

  const port::sptr<float> qs = smem, os = qs + kTileQ * D, ks = os + kTileQ * D, vs = ks + kTileK * D;
  const port::sptr<float> ps = vs + kTileK * D, row_max = ps + kTileQ * kTileK, row_sum = row_max + kTileQ,
                          rescale = row_sum + kTileQ;

  load_rows(qs, a.q + (b * a.q_seq + i0) * q_row + h * D, q_row, nq, D);
  for (int idx = tid; idx < nq * D; idx += kThreads) os[idx] = 0.0f;
  if (tid < nq) {
    row_max[tid] = -INFINITY;
    row_sum[tid] = 0.0f;
  }

  const int64_t n_keys = a.pos0 + i0 + nq;
  for (int64_t j0 = window_start(a.pos0 + i0, a.window) / kTileK * kTileK; j0 < n_keys; j0 += kTileK) {
    const int nk = int(min_of<int64_t>(kTileK, n_keys - j0));
    __syncthreads();  // the previous tile's K, V and probabilities are no longer read
    load_rows(ks, kseq + j0 * kv_row, kv_row, nk, D);
    load_rows(vs, vseq + j0 * kv_row, kv_row, nk, D);
    __syncthreads();
    for (int idx = tid; idx < nq * nk; idx += kThreads) {
      const int r = idx / nk, c = idx % nk;
      ps[r * kTileK + c] = allowed(doc, a.pos0 + i0 + r, j0 + c, a.window)
                               ? capped(a.scale * dot(qs + r * D, ks + c * D, D), a.softcap)
                               : -INFINITY;
    }
    __syncthreads();
    if (tid < nq) {
      const port::sptr<float> p = ps + tid * kTileK;
      float tile_max = -INFINITY;
      for (int c = 0; c < nk; ++c) {
        const float s = p[c];
        tile_max = fmaxf(tile_max, s);
      }
      const float old_max = row_max[tid];
      if (tile_max == -INFINITY) {  // the mask leaves this row no key of the tile
        for (int c = 0; c < nk; ++c) p[c] = 0.0f;
        rescale[tid] = 1.0f;
      } else {
        const float new_max = fmaxf(old_max, tile_max);
        const float factor = expf(old_max - new_max);  // 0 before the row's first key
        float sum = 0.0f;
        for (int c = 0; c < nk; ++c) {
          const float e = expf(float(p[c]) - new_max);
          p[c] = e;
          sum += e;
        }
        const float old_sum = row_sum[tid];
        row_sum[tid] = old_sum * factor + sum;
        row_max[tid] = new_max;
        rescale[tid] = factor;
      }
    }
    __syncthreads();
    for (int idx = tid; idx < nq * D; idx += kThreads) {
      const int r = idx / D, d = idx % D;
      const float f = rescale[r];
      float acc = float(os[idx]) * f;
      for (int c = 0; c < nk; ++c) {
        const float p = ps[r * kTileK + c], x = vs[c * D + d];
        acc += p * x;
      }
      os[idx] = acc;
    }
  }

  const port::gptr<float> out = a.out + (b * a.q_seq + i0) * q_row + h * D;
  for (int idx = tid; idx < nq * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    const float o = os[idx], l = row_sum[r];
    out[r * q_row + d] = o / l;
  }
  if (a.lse && tid < nq) {
    const float m = row_max[tid], l = row_sum[tid];
    a.lse[(b * a.q_seq + i0 + tid) * a.n_heads + h] = m + logf(l);
  }
}

rt::StreamHandle stream() {
  return rt::current_stream();
}

void check_smem(size_t bytes, int head_dim) {
  TF_CHECK(bytes <= kMaxSmemBytes, "attention with head_dim ", head_dim, " needs ", bytes,
           " bytes of shared memory per block, more than the ", kMaxSmemBytes, " a block may have");
}

void launch_forward(const char* name, const ForwardArgs& a, int64_t batch) {
  const int64_t n_blocks = batch * a.n_heads * ((a.q_seq + kTileQ - 1) / kTileQ);
  if (n_blocks == 0) return;
  TF_CHECK(n_blocks <= kMaxBlocks, name, ": ", n_blocks, " blocks of ", kTileQ,
           " query rows are more than one launch may have");
  const size_t smem = forward_smem_bytes(a.head_dim);
  check_smem(smem, a.head_dim);
  port::launch(attention_forward_kernel,
               port::LaunchConfig{name, dim3(unsigned(n_blocks)), dim3(kThreads), smem, stream()}, a);
}

// ---- backward -----------------------------------------------------------------------------------

struct BackwardArgs {
  port::gptr<float> dq, dk, dv;
  port::gptr<const float> d_out, q, k, v, lse, delta;
  port::gptr<const int32_t> doc;
  int64_t seq;
  int n_heads, n_kv_heads, head_dim;
  float scale;
  int window;
  float softcap;
};

// delta[row] = d_out[row] . out[row] for each of n_rows (token, head) rows of head_dim floats.
__global__ void __launch_bounds__(kThreads)
    attention_delta_kernel(port::gptr<float> delta, port::gptr<const float> d_out,
                           port::gptr<const float> out, int64_t n_rows, int head_dim) {
  const int64_t row = int64_t(blockIdx.x) * kThreads + int64_t(threadIdx.x);
  if (row >= n_rows) return;
  const port::gptr<const float> o = out + row * head_dim, g = d_out + row * head_dim;
  float acc = 0.0f;
  for (int d = 0; d < head_dim; ++d) {
    const float x = o[d], y = g[d];
    acc += x * y;
  }
  delta[row] = acc;
}

// The shared tiles of a backward block: K, V [kTileK][D]; Q, dO [kTileQ][D]; two accumulators
// (dK and dV, or dQ) [kTileK][D]; P and dS [kTileQ][kTileK]; lse and delta of the query rows.
struct BackwardTiles {
  port::sptr<float> ks, vs, qs, dos, acc0, acc1, ps, dss, lse, delta;
};

static_assert(kTileQ == kTileK, "the backward's accumulators are sized for either tile");

size_t backward_smem_bytes(int D) {
  return sizeof(float) * (size_t(6 * kTileK) * size_t(D) + 2 * kTileQ * kTileK + 2 * kTileQ);
}

__device__ BackwardTiles carve_backward(port::sptr<float> smem, int D) {
  BackwardTiles t;
  t.ks = smem;
  t.vs = t.ks + kTileK * D;
  t.qs = t.vs + kTileK * D;
  t.dos = t.qs + kTileQ * D;
  t.acc0 = t.dos + kTileQ * D;
  t.acc1 = t.acc0 + kTileK * D;
  t.ps = t.acc1 + kTileK * D;
  t.dss = t.ps + kTileQ * kTileK;
  t.lse = t.dss + kTileQ * kTileK;
  t.delta = t.lse + kTileQ;
  return t;
}

// Q, dO, lse and delta of query rows i0 .. i0 + nq of head h of sequence b into the tiles.
__device__ void load_query_rows(const BackwardTiles& t, const BackwardArgs& a, int64_t b, int h, int64_t i0,
                                int nq) {
  const int D = a.head_dim;
  const int64_t q_row = int64_t(a.n_heads) * D, row0 = (b * a.seq + i0) * a.n_heads + h;
  load_rows(t.qs, a.q + row0 * D, q_row, nq, D);
  load_rows(t.dos, a.d_out + row0 * D, q_row, nq, D);
  const int tid = int(threadIdx.x);
  if (tid < nq) {
    const float l = a.lse[row0 + tid * a.n_heads], dl = a.delta[row0 + tid * a.n_heads];
    t.lse[tid] = l;
    t.delta[tid] = dl;
  }
}

// P = exp(x - lse) and dS = P (dO.v - delta) of the tile's query rows i0 + r (r < nq) against its
// keys j0 + c (c < nk), x the scaled score q.k scale (capped: x = c tanh(q.k scale / c), and dS
// times 1 - (x / c)^2, the cap's derivative); 0 where the mask forbids the pair. Both backward
// kernels compute their tiles here, so they see the same P.
__device__ void tile_probabilities(const BackwardTiles& t, const BackwardArgs& a,
                                   port::gptr<const int32_t> doc, int64_t i0, int nq, int64_t j0, int nk) {
  const int D = a.head_dim;
  for (int idx = int(threadIdx.x); idx < nq * nk; idx += kThreads) {
    const int r = idx / nk, c = idx % nk;
    float p = 0.0f, ds = 0.0f;
    if (allowed(doc, i0 + r, j0 + c, a.window)) {
      const float l = t.lse[r], dl = t.delta[r];
      const float x = capped(a.scale * dot(t.qs + r * D, t.ks + c * D, D), a.softcap);
      p = expf(x - l);
      ds = p * (dot(t.dos + r * D, t.vs + c * D, D) - dl);
      if (a.softcap > 0) {
        const float th = x / a.softcap;
        ds *= 1.0f - th * th;
      }
    }
    t.ps[r * kTileK + c] = p;
    t.dss[r * kTileK + c] = ds;
  }
}

// dk, dv += gradients of keys j0 .. j0 + nk of kv head g; block x = (sequence * n_kv_heads + g) *
// key tiles + key tile. acc0 holds dK / scale, acc1 dV.
__global__ void __launch_bounds__(kThreads) attention_dkdv_kernel(BackwardArgs a) {
  TF_DYNAMIC_SHARED(float, smem);
  const int D = a.head_dim, tid = int(threadIdx.x);
  const int64_t n_kt = (a.seq + kTileK - 1) / kTileK;
  const int64_t b = int64_t(blockIdx.x) / (n_kt * a.n_kv_heads);
  const int g = int(int64_t(blockIdx.x) / n_kt % a.n_kv_heads);
  const int64_t j0 = int64_t(blockIdx.x) % n_kt * kTileK;
  const int nk = int(min_of<int64_t>(kTileK, a.seq - j0));
  const int group = a.n_heads / a.n_kv_heads;
  const int64_t kv_row = int64_t(a.n_kv_heads) * D, key0 = (b * a.seq + j0) * kv_row + g * D;
  const port::gptr<const int32_t> doc = a.doc ? a.doc + b * a.seq : port::gptr<const int32_t>(nullptr);
  const BackwardTiles t = carve_backward(smem, D);

  load_rows(t.ks, a.k + key0, kv_row, nk, D);
  load_rows(t.vs, a.v + key0, kv_row, nk, D);
  for (int idx = tid; idx < nk * D; idx += kThreads) {
    t.acc0[idx] = 0.0f;
    t.acc1[idx] = 0.0f;
  }
  // Queries before the key tile's first key see none of it, nor those a window ends before its last.
  const int64_t i_end = a.window > 0 && j0 + nk - 1 + a.window < a.seq ? j0 + nk - 1 + a.window : a.seq;
  for (int h = g * group; h < (g + 1) * group; ++h) {
    for (int64_t i0 = j0 / kTileQ * kTileQ; i0 < i_end; i0 += kTileQ) {
      const int nq = int(min_of<int64_t>(kTileQ, a.seq - i0));
      __syncthreads();  // the previous query tile is no longer read
      load_query_rows(t, a, b, h, i0, nq);
      __syncthreads();
      tile_probabilities(t, a, doc, i0, nq, j0, nk);
      __syncthreads();
      for (int idx = tid; idx < nk * D; idx += kThreads) {
        const int c = idx / D, d = idx % D;
        float dk_acc = t.acc0[idx], dv_acc = t.acc1[idx];
        for (int r = 0; r < nq; ++r) {
          const float p = t.ps[r * kTileK + c], ds = t.dss[r * kTileK + c];
          const float x = t.qs[r * D + d], go = t.dos[r * D + d];
          dk_acc += ds * x;
          dv_acc += p * go;
        }
        t.acc0[idx] = dk_acc;
        t.acc1[idx] = dv_acc;
      }
    }
  }
  for (int idx = tid; idx < nk * D; idx += kThreads) {
    const int c = idx / D, d = idx % D;
    const float dk_acc = t.acc0[idx], dv_acc = t.acc1[idx];
    const float dk_old = a.dk[key0 + c * kv_row + d], dv_old = a.dv[key0 + c * kv_row + d];
    a.dk[key0 + c * kv_row + d] = dk_old + a.scale * dk_acc;
    a.dv[key0 + c * kv_row + d] = dv_old + dv_acc;
  }
}

// dq += gradient of the block's query tile (query_tile); acc0 holds dQ / scale.
__global__ void __launch_bounds__(kThreads) attention_dq_kernel(BackwardArgs a) {
  TF_DYNAMIC_SHARED(float, smem);
  const int D = a.head_dim, tid = int(threadIdx.x);
  const QueryTile qt = query_tile(a.seq, a.n_heads, a.n_kv_heads);
  const int64_t b = qt.b, i0 = qt.i0;
  const int h = qt.h, kvh = qt.kvh, nq = qt.nq;
  const int64_t q_row = int64_t(a.n_heads) * D, kv_row = int64_t(a.n_kv_heads) * D;
  const port::gptr<const int32_t> doc = a.doc ? a.doc + b * a.seq : port::gptr<const int32_t>(nullptr);
  const BackwardTiles t = carve_backward(smem, D);

  load_query_rows(t, a, b, h, i0, nq);
  for (int idx = tid; idx < nq * D; idx += kThreads) t.acc0[idx] = 0.0f;
  for (int64_t j0 = window_start(i0, a.window) / kTileK * kTileK; j0 < i0 + nq; j0 += kTileK) {
    const int nk = int(min_of<int64_t>(kTileK, i0 + nq - j0));
    const int64_t key0 = (b * a.seq + j0) * kv_row + kvh * D;
    __syncthreads();  // the previous key tile is no longer read
    load_rows(t.ks, a.k + key0, kv_row, nk, D);
    load_rows(t.vs, a.v + key0, kv_row, nk, D);
    __syncthreads();
    tile_probabilities(t, a, doc, i0, nq, j0, nk);
    __syncthreads();
    for (int idx = tid; idx < nq * D; idx += kThreads) {
      const int r = idx / D, d = idx % D;
      float acc = t.acc0[idx];
      for (int c = 0; c < nk; ++c) {
        const float ds = t.dss[r * kTileK + c], x = t.ks[c * D + d];
        acc += ds * x;
      }
      t.acc0[idx] = acc;
    }
  }
  const port::gptr<float> dq = a.dq + (b * a.seq + i0) * q_row + h * D;
  for (int idx = tid; idx < nq * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    const float acc = t.acc0[idx], old = dq[r * q_row + d];
    dq[r * q_row + d] = old + a.scale * acc;
  }
}

size_t delta_bytes(int64_t n_rows) {
  return size_t(n_rows) * sizeof(float);
}

}  // namespace

void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const int32_t* doc_ids, const AttentionShape& s) {
  ref::check_attention_shape(s);
  const ForwardArgs a{out,       lse,          q,          k,       v,        doc_ids,  s.seq, s.seq, 0,
                      s.n_heads, s.n_kv_heads, s.head_dim, s.scale, s.window, s.softcap};
  launch_forward("attention_forward", a, s.batch);
}

void attention_backward(float* dq, float* dk, float* dv, const float* d_out, const float* q, const float* k,
                        const float* v, const float* out, const float* lse, const int32_t* doc_ids,
                        const AttentionShape& s) {
  ref::check_attention_shape(s);
  const int64_t n_rows = int64_t(s.batch) * s.seq * s.n_heads;
  if (n_rows == 0) return;
  const int64_t n_qt = (int64_t(s.seq) + kTileQ - 1) / kTileQ, n_kt = (int64_t(s.seq) + kTileK - 1) / kTileK;
  const int64_t dq_blocks = int64_t(s.batch) * s.n_heads * n_qt,
                dkdv_blocks = int64_t(s.batch) * s.n_kv_heads * n_kt;
  TF_CHECK(dq_blocks <= kMaxBlocks && (n_rows + kThreads - 1) / kThreads <= kMaxBlocks,
           "attention_backward: ", n_rows, " (token, head) rows are more than one launch may have");
  const size_t smem = backward_smem_bytes(s.head_dim);
  check_smem(smem, s.head_dim);

  auto* delta = static_cast<float*>(rt::scratch(kScratchDelta, delta_bytes(n_rows)));
  port::launch(
      attention_delta_kernel,
      port::LaunchConfig{"attention_backward delta", dim3(unsigned((n_rows + kThreads - 1) / kThreads)),
                         dim3(kThreads), 0, stream()},
      delta, d_out, out, n_rows, s.head_dim);
  const BackwardArgs a{
      dq,      dk,    dv,        d_out,        q,          k,       v,        lse,      delta,
      doc_ids, s.seq, s.n_heads, s.n_kv_heads, s.head_dim, s.scale, s.window, s.softcap};
  port::launch(attention_dkdv_kernel,
               port::LaunchConfig{"attention_backward dk dv", dim3(unsigned(dkdv_blocks)), dim3(kThreads),
                                  smem, stream()},
               a);
  port::launch(
      attention_dq_kernel,
      port::LaunchConfig{"attention_backward dq", dim3(unsigned(dq_blocks)), dim3(kThreads), smem, stream()},
      a);
}

void attention_cached_forward(float* out, const float* q, const float* k_cache, const float* v_cache,
                              int64_t n_past, int64_t n_new, int n_heads, int n_kv_heads, int head_dim,
                              float scale, int window, float softcap) {
  ref::check_attention_cached_shape(n_past, n_new, n_heads, n_kv_heads, head_dim, window, softcap);
  const ForwardArgs a{out,    nullptr, q,          k_cache,  v_cache, nullptr, n_new,  n_past + n_new,
                      n_past, n_heads, n_kv_heads, head_dim, scale,   window,  softcap};
  launch_forward("attention_cached_forward", a, 1);
}

void attention_backward_scratch(ScratchNeeds& n, const AttentionShape& s) {
  const int64_t n_rows = int64_t(s.batch) * s.seq * s.n_heads;
  if (n_rows > 0) n.need(kScratchDelta, "attention backward's delta", delta_bytes(n_rows));
}

}  // namespace tf::TF_PORT_BACKEND
