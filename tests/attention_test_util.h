// defines: what the tests that compare two attention implementations share: document ids for packed
// sequences (tf::test::make_doc_ids), the f32 error bound of one output row (forward_row_bound), the
// bf16 tensor-core kernels' bounds (flash_forward_bounds, flash_backward_bounds) and the float64
// backward formulas given out and lse (backward_given), attention shapes (make_shape), decoding cases
// over a NaN-padded KV cache (CachedCase, CachedInputs) and the accumulation check of the backwards
// (expect_accumulated)
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <ostream>
#include <set>
#include <string>
#include <vector>

#include "kernels/cpu/ref/attention.h"
#include "kernels/ops.h"
#include "src/core/dtype.h"
#include "src/core/rng.h"
#include "tests/op_test_util.h"

namespace tf::test {

enum class Docs { None, Packed, Interleaved };

// Causal self-attention over `batch` sequences of `seq` tokens, scale 1/sqrt(head_dim).
inline AttentionShape make_shape(int batch, int seq, int heads, int kv_heads, int head_dim) {
  AttentionShape s;
  s.batch = batch;
  s.seq = seq;
  s.n_heads = heads;
  s.n_kv_heads = kv_heads;
  s.head_dim = head_dim;
  s.scale = 1.0f / std::sqrt(float(head_dim));
  return s;
}

// A decoding call: n_new queries after n_past cached rows.
struct CachedCase {
  int64_t n_past, n_new;
  int heads, kv_heads, head_dim;
  int window = 0;  // sliding window, 0 for none
};
inline std::string cached_name(const CachedCase& c) {
  return "past" + std::to_string(c.n_past) + "_new" + std::to_string(c.n_new) + "_h" +
         std::to_string(c.heads) + "_kv" + std::to_string(c.kv_heads) + "_d" + std::to_string(c.head_dim) +
         (c.window > 0 ? "_w" + std::to_string(c.window) : "");
}
inline void PrintTo(const CachedCase& c, std::ostream* os) {
  *os << cached_name(c);
}

// Cache rows past the valid ones hold NaN, so a kernel reading one turns its output into NaN.
constexpr int64_t kSpareCacheRows = 3;

// q and k in [-2, 2) make scores of a few units after scaling, so softmax rows are far from
// uniform and a wrong mask or a lost rescale shows.
struct CachedInputs {
  CachedCase c;
  float scale;
  std::vector<float> q, k_cache, v_cache;
  CachedInputs(const CachedCase& cs, uint64_t seed) : c(cs), scale(1.0f / std::sqrt(float(cs.head_dim))) {
    const int64_t valid = c.n_past + c.n_new, kv_row = int64_t(c.kv_heads) * c.head_dim;
    q = random_floats(out_size(), seed, 2.0f);
    k_cache = random_floats(size_t(valid * kv_row), seed + 1, 2.0f);
    v_cache = random_floats(size_t(valid * kv_row), seed + 2);
    k_cache.resize(size_t((valid + kSpareCacheRows) * kv_row), std::numeric_limits<float>::quiet_NaN());
    v_cache.resize(k_cache.size(), std::numeric_limits<float>::quiet_NaN());
  }
  size_t out_size() const { return size_t(c.n_new) * size_t(c.heads) * size_t(c.head_dim); }
};

// A backward that adds into nonzero starting gradients gives start + its gradient from zero, within
// the one rounding of that addition (and one more where it is fused with the scaling): 2^-23 of
// |start| + |gradient|.
inline void expect_accumulated(const char* what, const std::vector<float>& sum,
                               const std::vector<float>& from, const std::vector<float>& grad) {
  for (size_t i = 0; i < sum.size(); ++i) {
    ASSERT_NEAR(sum[i], from[i] + grad[i], 1.2e-7 * (std::fabs(from[i]) + std::fabs(grad[i])))
        << what << "[" << i << "]";
  }
}

// Document ids of `batch` sequences of `seq` tokens (empty for None). Packed: increasing ids with
// documents starting at random positions (about three per sequence) and always one starting
// mid-sequence (mid-tile for most lengths). Interleaved: ids i % 3, so no tile holds a single
// document and every tile needs the per-element mask.
inline std::vector<int32_t> make_doc_ids(int batch, int seq, Docs docs, uint64_t seed) {
  if (docs == Docs::None) return {};
  std::vector<int32_t> ids(size_t(batch) * size_t(seq));
  const Philox rng(seed, 0xd0c);
  for (int b = 0; b < batch; ++b) {
    int32_t id = 10 * b;
    for (int i = 0; i < seq; ++i) {
      const size_t t = size_t(b) * size_t(seq) + size_t(i);
      if (docs == Docs::Interleaved) {
        ids[t] = i % 3;
        continue;
      }
      if (i > 0 && (i == seq / 2 + b || rng.uniform(t) < 3.0f / float(seq))) ++id;
      ids[t] = id;
    }
  }
  return ids;
}

// Per-element bounds on how far one f32 implementation of attention's forward may be from the exact
// result of the same formulas, to first order in u = 2^-24. For a query row with n allowed keys j,
// scores s_j = scale q.k_j and A_j = scale sum_d |q_d k_jd| (D = head_dim):
// - a score is a D-term dot product and a scaling: |error| <= (D + 1) u A_j;
// - online softmax: exp(s_j - max) rounds its argument (u |s_j - max| <= 2 u A) and its result,
//   and each of the at most R rescales by exp(old max - new max) does the same (R = n / key_tile + 2
//   for tiles of key_tile keys; key_tile 1 covers any tiling), so each normalized weight w_j is off
//   by a relative eps <= u ((D + 1) A + R (2 A + 2)) plus the same again for the score that sets
//   the max, with A = max_j A_j;
// - out_d = sum_j w_j v_jd: perturbing the weights by relative eps moves it by at most
//   2 eps sum_j w_j |v_jd| (the normalization's share included), and the n-term sums of the
//   numerator and of the denominator add 2 (n + 1) u sum_j w_j |v_jd|.
// So |error of out_d| <= u K M_d with M_d = sum_j w_j |v_jd| and K = 4 (D + 1) A + 4 R (2 A + 2) +
// 2 n + 2; lse = max + log(sum) is off by at most u (K + |lse|).
struct RowBound {
  std::vector<double> out;  // per element of the row
  double lse;
};

// sum_j w_j |v_jd| for each d, A and the log-sum-exp of the scaled scores, of one row qi against the
// rows `keys` of k and v (kv_row floats from each other, starting at kbase and vbase).
struct RowMagnitudes {
  std::vector<double> m;
  double a, lse;
};
inline RowMagnitudes row_magnitudes(const float* qi, const float* kbase, const float* vbase, int64_t kv_row,
                                    const std::vector<int64_t>& keys, int D, float scale) {
  std::vector<double> s(keys.size());
  double max_s = -INFINITY, a = 0;
  for (size_t t = 0; t < keys.size(); ++t) {
    const float* kj = kbase + keys[t] * kv_row;
    double dot = 0, mag = 0;
    for (int d = 0; d < D; ++d) {
      dot += double(qi[d]) * kj[d];
      mag += std::fabs(double(qi[d]) * kj[d]);
    }
    s[t] = scale * dot;
    max_s = std::max(max_s, s[t]);
    a = std::max(a, scale * mag);
  }
  double sum = 0;
  for (const double x : s) sum += std::exp(x - max_s);
  RowMagnitudes r{std::vector<double>(size_t(D)), a, max_s + std::log(sum)};
  for (size_t t = 0; t < keys.size(); ++t) {
    const double w = std::exp(s[t] - max_s) / sum;
    const float* vj = vbase + keys[t] * kv_row;
    for (int d = 0; d < D; ++d) r.m[size_t(d)] += w * std::fabs(double(vj[d]));
  }
  return r;
}

// The bound of one implementation for that row.
inline RowBound forward_row_bound(const float* qi, const float* kbase, const float* vbase, int64_t kv_row,
                                  const std::vector<int64_t>& keys, int D, float scale, int key_tile) {
  constexpr double kU = 1.0 / (1 << 24);
  const RowMagnitudes m = row_magnitudes(qi, kbase, vbase, kv_row, keys, D, scale);
  const double n = double(keys.size());
  const double rescales = n / key_tile + 2;
  const double K = 4 * (D + 1) * m.a + 4 * rescales * (2 * m.a + 2) + 2 * n + 2;
  RowBound r{m.m, kU * (K + std::fabs(m.lse))};
  for (double& x : r.out) x *= kU * K;
  return r;
}

struct ForwardBounds {
  std::vector<double> out, lse;
};

// The bounds of one implementation's out and lse for every row, with key tiles of key_tile keys.
inline ForwardBounds forward_bounds(const AttentionShape& s, const std::vector<float>& q,
                                    const std::vector<float>& k, const std::vector<float>& v,
                                    const std::vector<int32_t>& docs, int key_tile) {
  const int64_t H = s.n_heads, KV = s.n_kv_heads, D = s.head_dim, S = s.seq, group = H / KV;
  ForwardBounds fb{std::vector<double>(q.size()), std::vector<double>(q.size() / size_t(s.head_dim))};
  for (int64_t b = 0; b < s.batch; ++b) {
    const int32_t* doc = docs.empty() ? nullptr : docs.data() + b * S;
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < S; ++i) {
        std::vector<int64_t> keys;
        for (int64_t j = 0; j <= i; ++j)
          if (ref::attention_allowed(doc, i, j, s.window)) keys.push_back(j);
        const int64_t row = (b * S + i) * H + h;
        const RowBound r = forward_row_bound(q.data() + row * D, k.data() + (b * S * KV + h / group) * D,
                                             v.data() + (b * S * KV + h / group) * D, KV * D, keys, int(D),
                                             s.scale, key_tile);
        std::copy(r.out.begin(), r.out.end(), fb.out.begin() + row * D);
        fb.lse[size_t(row)] = r.lse;
      }
    }
  }
  return fb;
}

