// defines: tf::TrainConfig, tf::StepStats, tf::Trainer (one optimizer step: accumulate micro-batch
// gradients, sum them over the data-parallel ranks, check for NaN/Inf, clip, AdamW on the LoRA
// parameters)
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "src/dist/comm.h"
#include "src/dist/device_sum.h"
#include "src/model/llama.h"
#include "src/train/schedule.h"

namespace tf {

struct TrainConfig {
  LrScheduleParams lr;
  float weight_decay = 0.0f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float adam_eps = 1e-8f;
  float clip = 1.0f;  // global gradient-norm limit; <= 0 disables clipping
  // A step whose loss or gradient is NaN/Inf is skipped and counted; this many in a row abort.
  int max_consecutive_skips = 5;
  // Over several ranks, sum each block's LoRA gradients while the previous block's backward runs
  // (with a device sum, or where the communicator can overlap and the backend's memory is host
  // memory); the bits are the same either way.
  bool overlap_grad_sum = true;
};

struct StepStats {
  int64_t step = 0;  // 0-based index of this optimizer step
  double loss = 0;   // mean token loss over the accumulation group (of every rank)
  float lr = 0;
  float grad_norm = 0;        // before clipping
  int64_t tokens = 0;         // tokens processed (all positions, every rank)
  int64_t target_tokens = 0;  // tokens that had a target (every rank)
  int64_t rank_tokens = 0;    // tokens this rank processed
  double wait_seconds = 0;    // spent waiting for the slowest rank to finish its backward
  double reduce_seconds = 0;  // spent summing the gradients over the ranks, once all were there
  // With the sum overlapped: the seconds the sums worked in all, of which the step waited for
  // reduce_seconds after its backward (wait_seconds is then 0: the wait is inside the sums).
  double sum_work_seconds = 0;
  bool overlapped = false;
  bool skipped = false;
  int64_t skipped_total = 0;
};

// The optimizer-side counters a checkpoint must restore for an exact resume.
struct TrainerState {
  int64_t step = 0;        // optimizer steps taken or skipped
  int64_t adam_steps = 0;  // updates applied (AdamW bias correction)
  int64_t skipped_total = 0;
  int64_t consecutive_skips = 0;
};

class Trainer {
 public:
  // `comm`: the data-parallel ranks, each calling step() with its own share of every global batch
  // (nullptr: this process alone). `device_sum`: where the model's backend is a device, the sum of
  // the LoRA gradients in its memory over the same ranks (nullptr: they are summed in a host copy
  // over `comm`; the same bits). Both must outlive the trainer.
  Trainer(LlamaModel& model, const TrainConfig& cfg, dist::Communicator* comm = nullptr,
          dist::DeviceSum* device_sum = nullptr);

  // One optimizer step over the micro-batches of one accumulation group: this rank's share of the
  // global batch. The loss is the mean over all target tokens of the global batch (counted over
  // every rank first), and the gradients are summed over the ranks in rank order, so accumulation
  // and data parallelism give the same update as one large batch, identical on every rank.
  StepStats step(std::span<const Batch> micro_batches);

  const TrainerState& state() const { return state_; }
  void restore(const TrainerState& s) { state_ = s; }
  const TrainConfig& config() const { return cfg_; }

 private:
  // Sums the LoRA gradients over the ranks, recording in `st` the time spent waiting for the
  // other ranks and the time of the sum itself.
  void reduce_gradients(StepStats& st);
  // Whether this step's sum runs block by block during the last micro-batch's backward.
  bool overlapping() const;
  // The [begin, end) range of block l's LoRA gradients in the flat gradient vector (the state lays
  // them out block after block).
  std::pair<int64_t, int64_t> block_grads(int layer) const;

  LlamaModel& model_;
  TrainConfig cfg_;
  std::unique_ptr<dist::Communicator> own_comm_;  // the single process when none is given
  dist::Communicator* comm_;
  dist::DeviceSum* device_sum_;
  std::vector<float> host_grads_;  // staging for a backend whose memory is not host memory
  TrainerState state_;
};

// sqrt(sum of squares) of a gradient vector in `be`'s memory, accumulated in double.
double global_grad_norm(Backend& be, const float* g, int64_t n);

}  // namespace tf
