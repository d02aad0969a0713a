// defines: tf::ref::rope_rotate<T> (plain loops over any scalar type, so tests can run them in
// double); rope_forward / rope_backward are rotations by +angle / -angle.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/ops.h"

namespace tf::ref {

// Rotates each pair of x[n_tokens, n_heads, head_dim] by sign * pos[n] * inv_freq[i]. The angle is
// the product of the position and the frequency in T, then cos/sin in T: with T = float that is
// what HF computes (freqs = inv_freq @ position_ids in float32, then cos() and sin()).
template <typename T>
void rope_rotate(T* x, const int32_t* pos, const T* inv_freq, int64_t n_tokens, int n_heads, int head_dim,
                 RopeLayout layout, int sign) {
  const int half = head_dim / 2;
  for (int64_t t = 0; t < n_tokens; ++t) {
    for (int h = 0; h < n_heads; ++h) {
      T* xh = x + (t * n_heads + h) * head_dim;
      for (int i = 0; i < half; ++i) {
        const T angle = T(pos[t]) * inv_freq[i];
        const T c = std::cos(angle);
        const T s = T(sign) * std::sin(angle);
        // SplitHalf pairs (i, i + half), like HF's rotate_half; Interleaved pairs (2i, 2i + 1).
        T& a = layout == RopeLayout::SplitHalf ? xh[i] : xh[2 * i];
        T& b = layout == RopeLayout::SplitHalf ? xh[i + half] : xh[2 * i + 1];
        const T a0 = a, b0 = b;
        a = a0 * c - b0 * s;
        b = b0 * c + a0 * s;
      }
    }
  }
}

}  // namespace tf::ref
