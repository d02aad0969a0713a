// defines: the device-side decoders of quantized frozen weights that the CUDA backend's kernels share:
// QuantWeight (one quantized WeightRef in device memory, a kernel parameter), quant_weight (built on the
// host, checked), decode8<T> / decode8_bf16<T> (eight consecutive elements of a row, exactly
// tf::ref::dequantize_weight_tile's values), QuantTag / with_quant_dtype (the one switch from a
// runtime DType to the decoders' template argument), upload_quant_tables (the __constant__ NF4 code
// and dynamic-map tables), and the launchers of kernels/cuda/dequant.cu (quantized weights through
// dequantized tiles of rows: bf16 for the GEMMs, f32 for dequantize_weight_tile, and embedding rows). Include
// it at file scope: it opens namespace tf::TF_PORT_BACKEND itself.
//
// Every format's blocks hold a multiple of 8 elements, so decode8 reads one block (or one NF4 / INT8
// scale block) per call. NF4 and INT8 run over the flattened tensor, their blocks of 64 crossing
// rows; a row whose length is a multiple of 8 keeps every group of 8 inside one block, so the device
// takes NF4 / INT8 weights with cols % 8 == 0 (quant_weight refuses the others by name). The
// arithmetic is the references' order, each product rounded on its own (mul_rn: __fmul_rn under
// nvcc, which is never fused into an FMA), so a decoded value has the reference's bits on the
// simulator (tests/test_cuda_dequant.cpp) and, by the same operations, on a GPU.
#pragma once

#include <cstdint>
#include <mutex>
#include <type_traits>

#include "kernels/cpu/ref/quantize.h"
#include "kernels/cuda/kernel_common.h"
#include "kernels/cuda/port.h"
#include "kernels/ops.h"
#include "kernels/quant_blocks.h"
#include "src/core/dtype.h"
#include "src/core/error.h"

