// defines: tf::cpu::flat_block_absmax (the scale of an NF4 / INT8 block), for_each_flat_segment (an NF4 /
//          INT8 run cut at its scale blocks), tf::cpu::simd (the 128-bit helpers the AVX-512 and AVX2
//          decoders share), tf::cpu::avx512 block decoders of every quantized dtype (ggml blocks, NF4 /
//          INT8 runs) that hand the dequantized values, 16 at a time in a register, to a sink; and
//          TF_AVX512_BEGIN / TF_AVX512_END, which compile the code between them for AVX-512
//
// Shared by the weight-tile dequantizer (its sink stores) and quant_gemv (its sink multiplies and
// adds into the dot products, so a block is never written out). The values are those of the
// reference dequantizers bit for bit: every ggml scale product (f16 scale times small integers) is
// exact in f32, so the order of those products cannot change a result, and the one rounded product
// of NF4 / INT8 is the reference's.
#pragma once

#include <cstdint>

#include "kernels/cpu/isa.h"
#include "kernels/cpu/ref/quantize.h"
#include "kernels/ops.h"

namespace tf::cpu {

// The absmax of NF4 / INT8 block b. With double quantization the product is rounded on its own
// before the offset is added, as bitsandbytes does in two tensor operations; the volatile keeps a
// compiler from fusing the two into one FMA with a single rounding.
inline float flat_block_absmax(const QuantScales& s, int64_t b) {
  if (!s.nested) return static_cast<const float*>(s.absmax)[b];
  const uint8_t code = static_cast<const uint8_t*>(s.absmax)[b];
  const volatile float scaled = ref::dynamic_map()[code] * s.nested[b / kNf4NestedBlock];
  return scaled + s.offset;
}

// Elements [i0, i1) of an NF4 / INT8 weight's flattened codes, split where scale blocks end: at(i) is
// called with each segment's first element (to point a sink at its output), then segment(i, n,
// absmax) with the segment's elements and its block's absmax (resolved through any double
// quantization). The AVX-512 and AVX2 decoders take their segments from here.
template <class At, class Segment>
inline void for_each_flat_segment(const WeightRef& W, int64_t i0, int64_t i1, At&& at, Segment&& segment) {
  const int64_t block = dtype_block_elems(W.dtype);
  for (int64_t i = i0; i < i1;) {
    const int64_t b = i / block;
    const int64_t end = i1 < (b + 1) * block ? i1 : (b + 1) * block;
    at(i);
    segment(i, end - i, flat_block_absmax(W.scales, b));
    i = end;
  }
}

}  // namespace tf::cpu

#if defined(TF_HAVE_AVX512_KERNELS)

// GCC 12 reports the self-initialised _mm512_undefined_* inside its own AVX-512 intrinsics as maybe
// used uninitialised once they are inlined; the warning is located in the intrinsics header, so it
// is silenced from here on, for that header's text as well.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstring>

#include "kernels/quant_blocks.h"
#include "src/core/dtype.h"

// What the AVX-512 and AVX2 decoders share, compiled for F16C alone so that either inlines it.
#pragma GCC push_options
#pragma GCC target("f16c")

namespace tf::cpu::simd {

// An f16 scale as f32. F16C quiets a signalling NaN where the reference keeps its bits, so a NaN goes
// through the reference's conversion.
inline float f16_scale(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const float f = _cvtsh_ss(h);
  return f == f ? f : f16_to_f32(h);
}

inline __m128i load16(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}
inline __m128i low_nibbles(__m128i b) {
  return _mm_and_si128(b, _mm_set1_epi8(0x0F));
}
inline __m128i high_nibbles(__m128i b) {
  return _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
}

}  // namespace tf::cpu::simd

#pragma GCC pop_options

#define TF_AVX512_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,f16c,fma\")")
#define TF_AVX512_END _Pragma("GCC pop_options")

TF_AVX512_BEGIN

namespace tf::cpu::avx512 {

using simd::f16_scale;
using simd::high_nibbles;
using simd::load16;
using simd::low_nibbles;

inline __m512i widen_u8(__m128i b) {
  return _mm512_cvtepu8_epi32(b);
}
inline __m512 u8_to_ps(__m128i b) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
}

