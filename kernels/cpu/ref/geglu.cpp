// defines: tf::ref::geglu_forward and geglu_backward on f32 (the op set's reference entries)
#include "kernels/cpu/ref/geglu.h"

#include "kernels/ops.h"

namespace tf::ref {

void geglu_forward(float* out, const float* gate, const float* up, int64_t n) {
  geglu_forward<float>(out, gate, up, n);
}

void geglu_backward(float* d_gate, float* d_up, const float* d_out, const float* gate, const float* up,
                    int64_t n) {
  geglu_backward<float>(d_gate, d_up, d_out, gate, up, n);
}

}  // namespace tf::ref
