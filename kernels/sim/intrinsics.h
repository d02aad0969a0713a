// defines: the simulator's versions of CUDA's device types and intrinsics that need no scheduler:
// bf16 / half and their packed pairs with CUDA's conversion functions, the vector types (float2,
// float4, int2, int4, uint2, uint4) and make_*, __ldg, bit intrinsics (__popc, __clz, __ffs,
// __brev, __byte_perm, __float_as_uint and friends), fast math (rsqrtf, __expf, __logf, __fdividef;
// exp2f is the C library's), __constant__ tables (ConstantTable) and memory fences.
//
// Included by kernels/cuda/port.h for host builds only; kernels name these types through
// tf::port (bf16, half, bf16x2, half2) or by CUDA's own spellings.
#pragma once

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <type_traits>

#include "kernels/sim/sim.h"
#include "src/core/dtype.h"

namespace tf::sim {

// 16-bit floating-point storage types. Only bit patterns live here; arithmetic on them is not
// provided (CUDA's operator overloads differ between architectures), so a kernel converts to float
// with __bfloat162float / __half2float, computes, and converts back. The format tag keeps bf16 and
// half distinct types, as they are in CUDA.
template <typename Format>
class Float16Bits {
 public:
  Float16Bits() = default;
  static constexpr Float16Bits from_bits(uint16_t b) {
    Float16Bits v;
    v.bits_ = b;
    return v;
  }
  constexpr uint16_t bits() const { return bits_; }

 private:
  uint16_t bits_;
};
struct Bf16Format;
struct HalfFormat;
using Bf16 = Float16Bits<Bf16Format>;
using Half = Float16Bits<HalfFormat>;

// CUDA's __nv_bfloat162 / __half2: .x is the low half of the 32-bit word, as in an mma fragment.
struct alignas(4) Bf16x2 {
  Bf16 x, y;
};
struct alignas(4) Half2 {
  Half x, y;
};

// Refuses an upload of more bytes than the table holds, naming the table and the caller.
void check_constant_upload(const Region& table, size_t bytes, std::source_location loc);

// A __constant__ table: kernels read it through a checked pointer (bounds, and reads of a table
// the host never uploaded are reported); the host fills it with port::upload_constant.
template <typename T, size_t N>
class ConstantTable {
 public:
  explicit ConstantTable(const char* name) {
    region_.base = reinterpret_cast<std::byte*>(storage_);
    region_.bytes = sizeof(storage_);
    region_.space = Space::Constant;
    region_.elem_size = sizeof(T);
    region_.name = name;
    region_.initialised = false;
  }
  ConstantTable(const ConstantTable&) = delete;
  ConstantTable& operator=(const ConstantTable&) = delete;

  Ref<const T> operator[](std::ptrdiff_t i) const { return ptr()[i]; }
  Ptr<const T> ptr() const { return Ptr<const T>(uintptr_t(storage_), &region_); }
  operator Ptr<const T>() const { return ptr(); }

  // Host side: copies count elements to the start of the table.
  void upload(const T* host, size_t count, std::source_location loc) {
    check_constant_upload(region_, count * sizeof(T), loc);
    std::memcpy(storage_, host, count * sizeof(T));
    region_.initialised = true;
  }

 private:
  alignas(16) T storage_[N];
  Region region_;
};

}  // namespace tf::sim

// ---- 16-bit floats (CUDA's cuda_bf16.h / cuda_fp16.h spellings) -----------------------------------

// Round to nearest even with dtype.h's host conversions, so a value converted in a simulated
// kernel has the bits the CPU backend gives it. NaN stays NaN; the hardware returns the canonical
// NaN 0x7fff where dtype.h keeps the quieted payload, so only NaN bit patterns may differ on a GPU.
inline ::tf::sim::Bf16 __float2bfloat16_rn(float f) {
  return ::tf::sim::Bf16::from_bits(::tf::f32_to_bf16(f));
}
inline float __bfloat162float(::tf::sim::Bf16 h) {
  return ::tf::bf16_to_f32(h.bits());
}
inline ::tf::sim::Half __float2half_rn(float f) {
  return ::tf::sim::Half::from_bits(::tf::f32_to_f16(f));
}
inline float __half2float(::tf::sim::Half h) {
  return ::tf::f16_to_f32(h.bits());
}
inline unsigned short __bfloat16_as_ushort(::tf::sim::Bf16 h) {
  return h.bits();
}
inline ::tf::sim::Bf16 __ushort_as_bfloat16(unsigned short u) {
  return ::tf::sim::Bf16::from_bits(u);
}
inline unsigned short __half_as_ushort(::tf::sim::Half h) {
  return h.bits();
}
inline ::tf::sim::Half __ushort_as_half(unsigned short u) {
  return ::tf::sim::Half::from_bits(u);
}

