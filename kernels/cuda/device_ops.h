// defines: the op launchers of the CUDA backend, declared twice from the one op list: tf::cuda
// (kernels/cuda/*.cu built by nvcc) and tf::simt (the same sources built as host C++ against the
// SIMT simulator). Each launcher has the op's signature; its pointers are device memory, it queues
// its work on rt::current_stream() and returns host scalars after waiting for them.
#pragma once

#include "kernels/ops.h"

#define TF_OP(ret, name, params, args) ret name params;
namespace tf::cuda {
#include "kernels/op_signatures.inc"
}  // namespace tf::cuda
namespace tf::simt {
#include "kernels/op_signatures.inc"
}  // namespace tf::simt
#undef TF_OP
