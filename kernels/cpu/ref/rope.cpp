#include "kernels/cpu/ref/rope.h"

namespace tf::ref {

void rope_forward(float* x, const int32_t* pos, const float* inv_freq, int64_t n_tokens, int n_heads,
                  int head_dim, RopeLayout layout) {
  rope_rotate<float>(x, pos, inv_freq, n_tokens, n_heads, head_dim, layout, +1);
}

void rope_backward(float* dx, const int32_t* pos, const float* inv_freq, int64_t n_tokens, int n_heads,
                   int head_dim, RopeLayout layout) {
  rope_rotate<float>(dx, pos, inv_freq, n_tokens, n_heads, head_dim, layout, -1);
}

}  // namespace tf::ref
