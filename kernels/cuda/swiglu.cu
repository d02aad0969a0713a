// defines: the CUDA backend's swiglu, tf::cuda:: and tf::simt:: swiglu_forward and swiglu_backward
#include <cmath>
#include <cstdint>

#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/kernel_common.h"
#include "kernels/cuda/port.h"

namespace tf::TF_PORT_BACKEND {

namespace {

// expf is within 2 ulp under nvcc (CUDA C Programming Guide, "Mathematical Functions"); the
// simulator runs the host's.
__device__ __forceinline__ float sigmoid(float x) {
  return 1.0f / (1.0f + expf(-x));
}

__global__ void swiglu_forward_kernel(port::gptr<float> out, port::gptr<const float> gate,
                                      port::gptr<const float> up, int64_t n) {
  for (int64_t i = grid_first(); i < n; i += grid_stride()) {
    const float g = gate[i], u = up[i];
    out[i] = g * sigmoid(g) * u;
  }
}

// d silu(g)/dg = s + g s (1 - s), in the CPU's order of operations.
__global__ void swiglu_backward_kernel(port::gptr<float> d_gate, port::gptr<float> d_up,
                                       port::gptr<const float> d_out, port::gptr<const float> gate,
                                       port::gptr<const float> up, int64_t n) {
  for (int64_t i = grid_first(); i < n; i += grid_stride()) {
    const float g = gate[i], u = up[i], d = d_out[i], dg = d_gate[i], du = d_up[i];
    const float s = sigmoid(g);
    const float silu = g * s;
    d_gate[i] = dg + d * u * (s + silu * (1.0f - s));
    d_up[i] = du + d * silu;
  }
}

}  // namespace

void swiglu_forward(float* out, const float* gate, const float* up, int64_t n) {
  if (n <= 0) return;
  port::launch(swiglu_forward_kernel, on_current_stream("swiglu_forward", element_blocks(n), kElementThreads),
               out, gate, up, n);
}

void swiglu_backward(float* d_gate, float* d_up, const float* d_out, const float* gate, const float* up,
                     int64_t n) {
  if (n <= 0) return;
  port::launch(swiglu_backward_kernel,
               on_current_stream("swiglu_backward", element_blocks(n), kElementThreads), d_gate, d_up, d_out,
               gate, up, n);
}

}  // namespace tf::TF_PORT_BACKEND
