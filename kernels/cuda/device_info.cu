// defines: tf::cuda::device_count, tf::cuda::device_name
#include <cuda_runtime.h>

#include <string>

#include "kernels/cuda/device_info.h"

namespace tf::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;  // no driver or no device: CPU backend only
  return n;
}

std::string device_name(int index) {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, index) != cudaSuccess) return {};
  return prop.name;
}

}  // namespace tf::cuda
