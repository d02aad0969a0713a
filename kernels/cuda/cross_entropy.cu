// defines: the CUDA backend's fused lm_head + cross-entropy, tf::cuda:: and tf::simt::
// lm_head_cross_entropy: chunks of rows whose logits (linear_forward, any weight dtype) turn into losses
// and, in place, into d_logits, one warp per row; the [n_tokens, vocab] logits never exist;
// lm_head_cross_entropy_scratch, the rt::scratch it asks for
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/cpu/ref/cross_entropy.h"
#include "kernels/cpu/ref/linear.h"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/kernel_common.h"
#include "kernels/cuda/port.h"
#include "kernels/cuda/scratch_plan.h"
#include "src/core/error.h"

namespace tf::TF_PORT_BACKEND {

namespace {

// rt::scratch slots of a chunk's logits and of the per-row losses.
constexpr int kSlotLogits = 13, kSlotLosses = 14;
// Rows of logits formed at once: [128, vocab] f32 is 64 MiB for a 128k vocabulary, and 128 rows
// keep both GEMMs of a chunk on tensor cores at a useful size.
constexpr int64_t kChunkRows = 128;
// One warp per row, four rows per block.
constexpr int kRowsPerBlock = 4;

// Row `warp` of the chunk: loss[row] = log-sum-exp(logits) - logits[target] (0 for an ignored row),
// and, with `grad`, the row overwritten by grad_scale * (softmax - onehot(target)), or zeros for an
// ignored row so that the d_h product adds nothing for it. Each lane owns the columns equal to its
// lane index mod 32 in every pass, and the warp combines lanes by a butterfly, a fixed order: the
// same bits on every run. exp is summed in double, as the CPU does. Under a cap c > 0 every pass
// reads the logits capped, c tanh(z / c), and the gradient is taken back through the cap (times
// 1 - tanh^2), as the CPU does.
__device__ float capped_logit(float z, float cap) {
  return cap > 0 ? cap * tanhf(z / cap) : z;
}

__global__ void softmax_rows(port::gptr<float> logits, int64_t vocab, int64_t rows,
                             port::gptr<const int32_t> targets, port::gptr<double> losses, float grad_scale,
                             int grad, float cap) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + int64_t(threadIdx.x) / 32;
  const int lane = int(threadIdx.x) % 32;
  if (row >= rows) return;  // whole warps leave together
  const port::gptr<float> z = logits + row * vocab;
  const int32_t t = targets[row];
  if (t == kIgnoreIndex) {
    if (grad) {
      for (int64_t v = lane; v < vocab; v += 32) z[v] = 0.0f;
    }
    if (lane == 0) losses[row] = 0.0;
    return;
  }
  // The lane owning the target column reads it (before any lane writes the row) and shares it.
  float target_logit = 0.0f;
  if (lane == t % 32) target_logit = capped_logit(z[t], cap);
  target_logit = __shfl_sync(0xffffffffu, target_logit, t % 32);
  float mx = -INFINITY;
  for (int64_t v = lane; v < vocab; v += 32) {
    const float zv = capped_logit(z[v], cap);
    mx = fmaxf(mx, zv);
  }
  for (int offset = 16; offset > 0; offset /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, offset));
  double sum = 0;
  for (int64_t v = lane; v < vocab; v += 32) {
    const float zv = capped_logit(z[v], cap);
    sum += double(expf(zv - mx));
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) losses[row] = double(mx) + log(sum) - double(target_logit);
  if (!grad) return;
  const float scale = float(double(grad_scale) / sum);
  for (int64_t v = lane; v < vocab; v += 32) {
    const float zv = capped_logit(z[v], cap);
    const float p = expf(zv - mx) * scale;
    const float g = v == t ? p - grad_scale : p;
    const float th = cap > 0 ? zv / cap : 0.0f;
    z[v] = cap > 0 ? g * (1.0f - th * th) : g;
  }
}

