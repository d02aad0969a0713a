// defines: tf::cpu::avx2 block decoders of every quantized dtype (ggml blocks, NF4 / INT8 runs) that hand
//          the dequantized values, 8 at a time in a register, to a sink; and TF_AVX2_BEGIN /
//          TF_AVX2_END, which compile the code between them for AVX2 + FMA + F16C
//
// The decoders of the CPUs without AVX-512 (most desktop CPUs), shared by the weight-tile
// dequantizer and quant_gemv as the AVX-512 ones are. The values are the reference dequantizers'
// bit for bit: a ggml value is an f16 scale (or a product of one with a 6-bit integer) times a small
// integer, exact in f32, so forming (q - 8) d or q d + m directly, where the AVX-512 decoders look
// the 16 or 32 possible values up in a table of the same products, rounds the same once; Q6_K and
// the K-quants keep the reference's order of their one inexact product. F16C converts the scales
// but a NaN, which it would quiet where the reference keeps its bits.
#pragma once

#include "kernels/cpu/avx512_blocks.h"

#if defined(TF_HAVE_AVX512_KERNELS)

#include <immintrin.h>

#include <cstring>

#include "kernels/quant_blocks.h"
#include "src/core/dtype.h"

#define TF_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define TF_AVX2_END _Pragma("GCC pop_options")

TF_AVX2_BEGIN

namespace tf::cpu::avx2 {

using simd::f16_scale;
using simd::high_nibbles;
using simd::load16;
using simd::low_nibbles;

inline __m128i load8(const uint8_t* p) {
  return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
}
// The low 8 bytes of b as unsigned (u8) or signed (i8) floats; upper moves bytes 8-15 down.
inline __m256 u8(__m128i b) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
}
inline __m256 i8(__m128i b) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}
inline __m128i upper(__m128i b) {
  return _mm_srli_si128(b, 8);
}
// 16 bytes, each `value` where bit i of `bits` is set (byte i), else 0.
inline __m128i bit_bytes(uint32_t bits, char value) {
  const __m128i spread = _mm_shuffle_epi8(_mm_cvtsi32_si128(int(bits)),
                                          _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1));
  const __m128i select = _mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
  return _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(spread, select), select), _mm_set1_epi8(value));
}
// Bytes of h that have every bit of `bit` set: 0xFF, else 0.
inline __m128i test_bytes(__m128i h, __m128i bit) {
  return _mm_cmpeq_epi8(_mm_and_si128(h, bit), bit);
}

// Hands f(elements [8 g, 8 g + 8)) of a 16-byte vector of per-element values, as two sink calls
// j0 and j0 + 1.
template <class Sink, class F>
inline void sink16(Sink& sink, int j0, __m128i q, F&& f) {
  sink(j0, f(q));
  sink(j0 + 1, f(upper(q)));
}

// Each decoder reads one block at `b` (any alignment) and calls sink(j, v) once for each j in
// [0, block elements / 8), in order: v holds elements [8 j, 8 j + 8) of the block.

template <class Sink>
inline void block_q8_0(const uint8_t* b, Sink& sink) {
  const __m256 d = _mm256_set1_ps(f16_scale(b));
  for (int j = 0; j < 4; ++j) sink(j, _mm256_mul_ps(i8(load8(b + 2 + 8 * j)), d));
}

template <class Sink>
inline void block_q4_0(const uint8_t* b, Sink& sink) {
  const __m256 d = _mm256_set1_ps(f16_scale(b)), eight = _mm256_set1_ps(8.0f);
  const auto value = [&](__m128i q) { return _mm256_mul_ps(_mm256_sub_ps(u8(q), eight), d); };
  const __m128i q = load16(b + 2);
  sink16(sink, 0, low_nibbles(q), value);
  sink16(sink, 2, high_nibbles(q), value);
}

template <class Sink>
inline void block_q4_1(const uint8_t* b, Sink& sink) {
  const __m256 d = _mm256_set1_ps(f16_scale(b)), m = _mm256_set1_ps(f16_scale(b + 2));
  const auto value = [&](__m128i q) { return _mm256_add_ps(_mm256_mul_ps(u8(q), d), m); };
  const __m128i q = load16(b + 4);
  sink16(sink, 0, low_nibbles(q), value);
  sink16(sink, 2, high_nibbles(q), value);
}

