// defines: the factories of the CUDA backend (kernels/cuda/backend.cu): tf::cuda::make_device_backend
// (a GPU) and tf::simt::make_device_backend (the same backend source on the SIMT simulator), and
// compute_stream, the stream of such a backend's ops for work queued beside them
#pragma once

#include <memory>

#include "kernels/backend.h"
#include "kernels/cuda/runtime.h"

namespace tf::cuda {
std::unique_ptr<Backend> make_device_backend(int device, AttentionKernel attention);
// Whether `be` is a backend make_device_backend made; if so its device and the runtime stream its
// ops run on (Stream::Compute), for a library that queues work in order with them (NCCL's
// collectives on the LoRA gradients), into *device and *stream.
bool compute_stream(Backend& be, int* device, rt::StreamHandle* stream);
}  // namespace tf::cuda
namespace tf::simt {
std::unique_ptr<Backend> make_device_backend(int device, AttentionKernel attention);
bool compute_stream(Backend& be, int* device, rt::StreamHandle* stream);
}  // namespace tf::simt
