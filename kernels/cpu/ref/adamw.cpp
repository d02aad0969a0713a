#include "kernels/cpu/ref/adamw.h"

namespace tf::ref {

void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n, const AdamWParams& p) {
  adamw_update<float>(param, grad, m, v, n, p);
}

}  // namespace tf::ref