// The 4- and 5-bit formats decode through a table of the block's 16 or 32 possible values, built
// with the reference's arithmetic on 0, 1, 2, ...: one permute per 16 elements instead of a
// conversion, a multiply and an add. vpermps reads only the low 4 index bits and vpermt2ps the
// low 5, so a byte's low nibble needs no masking.
inline __m512 iota16() {
  return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
inline __m512 lookup16(__m512 table, __m512i idx) {
  return _mm512_permutexvar_ps(idx, table);
}
inline __m512 lookup32(__m512 lo, __m512 hi, __m512i idx) {
  return _mm512_permutex2var_ps(lo, idx, hi);
}
// The high nibbles of 16 bytes in 32-bit lanes (widen_u8 gives the low ones, as table indices).
inline __m512i high_nibble_lanes(__m128i b) {
  return _mm512_srli_epi32(_mm512_cvtepu8_epi32(b), 4);
}

// Each decoder reads one block at `b` (any alignment) and calls sink(j, v) once for each j in
// [0, block elements / 16), in a fixed order: v holds elements [16 j, 16 j + 16) of the block.

template <class Sink>
inline void block_q8_0(const uint8_t* b, Sink& sink) {
  const __m512 d = _mm512_set1_ps(f16_scale(b));
  for (int j = 0; j < 2; ++j)
    sink(j, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load16(b + 2 + 16 * j))), d));
}

template <class Sink>
inline void block_q4_0(const uint8_t* b, Sink& sink) {
  const __m512 d = _mm512_set1_ps(f16_scale(b));
  const __m512 table = _mm512_mul_ps(_mm512_sub_ps(iota16(), _mm512_set1_ps(8.0f)), d);
  const __m128i q = load16(b + 2);
  sink(0, lookup16(table, widen_u8(q)));
  sink(1, lookup16(table, high_nibble_lanes(q)));
}

template <class Sink>
inline void block_q4_1(const uint8_t* b, Sink& sink) {
  const __m512 d = _mm512_set1_ps(f16_scale(b));
  const __m512 m = _mm512_set1_ps(f16_scale(b + 2));
  const __m512 table = _mm512_add_ps(_mm512_mul_ps(iota16(), d), m);
  const __m128i q = load16(b + 4);
  sink(0, lookup16(table, widen_u8(q)));
  sink(1, lookup16(table, high_nibble_lanes(q)));
}

// The 5-bit values of a Q5_0 / Q5_1 block (qh then qs at `qh`) as table indices, elements 0-15 and
// 16-31: the nibble, plus 16 where the element's fifth bit is set.
inline void q5_indices(const uint8_t* qh_bytes, __m512i& lo, __m512i& hi) {
  uint32_t qh;
  std::memcpy(&qh, qh_bytes, 4);
  const __m128i q = load16(qh_bytes + 4);
  const __m512i sixteen = _mm512_set1_epi32(16);
  lo = widen_u8(low_nibbles(q));
  hi = high_nibble_lanes(q);
  lo = _mm512_mask_add_epi32(lo, __mmask16(qh), lo, sixteen);
  hi = _mm512_mask_add_epi32(hi, __mmask16(qh >> 16), hi, sixteen);
}

template <class Sink>
inline void block_q5_0(const uint8_t* b, Sink& sink) {
  const __m512 d = _mm512_set1_ps(f16_scale(b));
  const __m512 t_lo = _mm512_mul_ps(_mm512_sub_ps(iota16(), _mm512_set1_ps(16.0f)), d);
  const __m512 t_hi = _mm512_mul_ps(iota16(), d);
  __m512i lo, hi;
  q5_indices(b + 2, lo, hi);
  sink(0, lookup32(t_lo, t_hi, lo));
  sink(1, lookup32(t_lo, t_hi, hi));
}

