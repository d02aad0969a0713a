// defines: tf::offload::CostRates, CostInputs, StepCost, step_cost (the planner's time model of an
// optimizer step: the arithmetic of the forward, backward and recomputation at a rate that grows
// with the rows of each product, the per-op overheads, the copies of streamed weights and offloaded
// block inputs, the gathers of weights sharded across ranks, and how much of those copies hides
// behind compute)
#pragma once

#include <cstdint>
#include <string>

#include "src/model/config.h"

namespace tf::offload {

// The rates a step's time is predicted at. By default they are nominal, not measured (planning
// runs nothing heavy), so the predicted times rank the choices of a run rather than forecast its
// clock: what matters is the ratio of arithmetic to copies and how the rate grows with the rows of
// a product. calibrated() sets the cpu's from a measurement (tightfit bench's).
struct CostRates {
  double flops = 0;                // arithmetic of large products, FLOP/s
  double half_rate_rows = 0;       // rows of a product at which it reaches half of `flops`
  double op_overhead_s = 0;        // fixed cost of one op (a kernel launch, a thread-pool barrier)
  double link_bytes_s = 0;         // host memory -> the backend's memory (device backends)
  double disk_bytes_s = 0;         // the model file -> memory, through the direct reader
  double gather_bytes_s = 0;       // the other ranks' shares of a block -> one rank (over MPI)
  double memory_bytes_s = 0;       // the backend's memory bandwidth (the optimizer's pass over LoRA)
  bool copies_overlap = true;      // copies run beside compute (a copy engine) or take its cores
  std::string source = "nominal";  // where the rates come from, for the logs

  // A cpu of `threads` threads: f32 products, reads that compete with compute for the cores.
  static CostRates cpu(int threads);
  // A GPU: bf16 tensor-core products, copies on a copy engine over PCIe 4.0 x16.
  static CostRates device();
  // "nominal: 80 GFLOP/s (half of it at 32 rows), ..." for the plan's output.
  std::string describe() const;
  // What a benchmark of the backend measured (tightfit bench's); a zero rate keeps the nominal one.
  struct Measured {
    double flops_s = 0;         // a training step's useful arithmetic per second, required
    double rows = 0;            // the rows of that step's products, required
    double memory_bytes_s = 0;  // the memory bandwidth of a streaming op
    double op_overhead_s = 0;   // the fixed cost of one op
    double disk_bytes_s = 0;    // the model file read through the direct reader
  };
  // These rates with the arithmetic's set so that a product of `m.rows` rows runs at `m.flops_s`
  // (the rate's growth with rows, half_rate_rows, kept), and the memory bandwidth, the per-op cost
  // and the disk rate set to the measured ones that are positive; `source` says where they came from.
  CostRates calibrated(const Measured& m, const std::string& source) const;
};

// A run's step as the cost model sees it: the model's shape, the tokens of a micro-batch, and what
// the plan moves per micro-batch.
struct CostInputs {
  LlamaConfig config;
  LoraConfig lora;
  int micro_batch = 1;
  int seq_len = 0;
  int grad_accum = 1;
  bool recompute = false;           // per-block checkpointing: each block's forward runs twice
  uint64_t streamed_bytes = 0;      // per-layer weights read per pass (forward, and backward)
  bool streamed_from_disk = false;  // from the model file rather than host memory
  uint64_t gathered_bytes = 0;      // --shard-weights: the other ranks' shares received per pass
  uint64_t offloaded_bytes = 0;     // block inputs copied to host memory and back per micro-batch
  // Rows the MLP runs at a time (0: all of a micro-batch's): its products run at that many rows, the
  // backward forms each chunk's gate and up again, and per-block recomputation stops at the MLP.
  int64_t mlp_chunk = 0;
  // Rows per call of the loss (0: all of a micro-batch's): its lm_head products run at that many.
  int64_t loss_rows = 0;
  uint64_t uploaded_bytes = 0;  // host-to-device bytes before the first block (embedding rows)
  int64_t lora_params = 0;
};

// Seconds of one optimizer step, by part. `copy_s` is the copies' time; `exposed_copy_s` the part
// of it compute does not hide (all of it where copies do not overlap).
struct StepCost {
  double compute_s = 0;    // forward and backward arithmetic
  double recompute_s = 0;  // the blocks' forward again, under per-block checkpointing
  double overhead_s = 0;   // per-op fixed costs
  double copy_s = 0;
  double exposed_copy_s = 0;
  double optimizer_s = 0;
  double total_s = 0;
};

StepCost step_cost(const CostInputs& in, const CostRates& r);

}  // namespace tf::offload
