// defines: tf::cuda::device_count, tf::cuda::device_name (compiled only with the CUDA backend)
#pragma once

#include <string>

namespace tf::cuda {

// Number of usable CUDA devices; 0 when there is no driver or no device.
int device_count();
std::string device_name(int index);

}  // namespace tf::cuda
