// defines: tf::cpu::lm_head_cross_entropy (the [n_tokens, vocab] logits never exist: for an f32 /
// bf16 / f16 W, chunks of rows with logits via tf::cpu::matmul, stable log-softmax and d_h through
// a second matmul; for a quantized W, tiles of the vocabulary dequantized once per call each, with
// an online softmax over them, their products in bf16 under bf16 precision; logits soft-capped
// under a cap, with the cap's derivative in d_h)
#include "kernels/cpu/ref/cross_entropy.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cpu/bf16_gemm.h"
#include "kernels/cpu/ref/linear.h"
#include "kernels/ops.h"
#include "src/core/alloc.h"

namespace tf::cpu {
namespace {
// Rows of logits formed at once. [kChunkRows, vocab] f32 is the loss's whole working set (32 MiB
// for a 128k vocabulary); 64 rows keep both GEMMs of a chunk efficient, and the widening of a
// bf16 W, paid twice per chunk, costs about one element per 128 multiply-adds.
constexpr int64_t kChunkRows = 64;

// Row i's loss from its raw logits, and with d_h the row overwritten by its d(loss)/d(raw logits)
// times grad_scale: under a cap c the logits are z = c tanh(raw / c), and d/d(raw) is d/dz times
// 1 - (z / c)^2. So that an uncapped row keeps its bits, the two are separate loops.
double softmax_row(float* row, int64_t vocab, int32_t target, bool grad, float grad_scale, float cap) {
  const float inv = cap > 0 ? 1.0f / cap : 0.0f;
  if (cap > 0)
    for (int64_t v = 0; v < vocab; ++v) row[v] = cap * std::tanh(row[v] * inv);
  const float target_logit = row[target];
  const float mx = *std::max_element(row, row + vocab);
  if (cap > 0) {
    double sum = 0;
    for (int64_t v = 0; v < vocab; ++v) sum += std::exp(row[v] - mx);
    if (grad) {
      const float scale = float(double(grad_scale) / sum);
      for (int64_t v = 0; v < vocab; ++v) {
        const float th = row[v] * inv;
        const float p = std::exp(row[v] - mx) * scale - (v == target ? grad_scale : 0.0f);
        row[v] = p * (1.0f - th * th);
      }
    }
    return double(mx) + std::log(sum) - double(target_logit);
  }
  double sum = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    row[v] = std::exp(row[v] - mx);
    sum += row[v];
  }
  if (grad) {
    const float scale = float(double(grad_scale) / sum);
    for (int64_t v = 0; v < vocab; ++v) row[v] *= scale;
    row[target] -= grad_scale;
  }
  return double(mx) + std::log(sum) - double(target_logit);
}

double dense_cross_entropy(float* d_h, int64_t* n_valid, const float* h, WeightRef W, const int32_t* targets,
                           int64_t n_tokens, float grad_scale, float cap) {
  const int64_t vocab = W.rows;
  const int64_t dim = W.cols;
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
      row_loss[i] = softmax_row(row, vocab, t[i], d_h != nullptr, grad_scale, cap);
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

// A dequantized vocabulary tile holds at most this many f32 (16 MiB, inside the last-level cache;
// larger tiles repack h less often, as in linear.cpp), and at most kMaxVocabTileRows rows, which
// bounds the logits of a token chunk against it.
constexpr int64_t kVocabTileElems = int64_t(1) << 22;
constexpr int64_t kMaxVocabTileRows = 4096;
// Token rows whose logits against one tile are formed at once: [256, <= 4096] f32 is at most 4 MiB,
// and both GEMMs of a chunk stay efficient.
constexpr int64_t kTokenRows = 256;
// A quantized W is dequantized once per call, a vocabulary tile at a time (redoing it per chunk of
// rows, as the dense path widens, would cost a dequantization per 128 multiply-adds). Each row
// keeps a running max m and sum s = sum exp(z - m) over the tiles seen, rescaled when m grows (an
// online softmax), and, for d_h, the unnormalised acc = sum_v exp(z_v - m) W[v] the same way:
// d(loss)/dh = acc / s - W[target] once the last tile is in. Every row's state is updated by one
// thread in tile order and the row losses are added in row order, so, as in the dense path, the
// result is the same for any thread count, given the logits. Under a cap c the tile's logits are
// capped first and each term of acc (and the target's) carries the cap's derivative 1 - (z / c)^2.
// Under bf16 precision the tile is dequantized to bf16, and both products round their f32 operand
// (the chunk's rows of h; its exponentials) to bf16 and sum in f32 on bf16_gemm, as the projections
// do under it; h is rounded once per chunk and tile, or once per call when one chunk holds it.
double quantized_cross_entropy(float* d_h, int64_t* n_valid, const float* h, WeightRef W,
                               const int32_t* targets, int64_t n_tokens, float grad_scale, float cap) {
  const int64_t vocab = W.rows;
  const int64_t dim = W.cols;
  ref::check_linear("lm_head_cross_entropy", h, h, W, n_tokens, true);
  const int64_t count =
      std::count_if(targets, targets + n_tokens, [](int32_t x) { return x != kIgnoreIndex; });
  *n_valid = count;
  if (count == 0) return 0.0;
  TF_CHECK(dim > 0, "lm_head_cross_entropy: the ", vocab, " x 0 ", dtype_name(W.dtype),
           " weight has no columns");
  const int64_t tile_rows = std::min({vocab, kMaxVocabTileRows, std::max<int64_t>(1, kVocabTileElems / dim)});
  const int64_t chunk = std::min(n_tokens, kTokenRows);
  const bool bf16 = matmul_precision() == MatmulPrecision::BF16;
  // Kept per calling thread across calls, like the dense path's logits.
  thread_local Buffer tile_buffer, logits_buffer, acc_buffer, max_buffer, sum_buffer, target_buffer,
      h_bf16_buffer, e_bf16_buffer;
  void* tile_memory =
      grow_scratch(tile_buffer, size_t(tile_rows * dim) * (bf16 ? sizeof(uint16_t) : sizeof(float)));
  auto* tile = static_cast<float*>(tile_memory);
  auto* tile_bf16 = static_cast<uint16_t*>(tile_memory);
  uint16_t* h_bf16 =
      bf16 ? static_cast<uint16_t*>(grow_scratch(h_bf16_buffer, size_t(chunk * dim) * sizeof(uint16_t)))
           : nullptr;
  uint16_t* e_bf16 =
      bf16 && d_h
          ? static_cast<uint16_t*>(grow_scratch(e_bf16_buffer, size_t(chunk * tile_rows) * sizeof(uint16_t)))
          : nullptr;
  // Rounds `rows` contiguous rows of `width` floats to bf16.
  const auto round_rows = [](uint16_t* dst, const float* src, int64_t rows, int64_t width) {
#pragma omp parallel for schedule(static) if (rows * width >= (int64_t(1) << 15))
    for (int64_t i = 0; i < rows; ++i) round_to_bf16(dst + i * width, src + i * width, width);
  };
  bool h_rounded = false;  // one chunk holds every row: rounded once for all the tiles
  auto* logits = static_cast<float*>(grow_scratch(logits_buffer, size_t(chunk * tile_rows) * sizeof(float)));
  auto* run_max = static_cast<float*>(grow_scratch(max_buffer, size_t(n_tokens) * sizeof(float)));
  auto* run_sum = static_cast<double*>(grow_scratch(sum_buffer, size_t(n_tokens) * sizeof(double)));
  auto* target_logit = static_cast<float*>(grow_scratch(target_buffer, size_t(n_tokens) * sizeof(float)));
  float* acc =
      d_h ? static_cast<float*>(grow_scratch(acc_buffer, size_t(n_tokens * dim) * sizeof(float))) : nullptr;
  std::fill(run_max, run_max + n_tokens, -std::numeric_limits<float>::infinity());
  std::fill(run_sum, run_sum + n_tokens, 0.0);
  if (acc) std::fill(acc, acc + n_tokens * dim, 0.0f);
  for (int64_t v0 = 0; v0 < vocab; v0 += tile_rows) {
    const int64_t vn = std::min(tile_rows, vocab - v0);
    if (bf16)
      dequantize_weight_tile_bf16(tile_bf16, dim, W, v0, vn, 0, dim);
    else
      dequantize_weight_tile(tile, dim, W, v0, vn, 0, dim);
    for (int64_t r0 = 0; r0 < n_tokens; r0 += chunk) {
      const int64_t rows = std::min(chunk, n_tokens - r0);
      const int32_t* t = targets + r0;
      if (std::all_of(t, t + rows, [](int32_t x) { return x == kIgnoreIndex; })) continue;
      if (bf16) {
        if (!h_rounded || chunk < n_tokens) round_rows(h_bf16, h + r0 * dim, rows, dim);
        h_rounded = true;
        bf16_gemm(logits, vn, {h_bf16, DType::BF16, dim, false}, {tile_bf16, DType::BF16, dim, true}, rows,
                  vn, dim, 1.0f, 0.0f);
      } else {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(vn), int(dim), 1.0f, h + r0 * dim,
                    int(dim), tile, int(dim), 0.0f, logits, int(vn));
      }
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < rows; ++i) {
        // An ignored row's acc collects whatever its logits make of it and is never read.
        if (t[i] == kIgnoreIndex) continue;
        float* row = logits + i * vn;
        const float inv = cap > 0 ? 1.0f / cap : 0.0f;
        if (cap > 0)
          for (int64_t v = 0; v < vn; ++v) row[v] = cap * std::tanh(row[v] * inv);
        const int64_t g = r0 + i;
        const int64_t local = int64_t(t[i]) - v0;
        const bool has_target = local >= 0 && local < vn;
        if (has_target) target_logit[g] = row[local];
        const float target_slope = has_target ? 1.0f - row[local] * inv * (row[local] * inv) : 1.0f;
        const float mx = *std::max_element(row, row + vn);
        if (mx > run_max[g]) {
          // exp(-inf) = 0 on the first tile, where s and acc are still zero.
          const double rescale = std::exp(double(run_max[g]) - double(mx));
          run_sum[g] *= rescale;
          if (acc) {
            float* a = acc + g * dim;
            for (int64_t d = 0; d < dim; ++d) a[d] *= float(rescale);
          }
          run_max[g] = mx;
        }
        const float m = run_max[g];
        double sum = 0;
        if (cap > 0) {
          for (int64_t v = 0; v < vn; ++v) {
            const float th = row[v] * inv;
            const float e = std::exp(row[v] - m);
            sum += e;
            row[v] = e * (1.0f - th * th);
          }
        } else {
          for (int64_t v = 0; v < vn; ++v) {
            row[v] = std::exp(row[v] - m);
            sum += row[v];
          }
        }
        run_sum[g] += sum;
        if (d_h && has_target) {
          const float step = grad_scale * target_slope;
          float* dh = d_h + g * dim;
          if (bf16) {
            const uint16_t* w_target = tile_bf16 + local * dim;
            for (int64_t d = 0; d < dim; ++d) dh[d] -= step * bf16_to_f32(w_target[d]);
          } else {
            const float* w_target = tile + local * dim;
            for (int64_t d = 0; d < dim; ++d) dh[d] -= step * w_target[d];
          }
        }
      }
      if (acc && bf16) {
        round_rows(e_bf16, logits, rows, vn);
        bf16_gemm(acc + r0 * dim, dim, {e_bf16, DType::BF16, vn, false}, {tile_bf16, DType::BF16, dim, false},
                  rows, dim, vn, 1.0f, 1.0f);
      } else if (acc) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(rows), int(dim), int(vn), 1.0f, logits,
                    int(vn), tile, int(dim), 1.0f, acc + r0 * dim, int(dim));
      }
    }
  }
  double loss = 0;
  for (int64_t g = 0; g < n_tokens; ++g) {
    if (targets[g] == kIgnoreIndex) continue;
    loss += double(run_max[g]) + std::log(run_sum[g]) - double(target_logit[g]);
  }
  if (d_h) {
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < n_tokens; ++g) {
      if (targets[g] == kIgnoreIndex) continue;
      const float scale = float(double(grad_scale) / run_sum[g]);
      const float* a = acc + g * dim;
      float* dh = d_h + g * dim;
      for (int64_t d = 0; d < dim; ++d) dh[d] += scale * a[d];
    }
  }
  return loss;
}

}  // namespace

double lm_head_cross_entropy(float* d_h, int64_t* n_valid, const float* h, WeightRef W,
                             const int32_t* targets, int64_t n_tokens, float grad_scale, float softcap) {
  ref::check_targets(targets, n_tokens, W.rows);
  ref::check_logit_softcap(softcap);
  if (is_quantized(W.dtype))
    return quantized_cross_entropy(d_h, n_valid, h, W, targets, n_tokens, grad_scale, softcap);
  return dense_cross_entropy(d_h, n_valid, h, W, targets, n_tokens, grad_scale, softcap);
}

}  // namespace tf::cpu