// The backward, given out and lse (the same f32 values for both implementations): with
// p = exp(s - lse), dP = dO.v, delta = dO.out, B = sum |dO v|, C = sum |dO out| and
// dS = p (dP - delta), p is off by a relative u e, e = (D + 1) A_j + |s| + |lse| + 1 (score,
// subtraction, exp), dP and delta by D u B and D u C, so |error of dS| <= u G with
// G = p ((e + 3) |dP - delta| + D (B + C)). dq_d = scale sum_j dS_j k_jd over n terms is off by
// u scale sum_j (G_j + (n + 2) |dS_j|) |k_jd|; dk and dv likewise over the N (head, query) terms
// that reach key j: u scale sum (G + (N + 2) |dS|) |q_d| and u sum p (e + N + 2) |dO_d|.
struct GradBounds {
  std::vector<double> dq, dk, dv;
};

// The bounds of one implementation's dq, dk and dv, given the same out and lse.
inline GradBounds backward_bounds(const AttentionShape& s, const std::vector<float>& q,
                                  const std::vector<float>& k, const std::vector<float>& v,
                                  const std::vector<float>& d_out, const std::vector<float>& out,
                                  const std::vector<float>& lse_saved, const std::vector<int32_t>& docs) {
  constexpr double kU = 1.0 / (1 << 24);
  const int64_t H = s.n_heads, KV = s.n_kv_heads, D = s.head_dim, S = s.seq, group = H / KV;
  const double scale = s.scale;
  GradBounds gb{std::vector<double>(q.size()), std::vector<double>(k.size()), std::vector<double>(k.size())};
  // dk and dv: the sums of G |q| and |dS| |q| (of p e |dO| and p |dO|), and the count of terms.
  std::vector<double> dk_g(k.size()), dk_s(k.size()), dv_e(k.size()), dv_p(k.size());
  std::vector<double> n_terms(k.size() / size_t(s.head_dim));
  for (int64_t b = 0; b < s.batch; ++b) {
    const int32_t* doc = docs.empty() ? nullptr : docs.data() + b * S;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / group;
      for (int64_t i = 0; i < S; ++i) {
        const int64_t row = (b * S + i) * H + h;
        const float *qi = q.data() + row * D, *doi = d_out.data() + row * D, *oi = out.data() + row * D;
        const double lse = lse_saved[size_t(row)];
        double delta = 0, C = 0;
        for (int64_t d = 0; d < D; ++d) {
          delta += double(doi[d]) * oi[d];
          C += std::fabs(double(doi[d]) * oi[d]);
        }
        struct Term {
          int64_t kv;  // (token, kv head) row of k and v
          double p, e, ds, G;
        };
        std::vector<Term> terms;
        for (int64_t j = 0; j <= i; ++j) {
          if (!ref::attention_allowed(doc, i, j, s.window)) continue;
          const int64_t kv = (b * S + j) * KV + g;
          const float *kj = k.data() + kv * D, *vj = v.data() + kv * D;
          double qk = 0, A = 0, dp = 0, B = 0;
          for (int64_t d = 0; d < D; ++d) {
            qk += double(qi[d]) * kj[d];
            A += std::fabs(double(qi[d]) * kj[d]);
            dp += double(doi[d]) * vj[d];
            B += std::fabs(double(doi[d]) * vj[d]);
          }
          const double sc = scale * qk, p = std::exp(sc - lse);
          const double e = double(D + 1) * scale * A + std::fabs(sc) + std::fabs(lse) + 1;
          const double G = p * ((e + 3) * std::fabs(dp - delta) + double(D) * (B + C));
          terms.push_back({kv, p, e, p * (dp - delta), G});
        }
        const double n = double(terms.size());
        for (const Term& t : terms) {
          const float* kj = k.data() + t.kv * D;
          for (int64_t d = 0; d < D; ++d) {
            gb.dq[size_t(row * D + d)] += kU * scale * (t.G + (n + 2) * std::fabs(t.ds)) * std::fabs(kj[d]);
            const size_t at = size_t(t.kv * D + d);
            dk_g[at] += scale * t.G * std::fabs(qi[d]);
            dk_s[at] += scale * std::fabs(t.ds * qi[d]);
            dv_e[at] += t.p * t.e * std::fabs(doi[d]);
            dv_p[at] += t.p * std::fabs(doi[d]);
          }
          n_terms[size_t(t.kv)] += 1;
        }
      }
    }
  }
  for (size_t at = 0; at < k.size(); ++at) {
    const double N = n_terms[at / size_t(D)];
    gb.dk[at] = kU * (dk_g[at] + (N + 2) * dk_s[at]);
    gb.dv[at] = kU * (dv_e[at] + (N + 2) * dv_p[at]);
  }
  return gb;
}