namespace tf::TF_PORT_BACKEND {

// One quantized weight [rows, cols] in device memory, as its WeightRef stores it: ggml blocks along
// each row (row_bytes per row), or NF4 / INT8 codes over the flattened tensor with one absmax per 64
// elements (f32, or for a double-quantized NF4 uint8 codes of the dynamic map scaled by `nested`, one
// f32 per 256 absmax, plus `offset`). Trivially copyable, pointers checked on every simulated read.
struct QuantWeight {
  port::gptr<const uint8_t> data;
  port::gptr<const uint8_t> absmax;  // f32 per block, or uint8 codes where `nested` is set
  port::gptr<const float> nested;    // null without double quantization
  float offset = 0.0f;
  DType dtype = DType::Q8_0;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_bytes = 0;  // ggml formats; 0 for NF4 / INT8
};

// What reads or uploads the tables below stays in this unnamed namespace with them: an inline
// function shared across translation units would reach whichever unit's tables the linker kept.
namespace {

// The 16 NF4 values (kNf4Code) and bitsandbytes' signed dynamic map (ref::dynamic_map), which decodes
// a double-quantized absmax. One copy per translation unit; upload_quant_tables fills this one's.
TF_CONSTANT(float, kQuantNf4Code, 16);
TF_CONSTANT(float, kQuantDynamicMap, 256);

// Fills this translation unit's tables once, before the first launch that decodes (a __constant__
// upload is not ordered with the streams); quant_weight calls it.
inline void upload_quant_tables() {
  static std::once_flag once;
  std::call_once(once, [] {
    port::upload_constant(kQuantNf4Code, kNf4Code, 16);
    port::upload_constant(kQuantDynamicMap, ref::dynamic_map(), 256);
  });
}

// The QuantWeight of a device WeightRef, with this translation unit's tables uploaded (so a kernel
// given it can decode). `op` names the caller in errors: a dtype that is not quantized, rows that
// are not whole blocks (ggml) or not a multiple of 8 elements (NF4 / INT8), a missing absmax.
inline QuantWeight quant_weight(const WeightRef& W, const char* op = "quantized weight") {
  TF_CHECK(is_quantized(W.dtype), op, ": ", dtype_name(W.dtype), " is not a quantized dtype");
  TF_CHECK(W.rows >= 0 && W.cols >= 0, op, ": a ", dtype_name(W.dtype), " weight of ", W.rows, " x ", W.cols);
  const bool flat = W.dtype == DType::NF4 || W.dtype == DType::INT8;
  if (flat) {
    TF_CHECK(W.cols % 8 == 0, op, ": the CUDA backend runs ", dtype_name(W.dtype),
             " weights whose rows are a multiple of 8 elements; this one is ", W.rows, " x ", W.cols);
    TF_CHECK(W.scales.absmax || W.rows * W.cols == 0, op, ": ", dtype_name(W.dtype),
             " weight without its absmax");
  } else {
    TF_CHECK(W.cols % dtype_block_elems(W.dtype) == 0, op, ": ", dtype_name(W.dtype), " rows of ", W.cols,
             " elements are not whole blocks of ", dtype_block_elems(W.dtype));
  }
  TF_CHECK(W.data || W.rows * W.cols == 0, op, ": ", dtype_name(W.dtype), " weight data is null");
  upload_quant_tables();
  QuantWeight q;
  if (W.data) q.data = static_cast<const uint8_t*>(W.data);
  if (flat && W.scales.absmax) q.absmax = static_cast<const uint8_t*>(W.scales.absmax);
  if (flat && W.scales.nested) q.nested = W.scales.nested;
  q.offset = W.scales.offset;
  q.dtype = W.dtype;
  q.rows = W.rows;
  q.cols = W.cols;
  q.row_bytes = flat ? 0 : dtype_bytes(W.dtype, W.cols);
  return q;
}

__device__ __forceinline__ float div_rn(float a, float b) {
#if TF_PORT_SIM
  return a / b;
#else
  return __fdiv_rn(a, b);
#endif
}

// The f16 stored little-endian at p (any even address), widened exactly.
__device__ __forceinline__ float load_f16(port::gptr<const uint8_t> p) {
  const uint8_t lo = p[0], hi = p[1];
  return StoredF16::widen(uint16_t(lo | uint16_t(hi) << 8));
}

// The absmax of NF4 / INT8 block b, through the double quantization where there is one.
__device__ __forceinline__ float quant_block_absmax(const QuantWeight& w, int64_t b) {
  if (!w.nested) {
    const float a = port::ptr_cast<const float>(w.absmax)[b];
    return a;
  }
  const uint8_t code = w.absmax[b];
  const float map = kQuantDynamicMap[code];
  const float scale = w.nested[b / kNf4NestedBlock];
  return mul_rn(map, scale) + w.offset;
}

// Bytes per block of a ggml format, a constant device code can use (dtype_block_bytes is host code).
template <DType T>
constexpr int64_t kQuantBlockBytes = T == DType::Q4_0   ? int64_t(sizeof(BlockQ4_0))
                                     : T == DType::Q4_1 ? int64_t(sizeof(BlockQ4_1))
                                     : T == DType::Q5_0 ? int64_t(sizeof(BlockQ5_0))
                                     : T == DType::Q5_1 ? int64_t(sizeof(BlockQ5_1))
                                     : T == DType::Q8_0 ? int64_t(sizeof(BlockQ8_0))
                                     : T == DType::Q2_K ? int64_t(sizeof(BlockQ2_K))
                                     : T == DType::Q3_K ? int64_t(sizeof(BlockQ3_K))
                                     : T == DType::Q4_K ? int64_t(sizeof(BlockQ4_K))
                                     : T == DType::Q5_K ? int64_t(sizeof(BlockQ5_K))
                                     : T == DType::Q6_K ? int64_t(sizeof(BlockQ6_K))
                                                        : 0;

// W[row, col .. col + 7] for col a multiple of 8, as tf::ref::dequantize_weight_tile gives them.
template <DType T>
__device__ __forceinline__ void decode8(const QuantWeight& w, int64_t row, int64_t col, float (&out)[8]) {
  if constexpr (T == DType::NF4 || T == DType::INT8) {
    const int64_t i = row * w.cols + col;
    const float absmax = quant_block_absmax(w, i / kNf4Block);
    if constexpr (T == DType::NF4) {
      TF_UNROLL
      for (int k = 0; k < 8; k += 2) {
        const uint8_t byte = w.data[(i + k) / 2];  // i is even: element i + k in the high nibble
        const float hi = kQuantNf4Code[byte >> 4], lo = kQuantNf4Code[byte & 0x0F];
        out[k] = hi * absmax;
        out[k + 1] = lo * absmax;
      }
    } else {
      const float scale = div_rn(absmax, 127.0f);
      TF_UNROLL
      for (int k = 0; k < 8; ++k) {
        const uint8_t byte = w.data[i + k];
        out[k] = float(int8_t(byte)) * scale;
      }
    }
  } else if constexpr (T == DType::Q8_0 || T == DType::Q4_0 || T == DType::Q4_1 || T == DType::Q5_0 ||
                       T == DType::Q5_1) {
    const port::gptr<const uint8_t> blk = w.data + row * w.row_bytes + col / kQK0 * kQuantBlockBytes<T>;
    const int j0 = int(col % kQK0);
    const float d = load_f16(blk);
    if constexpr (T == DType::Q8_0) {
      TF_UNROLL
      for (int k = 0; k < 8; ++k) {
        const uint8_t q = blk[2 + j0 + k];
        out[k] = float(int8_t(q)) * d;
      }
    } else if constexpr (T == DType::Q4_0 || T == DType::Q4_1) {
      // Element j is the low nibble of qs[j] for j < 16, the high nibble of qs[j - 16] above.
      const int qs = T == DType::Q4_0 ? 2 : 4;
      const float m = T == DType::Q4_1 ? load_f16(blk + 2) : 0.0f;
      TF_UNROLL
      for (int k = 0; k < 8; ++k) {
        const int j = j0 + k;
        const uint8_t byte = blk[qs + j % 16];
        const int q = j < 16 ? byte & 0xF : byte >> 4;
        if constexpr (T == DType::Q4_0) {
          out[k] = float(q - 8) * d;
        } else {
          out[k] = mul_rn(float(q), d) + m;
        }
      }
    } else {
      // Q5: the fifth bit of element j is bit j of qh read as a little-endian uint32.
      const int qh = T == DType::Q5_0 ? 2 : 4, qs = qh + 4;
      const float m = T == DType::Q5_1 ? load_f16(blk + 2) : 0.0f;
      const uint8_t h0 = blk[qh], h1 = blk[qh + 1], h2 = blk[qh + 2], h3 = blk[qh + 3];
      const uint32_t high = uint32_t(h0) | uint32_t(h1) << 8 | uint32_t(h2) << 16 | uint32_t(h3) << 24;
      TF_UNROLL
      for (int k = 0; k < 8; ++k) {
        const int j = j0 + k;
        const uint8_t byte = blk[qs + j % 16];
        const int q = (j < 16 ? byte & 0xF : byte >> 4) | int((high >> j) & 1u) << 4;
        if constexpr (T == DType::Q5_0) {
          out[k] = float(q - 16) * d;
        } else {
          out[k] = mul_rn(float(q), d) + m;
        }
      }
    }
  } else {
    static_assert(
        T == DType::Q2_K || T == DType::Q3_K || T == DType::Q4_K || T == DType::Q5_K || T == DType::Q6_K,
        "decode8 takes the quantized dtypes");
    const port::gptr<const uint8_t> blk = w.data + row * w.row_bytes + col / kQKK * kQuantBlockBytes<T>;
    const int e0 = int(col % kQKK);
    if constexpr (T == DType::Q2_K || T == DType::Q3_K) {
      // qs (at 16 in Q2_K, 32 in Q3_K): element e is bits 2 ((e % 128) / 32) of byte (e / 128) 32 + e % 32.
      const int qs = T == DType::Q2_K ? 16 : 32;
      const int shift = 2 * ((e0 % 128) / 32);
      const int s = e0 / 16;  // the group's sub-block of 16
      if constexpr (T == DType::Q2_K) {
        const float d = load_f16(blk + 80), dmin = load_f16(blk + 82);
        const uint8_t sc = blk[s];
        const float dl = d * float(sc & 0xF);
        const float ml = mul_rn(dmin, float(sc >> 4));
        TF_UNROLL
        for (int k = 0; k < 8; ++k) {
          const int e = e0 + k;
          const uint8_t byte = blk[qs + (e / 128) * 32 + e % 32];
          const int q = (byte >> shift) & 3;
          out[k] = mul_rn(dl, float(q)) - ml;
        }
      } else {
        const float d = load_f16(blk + 108);
        const uint8_t lo = blk[96 + s % 8], hi = blk[96 + 8 + s % 4];
        const int sc = ((lo >> (4 * (s / 8))) & 0xF) | (((hi >> (2 * (s / 4))) & 3) << 4);
        const float dl = d * float(sc - 32);
        TF_UNROLL
        for (int k = 0; k < 8; ++k) {
          const int e = e0 + k;
          const uint8_t byte = blk[qs + (e / 128) * 32 + e % 32], mask = blk[e % 32];
          const int q = ((byte >> shift) & 3) - (((mask >> (e / 32)) & 1) ? 0 : 4);
          out[k] = dl * float(q);
        }
      }
    } else if constexpr (T == DType::Q4_K || T == DType::Q5_K) {
      // Each 64 elements share 32 bytes of qs: sub-block 2c in the low nibbles, 2c + 1 in the high;
      // Q5_K's fifth bit of that sub-block is bit (sub-block) of qh[e % 32].
      const int qs = T == DType::Q4_K ? 16 : 48;
      const int sub = e0 / 32, chunk = e0 / 64, l0 = e0 % 32;
      uint8_t scales[kKScaleBytes];
      TF_UNROLL
      for (int b = 0; b < kKScaleBytes; ++b) scales[b] = blk[4 + b];
      uint8_t sc = 0, mn = 0;
      k_scale_min(scales, sub, sc, mn);
      const float d = load_f16(blk), dmin = load_f16(blk + 2);
      const float ds = d * float(sc);
      const float ms = mul_rn(dmin, float(mn));
      TF_UNROLL
      for (int k = 0; k < 8; ++k) {
        const int l = l0 + k;
        const uint8_t byte = blk[qs + chunk * 32 + l];
        int q = sub % 2 == 0 ? byte & 0xF : byte >> 4;
        if constexpr (T == DType::Q5_K) {
          const uint8_t high = blk[16 + l];
          q += ((high >> sub) & 1) ? 16 : 0;
        }
        out[k] = mul_rn(ds, float(q)) - ms;
      }
    } else {
      // Q6_K: two halves of 128; in each, quarter u of element l + 32 u takes the low (u < 2) or
      // high nibble of ql[l + 32 (u % 2)], bits 2u..2u+1 of qh[l] and scale l / 16 + 2u.
      const int half = e0 / 128, u = (e0 % 128) / 32, l0 = e0 % 32;
      const float d = load_f16(blk + 208);
      const uint8_t sc_byte = blk[192 + 8 * half + l0 / 16 + 2 * u];
      const float dsc = d * float(int8_t(sc_byte));
      TF_UNROLL
      for (int k = 0; k < 8; ++k) {
        const int l = l0 + k;
        const uint8_t ql = blk[64 * half + l + 32 * (u % 2)], qh = blk[128 + 32 * half + l];
        const int q = int((u < 2 ? ql & 0xF : ql >> 4) | ((qh >> (2 * u)) & 3) << 4) - 32;
        out[k] = dsc * float(q);
      }
    }
  }
}

// decode8 rounded to bf16 and packed in pairs, element 2k in the low half of out[k] (the register
// layout of mma.sync's bf16 fragments and of a bf16x2 in memory).
template <DType T>
__device__ __forceinline__ void decode8_bf16(const QuantWeight& w, int64_t row, int64_t col,
                                             uint32_t (&out)[4]) {
  float v[8];
  decode8<T>(w, row, col, v);
  TF_UNROLL
  for (int k = 0; k < 4; ++k) out[k] = pack_bf16(v[2 * k], v[2 * k + 1]);
}

}  // namespace

// The decoders' template argument as a value: with_quant_dtype(W.dtype, [&](auto tag) { constexpr
// DType T = decltype(tag)::value; ... }).
template <DType T>
using QuantTag = std::integral_constant<DType, T>;

// Calls fn(QuantTag<dtype>{}) for a quantized dtype, so each kernel is instantiated per format with
// no per-element switch.
template <typename Fn>
void with_quant_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Q4_0: return fn(QuantTag<DType::Q4_0>{});
    case DType::Q4_1: return fn(QuantTag<DType::Q4_1>{});
    case DType::Q5_0: return fn(QuantTag<DType::Q5_0>{});
    case DType::Q5_1: return fn(QuantTag<DType::Q5_1>{});
    case DType::Q8_0: return fn(QuantTag<DType::Q8_0>{});
    case DType::Q2_K: return fn(QuantTag<DType::Q2_K>{});
    case DType::Q3_K: return fn(QuantTag<DType::Q3_K>{});
    case DType::Q4_K: return fn(QuantTag<DType::Q4_K>{});
    case DType::Q5_K: return fn(QuantTag<DType::Q5_K>{});
    case DType::Q6_K: return fn(QuantTag<DType::Q6_K>{});
    case DType::NF4: return fn(QuantTag<DType::NF4>{});
    case DType::INT8: return fn(QuantTag<DType::INT8>{});
    default: break;
  }
  TF_FAIL("with_quant_dtype: ", dtype_name(dtype), " is not a quantized dtype");
}

}  // namespace tf::TF_PORT_BACKEND
