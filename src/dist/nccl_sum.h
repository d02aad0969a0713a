// defines: the NCCL device sum's factory and its refusal (src/dist/nccl_sum.cpp, built only with
// TIGHTFIT_NCCL); callers go through dist::make_device_sum
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "kernels/backend.h"
#include "src/dist/comm.h"
#include "src/dist/device_sum.h"

namespace tf::dist {

// Why NCCL cannot sum in `be`'s memory on this rank ("" where it can: `be` is a GPU backend, whose
// index goes to *device).
std::string nccl_refusal(Backend& be, int* device);
// Starts NCCL over `comm`'s ranks (collective: rank 0's id broadcast over `comm`, then
// ncclCommInitRank on the device `be` runs on) and returns its sum; nccl_refusal(be) must be "".
std::unique_ptr<DeviceSum> nccl_sum(Communicator& comm, Backend& be, int64_t chunk);

}  // namespace tf::dist
