// defines: TF_CUDA_CHECK, which throws tf::Error for a failed CUDA runtime call (nvcc only).
#pragma once

#include <cuda_runtime.h>

#include "src/core/error.h"

// TF_CUDA_CHECK(call): throws tf::Error "<call>: <cudaGetErrorString> (file:line)" unless the call
// returns cudaSuccess.
#define TF_CUDA_CHECK(call)                                                                           \
  do {                                                                                                \
    const cudaError_t tf_cuda_err_ = (call);                                                          \
    if (tf_cuda_err_ != cudaSuccess)                                                                  \
      ::tf::detail::throw_error(__FILE__, __LINE__,                                                   \
                                ::tf::detail::concat(#call, ": ", cudaGetErrorString(tf_cuda_err_))); \
  } while (0)
