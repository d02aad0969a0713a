// defines: the factories of the CUDA backend (kernels/cuda/backend.cu): tf::cuda::make_device_backend
// (a GPU) and tf::simt::make_device_backend (the same backend source on the SIMT simulator)
#pragma once

#include <memory>

#include "kernels/backend.h"

namespace tf::cuda {
std::unique_ptr<Backend> make_device_backend(int device, AttentionKernel attention);
}
namespace tf::simt {
std::unique_ptr<Backend> make_device_backend(int device, AttentionKernel attention);
}