// The backward's formulas in float64 given out and lse (p = exp(scale q.k - lse), dP = dO.v,
// delta = dO.out, dS = p (dP - delta)), on inputs in double: what an implementation that is handed
// out and lse computes, without rounding. The gradients are returned, not accumulated.
inline GradBounds backward_given(const AttentionShape& s, const std::vector<double>& q,
                                 const std::vector<double>& k, const std::vector<double>& v,
                                 const std::vector<double>& d_out, const std::vector<float>& out,
                                 const std::vector<float>& lse, const std::vector<int32_t>& docs) {
  const int64_t H = s.n_heads, KV = s.n_kv_heads, D = s.head_dim, S = s.seq, group = H / KV;
  const double scale = s.scale;
  GradBounds g{std::vector<double>(q.size()), std::vector<double>(k.size()), std::vector<double>(k.size())};
  for (int64_t b = 0; b < s.batch; ++b) {
    const int32_t* doc = docs.empty() ? nullptr : docs.data() + b * S;
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < S; ++i) {
        const int64_t row = (b * S + i) * H + h;
        const double *qi = q.data() + row * D, *doi = d_out.data() + row * D;
        double delta = 0;
        for (int64_t d = 0; d < D; ++d) delta += doi[d] * double(out[size_t(row * D + d)]);
        for (int64_t j = 0; j <= i; ++j) {
          if (!ref::attention_allowed(doc, i, j, s.window)) continue;
          const int64_t kv = (b * S + j) * KV + h / group;
          const double *kj = k.data() + kv * D, *vj = v.data() + kv * D;
          double qk = 0, dp = 0;
          for (int64_t d = 0; d < D; ++d) {
            qk += qi[d] * kj[d];
            dp += doi[d] * vj[d];
          }
          const double p = std::exp(scale * qk - double(lse[size_t(row)])), ds = p * (dp - delta);
          for (int64_t d = 0; d < D; ++d) {
            g.dq[size_t(row * D + d)] += scale * ds * kj[d];
            g.dk[size_t(kv * D + d)] += scale * ds * qi[d];
            g.dv[size_t(kv * D + d)] += p * doi[d];
          }
        }
      }
    }
  }
  return g;
}

