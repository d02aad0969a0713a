// defines: the CUDA backend's geglu, tf::cuda:: and tf::simt:: geglu_forward and geglu_backward
#include <cmath>
#include <cstdint>

#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/kernel_common.h"
#include "kernels/cuda/port.h"

namespace tf::TF_PORT_BACKEND {

namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;

// tanhf is within 2 ulp under nvcc (CUDA C Programming Guide, "Mathematical Functions"); the
// simulator runs the host's. The operations are the CPU's, in its order.
__device__ __forceinline__ float gelu_tanh_t(float x) {
  return tanhf(kSqrt2OverPi * (x + kCubic * (x * x * x)));
}

__global__ void geglu_forward_kernel(port::gptr<float> out, port::gptr<const float> gate,
                                     port::gptr<const float> up, int64_t n) {
  for (int64_t i = grid_first(); i < n; i += grid_stride()) {
    const float x = gate[i], u = up[i];
    out[i] = 0.5f * x * (1.0f + gelu_tanh_t(x)) * u;
  }
}

__global__ void geglu_backward_kernel(port::gptr<float> d_gate, port::gptr<float> d_up,
                                      port::gptr<const float> d_out, port::gptr<const float> gate,
                                      port::gptr<const float> up, int64_t n) {
  for (int64_t i = grid_first(); i < n; i += grid_stride()) {
    const float x = gate[i], u = up[i], d = d_out[i], dg = d_gate[i], du = d_up[i];
    const float t = gelu_tanh_t(x);
    const float half_x = 0.5f * x;
    const float dgelu =
        0.5f * (1.0f + t) + half_x * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3 * kCubic * (x * x));
    d_gate[i] = dg + d * u * dgelu;
    d_up[i] = du + d * (half_x * (1.0f + t));
  }
}

}  // namespace

void geglu_forward(float* out, const float* gate, const float* up, int64_t n) {
  if (n <= 0) return;
  port::launch(geglu_forward_kernel, on_current_stream("geglu_forward", element_blocks(n), kElementThreads),
               out, gate, up, n);
}

void geglu_backward(float* d_gate, float* d_up, const float* d_out, const float* gate, const float* up,
                    int64_t n) {
  if (n <= 0) return;
  port::launch(geglu_backward_kernel, on_current_stream("geglu_backward", element_blocks(n), kElementThreads),
               d_gate, d_up, d_out, gate, up, n);
}

}  // namespace tf::TF_PORT_BACKEND
