// defines: tf::cpu::adamw_update
#include "kernels/cpu/ref/adamw.h"

#include <cmath>

#include "kernels/ops.h"

namespace tf::cpu {

// The same per-element operations as the reference in the same order (so results are identical),
// spread over threads and vector lanes.
void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n, const AdamWParams& p) {
  const ref::AdamWScalars<float> s(p);
#pragma omp parallel for simd schedule(static) if (n >= (int64_t(1) << 15))
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i];
    const float pi = param[i] * s.decay;
    const float mi = ref::lerp(m[i], g, s.lerp_weight);
    const float vi = v[i] * s.beta2 + s.one_minus_beta2 * g * g;
    const float denom = std::sqrt(vi) / s.bias_correction2_sqrt + s.eps;
    param[i] = pi + -s.step_size * (mi / denom);
    m[i] = mi;
    v[i] = vi;
  }
}

}  // namespace tf::cpu
