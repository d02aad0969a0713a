// defines: tf::cpu::swiglu_forward, tf::cpu::swiglu_backward
#include <cmath>

#include "kernels/ops.h"

namespace tf::cpu {

namespace {
// Below this many elements the OpenMP fork/join costs more than the loop.
constexpr int64_t kParallelMin = 1 << 15;

inline float sigmoid(float x) {
  return 1.0f / (1.0f + std::exp(-x));
}
}  // namespace

void swiglu_forward(float* out, const float* gate, const float* up, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] * sigmoid(gate[i]) * up[i];
}

void swiglu_backward(float* d_gate, float* d_up, const float* d_out, const float* gate, const float* up,
                     int64_t n) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    const float s = sigmoid(g);
    const float silu = g * s;
    d_gate[i] += d_out[i] * up[i] * (s + silu * (1.0f - s));
    d_up[i] += d_out[i] * silu;
  }
}

}  // namespace tf::cpu
