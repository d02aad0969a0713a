// defines: tf::ref::attention_forward<T>, tf::ref::attention_backward<T>,
// tf::ref::attention_cached_forward<T>: causal GQA attention, with an optional sliding window and
// logit soft-capping, as plain loops over any scalar type (tests run them in double). One query row
// at a time: its full row of scores, a plain softmax, then the weighted sum.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels/ops.h"
#include "src/core/error.h"

namespace tf::ref {

// The geometry every attention implementation accepts.
inline void check_attention_shape(const AttentionShape& s) {
  TF_CHECK(s.batch >= 0 && s.seq >= 0, "attention batch and seq must be non-negative, got ", s.batch, " and ",
           s.seq);
  TF_CHECK(s.head_dim > 0, "attention head_dim must be positive, got ", s.head_dim);
  TF_CHECK(s.n_heads > 0 && s.n_kv_heads > 0 && s.n_heads % s.n_kv_heads == 0, "attention n_heads (",
           s.n_heads, ") must be a positive multiple of n_kv_heads (", s.n_kv_heads, ")");
  TF_CHECK(s.window >= 0, "attention window must be non-negative (0: none), got ", s.window);
  TF_CHECK(s.softcap >= 0 && std::isfinite(s.softcap),
           "attention softcap must be non-negative (0: none), got ", s.softcap);
}

// A score x soft-capped: c * tanh(x / c), or x when c is 0.
template <typename T>
T softcap_score(T x, float c) {
  return c > 0 ? T(c) * std::tanh(x / T(c)) : x;
}

// The first key position that query position i sees under a sliding window (0 without one).
inline int64_t window_start(int64_t i, int window) {
  return window > 0 ? std::max<int64_t>(0, i - window + 1) : 0;
}

// Whether query position i of a sequence may attend to key position j of the same sequence;
// doc is that sequence's slice of doc_ids (or null), window the sliding window (0: none).
inline bool attention_allowed(const int32_t* doc, int64_t i, int64_t j, int window) {
  return j <= i && j >= window_start(i, window) && (doc == nullptr || doc[j] == doc[i]);
}

// The largest score of a softmax row and the sum of exp(score - max) over the row.
template <typename T>
struct SoftmaxRow {
  T max, sum;
};

// One softmax row: p[j] = exp(softcap(scale * qi . k_j) - max) for each key j <= i that query
// position i may attend to, with k_j = keys + j * key_row; p[j] of other keys is left as it was.
// Every reference computes its rows here.
template <typename T>
SoftmaxRow<T> softmax_numerators(T* p, const T* qi, const T* keys, int64_t key_row, const int32_t* doc,
                                 int64_t i, int window, int64_t D, float scale, float softcap) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j <= i; ++j) {
    if (!attention_allowed(doc, i, j, window)) continue;
    const T* kj = keys + j * key_row;
    T dot = 0;
    for (int64_t d = 0; d < D; ++d) dot += qi[d] * kj[d];
    p[size_t(j)] = softcap_score(T(scale) * dot, softcap);
    m = std::max(m, p[size_t(j)]);
  }
  T sum = 0;
  for (int64_t j = 0; j <= i; ++j) {
    if (!attention_allowed(doc, i, j, window)) continue;
    p[size_t(j)] = std::exp(p[size_t(j)] - m);
    sum += p[size_t(j)];
  }
  return {m, sum};
}

// oi = sum_j p[j] / sum * v_j over the keys j <= i that query position i may attend to, with
// v_j = values + j * value_row.
template <typename T>
void weighted_values(T* oi, const T* p, T sum, const T* values, int64_t value_row, const int32_t* doc,
                     int64_t i, int window, int64_t D) {
  for (int64_t d = 0; d < D; ++d) oi[d] = 0;
  for (int64_t j = 0; j <= i; ++j) {
    if (!attention_allowed(doc, i, j, window)) continue;
    const T* vj = values + j * value_row;
    for (int64_t d = 0; d < D; ++d) oi[d] += p[size_t(j)] / sum * vj[d];
  }
}

template <typename T>
void attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, const int32_t* doc_ids,
                       const AttentionShape& s) {
  check_attention_shape(s);
  const int64_t H = s.n_heads, KV = s.n_kv_heads, D = s.head_dim, S = s.seq;
  const int group = s.n_heads / s.n_kv_heads;
  std::vector<T> p(static_cast<size_t>(S));
  for (int64_t b = 0; b < s.batch; ++b) {
    const int32_t* doc = doc_ids ? doc_ids + b * S : nullptr;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / group;
      for (int64_t i = 0; i < S; ++i) {
        const T* qi = q + ((b * S + i) * H + h) * D;
        const SoftmaxRow<T> row = softmax_numerators(p.data(), qi, k + (b * S * KV + g) * D, KV * D, doc, i,
                                                     s.window, D, s.scale, s.softcap);
        weighted_values(out + ((b * S + i) * H + h) * D, p.data(), row.sum, v + (b * S * KV + g) * D, KV * D,
                        doc, i, s.window, D);
        lse[(b * S + i) * H + h] = row.max + std::log(row.sum);
      }
    }
  }
}

