// defines: tf::LrSchedule, tf::learning_rate (linear warmup, then cosine | linear | constant)
#pragma once

#include <cstdint>
#include <string>

namespace tf {

enum class LrSchedule : uint8_t { Cosine, Linear, Constant };
LrSchedule parse_lr_schedule(const std::string& name);  // "cosine", "linear", "constant"
const char* lr_schedule_name(LrSchedule s);

struct LrScheduleParams {
  float peak_lr = 2e-4f;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
  LrSchedule schedule = LrSchedule::Cosine;
  float min_lr_ratio = 0.0f;  // the decay ends at peak_lr * min_lr_ratio
};

// Learning rate of optimizer step `step` (0-based): rises linearly to the peak over the warmup
// steps (step + 1) / warmup, like HF's get_*_schedule_with_warmup, then decays over the rest.
float learning_rate(const LrScheduleParams& p, int64_t step);

}  // namespace tf
