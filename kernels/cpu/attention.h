// defines: tf::cpu::attention_backward_single_pass, attention_backward_thread_floats: how the cpu
// attention backward goes through a call's tiles and the per-thread scratch that takes, for the
// planner's byte model as for the kernel
#pragma once

#include <cstddef>

#include "kernels/ops.h"

namespace tf::cpu {

// Whether attention_backward takes each tile once, in one task per (batch, kv head) that owns dk and
// dv of all its keys and dq of its query heads, or in two passes (dk and dv per key block, then dq
// per query block), each forming the tile's scores and their gradients again. One pass forms five
// of a tile's products where two passes form seven; it is chosen unless its fewer, larger tasks
// leave the threads idle for longer than that saves. Both give the same bits.
bool attention_backward_single_pass(const AttentionShape& s, int threads);

// Floats of tile scratch each of `threads` threads takes in attention_backward (before rounding up
// to 16): one pass keeps the transposed keys and values and the dk and dv accumulators of a whole
// sequence, two passes one key block's.
size_t attention_backward_thread_floats(const AttentionShape& s, int threads);

}  // namespace tf::cpu