// The 5-bit values of a Q5_0 / Q5_1 block (qh then qs at `qh_bytes`), elements 0-15 and 16-31.
inline void q5_values(const uint8_t* qh_bytes, __m128i& lo, __m128i& hi) {
  uint32_t qh;
  std::memcpy(&qh, qh_bytes, 4);
  const __m128i q = load16(qh_bytes + 4);
  lo = _mm_or_si128(low_nibbles(q), bit_bytes(qh & 0xFFFF, 16));
  hi = _mm_or_si128(high_nibbles(q), bit_bytes(qh >> 16, 16));
}

template <class Sink>
inline void block_q5_0(const uint8_t* b, Sink& sink) {
  const __m256 d = _mm256_set1_ps(f16_scale(b)), sixteen = _mm256_set1_ps(16.0f);
  const auto value = [&](__m128i q) { return _mm256_mul_ps(_mm256_sub_ps(u8(q), sixteen), d); };
  __m128i lo, hi;
  q5_values(b + 2, lo, hi);
  sink16(sink, 0, lo, value);
  sink16(sink, 2, hi, value);
}

template <class Sink>
inline void block_q5_1(const uint8_t* b, Sink& sink) {
  const __m256 d = _mm256_set1_ps(f16_scale(b)), m = _mm256_set1_ps(f16_scale(b + 2));
  const auto value = [&](__m128i q) { return _mm256_add_ps(_mm256_mul_ps(u8(q), d), m); };
  __m128i lo, hi;
  q5_values(b + 4, lo, hi);
  sink16(sink, 0, lo, value);
  sink16(sink, 2, hi, value);
}

// The 2-bit values of Q2_K / Q3_K: elements 128 h + 32 p + 16 k + i are bits 2p..2p+1 of
// qs[32 h + 16 k + i].
inline __m128i two_bits(const uint8_t* qs, int h, int p, int k) {
  return _mm_and_si128(_mm_srli_epi16(load16(qs + 32 * h + 16 * k), 2 * p), _mm_set1_epi8(3));
}

template <class Sink>
inline void block_q2_k(const uint8_t* b, Sink& sink) {
  const uint8_t* scales = b + offsetof(BlockQ2_K, scales);
  const uint8_t* qs = b + offsetof(BlockQ2_K, qs);
  const float d = f16_scale(b + offsetof(BlockQ2_K, d));
  const float dmin = f16_scale(b + offsetof(BlockQ2_K, dmin));
  for (int h = 0; h < 2; ++h)
    for (int p = 0; p < 4; ++p)
      for (int k = 0; k < 2; ++k) {
        const int j = 8 * h + 2 * p + k;  // the sub-block of 16
        const __m256 dl = _mm256_set1_ps(d * float(scales[j] & 0xF));
        const __m256 ml = _mm256_set1_ps(dmin * float(scales[j] >> 4));
        sink16(sink, 2 * j, two_bits(qs, h, p, k),
               [&](__m128i q) { return _mm256_sub_ps(_mm256_mul_ps(dl, u8(q)), ml); });
      }
}

