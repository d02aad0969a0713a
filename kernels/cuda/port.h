// defines: the portability layer kernels/cuda/ kernels are written against. Under nvcc it is CUDA
// itself at no cost; under a host compiler the same spellings run on the SIMT simulator
// (kernels/sim/sim.h), which checks every shared and global access, barrier and warp collective.
//
// Kernels use CUDA's own names for
//   threadIdx / blockIdx / blockDim / gridDim, warpSize, dim3
//   __syncthreads, __syncthreads_count / _and / _or, __syncwarp, __threadfence, __threadfence_block
//     (the simulator's memory is sequentially consistent, so fences are no-ops there; its race
//     checker does not take a fence + atomic as ordering blocks: communicate between blocks
//     through a second launch, not the "last block" pattern)
//   __shfl*_sync, __ballot/__any/__all_sync,
//   __activemask (in simulation the caller alone, the least the GPU may return: a mask for a later
//     collective must come from __ballot_sync or be known)
//   __reduce_add_sync / __reduce_min_sync / __reduce_max_sync (int and unsigned)
//   atomicAdd (int, unsigned, float, double) / Max / Min / Exch / CAS
//   float2, float4, int2, int4, uint2, uint4, make_float4 and friends, __ldg
//   __float2bfloat16_rn, __bfloat162float, __float2half_rn, __half2float,
//   __bfloat16_as_ushort, __ushort_as_bfloat16, __half_as_ushort, __ushort_as_half,
//   __floats2bfloat162_rn, __float22bfloat162_rn, __bfloat1622float2,
//   __floats2half2_rn, __float22half2_rn, __half22float2
//   __popc, __popcll, __clz, __clzll, __ffs, __ffsll, __brev, __byte_perm,
//   __float_as_uint, __uint_as_float, __float_as_int, __int_as_float
//   rsqrtf, __expf, __logf, exp2f, __fdividef: approximate on the GPU (CUDA C Programming Guide:
//     rsqrtf, exp2f and __fdividef 2 ulp, __expf 2 + floor(|1.173 x|) ulp, __logf 2^-21.41
//     absolute in [0.5, 2], 3 ulp elsewhere); the simulator computes them in float with the C
//     library, so tests compare against those bounds, not against bits
// and from tf::port:
//   gptr<T>, sptr<T>          pointers to global and shared memory (T* under nvcc)
//   bf16, half, bf16x2, half2 __nv_bfloat16, __half, __nv_bfloat162, __half2 (in simulation 16-bit
//                             storage types with dtype.h's conversions; no arithmetic on them)
//   TF_SHARED(T, name, n)     static shared array of n elements; TF_DYNAMIC_SHARED(T, name)
//   TF_CONSTANT(T, name, n)   a __constant__ table of n elements at namespace scope, read as
//                             name[i]; upload_constant(name, host, count) fills it from the host
//                             (not ordered with streams: before the first launch that reads it)
//   TF_UNROLL                 #pragma unroll where the compiler knows it
//   ptr_cast<U>(p)            reinterpret a device pointer
//   mma_m16n8k16_bf16 / _f16  mma.sync.aligned.m16n8k16.row.col, f32 accumulate
//   mma_m16n8k8_bf16 / _f16   mma.sync.aligned.m16n8k8.row.col, f32 accumulate
//   mma_m16n8k32_s8, mma_m16n8k16_s8  mma.sync.aligned.*.row.col.s32.s8.s8.s32 (wrapping)
//     (fragment layouts: kernels/sim/fragments.h)
//   ldmatrix<N, Trans>(r, p)  ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16
//   cp_async_16(dst, src, n)  cp.async.cg.shared.global, 16 bytes of which the first n are read
//   cp_async_commit(), cp_async_wait<N>()
//   launch(kernel, LaunchConfig{...}, args...)
// Rules that keep a kernel runnable in the simulator:
//   - device memory is reached only through gptr / sptr (a raw pointer parameter does not compile
//     for the simulator);
//   - read an element into a named type (float v = tile[i]), not `auto`: in simulation tile[i] is a
//     checked reference, and `auto` would keep the reference rather than the value;
//   - load a whole struct element before reading its members;
//   - convert bf16 / half explicitly (__bfloat162float ...), and reach their bits with
//     __bfloat16_as_ushort / __ushort_as_bfloat16;
//   - a 16-byte vector access needs a 16-byte aligned address (the simulator reports others).
// The code must also compile as C++17 (nvcc) and C++20 (host).
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

#include "kernels/cuda/runtime.h"

#if defined(__CUDACC__)
#define TF_PORT_SIM 0
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "src/core/error.h"
#else
#define TF_PORT_SIM 1
#include "kernels/sim/intrinsics.h"
#include "kernels/sim/mma.h"
#include "kernels/sim/sim.h"
#endif

