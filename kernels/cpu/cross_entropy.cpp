// defines: tf::cpu::lm_head_cross_entropy (chunks of rows: logits via tf::cpu::matmul, stable
// log-softmax, d_h through a second matmul; the [n_tokens, vocab] logits never exist)
#include "kernels/cpu/ref/cross_entropy.h"

#include <algorithm>
#include <cmath>

#include "kernels/ops.h"
#include "src/core/alloc.h"

namespace tf::cpu {
namespace {
// Rows of logits formed at once. [kChunkRows, vocab] f32 is the loss's whole working set (32 MiB
// for a 128k vocabulary); 64 rows keep both GEMMs of a chunk efficient, and the widening of a
// bf16 W, paid twice per chunk, costs about one element per 128 multiply-adds.
constexpr int64_t kChunkRows = 64;
}  // namespace

double lm_head_cross_entropy(float* d_h, int64_t* n_valid, const float* h, WeightRef W,
                             const int32_t* targets, int64_t n_tokens, float grad_scale) {
  const int64_t vocab = W.rows;
  const int64_t dim = W.cols;
  ref::check_targets(targets, n_tokens, vocab);
  const int64_t chunk = std::min(n_tokens, kChunkRows);
  // Kept per calling thread across calls: the training step runs this once per micro-batch.
  thread_local Buffer logits_buffer;
  auto* logits = static_cast<float*>(grow_scratch(logits_buffer, size_t(chunk * vocab) * sizeof(float)));
  const MatOperand w_transposed{W.data, W.dtype, dim, true};
  const MatOperand w{W.data, W.dtype, dim, false};
  double loss = 0;
  int64_t count = 0;
  for (int64_t r0 = 0; r0 < n_tokens; r0 += kChunkRows) {
    const int64_t rows = std::min(kChunkRows, n_tokens - r0);
    const int32_t* t = targets + r0;
    if (std::all_of(t, t + rows, [](int32_t x) { return x == kIgnoreIndex; })) continue;
    matmul(logits, vocab, MatOperand{h + r0 * dim, DType::F32, dim, false}, w_transposed, rows, vocab, dim,
           1.0f, 0.0f);
    // Each row's loss goes to its own slot and the slots are added in row order below: an OpenMP
    // reduction would combine per-thread partials whose extent depends on the thread count, in the
    // order the threads finish. So the loss is the same for any thread count, given the logits.
    double row_loss[kChunkRows];
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      float* row = logits + i * vocab;
      if (t[i] == kIgnoreIndex) {
        // A zero row of dlogits makes the d_h matmul add nothing for this row.
        if (d_h) std::fill(row, row + vocab, 0.0f);
        continue;
      }
      const float target_logit = row[t[i]];
      const float mx = *std::max_element(row, row + vocab);
      double sum = 0;
      for (int64_t v = 0; v < vocab; ++v) {
        row[v] = std::exp(row[v] - mx);
        sum += row[v];
      }
      row_loss[i] = double(mx) + std::log(sum) - double(target_logit);
      if (d_h) {
        const float scale = float(double(grad_scale) / sum);
        for (int64_t v = 0; v < vocab; ++v) row[v] *= scale;
        row[t[i]] -= grad_scale;
      }
    }
    for (int64_t i = 0; i < rows; ++i) {
      if (t[i] == kIgnoreIndex) continue;
      loss += row_loss[i];
      ++count;
    }
    if (d_h)
      matmul(d_h + r0 * dim, dim, MatOperand{logits, DType::F32, vocab, false}, w, rows, dim, vocab, 1.0f,
             1.0f);
  }
  *n_valid = count;
  return loss;
}

}  // namespace tf::cpu
