// defines: tf::ref::adamw_update<T>, tf::ref::AdamWScalars (plain loops over any scalar type, so
// tests can run them in double)
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/ops.h"
#include "src/core/error.h"
#include "src/core/host_device.h"

namespace tf::ref {

// The per-step scalars of torch.optim.AdamW (single-tensor path): PyTorch computes them as Python
// floats (double) and applies them at the parameters' precision, so they are rounded to T once.
template <typename T>
struct AdamWScalars {
  T decay, lerp_weight, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps;

  explicit AdamWScalars(const AdamWParams& p) {
    TF_CHECK(p.step >= 1, "adamw_update: step must be >= 1 (bias correction), got ", p.step);
    const double lr = p.lr, b1 = p.beta1, b2 = p.beta2;
    decay = T(1.0 - lr * double(p.weight_decay));
    lerp_weight = T(1.0 - b1);
    beta2 = T(b2);
    one_minus_beta2 = T(1.0 - b2);
    step_size = T(lr / (1.0 - std::pow(b1, double(p.step))));
    bias_correction2_sqrt = T(std::sqrt(1.0 - std::pow(b2, double(p.step))));
    eps = T(p.eps);
  }
};

// torch.lerp(start, end, w): the two forms keep the result exact at w = 0 and w = 1. The CUDA
// backend's AdamW kernel calls it too.
template <typename T>
TF_HOST_DEVICE T lerp(T start, T end, T w) {
  return w < T(0.5) ? start + w * (end - start) : end - (end - start) * (T(1) - w);
}

// One AdamW step in the order of PyTorch's operations:
//   p *= 1 - lr*wd;  m = lerp(m, g, 1-b1);  v = v*b2 + (1-b2)*g*g;
//   p += -(lr / (1-b1^t)) * (m / (sqrt(v) / sqrt(1-b2^t) + eps))
template <typename T>
void adamw_update(T* param, const T* grad, T* m, T* v, int64_t n, const AdamWParams& p) {
  const AdamWScalars<T> s(p);
  for (int64_t i = 0; i < n; ++i) {
    param[i] *= s.decay;
    m[i] = lerp(m[i], grad[i], s.lerp_weight);
    v[i] = v[i] * s.beta2 + s.one_minus_beta2 * grad[i] * grad[i];
    const T denom = std::sqrt(v[i]) / s.bias_correction2_sqrt + s.eps;
    param[i] += -s.step_size * (m[i] / denom);
  }
}

}  // namespace tf::ref