// Launchers live in tf::cuda when built by nvcc and in tf::simt when the same source is compiled
// for the simulator, so both can be linked into one program.
#if TF_PORT_SIM
#define TF_PORT_BACKEND simt
#else
#define TF_PORT_BACKEND cuda
#endif

namespace tf::port {

template <typename T>
struct type_identity {
  using type = T;
};

}  // namespace tf::port

#if !TF_PORT_SIM  // ---------------------------------------------------------------- CUDA itself

#define TF_UNROLL _Pragma("unroll")
#define TF_SHARED(T, name, count) __shared__ __align__(16) T name[count]
#define TF_DYNAMIC_SHARED(T, name)                                  \
  extern __shared__ __align__(16) unsigned char tf_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(tf_dynamic_smem_)
#define TF_CONSTANT(T, name, count) __constant__ __align__(16) T name[count]

namespace tf::port {

template <typename T>
using gptr = T*;
template <typename T>
using sptr = T*;
using bf16 = __nv_bfloat16;
using half = __half;
using bf16x2 = __nv_bfloat162;
using half2 = __half2;

// Copies count elements to the start of a TF_CONSTANT table. The copy is not ordered with the
// backend's streams: upload before the first launch that reads the table, never while one may run.
template <typename T, size_t N>
void upload_constant(T (&table)[N], const typename type_identity<T>::type* host, size_t count) {
  TF_CHECK(count <= N, "upload of ", count, " elements into a __constant__ table of ", N);
  const cudaError_t e = cudaMemcpyToSymbol(table, host, count * sizeof(T));
  TF_CHECK(e == cudaSuccess, "upload to a __constant__ table: ", cudaGetErrorString(e));
}
using stream_t = cudaStream_t;

template <typename U, typename T>
__device__ __forceinline__ U* ptr_cast(T* p) {
  return reinterpret_cast<U*>(p);
}

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2], const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2], const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

__device__ __forceinline__ void mma_m16n8k8_bf16(float (&d)[4], const uint32_t (&a)[2],
                                                 const uint32_t (&b)[1], const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%8,%9,%10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(b[0]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ void mma_m16n8k8_f16(float (&d)[4], const uint32_t (&a)[2], const uint32_t (&b)[1],
                                                const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%8,%9,%10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(b[0]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ void mma_m16n8k32_s8(int32_t (&d)[4], const uint32_t (&a)[4],
                                                const uint32_t (&b)[2], const int32_t (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(c[0]), "r"(c[1]), "r"(c[2]),
        "r"(c[3]));
}

__device__ __forceinline__ void mma_m16n8k16_s8(int32_t (&d)[4], const uint32_t (&a)[2],
                                                const uint32_t (&b)[1], const int32_t (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%8,%9,%10};\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(b[0]), "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]));
}

template <int kNum, bool kTrans = false, typename T>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[kNum], const T* row) {
  static_assert(kNum == 1 || kNum == 2 || kNum == 4, "ldmatrix loads 1, 2 or 4 matrices");
  const auto addr = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if constexpr (kNum == 1 && !kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr));
  } else if constexpr (kNum == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr));
  } else if constexpr (kNum == 2 && !kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
  } else if constexpr (kNum == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
  } else if constexpr (!kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
}

template <typename T>
__device__ __forceinline__ void cp_async_16(T* dst, const typename type_identity<T>::type* src,
                                            int src_bytes = 16) {
  const auto addr = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

}  // namespace tf::port

#else  // ----------------------------------------------------------------------- the simulator

#define TF_UNROLL
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (::tf::sim::thread_index())
#define blockIdx (::tf::sim::block_index())
#define blockDim (::tf::sim::block_dim())
#define gridDim (::tf::sim::grid_dim())