// The bounds of the flash backward (kernels/cuda/flash_attention_bwd.cu) against the exact
// gradient of its bf16 inputs qr, kr, vr, dor given the saved out and lse, to first order in
// u = 2^-24 and u_b = 2^-8. For a (head, query i, key j) term with exact s = scale q.k,
// A = scale sum_d |q_d k_d|, p = exp(s - lse), dP = dO.v, B = sum |dO_d v_d|, delta = dO.out,
// C = sum |dO_d out_d|, dS = p (dP - delta), and D the head dim:
// - the score's mma sums D exact bf16 products in f32 (D u A / scale before scaling); the kernel
//   computes p as exp2(raw * scale log2 e - lse log2 e), which rounds the product, the constant,
//   the saved lse, lse log2 e and the difference, and exp2f is good to 2 ulp (4 u): p is off by a
//   relative u e with e = (D + 1) A + 3 |s| + 3 |lse| + 4;
// - dP's mma is off by D u B, delta's f32 sum (of bf16 dO and the rounded out) by (D + 1) u C, and
//   forming dS rounds twice more, so dS is off by u G, G = (e + 2) |dS| + p (D B + (D + 1) C);
// - P and dS are rounded to bf16 for their mma: u_b p and u_b |dS| more;
// - the mma products of bf16 are exact; an output summing n terms in f32 (n keys for dq, N
//   (head, query) terms for dk and dv) and adding the total into the gradient rounds n + 2 times.
// So |dq_id error| <= scale sum_j ((u_b + (n + 2) u) |dS| + u G) |k_jd|,
//    |dk_jd error| <= scale sum ((u_b + (N + 2) u) |dS| + u G) |q_id|,
//    |dv_jd error| <= sum (u_b + u (e + N + 2)) p |dO_id|.
// Second-order terms (u_b u G and the like) are below 2^-20 of the first-order ones. Scores of a
// few units keep every p far above f32's subnormals, so no absolute error term is needed.
inline GradBounds flash_backward_bounds(const AttentionShape& s, const std::vector<double>& qr,
                                        const std::vector<double>& kr, const std::vector<double>& vr,
                                        const std::vector<double>& dor, const std::vector<float>& out,
                                        const std::vector<float>& lse_saved,
                                        const std::vector<int32_t>& docs) {
  constexpr double kU = 1.0 / (1 << 24), kUb = 1.0 / (1 << 8);
  const int64_t H = s.n_heads, KV = s.n_kv_heads, D = s.head_dim, S = s.seq, group = H / KV;
  const double scale = s.scale;
  GradBounds bd{std::vector<double>(qr.size()), std::vector<double>(kr.size()),
                std::vector<double>(kr.size())};
  // Per key row and element: dk's sums of (u_b |dS| + u G) |q| and of |dS| |q|, dv's of
  // (u_b + u e) p |dO| and of p |dO|; the count of terms per key row.
  std::vector<double> dk_a(kr.size()), dk_s(kr.size()), dv_a(kr.size()), dv_p(kr.size());
  std::vector<double> n_terms(kr.size() / size_t(D));
  struct Term {
    int64_t kv;
    double p, e, ds, G;
  };
  std::vector<Term> terms;
  for (int64_t b = 0; b < s.batch; ++b) {
    const int32_t* doc = docs.empty() ? nullptr : docs.data() + b * S;
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < S; ++i) {
        const int64_t row = (b * S + i) * H + h;
        const double* qi = qr.data() + row * D;
        const double* doi = dor.data() + row * D;
        const float* oi = out.data() + row * D;
        const double lse = lse_saved[size_t(row)];
        double delta = 0, C = 0;
        for (int64_t d = 0; d < D; ++d) {
          delta += doi[d] * oi[d];
          C += std::fabs(doi[d] * oi[d]);
        }
        terms.clear();
        for (int64_t j = 0; j <= i; ++j) {
          if (!ref::attention_allowed(doc, i, j, s.window)) continue;
          const int64_t kv = (b * S + j) * KV + h / group;
          const double *kj = kr.data() + kv * D, *vj = vr.data() + kv * D;
          double qk = 0, A = 0, dp = 0, B = 0;
          for (int64_t d = 0; d < D; ++d) {
            qk += qi[d] * kj[d];
            A += std::fabs(qi[d] * kj[d]);
            dp += doi[d] * vj[d];
            B += std::fabs(doi[d] * vj[d]);
          }
          const double sc = scale * qk, p = std::exp(sc - lse), ds = p * (dp - delta);
          const double e = double(D + 1) * scale * A + 3 * std::fabs(sc) + 3 * std::fabs(lse) + 4;
          const double G = (e + 2) * std::fabs(ds) + p * (double(D) * B + double(D + 1) * C);
          terms.push_back({kv, p, e, ds, G});
        }
        const double n = double(terms.size());
        for (const Term& t : terms) {
          const double* kj = kr.data() + t.kv * D;
          for (int64_t d = 0; d < D; ++d) {
            bd.dq[size_t(row * D + d)] +=
                scale * ((kUb + (n + 2) * kU) * std::fabs(t.ds) + kU * t.G) * std::fabs(kj[d]);
            const size_t at = size_t(t.kv * D + d);
            dk_a[at] += (kUb * std::fabs(t.ds) + kU * t.G) * std::fabs(qi[d]);
            dk_s[at] += std::fabs(t.ds * qi[d]);
            dv_a[at] += (kUb + kU * t.e) * t.p * std::fabs(doi[d]);
            dv_p[at] += t.p * std::fabs(doi[d]);
          }
          n_terms[size_t(t.kv)] += 1;
        }
      }
    }
  }
  for (size_t at = 0; at < kr.size(); ++at) {
    const double N = n_terms[at / size_t(D)];
    bd.dk[at] = scale * (dk_a[at] + (N + 2) * kU * dk_s[at]);
    bd.dv[at] = dv_a[at] + (N + 2) * kU * dv_p[at];
  }
  return bd;
}

