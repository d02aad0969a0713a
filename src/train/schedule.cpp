#include "src/train/schedule.h"

#include <algorithm>
#include <cmath>

#include "src/core/error.h"

namespace tf {

LrSchedule parse_lr_schedule(const std::string& name) {
  if (name == "cosine") return LrSchedule::Cosine;
  if (name == "linear") return LrSchedule::Linear;
  if (name == "constant") return LrSchedule::Constant;
  TF_FAIL("unknown learning-rate schedule '", name, "'; expected cosine, linear or constant");
}

const char* lr_schedule_name(LrSchedule s) {
  switch (s) {
    case LrSchedule::Cosine: return "cosine";
    case LrSchedule::Linear: return "linear";
    case LrSchedule::Constant: return "constant";
  }
  return "?";
}

float learning_rate(const LrScheduleParams& p, int64_t step) {
  if (step < p.warmup_steps) return p.peak_lr * float(step + 1) / float(p.warmup_steps);
  if (p.schedule == LrSchedule::Constant) return p.peak_lr;
  const int64_t decay_steps = std::max<int64_t>(1, p.total_steps - p.warmup_steps);
  const double progress = std::clamp(double(step - p.warmup_steps) / double(decay_steps), 0.0, 1.0);
  const double shape =
      p.schedule == LrSchedule::Cosine ? 0.5 * (1.0 + std::cos(M_PI * progress)) : 1.0 - progress;
  return float(p.peak_lr * (p.min_lr_ratio + (1.0 - p.min_lr_ratio) * shape));
}

}  // namespace tf