template <class Sink>
inline void block_q5_1(const uint8_t* b, Sink& sink) {
  const __m512 d = _mm512_set1_ps(f16_scale(b));
  const __m512 m = _mm512_set1_ps(f16_scale(b + 2));
  const __m512 t_lo = _mm512_add_ps(_mm512_mul_ps(iota16(), d), m);
  const __m512 t_hi = _mm512_add_ps(_mm512_mul_ps(_mm512_add_ps(iota16(), _mm512_set1_ps(16.0f)), d), m);
  __m512i lo, hi;
  q5_indices(b + 4, lo, hi);
  sink(0, lookup32(t_lo, t_hi, lo));
  sink(1, lookup32(t_lo, t_hi, hi));
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
        const int j = 8 * h + 2 * p + k;  // also the sub-block of 16
        const __m512 dl = _mm512_set1_ps(d * float(scales[j] & 0xF));
        const __m512 ml = _mm512_set1_ps(dmin * float(scales[j] >> 4));
        sink(j, _mm512_sub_ps(_mm512_mul_ps(dl, u8_to_ps(two_bits(qs, h, p, k))), ml));
      }
}

template <class Sink>
inline void block_q3_k(const uint8_t* b, Sink& sink) {
  const uint8_t* hmask = b + offsetof(BlockQ3_K, hmask);
  const uint8_t* qs = b + offsetof(BlockQ3_K, qs);
  const uint8_t* scales = b + offsetof(BlockQ3_K, scales);
  const float d = f16_scale(b + offsetof(BlockQ3_K, d));
  const __m512i four = _mm512_set1_epi32(4);
  for (int h = 0; h < 2; ++h)
    for (int p = 0; p < 4; ++p)
      for (int k = 0; k < 2; ++k) {
        const int j = 8 * h + 2 * p + k;
        const int sc =
            ((scales[j % 8] >> (4 * (j / 8))) & 0xF) | (((scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4);
        const __m512 dl = _mm512_set1_ps(d * float(sc - 32));
        // Element e's third bit is bit e / 32 of hmask[e % 32]; where it is clear, q - 4.
        const __mmask16 high =
            _mm_test_epi8_mask(load16(hmask + 16 * k), _mm_set1_epi8(char(1 << (4 * h + p))));
        __m512i q = widen_u8(two_bits(qs, h, p, k));
        q = _mm512_mask_sub_epi32(q, __mmask16(~high), q, four);
        sink(j, _mm512_mul_ps(dl, _mm512_cvtepi32_ps(q)));
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
    const __m512 t0 = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(d * float(sc0)), iota16()),
                                    _mm512_set1_ps(dmin * float(mn0)));
    const __m512 t1 = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(d * float(sc1)), iota16()),
                                    _mm512_set1_ps(dmin * float(mn1)));
    for (int k = 0; k < 2; ++k) {
      const __m128i q = load16(qs + 16 * s + 16 * k);
      sink(2 * s + k, lookup16(t0, widen_u8(q)));
      sink(2 * s + 2 + k, lookup16(t1, high_nibble_lanes(q)));
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
  const __m512i sixteen = _mm512_set1_epi32(16);
  for (int s = 0; s < 8; s += 2) {
    uint8_t sc0, mn0, sc1, mn1;
    k_scale_min(scales, s, sc0, mn0);
    k_scale_min(scales, s + 1, sc1, mn1);
    const __m512 d0 = _mm512_set1_ps(d * float(sc0)), m0 = _mm512_set1_ps(dmin * float(mn0));
    const __m512 d1 = _mm512_set1_ps(d * float(sc1)), m1 = _mm512_set1_ps(dmin * float(mn1));
    const __m512 iota_hi = _mm512_add_ps(iota16(), _mm512_set1_ps(16.0f));
    const __m512 t0_lo = _mm512_sub_ps(_mm512_mul_ps(d0, iota16()), m0);
    const __m512 t0_hi = _mm512_sub_ps(_mm512_mul_ps(d0, iota_hi), m0);
    const __m512 t1_lo = _mm512_sub_ps(_mm512_mul_ps(d1, iota16()), m1);
    const __m512 t1_hi = _mm512_sub_ps(_mm512_mul_ps(d1, iota_hi), m1);
    // Sub-blocks s and s + 1 take their fifth bits from bits s and s + 1 of qh[l].
    const __m128i bit0 = _mm_set1_epi8(char(1 << s)), bit1 = _mm_set1_epi8(char(2 << s));
    for (int k = 0; k < 2; ++k) {
      const __m128i q = load16(qs + 16 * s + 16 * k);
      const __m128i h = load16(qh + 16 * k);
      __m512i lo = widen_u8(low_nibbles(q)), hi = high_nibble_lanes(q);
      lo = _mm512_mask_add_epi32(lo, _mm_test_epi8_mask(h, bit0), lo, sixteen);
      hi = _mm512_mask_add_epi32(hi, _mm_test_epi8_mask(h, bit1), hi, sixteen);
      sink(2 * s + k, lookup32(t0_lo, t0_hi, lo));
      sink(2 * s + 2 + k, lookup32(t1_lo, t1_hi, hi));
    }
  }
}