// Recomputes each softmax row from q and k (the saved out and lse are not used, so the reference
// checks the fast version's use of them independently). With P the softmax row, dP_j = dO.v_j and
// dS_j = P_j (dP_j - sum_l P_l dP_l), times the cap's derivative 1 - tanh^2(x_j / c) at the scaled
// score x_j when soft-capped: dq += scale dS k, dk_j += scale dS_j q, dv_j += P_j dO.
template <typename T>
void attention_backward(T* dq, T* dk, T* dv, const T* d_out, const T* q, const T* k, const T* v,
                        const int32_t* doc_ids, const AttentionShape& s) {
  check_attention_shape(s);
  const int64_t H = s.n_heads, KV = s.n_kv_heads, D = s.head_dim, S = s.seq;
  const int group = s.n_heads / s.n_kv_heads;
  std::vector<T> p(static_cast<size_t>(S)), dp(static_cast<size_t>(S));
  for (int64_t b = 0; b < s.batch; ++b) {
    const int32_t* doc = doc_ids ? doc_ids + b * S : nullptr;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / group;
      for (int64_t i = 0; i < S; ++i) {
        const T* qi = q + ((b * S + i) * H + h) * D;
        const T* doi = d_out + ((b * S + i) * H + h) * D;
        const T sum = softmax_numerators(p.data(), qi, k + (b * S * KV + g) * D, KV * D, doc, i, s.window, D,
                                         s.scale, s.softcap)
                          .sum;
        T row_dot = 0;
        for (int64_t j = 0; j <= i; ++j) {
          if (!attention_allowed(doc, i, j, s.window)) continue;
          p[size_t(j)] /= sum;
          const T* vj = v + ((b * S + j) * KV + g) * D;
          T dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += doi[d] * vj[d];
          dp[size_t(j)] = dot;
          row_dot += p[size_t(j)] * dot;
        }
        T* dqi = dq + ((b * S + i) * H + h) * D;
        for (int64_t j = 0; j <= i; ++j) {
          if (!attention_allowed(doc, i, j, s.window)) continue;
          const T* kj = k + ((b * S + j) * KV + g) * D;
          T ds = p[size_t(j)] * (dp[size_t(j)] - row_dot);
          if (s.softcap > 0) {
            T dot = 0;
            for (int64_t d = 0; d < D; ++d) dot += qi[d] * kj[d];
            const T th = std::tanh(T(s.scale) * dot / T(s.softcap));
            ds *= 1 - th * th;
          }
          T* dkj = dk + ((b * S + j) * KV + g) * D;
          T* dvj = dv + ((b * S + j) * KV + g) * D;
          for (int64_t d = 0; d < D; ++d) {
            dqi[d] += T(s.scale) * ds * kj[d];
            dkj[d] += T(s.scale) * ds * qi[d];
            dvj[d] += p[size_t(j)] * doi[d];
          }
        }
      }
    }
  }
}

// The geometry attention_cached_forward accepts.
inline void check_attention_cached_shape(int64_t n_past, int64_t n_new, int n_heads, int n_kv_heads,
                                         int head_dim, int window, float softcap) {
  TF_CHECK(n_past >= 0 && n_new >= 0, "cached attention n_past and n_new must be non-negative, got ", n_past,
           " and ", n_new);
  TF_CHECK(head_dim > 0, "cached attention head_dim must be positive, got ", head_dim);
  TF_CHECK(n_heads > 0 && n_kv_heads > 0 && n_heads % n_kv_heads == 0, "cached attention n_heads (", n_heads,
           ") must be a positive multiple of n_kv_heads (", n_kv_heads, ")");
  TF_CHECK(window >= 0, "cached attention window must be non-negative (0: none), got ", window);
  TF_CHECK(softcap >= 0 && std::isfinite(softcap),
           "cached attention softcap must be non-negative (0: none), got ", softcap);
}

// Query i is attention_forward's row n_past + i, computed by the same helpers with the cache rows as
// that sequence's keys and values: on a cache holding a sequence's k and v the two references
// agree bit for bit, which the tests use to pin the cached indexing to the training op.
template <typename T>
void attention_cached_forward(T* out, const T* q, const T* k_cache, const T* v_cache, int64_t n_past,
                              int64_t n_new, int n_heads, int n_kv_heads, int head_dim, float scale,
                              int window, float softcap = 0.0f) {
  check_attention_cached_shape(n_past, n_new, n_heads, n_kv_heads, head_dim, window, softcap);
  const int64_t H = n_heads, KV = n_kv_heads, D = head_dim;
  const int group = n_heads / n_kv_heads;
  std::vector<T> p(static_cast<size_t>(n_past + n_new));
  for (int64_t h = 0; h < H; ++h) {
    const int64_t g = h / group;
    for (int64_t i = 0; i < n_new; ++i) {
      const int64_t pos = n_past + i;
      const T* qi = q + (i * H + h) * D;
      const T sum =
          softmax_numerators(p.data(), qi, k_cache + g * D, KV * D, nullptr, pos, window, D, scale, softcap)
              .sum;
      weighted_values(out + (i * H + h) * D, p.data(), sum, v_cache + g * D, KV * D, nullptr, pos, window, D);
    }
  }
}

}  // namespace tf::ref
