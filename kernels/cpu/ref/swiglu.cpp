#include "kernels/cpu/ref/swiglu.h"

#include "kernels/ops.h"

namespace tf::ref {

void swiglu_forward(float* out, const float* gate, const float* up, int64_t n) {
  swiglu_forward<float>(out, gate, up, n);
}

void swiglu_backward(float* d_gate, float* d_up, const float* d_out, const float* gate, const float* up,
                     int64_t n) {
  swiglu_backward<float>(d_gate, d_up, d_out, gate, up, n);
}

}  // namespace tf::ref
