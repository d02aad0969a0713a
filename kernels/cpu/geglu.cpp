// defines: tf::cpu::geglu_forward, tf::cpu::geglu_backward
#include <cmath>

#include "kernels/ops.h"

namespace tf::cpu {

namespace {
// Below this many elements the OpenMP fork/join costs more than the loop.
constexpr int64_t kParallelMin = 1 << 15;
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;

// tanh(sqrt(2 / pi) * (x + 0.044715 x^3)); the CUDA kernel rounds the same operations in this order.
inline float gelu_tanh_t(float x) {
  return std::tanh(kSqrt2OverPi * (x + kCubic * (x * x * x)));
}
}  // namespace

void geglu_forward(float* out, const float* gate, const float* up, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float x = gate[i];
    out[i] = 0.5f * x * (1.0f + gelu_tanh_t(x)) * up[i];
  }
}

void geglu_backward(float* d_gate, float* d_up, const float* d_out, const float* gate, const float* up,
                    int64_t n) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float x = gate[i];
    const float t = gelu_tanh_t(x);
    const float half_x = 0.5f * x;
    const float d =
        0.5f * (1.0f + t) + half_x * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3 * kCubic * (x * x));
    d_gate[i] += d_out[i] * up[i] * d;
    d_up[i] += d_out[i] * (half_x * (1.0f + t));
  }
}

}  // namespace tf::cpu
