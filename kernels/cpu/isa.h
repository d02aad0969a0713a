// defines: tf::cpu::use_avx512 (whether the AVX-512 kernels of the quantized weight ops run),
//          tf::cpu::use_avx2 (whether the AVX2 dropout mask, SwiGLU loops and, without AVX-512, the AVX2
//          decoders of the quantized weight ops run), tf::cpu::ScopedAvx2Kernels (the AVX2 decoders in
//          place of the AVX-512 ones, for tests),
//          tf::cpu::cpu_has_avx512_bf16 (whether the CPU has the bf16 dot products of the bf16 GEMM),
//          tf::cpu::ScopedPortableKernels (forces their portable versions, for tests and comparisons),
//          TF_HAVE_AVX512_KERNELS (set where those kernels are compiled at all)
//
// The AVX-512 kernels are compiled with function-level target options, whatever the build's -march,
// and chosen when the running CPU has the features: one binary runs on any x86-64 and uses the wide
// path where there is one.
#pragma once

#include <atomic>

#if defined(__x86_64__) && defined(__GNUC__)
#define TF_HAVE_AVX512_KERNELS 1
#endif

namespace tf::cpu {

namespace detail {
inline std::atomic<int> g_portable_forced{0};
inline std::atomic<int> g_avx512_forced_off{0};
}  // namespace detail

// AVX-512 F, BW, VL and DQ (and the F16C / FMA every such CPU has) on this CPU.
inline bool cpu_has_avx512() {
#if defined(TF_HAVE_AVX512_KERNELS)
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// AVX-512 BF16 (vdpbf16ps: bf16 pairs multiplied and summed into f32) besides the above; CPUs with AMX
// have it too.
inline bool cpu_has_avx512_bf16() {
#if defined(TF_HAVE_AVX512_KERNELS)
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

inline bool use_avx512() {
  return cpu_has_avx512() && detail::g_portable_forced.load(std::memory_order_relaxed) == 0 &&
         detail::g_avx512_forced_off.load(std::memory_order_relaxed) == 0;
}

// AVX2, FMA and F16C (the 256-bit integer ops of the dropout mask's Philox rounds, SwiGLU's exp_f32x8, the
// quantized weight ops' decoders where there is no AVX-512) on this CPU; every AVX-512 CPU has them.
// Forced off with the AVX-512 kernels by ScopedPortableKernels.
inline bool use_avx2() {
#if defined(TF_HAVE_AVX512_KERNELS)
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return has && detail::g_portable_forced.load(std::memory_order_relaxed) == 0;
#else
  return false;
#endif
}

// While one is alive, the kernels that have an AVX-512 version run their AVX2 one where they have one
// and the CPU has AVX2, so that a test on an AVX-512 machine covers what a CPU without it runs.
class ScopedAvx2Kernels {
 public:
  ScopedAvx2Kernels() { detail::g_avx512_forced_off.fetch_add(1); }
  ~ScopedAvx2Kernels() { detail::g_avx512_forced_off.fetch_sub(1); }
  ScopedAvx2Kernels(const ScopedAvx2Kernels&) = delete;
  ScopedAvx2Kernels& operator=(const ScopedAvx2Kernels&) = delete;
};

// While one is alive, the kernels that have an AVX-512 version run their portable one instead, so that a
// test on an AVX-512 machine covers both.
class ScopedPortableKernels {
 public:
  ScopedPortableKernels() { detail::g_portable_forced.fetch_add(1); }
  ~ScopedPortableKernels() { detail::g_portable_forced.fetch_sub(1); }
  ScopedPortableKernels(const ScopedPortableKernels&) = delete;
  ScopedPortableKernels& operator=(const ScopedPortableKernels&) = delete;
};

}  // namespace tf::cpu