template <class Sink>
inline void block_q3_k(const uint8_t* b, Sink& sink) {
  const uint8_t* hmask = b + offsetof(BlockQ3_K, hmask);
  const uint8_t* qs = b + offsetof(BlockQ3_K, qs);
  const uint8_t* scales = b + offsetof(BlockQ3_K, scales);
  const float d = f16_scale(b + offsetof(BlockQ3_K, d));
  for (int h = 0; h < 2; ++h)
    for (int p = 0; p < 4; ++p)
      for (int k = 0; k < 2; ++k) {
        const int j = 8 * h + 2 * p + k;
        const int sc =
            ((scales[j % 8] >> (4 * (j / 8))) & 0xF) | (((scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4);
        const __m256 dl = _mm256_set1_ps(d * float(sc - 32));
        // Element e's third bit is bit e / 32 of hmask[e % 32]; where it is clear, q - 4.
        const __m128i high = test_bytes(load16(hmask + 16 * k), _mm_set1_epi8(char(1 << (4 * h + p))));
        const __m128i q = _mm_sub_epi8(two_bits(qs, h, p, k), _mm_andnot_si128(high, _mm_set1_epi8(4)));
        sink16(sink, 2 * j, q, [&](__m128i v) { return _mm256_mul_ps(dl, i8(v)); });
      }
}

template <class Sink>
inline void block_q4_k(const uint8_t* b, Sink& sink) {
  const uint8_t* scales = b + offsetof(BlockQ4_K, scales);
  const uint8_t* qs = b + offsetof(BlockQ4_K, qs);
  const float d = f16_scale(b + offsetof(BlockQ4_K, d));
  const float dmin = f16_scale(b + offsetof(BlockQ4_K, dmin));
  for (int s = 0; s < 8; s += 2) {
    uint8_t sc0, mn0, sc1, mn1;
    k_scale_min(scales, s, sc0, mn0);
    k_scale_min(scales, s + 1, sc1, mn1);
    const __m256 d0 = _mm256_set1_ps(d * float(sc0)), m0 = _mm256_set1_ps(dmin * float(mn0));
    const __m256 d1 = _mm256_set1_ps(d * float(sc1)), m1 = _mm256_set1_ps(dmin * float(mn1));
    for (int k = 0; k < 2; ++k) {
      const __m128i q = load16(qs + 16 * s + 16 * k);
      sink16(sink, 2 * (2 * s + k), low_nibbles(q),
             [&](__m128i v) { return _mm256_sub_ps(_mm256_mul_ps(d0, u8(v)), m0); });
      sink16(sink, 2 * (2 * s + 2 + k), high_nibbles(q),
             [&](__m128i v) { return _mm256_sub_ps(_mm256_mul_ps(d1, u8(v)), m1); });
    }
  }
}

template <class Sink>
inline void block_q5_k(const uint8_t* b, Sink& sink) {
  const uint8_t* scales = b + offsetof(BlockQ5_K, scales);
  const uint8_t* qh = b + offsetof(BlockQ5_K, qh);
  const uint8_t* qs = b + offsetof(BlockQ5_K, qs);
  const float d = f16_scale(b + offsetof(BlockQ5_K, d));
  const float dmin = f16_scale(b + offsetof(BlockQ5_K, dmin));
  const __m128i sixteen = _mm_set1_epi8(16);
  for (int s = 0; s < 8; s += 2) {
    uint8_t sc0, mn0, sc1, mn1;
    k_scale_min(scales, s, sc0, mn0);
    k_scale_min(scales, s + 1, sc1, mn1);
    const __m256 d0 = _mm256_set1_ps(d * float(sc0)), m0 = _mm256_set1_ps(dmin * float(mn0));
    const __m256 d1 = _mm256_set1_ps(d * float(sc1)), m1 = _mm256_set1_ps(dmin * float(mn1));
    // Sub-blocks s and s + 1 take their fifth bits from bits s and s + 1 of qh[l].
    const __m128i bit0 = _mm_set1_epi8(char(1 << s)), bit1 = _mm_set1_epi8(char(2 << s));
    for (int k = 0; k < 2; ++k) {
      const __m128i q = load16(qs + 16 * s + 16 * k);
      const __m128i h = load16(qh + 16 * k);
      const __m128i lo = _mm_or_si128(low_nibbles(q), _mm_and_si128(test_bytes(h, bit0), sixteen));
      const __m128i hi = _mm_or_si128(high_nibbles(q), _mm_and_si128(test_bytes(h, bit1), sixteen));
      sink16(sink, 2 * (2 * s + k), lo,
             [&](__m128i v) { return _mm256_sub_ps(_mm256_mul_ps(d0, u8(v)), m0); });
      sink16(sink, 2 * (2 * s + 2 + k), hi,
             [&](__m128i v) { return _mm256_sub_ps(_mm256_mul_ps(d1, u8(v)), m1); });
    }
  }
}

template <class Sink>
inline void block_q6_k(const uint8_t* b, Sink& sink) {
  const auto* scales = reinterpret_cast<const int8_t*>(b + offsetof(BlockQ6_K, scales));
  const float d = f16_scale(b + offsetof(BlockQ6_K, d));
  const __m128i m4 = _mm_set1_epi8(0x0F), m2 = _mm_set1_epi8(0x30), thirty_two = _mm_set1_epi8(32);
  // Two halves of 128 elements; in each, byte l of ql (and l + 32) and of qh feed elements l, l + 32,
  // l + 64 and l + 96, whose sub-blocks of 16 are l / 16 + 0, 2, 4, 6.
  for (int half = 0; half < 2; ++half) {
    const uint8_t* ql = b + offsetof(BlockQ6_K, ql) + 64 * half;
    const uint8_t* qh = b + offsetof(BlockQ6_K, qh) + 32 * half;
    for (int k = 0; k < 2; ++k) {
      const __m128i a = load16(ql + 16 * k), c = load16(ql + 32 + 16 * k), h = load16(qh + 16 * k);
      const __m128i q[4] = {
          _mm_or_si128(_mm_and_si128(a, m4), _mm_and_si128(_mm_slli_epi16(h, 4), m2)),
          _mm_or_si128(_mm_and_si128(c, m4), _mm_and_si128(_mm_slli_epi16(h, 2), m2)),
          _mm_or_si128(high_nibbles(a), _mm_and_si128(h, m2)),
          _mm_or_si128(high_nibbles(c), _mm_and_si128(_mm_srli_epi16(h, 2), m2)),
      };
      for (int i = 0; i < 4; ++i) {
        const int j = 8 * half + k + 2 * i;
        const __m256 ds = _mm256_set1_ps(d * float(scales[j]));
        // 6-bit values minus 32 fit a signed byte.
        sink16(sink, 2 * j, _mm_sub_epi8(q[i], thirty_two),
               [&](__m128i v) { return _mm256_mul_ps(ds, i8(v)); });
      }
    }
  }
}

// Decodes one block of ggml dtype D.
template <DType D, class Sink>
inline void decode_block(const uint8_t* b, Sink& sink) {
  if constexpr (D == DType::Q8_0) block_q8_0(b, sink);
  if constexpr (D == DType::Q4_0) block_q4_0(b, sink);
  if constexpr (D == DType::Q4_1) block_q4_1(b, sink);
  if constexpr (D == DType::Q5_0) block_q5_0(b, sink);
  if constexpr (D == DType::Q5_1) block_q5_1(b, sink);
  if constexpr (D == DType::Q2_K) block_q2_k(b, sink);
  if constexpr (D == DType::Q3_K) block_q3_k(b, sink);
  if constexpr (D == DType::Q4_K) block_q4_k(b, sink);
  if constexpr (D == DType::Q5_K) block_q5_k(b, sink);
  if constexpr (D == DType::Q6_K) block_q6_k(b, sink);
}

// NF4 / INT8: elements [i, i + n) of the flattened codes, all inside one scale block whose absmax
// (already resolved through any double quantization) is given. A whole block starting on a byte
// goes to sink(j, v) as a ggml block does; any other segment goes element by element to
// sink.one(o, value) for ascending output offsets o. Never reads a code byte outside the segment.
template <class Sink>
inline void nf4_segment(const uint8_t* codes, int64_t i, int64_t n, float absmax, Sink& sink) {
  if (n == kNf4Block && i % 2 == 0) {
    const __m256 a = _mm256_set1_ps(absmax);
    const __m256 t_lo = _mm256_mul_ps(_mm256_loadu_ps(kNf4Code), a);
    const __m256 t_hi = _mm256_mul_ps(_mm256_loadu_ps(kNf4Code + 8), a);
    const auto lookup = [&](__m128i q) {
      const __m256i idx = _mm256_cvtepu8_epi32(q);
      const __m256 high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
      return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t_lo, idx), _mm256_permutevar8x32_ps(t_hi, idx), high);
    };
    for (int j = 0; j < kNf4Block / 16; ++j) {
      // Element 2m is the high nibble of byte m, 2m + 1 the low one.
      const __m128i b = load8(codes + i / 2 + 8 * j);
      sink16(sink, 2 * j, _mm_unpacklo_epi8(high_nibbles(b), low_nibbles(b)), lookup);
    }
    return;
  }
  for (int64_t o = 0; o < n; ++o) {
    const uint8_t byte = codes[(i + o) / 2];
    sink.one(o, kNf4Code[(i + o) % 2 == 0 ? byte >> 4 : byte & 0x0F] * absmax);
  }
}

