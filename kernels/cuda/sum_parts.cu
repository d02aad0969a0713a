// defines: tf::cuda:: and tf::simt::sum_parts_in_order: buffers of n floats added element by element
// in buffer order, one f32 rounding per addition (the device half of a rank-order sum)
#include <cstdint>

#include "kernels/cuda/kernel_common.h"
#include "kernels/cuda/port.h"
#include "kernels/cuda/sum_parts.h"
#include "src/core/error.h"

namespace tf::TF_PORT_BACKEND {

namespace {

// Each element's sum runs in one thread, part 0 first: the order of the additions is fixed by the
// data's layout alone, whatever the grid.
__global__ void sum_parts_kernel(port::gptr<float> out, port::gptr<const float> parts, int n_parts,
                                 int64_t n) {
  for (int64_t i = grid_first(); i < n; i += grid_stride()) {
    float acc = parts[i];
    for (int p = 1; p < n_parts; ++p) {
      const float v = parts[int64_t(p) * n + i];
      acc = acc + v;
    }
    out[i] = acc;
  }
}

}  // namespace

void sum_parts_in_order(float* out, const float* parts, int n_parts, int64_t n, rt::StreamHandle stream) {
  TF_CHECK(n_parts >= 1 && n >= 0, "sum_parts_in_order: ", n_parts, " parts of ", n, " values");
  if (n == 0) return;
  const port::LaunchConfig cfg{"sum_parts_in_order", dim3(unsigned(element_blocks(n))), dim3(kElementThreads),
                               0, stream};
  port::launch(sum_parts_kernel, cfg, out, parts, n_parts, n);
}

}  // namespace tf::TF_PORT_BACKEND
