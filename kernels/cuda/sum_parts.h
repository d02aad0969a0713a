// defines: tf::cuda:: and tf::simt::sum_parts_in_order, the device add of `parts` buffers laid out
// one after another, element by element in buffer order (kernels/cuda/sum_parts.cu)
#pragma once

#include <cstdint>

#include "kernels/cuda/runtime.h"

namespace tf::cuda {
// out[i] = ((parts[i] + parts[n + i]) + parts[2n + i]) + ... over n_parts buffers of n floats, each
// addition one f32 rounding, queued on `stream`: the bits of the host's loop that copies buffer 0
// and adds each later buffer into it. `out` must not overlap `parts`.
void sum_parts_in_order(float* out, const float* parts, int n_parts, int64_t n, rt::StreamHandle stream);
}  // namespace tf::cuda
namespace tf::simt {
void sum_parts_in_order(float* out, const float* parts, int n_parts, int64_t n, rt::StreamHandle stream);
}  // namespace tf::simt
