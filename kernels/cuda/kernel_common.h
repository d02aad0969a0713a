// defines: what the CUDA backend's elementwise, norm and embedding launchers share: launch shapes on
// rt::current_stream(), widening loads of f32 / bf16 / f16 weights (StoredF32 / StoredBF16 /
// StoredF16 and with_stored_weight, which picks a kernel instantiation from a WeightRef's dtype),
// block_sum, a block-wide sum in a fixed order, and mul_rn, a product rounded on its own. Include
// it at file scope: it opens namespace tf::TF_PORT_BACKEND itself.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/cuda/port.h"
#include "kernels/cuda/runtime.h"
#include "kernels/ops.h"
#include "src/core/dtype.h"
#include "src/core/error.h"

#if !TF_PORT_SIM
#include <cuda_fp16.h>
#endif

namespace tf::TF_PORT_BACKEND {

// Threads per block of the one-element-per-thread kernels: small enough that a simulated launch
// of a few blocks stays a few hundred fibers, large enough to keep an SM busy with several blocks.
constexpr int kElementThreads = 128;
// Grid-stride kernels launch at most this many blocks (131072 threads fill an H200 twice over).
constexpr int64_t kMaxElementBlocks = 1024;

// A launch of `blocks` (at least one) blocks of `threads` on the stream the launchers queue on.
inline port::LaunchConfig on_current_stream(const char* name, int64_t blocks, int threads,
                                            size_t dynamic_smem = 0) {
  return port::LaunchConfig{name, dim3(unsigned(std::max<int64_t>(blocks, 1))), dim3(unsigned(threads)),
                            dynamic_smem, rt::current_stream()};
}

// Blocks of kElementThreads for a grid-stride loop over n items.
inline int64_t element_blocks(int64_t n) {
  return std::min(kMaxElementBlocks, (n + kElementThreads - 1) / kElementThreads);
}

// a * b, rounded once and never fused into a following add or subtract: the references compute
// each product and sum as its own rounding (ggml, bitsandbytes, dropout's backward), and so must
// the device.
__device__ __forceinline__ float mul_rn(float a, float b) {
#if TF_PORT_SIM
  const volatile float p = a * b;
  return p;
#else
  return __fmul_rn(a, b);
#endif
}

// The first index and the stride of a grid-stride loop over 1-D blocks.
__device__ __forceinline__ int64_t grid_first() {
  return int64_t(blockIdx.x) * int64_t(blockDim.x) + int64_t(threadIdx.x);
}
__device__ __forceinline__ int64_t grid_stride() {
  return int64_t(gridDim.x) * int64_t(blockDim.x);
}

// f32 to bf16 bits, rounding to nearest even (one conversion instruction on a GPU); NaN stays NaN
// (a GPU gives the canonical NaN where tf::f32_to_bf16, the simulator's conversion, keeps the
// quieted payload).
__device__ __forceinline__ uint16_t bf16_bits(float x) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
// Two f32 rounded to bf16, lo in the low half: the register layout of mma.sync's bf16 fragments
// and of a bf16x2 in memory.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  return uint32_t(bf16_bits(lo)) | uint32_t(bf16_bits(hi)) << 16;
}

// Storage types of small float weights (norm weights, biases, embedding rows): Storage is the
// element in device memory, widen() its exact f32 value.
struct StoredF32 {
  using Storage = float;
  __device__ __forceinline__ static float widen(float v) { return v; }
};
struct StoredBF16 {
  using Storage = uint16_t;
  __device__ __forceinline__ static float widen(uint16_t h) {
    const uint32_t bits = uint32_t(h) << 16;
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
  }
};
struct StoredF16 {
  using Storage = uint16_t;
  __device__ __forceinline__ static float widen(uint16_t h) {
#if TF_PORT_SIM
    return f16_to_f32(h);
#else
    return __half2float(__ushort_as_half(h));
#endif
  }
};

// Calls fn(StoredX{}) for w's dtype, so the kernel fn launches is instantiated per storage type and
// its inner loop has no per-element switch. `what` names the weight in errors ("rmsnorm weight").
template <typename Fn>
void with_stored_weight(const char* what, const WeightRef& w, Fn&& fn) {
  switch (w.dtype) {
    case DType::F32: return fn(StoredF32{});
    case DType::BF16: return fn(StoredBF16{});
    case DType::F16: return fn(StoredF16{});
    default: break;
  }
  TF_FAIL(what, " dtype ", dtype_name(w.dtype), " is not a float type (f32, bf16, f16)");
}

// The sum of v over the block's kThreads threads (all of which must call it), returned to every
// thread. Lanes add by a butterfly, then each thread adds the warp sums in warp order: a fixed
// order, so the same bits on every run and every interleaving of the threads.
template <int kThreads, typename T>
__device__ T block_sum(T v) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block_sum needs whole warps");
  constexpr int kWarps = kThreads / 32;
  TF_SHARED(T, warp_sums, kWarps);
  TF_UNROLL
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < kWarps; ++w) {
    const T s = warp_sums[w];
    total += s;
  }
  __syncthreads();  // a later call overwrites warp_sums only after every thread has read them
  return total;
}

}  // namespace tf::TF_PORT_BACKEND