// The bounds of the flash forward (kernels/cuda/flash_attention_fwd.cu: q, k, v rounded to bf16
// for the tensor cores, P rounded to bf16 before P V, f32 sums and softmax). For one query row
// with allowed keys j, weights w_j = softmax of the scores and M_d = sum_j w_j |v_jd|:
// - Against the exact result on the bf16-rounded q, k, v (what the tensor cores multiply): the
//   products of bf16 values are exact in f32 and the sums f32, so the kernel is an f32 attention
//   (forward_row_bound) except that P is rounded to bf16 before P V while the row sum keeps f32 P:
//   that moves out_d by at most 2^-8 sum_j w_j |v_jd| = 2^-8 M_d and leaves lse alone. A naive
//   kernel of the same precisions would be within 2^-8 M_d + the f32 bound; the bound is twice
//   that, for the tensor cores' accumulation (which need not round to nearest) and exp2f's 2 ulp.
//   The online softmax rescales only on key tiles that hold an allowed key of the row (elsewhere
//   the factor is exp2(0) = 1 and the weights 0, exactly), which sets R of the f32 bound.
// - Against an f32 implementation on the f32 inputs: add the inputs' rounding and that
//   implementation's own f32 bound (for any tiling, key tile 1). Rounding q and k to bf16 moves
//   each score by at most Delta = (2^-7 + 2^-16) A with A = max_j scale sum_d |q_d k_jd|, so each
//   weight by a factor in [e^-2Delta, e^2Delta]: out_d moves by at most (e^2Delta - 1) M_d,
//   rounding v adds 2^-8 e^2Delta M_d, and lse moves by at most Delta.
struct FlashRowBound {
  std::vector<double> out_exact, out_vs_f32;  // per element of the row
  double lse_exact, lse_vs_f32;
};

