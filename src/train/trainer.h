// defines: tf::TrainConfig, tf::StepStats, tf::Trainer (one optimizer step: accumulate micro-batch
// gradients, check for NaN/Inf, clip, AdamW on the LoRA parameters)
#pragma once

#include <cstdint>
#include <span>

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
};

struct StepStats {
  int64_t step = 0;  // 0-based index of this optimizer step
  double loss = 0;   // mean token loss over the accumulation group
  float lr = 0;
  float grad_norm = 0;        // before clipping
  int64_t tokens = 0;         // tokens processed (all positions)
  int64_t target_tokens = 0;  // tokens that had a target
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
  Trainer(LlamaModel& model, const TrainConfig& cfg);

  // One optimizer step over the micro-batches of one accumulation group. The loss is the mean over
  // all target tokens of the group, so accumulation gives the same update as one large batch.
  StepStats step(std::span<const Batch> micro_batches);

  const TrainerState& state() const { return state_; }
  void restore(const TrainerState& s) { state_ = s; }
  const TrainConfig& config() const { return cfg_; }

 private:
  LlamaModel& model_;
  TrainConfig cfg_;
  TrainerState state_;
};

// sqrt(sum of squares) of a gradient vector in `be`'s memory, accumulated in double.
double global_grad_norm(Backend& be, const float* g, int64_t n);

}  // namespace tf