template <class Sink>
inline void int8_segment(const int8_t* codes, int64_t i, int64_t n, float absmax, Sink& sink) {
  const float scale = absmax / 127.0f;
  if (n == kInt8Block) {
    const __m256 s = _mm256_set1_ps(scale);
    for (int j = 0; j < kInt8Block / 8; ++j)
      sink(j, _mm256_mul_ps(i8(load8(reinterpret_cast<const uint8_t*>(codes + i + 8 * j))), s));
    return;
  }
  for (int64_t o = 0; o < n; ++o) sink.one(o, float(codes[i + o]) * scale);
}

// Elements [i0, i1) of an NF4 / INT8 weight's flattened codes, each scale block's segment to the sink
// (for_each_flat_segment).
template <class Sink, class At>
inline void flat_segments(const WeightRef& W, int64_t i0, int64_t i1, Sink& sink, At&& at) {
  for_each_flat_segment(W, i0, i1, at, [&](int64_t i, int64_t n, float absmax) {
    if (W.dtype == DType::NF4)
      nf4_segment(static_cast<const uint8_t*>(W.data), i, n, absmax, sink);
    else
      int8_segment(static_cast<const int8_t*>(W.data), i, n, absmax, sink);
  });
}

}  // namespace tf::cpu::avx2

TF_AVX2_END

#endif  // TF_HAVE_AVX512_KERNELS