// The bounds of one row for a flash kernel of key_tile keys per tile: q, k, v the f32 inputs and
// qr, kr, vr their bf16 roundings, at the same offsets.
inline FlashRowBound flash_forward_row_bound(const float* q, const float* qr, const float* k, const float* kr,
                                             const float* v, const float* vr, int64_t kv_row,
                                             const std::vector<int64_t>& keys, int D, float scale,
                                             int key_tile) {
  constexpr double kBf16U = 1.0 / 256;  // unit roundoff of bf16 (8 significant bits)
  std::set<int64_t> tiles;
  for (const int64_t j : keys) tiles.insert(j / key_tile);
  // n / tile + 2 rescales must cover the tiles that hold one of the row's n keys.
  const int tile = std::max<int>(1, int(keys.size() / std::max<size_t>(1, tiles.size())));
  const RowBound f32r = forward_row_bound(qr, kr, vr, kv_row, keys, D, scale, tile);
  const RowMagnitudes mr = row_magnitudes(qr, kr, vr, kv_row, keys, D, scale);
  const RowBound f32 = forward_row_bound(q, k, v, kv_row, keys, D, scale, 1);
  const RowMagnitudes m = row_magnitudes(q, k, v, kv_row, keys, D, scale);
  const double delta = (1.0 / 128 + 1.0 / 65536) * m.a, grow = std::exp(2 * delta);
  FlashRowBound b{std::vector<double>(size_t(D)), std::vector<double>(size_t(D)), 2 * f32r.lse, 0};
  for (size_t d = 0; d < size_t(D); ++d) {
    b.out_exact[d] = 2 * (kBf16U * mr.m[d] + f32r.out[d]);
    b.out_vs_f32[d] = b.out_exact[d] + (grow - 1 + kBf16U * grow) * m.m[d] + f32.out[d];
  }
  b.lse_vs_f32 = b.lse_exact + delta + f32.lse;
  return b;
}

