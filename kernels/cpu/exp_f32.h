// defines: tf::cpu::exp_f32 (e^x in f32 within one ulp, subnormal results, overflow to inf and NaN
//          included) and, where the AVX2 kernels are compiled, tf::cpu::exp_f32x8 (eight lanes of
//          the same, bit for bit)
//
// The element-wise activations spent most of their time in the C library's expf, one element at a
// time. These two compute e^x by the same operations in the same order, so a loop can run its
// lanes eight at a time and its tail one by one and give the bits the scalar loop gives on any
// CPU: n = nearest(x log2 e); r = x - n ln2 in two FMAs (ln2 split into a high and a low part);
// e^r by its Taylor polynomial of degree 7 in Horner form, one FMA a term (|r| <= ln2 / 2, where
// the dropped term is below 0.13 ulp); then r's power scaled by 2^n in two exact powers of two,
// so that a subnormal result is rounded once. Neither has a product followed by a sum that a
// compiler could fuse into an FMA; a caller whose own arithmetic is to match lane for lane is
// compiled with -ffp-contract=off.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/isa.h"

#if defined(TF_HAVE_AVX512_KERNELS)
#include <immintrin.h>
#endif

namespace tf::cpu {

namespace exp_detail {
// Past these e^x is 0 (below half the smallest subnormal) or inf: clamping keeps n's powers of two
// representable and gives those results exactly.
constexpr float kLo = -104.0f, kHi = 89.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f;  // ln 2 to 16 bits, so n ln2_hi is exact
constexpr float kLn2Lo = 1.42860682030941723e-6f;
// 1 / k!, k = 7 down to 2.
constexpr float kC[] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f};

inline float pow2(int32_t k) {
  const uint32_t bits = uint32_t(k + 127) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
}  // namespace exp_detail

inline float exp_f32(float x) {
  using namespace exp_detail;
  if (std::isnan(x)) return x;
  x = std::fmin(std::fmax(x, kLo), kHi);
  const float n = std::nearbyint(x * kLog2e);
  float r = std::fma(n, -kLn2Hi, x);
  r = std::fma(n, -kLn2Lo, r);
  float p = kC[0];
  for (int i = 1; i < 6; ++i) p = std::fma(p, r, kC[i]);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  // n lies in [-150, 128]: its halves are normal powers of two, the first product exact.
  const int32_t k = int32_t(n), k1 = k >> 1, k2 = k - k1;
  return p * pow2(k1) * pow2(k2);
}

#if defined(TF_HAVE_AVX512_KERNELS)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
inline __m256 exp_f32x8(__m256 x) {
  using namespace exp_detail;
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kLo)), _mm256_set1_ps(kHi));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kC[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kC[i]));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i k = _mm256_cvtps_epi32(n), k1 = _mm256_srai_epi32(k, 1), k2 = _mm256_sub_epi32(k, k1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, bias), 23));
  return _mm256_blendv_ps(_mm256_mul_ps(_mm256_mul_ps(p, s1), s2), x, nan);
}
#pragma GCC pop_options
#endif

}  // namespace tf::cpu