#define TF_SHARED(T, name, count)                                                         \
  static const ::tf::sim::SharedDecl name##_decl_{#name, sizeof(T) * (count), sizeof(T)}; \
  const ::tf::sim::Ptr<T> name = ::tf::sim::region_ptr<T>(::tf::sim::static_shared(name##_decl_))
#define TF_DYNAMIC_SHARED(T, name) \
  const ::tf::sim::Ptr<T> name = ::tf::sim::region_ptr<T>(::tf::sim::dynamic_shared())
#define TF_CONSTANT(T, name, count) ::tf::sim::ConstantTable<T, count> name(#name)

using dim3 = ::tf::sim::Dim3;
using uint3 = ::tf::sim::Dim3;
inline constexpr int warpSize = ::tf::sim::kWarpSize;

inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  ::tf::sim::syncthreads(loc);
}
inline int __syncthreads_count(int pred, std::source_location loc = std::source_location::current()) {
  return int(::tf::sim::syncthreads_count(pred != 0, loc));
}
inline int __syncthreads_and(int pred, std::source_location loc = std::source_location::current()) {
  return int(::tf::sim::syncthreads_count(pred != 0, loc)) == int(blockDim.x * blockDim.y * blockDim.z);
}
inline int __syncthreads_or(int pred, std::source_location loc = std::source_location::current()) {
  return ::tf::sim::syncthreads_count(pred != 0, loc) != 0;
}
inline void __syncwarp(unsigned mask = 0xffffffffu,
                       std::source_location loc = std::source_location::current()) {
  ::tf::sim::syncwarp(mask, loc);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = warpSize,
              std::source_location loc = std::source_location::current()) {
  return ::tf::sim::shfl(::tf::sim::ShflKind::Idx, mask, v, src_lane, width, loc);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize,
                 std::source_location loc = std::source_location::current()) {
  return ::tf::sim::shfl(::tf::sim::ShflKind::Up, mask, v, int(delta), width, loc);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize,
                   std::source_location loc = std::source_location::current()) {
  return ::tf::sim::shfl(::tf::sim::ShflKind::Down, mask, v, int(delta), width, loc);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize,
                  std::source_location loc = std::source_location::current()) {
  return ::tf::sim::shfl(::tf::sim::ShflKind::Xor, mask, v, lane_mask, width, loc);
}
inline unsigned __ballot_sync(unsigned mask, int pred,
                              std::source_location loc = std::source_location::current()) {
  return ::tf::sim::vote(::tf::sim::VoteKind::Ballot, mask, pred != 0, loc);
}
inline int __any_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return int(::tf::sim::vote(::tf::sim::VoteKind::Any, mask, pred != 0, loc));
}
inline int __all_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return int(::tf::sim::vote(::tf::sim::VoteKind::All, mask, pred != 0, loc));
}
// The hardware returns the lanes that happen to execute this call together, which may be any subset
// that contains the caller; the simulator returns the smallest, the caller alone, so that a kernel
// relying on more (say, shuffling from a lane the mask may not hold) is reported.
inline unsigned __activemask() {
  const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  return 1u << (tid % unsigned(warpSize));
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v,
                                  std::source_location loc = std::source_location::current()) {
  return ::tf::sim::reduce(::tf::sim::ReduceKind::Add, false, mask, v, loc);
}
inline int __reduce_add_sync(unsigned mask, int v,
                             std::source_location loc = std::source_location::current()) {
  return int(::tf::sim::reduce(::tf::sim::ReduceKind::Add, true, mask, uint32_t(v), loc));
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v,
                                  std::source_location loc = std::source_location::current()) {
  return ::tf::sim::reduce(::tf::sim::ReduceKind::Min, false, mask, v, loc);
}
inline int __reduce_min_sync(unsigned mask, int v,
                             std::source_location loc = std::source_location::current()) {
  return int(::tf::sim::reduce(::tf::sim::ReduceKind::Min, true, mask, uint32_t(v), loc));
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v,
                                  std::source_location loc = std::source_location::current()) {
  return ::tf::sim::reduce(::tf::sim::ReduceKind::Max, false, mask, v, loc);
}
inline int __reduce_max_sync(unsigned mask, int v,
                             std::source_location loc = std::source_location::current()) {
  return int(::tf::sim::reduce(::tf::sim::ReduceKind::Max, true, mask, uint32_t(v), loc));
}

template <typename T>
T atomicAdd(::tf::sim::Ptr<T> p, typename ::tf::port::type_identity<T>::type v) {
  return ::tf::sim::atomic_rmw(p, [&](T old) { return T(old + v); });
}
template <typename T>
T atomicMax(::tf::sim::Ptr<T> p, typename ::tf::port::type_identity<T>::type v) {
  return ::tf::sim::atomic_rmw(p, [&](T old) { return old < v ? v : old; });
}
template <typename T>
T atomicMin(::tf::sim::Ptr<T> p, typename ::tf::port::type_identity<T>::type v) {
  return ::tf::sim::atomic_rmw(p, [&](T old) { return v < old ? v : old; });
}
template <typename T>
T atomicExch(::tf::sim::Ptr<T> p, typename ::tf::port::type_identity<T>::type v) {
  return ::tf::sim::atomic_rmw(p, [&](T) { return v; });
}
template <typename T>
T atomicCAS(::tf::sim::Ptr<T> p, typename ::tf::port::type_identity<T>::type compare,
            typename ::tf::port::type_identity<T>::type v) {
  return ::tf::sim::atomic_rmw(p, [&](T old) { return old == compare ? v : old; });
}

