// defines: the fast elementwise ops (tf::cpu::add_inplace, add_bias, fill, scale_inplace, copy,
//          sum_squares, dropout_forward, dropout_backward): OpenMP loops above kMinParallelElems,
//          dropout masks from sixteen Philox blocks at a time (in AVX2 registers where the CPU has them)
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/float_weight.h"
#include "kernels/cpu/isa.h"
#include "kernels/ops.h"
#include "src/core/error.h"
#include "src/core/parallel.h"
#include "src/core/rng.h"

// x86-64 under GCC (TF_HAVE_AVX512_KERNELS), where the AVX2 mask kernel is compiled.
#if defined(TF_HAVE_AVX512_KERNELS)
#include <immintrin.h>
#endif

namespace tf::cpu {

void add_inplace(float* y, const float* x, int64_t n) {
#pragma omp parallel for if (n >= kMinParallelElems) schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void add_bias(float* y, WeightRef bias, int64_t rows, int64_t width) {
  with_float_weight("add_bias: bias", bias, width, [&](auto b) {
#pragma omp parallel for if (rows * width >= kMinParallelElems) schedule(static)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < width; ++c) y[r * width + c] += b(c);
  });
}

void fill(float* x, float value, int64_t n) {
  std::fill(x, x + n, value);
}

void scale_inplace(float* x, float s, int64_t n) {
#pragma omp parallel for if (n >= kMinParallelElems) schedule(static)
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

void copy(float* dst, const float* src, int64_t n) {
  std::memcpy(dst, src, size_t(n) * sizeof(float));
}

double sum_squares(const float* x, int64_t n) {
  return ordered_sum(n, [x](int64_t i) { return double(x[i]) * double(x[i]); });
}

namespace {

constexpr uint64_t kGroupElems = 4 * Philox::kBatch;

// Element i is dropped when uint_to_unit_float(word) = (word >> 8) 2^-24 < p. For an integer v,
// v < p 2^24 holds exactly when v < ceil(p 2^24) (p 2^24 is exact in f32: a power-of-two scale), and
// (word >> 8) < T exactly when word < 256 T; p < 1 keeps 256 T below 2^32. So the vector path
// compares the raw words with one integer and drops exactly the elements the float test drops.
uint32_t dropout_word_threshold(float p) {
  return uint32_t(std::ceil(p * 16777216.0f)) << 8;
}

// What a mask is applied to. Forward: out = dropout(x) (out may be x). Backward (dx set): out holds
// the gradient coming in, dropout of which is added to dx before out takes dropout(x).
struct MaskTarget {
  float* out;
  const float* x;
  float* dx;
};

// The elements e0 .. e1 (indices in the mask) of group g, one by one from the group's words: the
// portable path, and the partial groups at either end of the vector path.
void dropout_group_scalar(const MaskTarget& t, const Philox& rng, uint64_t g, uint64_t e0, uint64_t e1,
                          uint64_t first, float p, float keep_scale) {
  uint32_t words[4][Philox::kBatch];
  rng.blocks(g * Philox::kBatch, words);
  uint32_t element[kGroupElems];
  for (int b = 0; b < Philox::kBatch; ++b)
    for (int w = 0; w < 4; ++w) element[4 * b + w] = words[w][b];
  for (uint64_t e = e0; e < e1; ++e) {
    const uint64_t i = e - first;
    const bool dropped = uint_to_unit_float(element[e - g * kGroupElems]) < p;
    if (t.dx) t.dx[i] += dropped ? 0.0f : t.out[i] * keep_scale;
    t.out[i] = dropped ? 0.0f : t.x[i] * keep_scale;
  }
}

}  // namespace

#if defined(TF_HAVE_AVX512_KERNELS)
#pragma GCC push_options
#pragma GCC target("avx2")
namespace {

// The 32x32 -> 64-bit products of Philox's rounds, 8 lanes at once: mul_epu32 multiplies the even
// lanes (and, shifted down, the odd ones) into 64-bit lanes, whose halves are put back in place.
inline void mul_hi_lo(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// AVX2 has only signed 32-bit compares: flipping the sign bits of both sides orders them unsigned.
inline __m256i less_unsigned(__m256i a, __m256i b) {
  const __m256i sign = _mm256_set1_epi32(int(0x80000000u));
  return _mm256_cmpgt_epi32(_mm256_xor_si256(b, sign), _mm256_xor_si256(a, sign));
}

// Philox4x32-10 of the 8 blocks first .. first + 7 of the stream (key k0, k1; stream words s0, s1):
// the rounds of philox4x32_words, lane b holding block first + b and c[w] word w of each block.
inline void philox_blocks8(uint64_t first, uint32_t k0, uint32_t k1, uint32_t s0, uint32_t s1,
                           __m256i (&c)[4]) {
  // With first a multiple of 8 the low counter words of its 8 blocks never wrap into the high one.
  c[0] = _mm256_add_epi32(_mm256_set1_epi32(int(uint32_t(first))), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  c[1] = _mm256_set1_epi32(int(uint32_t(first >> 32)));
  c[2] = _mm256_set1_epi32(int(s0));
  c[3] = _mm256_set1_epi32(int(s1));
  const __m256i m0 = _mm256_set1_epi32(int(0xD2511F53u)), m1 = _mm256_set1_epi32(int(0xCD9E8D57u));
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mul_hi_lo(c[0], m0, hi0, lo0);
    mul_hi_lo(c[2], m1, hi1, lo1);
    const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c[1]), _mm256_set1_epi32(int(k0)));
    const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c[3]), _mm256_set1_epi32(int(k1)));
    c[1] = lo1;
    c[3] = lo0;
    c[0] = n0;
    c[2] = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// Groups g0 .. g1 - 1 of the mask, each its 64 elements in mask order (element 4b + w is word w of
// block b): each half group's words are transposed in registers, compared with the threshold, and
// x scaled where kept, one rounded product per element as in the scalar path (and the same for the
// gradient added to dx).
void dropout_groups_avx2(const MaskTarget& t, uint64_t g0, uint64_t g1, uint64_t first, uint64_t key,
                         uint64_t stream, uint32_t threshold, float keep_scale) {
  const __m256i limit = _mm256_set1_epi32(int(threshold));
  const __m256 scale = _mm256_set1_ps(keep_scale);
  for (uint64_t g = g0; g < g1; ++g) {
    for (int half = 0; half < 2; ++half) {
      __m256i c[4];
      philox_blocks8(g * Philox::kBatch + 8 * uint64_t(half), uint32_t(key), uint32_t(key >> 32),
                     uint32_t(stream), uint32_t(stream >> 32), c);
      // Blocks 0-1 | 4-5 and 2-3 | 6-7 as word pairs, then whole blocks b | b + 4, then in order.
      const __m256i t0 = _mm256_unpacklo_epi32(c[0], c[1]), t1 = _mm256_unpackhi_epi32(c[0], c[1]);
      const __m256i t2 = _mm256_unpacklo_epi32(c[2], c[3]), t3 = _mm256_unpackhi_epi32(c[2], c[3]);
      const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
      const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
      const __m256i words[4] = {
          _mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u2, u3, 0x20),
          _mm256_permute2x128_si256(u0, u1, 0x31), _mm256_permute2x128_si256(u2, u3, 0x31)};
      const uint64_t i0 = g * kGroupElems + 32 * uint64_t(half) - first;
      for (int v = 0; v < 4; ++v) {
        const uint64_t i = i0 + 8 * uint64_t(v);
        const __m256 dropped = _mm256_castsi256_ps(less_unsigned(words[v], limit));
        if (t.dx) {
          const __m256 gv = _mm256_andnot_ps(dropped, _mm256_mul_ps(_mm256_loadu_ps(t.out + i), scale));
          _mm256_storeu_ps(t.dx + i, _mm256_add_ps(_mm256_loadu_ps(t.dx + i), gv));
        }
        const __m256 xv = _mm256_loadu_ps(t.x + i);
        _mm256_storeu_ps(t.out + i, _mm256_andnot_ps(dropped, _mm256_mul_ps(xv, scale)));
      }
    }
  }
}

}  // namespace
#pragma GCC pop_options
#endif

