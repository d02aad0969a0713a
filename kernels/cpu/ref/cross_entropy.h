// defines: tf::ref::lm_head_cross_entropy_loops (plain loops over any scalar type, so tests can run
// it in double), tf::ref::check_targets (the target validation shared with the fast version)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/ops.h"
#include "src/core/error.h"

namespace tf::ref {

// Every target is kIgnoreIndex or a row of the vocabulary; anything else would index outside the
// logits, so it is reported with its row before any output is touched.
inline void check_targets(const int32_t* targets, int64_t n_tokens, int64_t vocab) {
  for (int64_t i = 0; i < n_tokens; ++i) {
    const int32_t t = targets[i];
    TF_CHECK(t == kIgnoreIndex || (t >= 0 && t < vocab), "lm_head_cross_entropy: target ", t, " at row ", i,
             " is outside [0, ", vocab, ") and is not the ignore index ", kIgnoreIndex);
  }
}

// A logit cap is c > 0, or 0 for none.
inline void check_logit_softcap(double softcap) {
  TF_CHECK(softcap >= 0 && std::isfinite(softcap),
           "lm_head_cross_entropy: softcap must be non-negative (0: none), got ", softcap);
}

// Returns sum over rows with a valid target of lse(logits) - logits[target], logits = h W^T with
// w(v, d) = W[v, d], soft-capped to c tanh(logits / c) under a cap c > 0; d_h += grad_scale *
// (softmax(logits) - onehot(target)) diag(1 - tanh^2(h W^T / c)) W (no diag without a cap). All
// arithmetic is in double, one row of logits at a time.
template <typename T, typename ReadW>
double lm_head_cross_entropy_loops(T* d_h, int64_t* n_valid, const T* h, const ReadW& w, int64_t vocab,
                                   int64_t dim, const int32_t* targets, int64_t n_tokens, double grad_scale,
                                   double softcap = 0) {
  check_targets(targets, n_tokens, vocab);
  check_logit_softcap(softcap);
  std::vector<double> logits(static_cast<size_t>(vocab)), grad_row(static_cast<size_t>(dim));
  double loss = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < n_tokens; ++i) {
    const int32_t t = targets[i];
    if (t == kIgnoreIndex) continue;
    const T* hi = h + i * dim;
    for (int64_t v = 0; v < vocab; ++v) {
      double acc = 0;
      for (int64_t d = 0; d < dim; ++d) acc += double(hi[d]) * double(w(v, d));
      logits[size_t(v)] = softcap > 0 ? softcap * std::tanh(acc / softcap) : acc;
    }
    const double mx = *std::max_element(logits.begin(), logits.end());
    double sum = 0;
    for (double l : logits) sum += std::exp(l - mx);
    const double lse = mx + std::log(sum);
    loss += lse - logits[size_t(t)];
    ++count;
    if (!d_h) continue;
    std::fill(grad_row.begin(), grad_row.end(), 0.0);
    for (int64_t v = 0; v < vocab; ++v) {
      const double th = softcap > 0 ? logits[size_t(v)] / softcap : 0.0;
      const double g =
          grad_scale * (std::exp(logits[size_t(v)] - lse) - (v == t ? 1.0 : 0.0)) * (1 - th * th);
      for (int64_t d = 0; d < dim; ++d) grad_row[size_t(d)] += g * double(w(v, d));
    }
    for (int64_t d = 0; d < dim; ++d) d_h[i * dim + d] = T(double(d_h[i * dim + d]) + grad_row[size_t(d)]);
  }
  *n_valid = count;
  return loss;
}

}  // namespace tf::ref