namespace tf::port {

template <typename T>
using gptr = sim::Ptr<T>;
template <typename T>
using sptr = sim::Ptr<T>;
using stream_t = void*;
using sim::ptr_cast;
using bf16 = sim::Bf16;
using half = sim::Half;
using bf16x2 = sim::Bf16x2;
using half2 = sim::Half2;

template <typename T, size_t N>
void upload_constant(sim::ConstantTable<T, N>& table, const typename type_identity<T>::type* host,
                     size_t count, std::source_location loc = std::source_location::current()) {
  table.upload(host, count, loc);
}

inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                              const float (&c)[4],
                              std::source_location loc = std::source_location::current()) {
  sim::mma({sim::MmaShape::M16N8K16, sim::MmaType::BF16, a, b, c, d}, loc);
}
inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                             const float (&c)[4],
                             std::source_location loc = std::source_location::current()) {
  sim::mma({sim::MmaShape::M16N8K16, sim::MmaType::F16, a, b, c, d}, loc);
}
inline void mma_m16n8k8_bf16(float (&d)[4], const uint32_t (&a)[2], const uint32_t (&b)[1],
                             const float (&c)[4],
                             std::source_location loc = std::source_location::current()) {
  sim::mma({sim::MmaShape::M16N8K8, sim::MmaType::BF16, a, b, c, d}, loc);
}
inline void mma_m16n8k8_f16(float (&d)[4], const uint32_t (&a)[2], const uint32_t (&b)[1],
                            const float (&c)[4], std::source_location loc = std::source_location::current()) {
  sim::mma({sim::MmaShape::M16N8K8, sim::MmaType::F16, a, b, c, d}, loc);
}
inline void mma_m16n8k32_s8(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                            const int32_t (&c)[4],
                            std::source_location loc = std::source_location::current()) {
  sim::mma({sim::MmaShape::M16N8K32, sim::MmaType::S8, a, b, c, d}, loc);
}
inline void mma_m16n8k16_s8(int32_t (&d)[4], const uint32_t (&a)[2], const uint32_t (&b)[1],
                            const int32_t (&c)[4],
                            std::source_location loc = std::source_location::current()) {
  sim::mma({sim::MmaShape::M16N8K16, sim::MmaType::S8, a, b, c, d}, loc);
}

template <int kNum, bool kTrans = false, typename T>
void ldmatrix(uint32_t (&r)[kNum], sptr<T> row, std::source_location loc = std::source_location::current()) {
  static_assert(kNum == 1 || kNum == 2 || kNum == 4, "ldmatrix loads 1, 2 or 4 matrices");
  sim::ldmatrix(kNum, kTrans, r, row.region(), row.addr(), loc);
}

template <typename T>
void cp_async_16(sptr<T> dst, typename type_identity<gptr<const T>>::type src, int src_bytes = 16,
                 std::source_location loc = std::source_location::current()) {
  sim::cp_async(dst.region(), dst.addr(), src.region(), src.addr(), 16, src_bytes, loc);
}
inline void cp_async_commit() {
  sim::cp_async_commit();
}
template <int kPending>
void cp_async_wait() {
  sim::cp_async_wait(kPending);
}

}  // namespace tf::port

#endif  // TF_PORT_SIM

namespace tf::port {

// One kernel launch. Dynamic shared memory above 48 KB needs CUDA's opt-in, which launch() makes.
struct LaunchConfig {
  const char* name;  // for error messages
  dim3 grid;
  dim3 block;
  size_t dynamic_smem = 0;
  TF_PORT_BACKEND::rt::StreamHandle stream = nullptr;
};

// Queues the kernel on cfg.stream. With rt::sync_after_launch() on, the CUDA build also waits for
// it, so that a fault is reported at the launch that caused it.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), const LaunchConfig& cfg, Args&&... args) {
#if TF_PORT_SIM
  sim::launch_with(sim::LaunchSpec{cfg.name, cfg.grid, cfg.block, cfg.dynamic_smem, cfg.stream}, kernel,
                   std::forward<Args>(args)...);
#else
  auto check = [&](cudaError_t e) {
    if (e != cudaSuccess)
      throw Error(detail::concat("launch of kernel '", cfg.name, "': ", cudaGetErrorString(e)));
  };
  if (cfg.dynamic_smem > 48 * 1024) {
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(cfg.dynamic_smem)));
  }
  const auto stream = static_cast<cudaStream_t>(cfg.stream);
  kernel<<<cfg.grid, cfg.block, cfg.dynamic_smem, stream>>>(std::forward<Args>(args)...);
  check(cudaGetLastError());
  if (cuda::rt::sync_after_launch()) check(cudaStreamSynchronize(stream));
#endif
}

}  // namespace tf::port
