// defines: the planner's time model of an optimizer step (offload/cost_model.h)
#include "offload/cost_model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

#include "src/model/weights.h"

namespace tf::offload {

namespace {

// Ops a layer runs per micro-batch in each pass (norms, the seven projections and their adapters,
// rope, attention, the activation, the residual adds), rounded up: they set how much a small
// micro-batch pays in launches and barriers.
constexpr double kForwardOpsPerLayer = 30;
constexpr double kBackwardOpsPerLayer = 50;
// The MLP's ops of one chunk, forward and backward, which a chunked MLP runs once more per chunk.
constexpr double kMlpOpsPerChunk = 25;

}  // namespace

CostRates CostRates::cpu(int threads) {
  CostRates r;
  // About what one AVX-512 core sustains in f32 sgemm at the shapes of a training step.
  r.flops = std::max(threads, 1) * 40e9;
  r.half_rate_rows = 32;
  r.op_overhead_s = 20e-6;
  r.link_bytes_s = 0;
  r.disk_bytes_s = 1.5e9;
  // Open MPI between the processes of one machine, through shared memory.
  r.gather_bytes_s = 5e9;
  r.memory_bytes_s = 20e9;
  // The reads need the cores the products spin on: they were measured hidden at 1024 tokens a
  // step and not at 64, so the model hides none of them.
  r.copies_overlap = false;
  return r;
}

CostRates CostRates::device() {
  CostRates r;
  r.flops = 100e12;
  r.half_rate_rows = 256;
  r.op_overhead_s = 8e-6;
  r.link_bytes_s = 20e9;
  r.disk_bytes_s = 1.5e9;
  // The shares live in host memory and are gathered over MPI, as on the cpu.
  r.gather_bytes_s = 5e9;
  r.memory_bytes_s = 1e12;
  r.copies_overlap = true;
  return r;
}

std::string CostRates::describe() const {
  char buf[256];
  std::snprintf(
      buf, sizeof buf,
      "%.1f GFLOP/s (half of it at %.0f rows), %.0f us per op, host link %.0f GB/s, disk %.1f GB/s, "
      "rank gathers %.1f GB/s, memory %.1f GB/s, copies %s compute",
      flops / 1e9, half_rate_rows, op_overhead_s * 1e6, link_bytes_s / 1e9, disk_bytes_s / 1e9,
      gather_bytes_s / 1e9, memory_bytes_s / 1e9, copies_overlap ? "beside" : "not beside");
  return source + ": " + buf;
}

CostRates CostRates::calibrated(const Measured& m, const std::string& from) const {
  CostRates r = *this;
  // rate(rows) = flops * rows / (rows + half_rate_rows), solved for flops.
  r.flops = m.flops_s * (m.rows + half_rate_rows) / m.rows;
  if (m.memory_bytes_s > 0) r.memory_bytes_s = m.memory_bytes_s;
  if (m.op_overhead_s > 0) r.op_overhead_s = m.op_overhead_s;
  if (m.disk_bytes_s > 0) r.disk_bytes_s = m.disk_bytes_s;
  r.source = from;
  return r;
}

StepCost step_cost(const CostInputs& in, const CostRates& r) {
  const LlamaConfig& c = in.config;
  const double rows = double(in.micro_batch) * in.seq_len;
  const double layers = c.n_layers;
  // The attention side's projections and the MLP's, each with its adapters.
  double attn_params = 0, attn_lora = 0, mlp_params = 0, mlp_lora = 0, gate_up = 0;
  for (WeightSlot slot : {WeightSlot::Q, WeightSlot::K, WeightSlot::V, WeightSlot::O, WeightSlot::Gate,
                          WeightSlot::Up, WeightSlot::Down}) {
    const LoraTarget target = *lora_target_of(slot);
    const auto [rows_out, cols_in] = weight_shape(c, slot);
    const double din = double(cols_in), dout = double(rows_out);
    const bool mlp = target == LoraTarget::Gate || target == LoraTarget::Up || target == LoraTarget::Down;
    (mlp ? mlp_params : attn_params) += din * dout;
    if (target == LoraTarget::Gate || target == LoraTarget::Up) gate_up += din * dout;
    if (in.lora.has(target)) (mlp ? mlp_lora : attn_lora) += double(in.lora.rank) * (din + dout);
  }
  const bool chunked = in.mlp_chunk > 0 && double(in.mlp_chunk) < rows;
  const double mlp_rows = chunked ? double(in.mlp_chunk) : rows;
  // A causal product of q and k, and of the weights and v: half of seq x seq per head and sequence.
  const double attention = 2.0 * double(in.seq_len) * in.seq_len * c.n_heads * c.head_dim * in.micro_batch;
  // The frozen base needs only its input gradients (one product per projection); the adapters need
  // theirs and their weights'; attention's backward recomputes its scores and forms four products.
  // A chunked MLP forms its gate and up again in the backward instead of keeping them.
  const double attn_forward = 2 * rows * (attn_params + attn_lora) + attention;
  const double attn_backward = 2 * rows * attn_params + 4 * rows * attn_lora + 2.5 * attention;
  const double mlp_forward = 2 * rows * (mlp_params + mlp_lora);
  const double mlp_backward =
      2 * rows * mlp_params + 4 * rows * mlp_lora + (chunked ? 2 * rows * gate_up : 0);
  const double head = 2 * rows * double(c.vocab) * c.hidden;
  const double loss_rows = in.loss_rows > 0 ? std::min(double(in.loss_rows), rows) : rows;
  const auto rate = [&](double m) { return r.flops * m / (m + r.half_rate_rows); };

  StepCost s;
  const double accum = std::max(in.grad_accum, 1);
  s.compute_s = accum * (layers * (attn_forward + attn_backward) / rate(rows) +
                         layers * (mlp_forward + mlp_backward) / rate(mlp_rows) + 2 * head / rate(loss_rows));
  // Recomputation repeats a block's forward, up to the MLP when the backward forms the MLP's itself.
  s.recompute_s =
      in.recompute
          ? accum * layers * (attn_forward / rate(rows) + (chunked ? 0 : mlp_forward / rate(mlp_rows)))
          : 0;
  const double chunks = chunked ? std::ceil(rows / mlp_rows) : 1;
  // The norms Qwen3 and Gemma 3 add (q and k per head; the attention and MLP outputs): one op each in
  // the forward, a fill and the norm's backward in the backward; their FLOPs are negligible.
  const double norms = (c.qk_norm ? 2 : 0) + (c.sandwich_norms ? 2 : 0);
  const double ops = layers * ((kForwardOpsPerLayer + norms) * (in.recompute ? 2 : 1) + kBackwardOpsPerLayer +
                               2 * norms + kMlpOpsPerChunk * (chunks - 1)) +
                     10 + 2 * (std::ceil(rows / loss_rows) - 1);  // each further call of the loss
  s.overhead_s = accum * ops * r.op_overhead_s;
  // Streamed weights are read in the forward and again in the backward (which recomputes from the
  // same copy); offloaded inputs go out in the forward and come back in the backward.
  double copy = 0;
  if (in.streamed_bytes) {
    const double rate_in = in.streamed_from_disk ? r.disk_bytes_s : r.link_bytes_s;
    copy += 2.0 * double(in.streamed_bytes) / rate_in;
  }
  if (in.offloaded_bytes) copy += 2.0 * double(in.offloaded_bytes) / r.link_bytes_s;
  // Sharded weights are gathered from the other ranks for the forward and again for the backward,
  // each block before the copy to a device that Host streaming makes too.
  if (in.gathered_bytes) copy += 2.0 * double(in.gathered_bytes) / r.gather_bytes_s;
  // Overlapped copies hide behind the micro-batch's compute but for the first block's, which
  // nothing precedes; an upload before the first block hides behind nothing.
  const double busy = (s.compute_s + s.recompute_s) / accum;
  const double exposed = r.copies_overlap ? std::max(0.0, copy - busy) + copy / std::max(layers, 1.0) : copy;
  const double upload = in.uploaded_bytes ? double(in.uploaded_bytes) / r.link_bytes_s : 0;
  s.copy_s = accum * (copy + upload);
  s.exposed_copy_s = accum * (exposed + upload);
  // AdamW reads and writes each parameter, its gradient and both moments.
  s.optimizer_s = double(in.lora_params) * 7 * sizeof(float) / r.memory_bytes_s;
  s.total_s = s.compute_s + s.recompute_s + s.overhead_s + s.exposed_copy_s + s.optimizer_s;
  return s;
}

}  // namespace tf::offload
