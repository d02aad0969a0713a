// defines: the CUDA backend's AdamW, tf::cuda:: and tf::simt:: adamw_update (one thread per element,
// the CPU's per-element operations in the CPU's order)
#include <cmath>
#include <cstdint>

#include "kernels/cpu/ref/adamw.h"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/kernel_common.h"
#include "kernels/cuda/port.h"

namespace tf::TF_PORT_BACKEND {

namespace {

// The step's scalars come from the host, rounded to f32 there exactly as tf::cpu rounds them. The
// operations below are the CPU's in its order, but nvcc and the host compiler each contract some
// multiply-adds into FMAs of their choosing, so a result may differ from the CPU's in its last bit
// or two (tests/test_cuda_elementwise.cpp bounds it).
__global__ void adamw_kernel(port::gptr<float> param, port::gptr<const float> grad, port::gptr<float> m,
                             port::gptr<float> v, int64_t n, ref::AdamWScalars<float> s) {
  for (int64_t i = grid_first(); i < n; i += grid_stride()) {
    const float g = grad[i], p0 = param[i], m0 = m[i], v0 = v[i];
    const float pi = p0 * s.decay;
    const float mi = ref::lerp(m0, g, s.lerp_weight);
    const float vi = v0 * s.beta2 + s.one_minus_beta2 * g * g;
    const float denom = sqrtf(vi) / s.bias_correction2_sqrt + s.eps;
    param[i] = pi + -s.step_size * (mi / denom);
    m[i] = mi;
    v[i] = vi;
  }
}

}  // namespace

void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n, const AdamWParams& p) {
  const ref::AdamWScalars<float> s(p);
  if (n <= 0) return;
  port::launch(adamw_kernel, on_current_stream("adamw_update", element_blocks(n), kElementThreads), param,
               grad, m, v, n, s);
}

}  // namespace tf::TF_PORT_BACKEND