template <class Sink>
inline void block_q6_k(const uint8_t* b, Sink& sink) {
  const auto* scales = reinterpret_cast<const int8_t*>(b + offsetof(BlockQ6_K, scales));
  const float d = f16_scale(b + offsetof(BlockQ6_K, d));
  const __m128i m4 = _mm_set1_epi8(0x0F), m2 = _mm_set1_epi8(0x30);
  const __m512i thirty_two = _mm512_set1_epi32(32);
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
        const __m512 ds = _mm512_set1_ps(d * float(scales[j]));
        sink(j, _mm512_mul_ps(ds, _mm512_cvtepi32_ps(_mm512_sub_epi32(widen_u8(q[i]), thirty_two))));
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

// Sixteen NF4 values from the 8 bytes at `bytes` (element 2j is the high nibble of byte j, 2j + 1
// the low one) through `table`, the codebook times the block's absmax; bytes past `byte_mask`
// read as zero.
inline __m512 nf4_16(const uint8_t* bytes, __mmask16 byte_mask, __m512 table) {
  const __m128i b = _mm_maskz_loadu_epi8(byte_mask, bytes);
  const __m128i nibbles = _mm_unpacklo_epi8(high_nibbles(b), low_nibbles(b));
  return lookup16(table, widen_u8(nibbles));
}

inline __m512 int8_16(const int8_t* codes, __mmask16 mask, __m512 scale) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, codes))), scale);
}

// NF4 / INT8: elements [i, i + n) of the flattened codes, all inside one scale block whose absmax
// (already resolved through any double quantization) is given. A whole block starting on a byte
// goes to sink(j, v) as a ggml block does; any other segment to sink(o, v, mask) for ascending
// output offsets o, where the lanes in `mask` of v are elements i + o, ... and the others are
// unspecified. Never reads a code byte outside the segment.
template <class Sink>
inline void nf4_segment(const uint8_t* codes, int64_t i, int64_t n, float absmax, Sink& sink) {
  const __m512 table = _mm512_mul_ps(_mm512_loadu_ps(kNf4Code), _mm512_set1_ps(absmax));
  if (n == kNf4Block && i % 2 == 0) {
    for (int j = 0; j < kNf4Block / 16; ++j) sink(j, nf4_16(codes + i / 2 + 8 * j, 0xFF, table));
    return;
  }
  int64_t o = 0;
  if (i % 2 == 1 && n > 0) {  // starts on the low nibble of a byte
    sink(o, _mm512_set1_ps(kNf4Code[codes[i / 2] & 0x0F] * absmax), __mmask16(1));
    ++o;
  }
  for (; o < n; o += 16) {
    const int64_t left = n - o < 16 ? n - o : 16;
    const __mmask16 byte_mask = __mmask16((1u << ((left + 1) / 2)) - 1);
    sink(o, nf4_16(codes + (i + o) / 2, byte_mask, table), __mmask16((1u << left) - 1));
  }
}

template <class Sink>
inline void int8_segment(const int8_t* codes, int64_t i, int64_t n, float absmax, Sink& sink) {
  const __m512 scale = _mm512_set1_ps(absmax / 127.0f);
  if (n == kInt8Block) {
    for (int j = 0; j < kInt8Block / 16; ++j) sink(j, int8_16(codes + i + 16 * j, 0xFFFF, scale));
    return;
  }
  for (int64_t o = 0; o < n; o += 16) {
    const __mmask16 mask = __mmask16((1u << (n - o < 16 ? n - o : 16)) - 1);
    sink(o, int8_16(codes + i + o, mask, scale), mask);
  }
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

}  // namespace tf::cpu::avx512

TF_AVX512_END

#endif  // TF_HAVE_AVX512_KERNELS