namespace {

// Element i draws word i % 4 of Philox block i / 4 (Philox::uniform(i)), the blocks computed
// kBatch at a time in vector lanes and every word used: one scalar block per element made the
// masks a third of a training step, and the compiler's lane-wise version of Philox::blocks still
// ran at 4-6.5 ns an element (bench_lora), so AVX2 CPUs run the rounds in registers. The groups
// are aligned in the mask (from index 0), so that the rows of a larger input starting at `first`
// draw the same words as that input does.
void apply_dropout(const MaskTarget& t, int64_t n, float p, uint64_t seed, uint64_t stream, uint64_t first) {
  if (n <= 0) return;
  const Philox rng(seed, stream);
  const float keep_scale = 1.0f / (1.0f - p);
  const uint64_t end = first + uint64_t(n);
  const uint64_t g0 = first / kGroupElems, g1 = (end + kGroupElems - 1) / kGroupElems;
#if defined(TF_HAVE_AVX512_KERNELS)
  if (use_avx2()) {
    // Whole groups in the vector path; the partial ones at either end, at most two, one by one.
    const uint64_t v0 = (first + kGroupElems - 1) / kGroupElems, v1 = end / kGroupElems;
    if (v0 >= v1) {
      for (uint64_t g = g0; g < g1; ++g)
        dropout_group_scalar(t, rng, g, std::max(g * kGroupElems, first),
                             std::min((g + 1) * kGroupElems, end), first, p, keep_scale);
      return;
    }
    if (first < v0 * kGroupElems)
      dropout_group_scalar(t, rng, g0, first, v0 * kGroupElems, first, p, keep_scale);
    if (end > v1 * kGroupElems) dropout_group_scalar(t, rng, v1, v1 * kGroupElems, end, first, p, keep_scale);
    const uint32_t threshold = dropout_word_threshold(p);
#pragma omp parallel for if (n >= kMinParallelElems) schedule(static)
    for (uint64_t g = v0; g < v1; ++g)
      dropout_groups_avx2(t, g, g + 1, first, seed, stream, threshold, keep_scale);
    return;
  }
#endif
#pragma omp parallel for if (n >= kMinParallelElems) schedule(static)
  for (uint64_t g = g0; g < g1; ++g)
    dropout_group_scalar(t, rng, g, std::max(g * kGroupElems, first), std::min((g + 1) * kGroupElems, end),
                         first, p, keep_scale);
}

}  // namespace

void dropout_forward(float* out, const float* x, int64_t n, float p, uint64_t seed, uint64_t stream,
                     uint64_t first) {
  TF_CHECK(p >= 0 && p < 1, "dropout_forward: p must be in [0, 1), got ", p);
  apply_dropout({out, x, nullptr}, n, p, seed, stream, first);
}

void dropout_backward(float* dx, float* g, const float* x, int64_t n, float p, uint64_t seed, uint64_t stream,
                      uint64_t first) {
  TF_CHECK(p >= 0 && p < 1, "dropout_backward: p must be in [0, 1), got ", p);
  apply_dropout({g, x, dx}, n, p, seed, stream, first);
}

}  // namespace tf::cpu