int64_t chunk_rows(int64_t n_tokens) {
  return std::min(n_tokens, kChunkRows);
}
size_t logits_bytes(int64_t rows, int64_t vocab) {
  return size_t(rows * vocab) * sizeof(float);
}
size_t losses_bytes(int64_t n_tokens) {
  return size_t(n_tokens) * sizeof(double);
}

}  // namespace

// A chunk's products run on a full chunk of rows and on the last, shorter one.
void lm_head_cross_entropy_scratch(ScratchNeeds& s, const WeightRef& W, int64_t n_tokens, bool grad) {
  if (n_tokens == 0) return;
  const int64_t chunk = chunk_rows(n_tokens);
  s.need(kSlotLogits, "lm_head_cross_entropy's chunk of logits", logits_bytes(chunk, W.rows));
  s.need(kSlotLosses, "lm_head_cross_entropy's row losses", losses_bytes(n_tokens));
  for (const int64_t rows : {chunk, n_tokens % chunk}) {
    if (rows == 0) continue;
    linear_forward_scratch(s, W, rows);
    if (grad) linear_backward_input_scratch(s, W, rows);
  }
}

double lm_head_cross_entropy(float* d_h, int64_t* n_valid, const float* h, WeightRef W,
                             const int32_t* targets, int64_t n_tokens, float grad_scale, float softcap) {
  ref::check_linear("lm_head_cross_entropy", h, h, W, n_tokens, true);
  ref::check_logit_softcap(softcap);
  TF_CHECK(n_valid != nullptr, "lm_head_cross_entropy: n_valid is null");
  const int64_t vocab = W.rows, dim = W.cols;
  const rt::StreamHandle stream = rt::current_stream();
  // The targets come to the host first: they are checked, with the CPU's message, before any
  // output is touched, and they say which chunks hold no counted row.
  std::vector<int32_t> t(static_cast<size_t>(n_tokens));
  if (n_tokens > 0) {
    rt::memcpy_d2h(t.data(), targets, size_t(n_tokens) * sizeof(int32_t), stream);
    rt::stream_synchronize(stream);
  }
  ref::check_targets(t.data(), n_tokens, vocab);
  const int64_t count = std::count_if(t.begin(), t.end(), [](int32_t x) { return x != kIgnoreIndex; });
  *n_valid = count;
  if (count == 0) return 0.0;

  const int64_t chunk = chunk_rows(n_tokens);
  auto* logits = static_cast<float*>(rt::scratch(kSlotLogits, logits_bytes(chunk, vocab)));
  auto* losses = static_cast<double*>(rt::scratch(kSlotLosses, losses_bytes(n_tokens)));
  for (int64_t r0 = 0; r0 < n_tokens; r0 += chunk) {
    const int64_t rows = std::min(chunk, n_tokens - r0);
    if (std::all_of(t.begin() + r0, t.begin() + r0 + rows, [](int32_t x) { return x == kIgnoreIndex; }))
      continue;
    linear_forward(logits, h + r0 * dim, W, rows, 0.0f);
    port::launch(softmax_rows,
                 on_current_stream("lm_head_softmax_rows", (rows + kRowsPerBlock - 1) / kRowsPerBlock,
                                   32 * kRowsPerBlock),
                 logits, vocab, rows, targets + r0, losses + r0, grad_scale, d_h ? 1 : 0, softcap);
    if (d_h) linear_backward_input(d_h + r0 * dim, logits, W, rows, 1.0f);
  }
  // The rows' losses are added on the host in row order, a fixed order whatever the chunking.
  std::vector<double> row_loss(static_cast<size_t>(n_tokens));
  rt::memcpy_d2h(row_loss.data(), losses, size_t(n_tokens) * sizeof(double), stream);
  rt::stream_synchronize(stream);
  double loss = 0;
  for (int64_t i = 0; i < n_tokens; ++i) {
    if (t[size_t(i)] != kIgnoreIndex) loss += row_loss[size_t(i)];
  }
  return loss;
}

}  // namespace tf::TF_PORT_BACKEND