// ---- vector types ---------------------------------------------------------------------------------

// CUDA's alignments: a 16-byte vector load from an address that is not a multiple of 16 is
// reported by the checker as a misaligned access, as it faults on the GPU.
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

inline float2 make_float2(float x, float y) {
  return {x, y};
}
inline float4 make_float4(float x, float y, float z, float w) {
  return {x, y, z, w};
}
inline int2 make_int2(int x, int y) {
  return {x, y};
}
inline int4 make_int4(int x, int y, int z, int w) {
  return {x, y, z, w};
}
inline uint2 make_uint2(unsigned x, unsigned y) {
  return {x, y};
}
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
  return {x, y, z, w};
}

inline ::tf::sim::Bf16x2 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline ::tf::sim::Bf16x2 __float22bfloat162_rn(float2 v) {
  return __floats2bfloat162_rn(v.x, v.y);
}
inline float2 __bfloat1622float2(::tf::sim::Bf16x2 v) {
  return {__bfloat162float(v.x), __bfloat162float(v.y)};
}
inline ::tf::sim::Half2 __floats2half2_rn(float lo, float hi) {
  return {__float2half_rn(lo), __float2half_rn(hi)};
}
inline ::tf::sim::Half2 __float22half2_rn(float2 v) {
  return __floats2half2_rn(v.x, v.y);
}
inline float2 __half22float2(::tf::sim::Half2 v) {
  return {__half2float(v.x), __half2float(v.y)};
}

// A load through the read-only data cache; in the simulator an ordinary checked read.
template <typename T>
std::remove_const_t<T> __ldg(::tf::sim::Ptr<T> p) {
  return *p;
}

// ---- bits -----------------------------------------------------------------------------------------

inline int __popc(unsigned x) {
  return std::popcount(x);
}
inline int __popcll(unsigned long long x) {
  return std::popcount(x);
}
inline int __clz(int x) {
  return std::countl_zero(unsigned(x));
}
inline int __clzll(long long x) {
  return std::countl_zero((unsigned long long)(x));
}
// 1-based position of the least significant set bit; 0 when none is set.
inline int __ffs(int x) {
  return x == 0 ? 0 : std::countr_zero(unsigned(x)) + 1;
}
inline int __ffsll(long long x) {
  return x == 0 ? 0 : std::countr_zero((unsigned long long)(x)) + 1;
}
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
// Byte n of the result is byte (s >> 4n) & 7 of the eight bytes y:x (x's bytes are 0..3).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const unsigned long long bytes = (unsigned long long)(y) << 32 | x;
  unsigned r = 0;
  for (int n = 0; n < 4; ++n) r |= unsigned(bytes >> (8 * ((s >> (4 * n)) & 7u)) & 0xffu) << (8 * n);
  return r;
}
inline unsigned __float_as_uint(float f) {
  return std::bit_cast<unsigned>(f);
}
inline float __uint_as_float(unsigned u) {
  return std::bit_cast<float>(u);
}
inline int __float_as_int(float f) {
  return std::bit_cast<int>(f);
}
inline float __int_as_float(int i) {
  return std::bit_cast<float>(i);
}

// ---- fast math ------------------------------------------------------------------------------------

// The GPU computes these approximately (the CUDA C Programming Guide's bounds: rsqrtf 2 ulp,
// __fdividef 2 ulp for |y| in [2^-126, 2^126], __expf 2 + floor(|1.173 x|) ulp, __logf 2^-21.41
// absolute in [0.5, 2] and 3 ulp elsewhere, exp2f 2 ulp); the simulator computes them in float with
// the C library, well inside those bounds, and tests compare against them with the GPU's bounds.
// exp2f is the C library's own. glibc's <math.h> declares __expf and __logf (extern "C", noexcept)
// without exporting them, so these definitions complete its declarations.
inline float __expf(float x) noexcept {
  return std::exp(x);
}
inline float __logf(float x) noexcept {
  return std::log(x);
}
inline float rsqrtf(float x) {
  return 1.0f / std::sqrt(x);
}
inline float __fdividef(float x, float y) {
  return x / y;
}

// ---- fences ---------------------------------------------------------------------------------------

// The simulator runs every thread on one host thread, so each write is visible to every later
// read at once: the fences CUDA needs to order writes seen by other threads have nothing to do.
inline void __threadfence() {}
inline void __threadfence_block() {}
