// defines: the device runtime the CUDA backend is written against, declared for both builds of it:
// tf::cuda::rt (the CUDA runtime, every call checked with file:line) and tf::simt::rt (simulated
// device memory, copies, streams and events with bounds, liveness and ordering checks). Kernel
// sources (compiled as either) call `rt::` inside namespace tf::TF_PORT_BACKEND.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace tf::cuda::rt {
#include "kernels/cuda/runtime_api.inc"
}  // namespace tf::cuda::rt
namespace tf::simt::rt {
#include "kernels/cuda/runtime_api.inc"
}  // namespace tf::simt::rt
