// defines: tf::ref::gelu_tanh<T>, tf::ref::geglu_forward<T>, tf::ref::geglu_backward<T> (plain loops
// over any scalar type, so tests can run them in double)
#pragma once

#include <cmath>
#include <cstdint>

namespace tf::ref {

// The constants of transformers' gelu_pytorch_tanh (torch's gelu(approximate="tanh")).
constexpr double kGeluSqrt2OverPi = 0.7978845608028654;  // sqrt(2 / pi)
constexpr double kGeluCubic = 0.044715;

// gelu(x) = x / 2 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3)))
template <typename T>
T gelu_tanh(T x) {
  const T t = std::tanh(T(kGeluSqrt2OverPi) * (x + T(kGeluCubic) * x * x * x));
  return T(0.5) * x * (T(1) + t);
}

// out = gelu(gate) * up
template <typename T>
void geglu_forward(T* out, const T* gate, const T* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gelu_tanh(gate[i]) * up[i];
}

// gelu'(x) = (1 + t) / 2 + x / 2 (1 - t^2) sqrt(2 / pi) (1 + 3 * 0.044715 x^2), t the tanh above
template <typename T>
void geglu_backward(T* d_gate, T* d_up, const T* d_out, const T* gate, const T* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T x = gate[i];
    const T t = std::tanh(T(kGeluSqrt2OverPi) * (x + T(kGeluCubic) * x * x * x));
    const T d = T(0.5) * (T(1) + t) +
                T(0.5) * x * (T(1) - t * t) * T(kGeluSqrt2OverPi) * (T(1) + T(3 * kGeluCubic) * x * x);
    d_gate[i] += d_out[i] * up[i] * d;
    d_up[i] += d_out[i] * T(0.5) * x * (T(1) + t);
  }
}

}  // namespace tf::ref