inline std::vector<float> bf16_rounded(const std::vector<float>& x) {
  std::vector<float> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = bf16_to_f32(f32_to_bf16(x[i]));
  return r;
}

// The flash forward's bounds for every row of attention_forward's inputs: against the exact result
// on the bf16-rounded inputs, and against an f32 implementation on the inputs themselves.
struct FlashBounds {
  ForwardBounds exact, vs_f32;
};
inline FlashBounds flash_forward_bounds(const AttentionShape& s, const std::vector<float>& q,
                                        const std::vector<float>& k, const std::vector<float>& v,
                                        const std::vector<int32_t>& docs, int key_tile) {
  const std::vector<float> qr = bf16_rounded(q), kr = bf16_rounded(k), vr = bf16_rounded(v);
  const int64_t H = s.n_heads, KV = s.n_kv_heads, D = s.head_dim, S = s.seq, group = H / KV;
  const size_t n_rows = q.size() / size_t(D);
  FlashBounds fb{{std::vector<double>(q.size()), std::vector<double>(n_rows)},
                 {std::vector<double>(q.size()), std::vector<double>(n_rows)}};
  for (int64_t b = 0; b < s.batch; ++b) {
    const int32_t* doc = docs.empty() ? nullptr : docs.data() + b * S;
    for (int64_t i = 0; i < S; ++i) {
      std::vector<int64_t> keys;
      for (int64_t j = 0; j <= i; ++j)
        if (ref::attention_allowed(doc, i, j, s.window)) keys.push_back(j);
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row = (b * S + i) * H + h, kv0 = (b * S * KV + h / group) * D;
        const FlashRowBound r =
            flash_forward_row_bound(q.data() + row * D, qr.data() + row * D, k.data() + kv0, kr.data() + kv0,
                                    v.data() + kv0, vr.data() + kv0, KV * D, keys, int(D), s.scale, key_tile);
        std::copy(r.out_exact.begin(), r.out_exact.end(), fb.exact.out.begin() + row * D);
        std::copy(r.out_vs_f32.begin(), r.out_vs_f32.end(), fb.vs_f32.out.begin() + row * D);
        fb.exact.lse[size_t(row)] = r.lse_exact;
        fb.vs_f32.lse[size_t(row)] = r.lse_vs_f32;
      }
    }
  }
  return fb;
}

}  // namespace tf::test
