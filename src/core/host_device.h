// defines: TF_HOST_DEVICE, which marks a small pure function as callable from CUDA kernels as well
// as from host code, so that a kernel and the CPU share one definition of it
#pragma once

#if defined(__CUDACC__)
#define TF_HOST_DEVICE __host__ __device__
#else
#define TF_HOST_DEVICE
#endif
