// defines: what the tests that compare two attention implementations share: document ids for packed
// sequences (tf::test::make_doc_ids) and the f32 error bound of one output row (forward_row_bound)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "src/core/rng.h"

namespace tf::test {

enum class Docs { None, Packed, Interleaved };

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

// The bound of one implementation for one query row qi against the rows `keys` of k and v (kv_row
// floats from each other, starting at kbase and vbase).
inline RowBound forward_row_bound(const float* qi, const float* kbase, const float* vbase, int64_t kv_row,
                                  const std::vector<int64_t>& keys, int D, float scale, int key_tile) {
  constexpr double kU = 1.0 / (1 << 24);
  std::vector<double> s(keys.size());
  double max_s = -INFINITY, A = 0;
  for (size_t t = 0; t < keys.size(); ++t) {
    const float* kj = kbase + keys[t] * kv_row;
    double dot = 0, mag = 0;
    for (int d = 0; d < D; ++d) {
      dot += double(qi[d]) * kj[d];
      mag += std::fabs(double(qi[d]) * kj[d]);
    }
    s[t] = scale * dot;
    max_s = std::max(max_s, s[t]);
    A = std::max(A, scale * mag);
  }
  double sum = 0;
  for (const double x : s) sum += std::exp(x - max_s);
  const double n = double(keys.size());
  const double rescales = n / key_tile + 2;
  const double K = 4 * (D + 1) * A + 4 * rescales * (2 * A + 2) + 2 * n + 2;
  RowBound r{std::vector<double>(size_t(D)), 0};
  for (size_t t = 0; t < keys.size(); ++t) {
    const double w = std::exp(s[t] - max_s) / sum;
    const float* vj = vbase + keys[t] * kv_row;
    for (int d = 0; d < D; ++d) r.out[size_t(d)] += w * std::fabs(double(vj[d]));
  }
  for (double& m : r.out) m *= kU * K;
  r.lse = kU * (K + std::fabs(max_s + std::log(sum)));
  return r;
}

}  // namespace tf::test
