// defines: tf::ref::swiglu_forward<T>, tf::ref::swiglu_backward<T> (plain loops over any scalar
// type, so tests can run them in double)
#pragma once

#include <cmath>
#include <cstdint>

namespace tf::ref {

template <typename T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// out = silu(gate) * up, silu(x) = x * sigmoid(x)
template <typename T>
void swiglu_forward(T* out, const T* gate, const T* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] * sigmoid(gate[i]) * up[i];
}

// d silu(g)/dg = sigmoid(g) + g * sigmoid(g) * (1 - sigmoid(g))
template <typename T>
void swiglu_backward(T* d_gate, T* d_up, const T* d_out, const T* gate, const T* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T s = sigmoid(gate[i]);
    d_gate[i] += d_out[i] * up[i] * (s + gate[i] * s * (T(1) - s));
    d_up[i] += d_out[i] * gate[i] * s;
  }
}

}  // namespace tf::ref
