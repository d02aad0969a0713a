// defines: the CUDA backend's rope, tf::cuda:: and tf::simt:: rope_forward and rope_backward (both
// layouts; one thread per rotated pair)
#include <cmath>
#include <cstdint>

#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/kernel_common.h"
#include "kernels/cuda/port.h"
#include "src/core/error.h"

namespace tf::TF_PORT_BACKEND {

namespace {

// Pair k of all n_tokens * n_heads * half: i = k % half within head k / half. The angle is the f32
// product of the position and the frequency, then cosf / sinf (within 2 ulp under nvcc, the host's
// in the simulator), as the CPU computes it.
__global__ void rope_kernel(port::gptr<float> x, port::gptr<const int32_t> pos,
                            port::gptr<const float> inv_freq, int64_t n_pairs, int n_heads, int half,
                            bool split_half, float sign) {
  for (int64_t k = grid_first(); k < n_pairs; k += grid_stride()) {
    const int i = int(k % half);
    const int64_t head = k / half, token = head / n_heads;
    const int32_t p = pos[token];
    const float f = inv_freq[i];
    const float angle = float(p) * f;
    const float c = cosf(angle), s = sign * sinf(angle);
    const port::gptr<float> xh = x + head * 2 * half;
    const int ia = split_half ? i : 2 * i, ib = split_half ? i + half : 2 * i + 1;
    const float a = xh[ia], b = xh[ib];
    xh[ia] = a * c - b * s;
    xh[ib] = b * c + a * s;
  }
}

void rope_rotate(float* x, const int32_t* pos, const float* inv_freq, int64_t n_tokens, int n_heads,
                 int head_dim, RopeLayout layout, float sign, const char* name) {
  TF_CHECK(head_dim > 0 && head_dim % 2 == 0 && head_dim <= 1024,
           "rope head_dim must be even and in [2, 1024], got ", head_dim);
  const int half = head_dim / 2;
  const int64_t n_pairs = n_tokens * int64_t(n_heads) * half;
  if (n_pairs <= 0) return;
  port::launch(rope_kernel, on_current_stream(name, element_blocks(n_pairs), kElementThreads), x, pos,
               inv_freq, n_pairs, n_heads, half, layout == RopeLayout::SplitHalf, sign);
}

}  // namespace

void rope_forward(float* x, const int32_t* pos, const float* inv_freq, int64_t n_tokens, int n_heads,
                  int head_dim, RopeLayout layout) {
  rope_rotate(x, pos, inv_freq, n_tokens, n_heads, head_dim, layout, 1.0f, "rope_forward");
}

void rope_backward(float* dx, const int32_t* pos, const float* inv_freq, int64_t n_tokens, int n_heads,
                   int head_dim, RopeLayout layout) {
  rope_rotate(dx, pos, inv_freq, n_tokens, n_heads, head_dim, layout, -1.0f, "rope_backward");
}

}  // namespace tf::TF_PORT_BACKEND
