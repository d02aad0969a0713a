// defines: tf::cpu::quant_gemv (small-batch matmul straight from quantized blocks)
#include "kernels/cpu/quant_gemv.h"

#include <algorithm>

#include "kernels/cpu/avx512_blocks.h"
#include "kernels/cpu/isa.h"
#include "src/core/error.h"
#include "src/core/parallel.h"

namespace tf::cpu {
namespace {

// Rows per parallel task: each task's rows are contiguous in W, and a task is long enough to be
// worth handing to a thread.
constexpr int64_t kRowsPerTask = 16;
// Elements dequantized at a time by the portable version: one k-quant super-block, eight of the
// 32-element formats, four NF4 / INT8 scale blocks; 1 KiB that stays in L1.
constexpr int64_t kPortableChunk = 256;
// Independent partial sums per dot product, so the compiler can keep them in one vector register.
constexpr int kLanes = 16;

using RowsFn = void (*)(float* y, const float* x, const WeightRef& W, int64_t n_tokens, float beta,
                        int64_t r0, int64_t r1);

void store(float& out, float dot, float beta) {
  out = beta == 0.0f ? dot : dot + beta * out;
}

void portable_rows(float* y, const float* x, const WeightRef& W, int64_t n_tokens, float beta, int64_t r0,
                   int64_t r1) {
  float w[kPortableChunk];
  float acc[kQuantGemvMaxTokens][kLanes];
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t t = 0; t < n_tokens; ++t) std::fill(acc[t], acc[t] + kLanes, 0.0f);
    for (int64_t c0 = 0; c0 < W.cols; c0 += kPortableChunk) {
      const int64_t n = std::min(kPortableChunk, W.cols - c0);
      dequantize_weight_tile(w, n, W, r, 1, c0, n);
      for (int64_t t = 0; t < n_tokens; ++t) {
        const float* xt = x + t * W.cols + c0;
        for (int64_t k = 0; k < n; ++k) acc[t][k % kLanes] += w[k] * xt[k];
      }
    }
    for (int64_t t = 0; t < n_tokens; ++t) {
      float dot = 0.0f;
      for (int l = 0; l < kLanes; ++l) dot += acc[t][l];
      store(y[t * W.rows + r], dot, beta);
    }
  }
}

#if defined(TF_HAVE_AVX512_KERNELS)
TF_AVX512_BEGIN

// Multiplies each dequantized vector of a block into the T dot products. Two accumulators per token
// (even and odd vectors) halve the chain of dependent FMAs.
template <int T>
struct DotSink {
  const float* x;  // token 0's input at the first column of the current block or segment
  int64_t ldx;
  __m512 acc[T][2];

  void operator()(int j, __m512 w) {
    for (int t = 0; t < T; ++t)
      acc[t][j & 1] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + t * ldx + 16 * j), acc[t][j & 1]);
  }
  // A partial NF4 / INT8 segment; rare, so one accumulator (a constant index keeps acc in registers).
  void operator()(int64_t o, __m512 w, __mmask16 mask) {
    for (int t = 0; t < T; ++t)
      acc[t][0] = _mm512_mask3_fmadd_ps(w, _mm512_maskz_loadu_ps(mask, x + t * ldx + o), acc[t][0], mask);
  }
};

template <DType D, int T>
void avx512_rows(float* y, const float* x, const WeightRef& W, int64_t n_tokens, float beta, int64_t r0,
                 int64_t r1) {
  constexpr int64_t kElems = dtype_block_elems(D), kBytes = dtype_block_bytes(D);
  const auto* data = static_cast<const uint8_t*>(W.data);
  for (int64_t r = r0; r < r1; ++r) {
    DotSink<T> sink{x, W.cols, {}};
    for (int t = 0; t < T; ++t) sink.acc[t][0] = sink.acc[t][1] = _mm512_setzero_ps();
    if constexpr (D == DType::NF4 || D == DType::INT8) {
      const int64_t row_begin = r * W.cols, row_end = row_begin + W.cols;
      for (int64_t i = row_begin; i < row_end;) {
        const int64_t b = i / kElems;
        const int64_t end = std::min(row_end, (b + 1) * kElems);
        sink.x = x + (i - row_begin);
        if constexpr (D == DType::NF4)
          avx512::nf4_segment(data, i, end - i, flat_block_absmax(W.scales, b), sink);
        else
          avx512::int8_segment(reinterpret_cast<const int8_t*>(data), i, end - i,
                               flat_block_absmax(W.scales, b), sink);
        i = end;
      }
    } else {
      const uint8_t* row = data + dtype_bytes(D, r * W.cols);
      for (int64_t b = 0; b < W.cols / kElems; ++b) {
        sink.x = x + b * kElems;
        avx512::decode_block<D>(row + b * kBytes, sink);
      }
    }
    for (int t = 0; t < T; ++t)
      store(y[t * W.rows + r], _mm512_reduce_add_ps(_mm512_add_ps(sink.acc[t][0], sink.acc[t][1])), beta);
  }
}

template <DType D>
RowsFn avx512_for_tokens(int64_t n_tokens) {
  switch (n_tokens) {
    case 1: return avx512_rows<D, 1>;
    case 2: return avx512_rows<D, 2>;
    case 3: return avx512_rows<D, 3>;
    case 4: return avx512_rows<D, 4>;
    case 5: return avx512_rows<D, 5>;
    case 6: return avx512_rows<D, 6>;
    case 7: return avx512_rows<D, 7>;
    default: return avx512_rows<D, 8>;
  }
}

RowsFn avx512_kernel(DType dtype, int64_t n_tokens) {
  switch (dtype) {
    case DType::Q4_0: return avx512_for_tokens<DType::Q4_0>(n_tokens);
    case DType::Q4_1: return avx512_for_tokens<DType::Q4_1>(n_tokens);
    case DType::Q5_0: return avx512_for_tokens<DType::Q5_0>(n_tokens);
    case DType::Q5_1: return avx512_for_tokens<DType::Q5_1>(n_tokens);
    case DType::Q8_0: return avx512_for_tokens<DType::Q8_0>(n_tokens);
    case DType::Q2_K: return avx512_for_tokens<DType::Q2_K>(n_tokens);
    case DType::Q3_K: return avx512_for_tokens<DType::Q3_K>(n_tokens);
    case DType::Q4_K: return avx512_for_tokens<DType::Q4_K>(n_tokens);
    case DType::Q5_K: return avx512_for_tokens<DType::Q5_K>(n_tokens);
    case DType::Q6_K: return avx512_for_tokens<DType::Q6_K>(n_tokens);
    case DType::NF4: return avx512_for_tokens<DType::NF4>(n_tokens);
    default: return avx512_for_tokens<DType::INT8>(n_tokens);
  }
}

TF_AVX512_END
#endif  // TF_HAVE_AVX512_KERNELS

}  // namespace

void quant_gemv(float* y, const float* x, const WeightRef& W, int64_t n_tokens, float beta) {
  TF_CHECK(is_quantized(W.dtype), "quant_gemv: weight dtype ", dtype_name(W.dtype), " is not quantized");
  TF_CHECK(n_tokens >= 0 && n_tokens <= kQuantGemvMaxTokens, "quant_gemv: ", n_tokens,
           " tokens, expected 0 to ", kQuantGemvMaxTokens);
  TF_CHECK(W.rows >= 0 && W.cols >= 0, "quant_gemv: negative weight shape ", W.rows, " x ", W.cols);
  if (W.dtype == DType::NF4 || W.dtype == DType::INT8) {
    TF_CHECK(W.scales.absmax, "quant_gemv: ", dtype_name(W.dtype), " weight without its absmax");
  } else {
    TF_CHECK(W.cols % dtype_block_elems(W.dtype) == 0, "quant_gemv: ", dtype_name(W.dtype), " rows of ",
             W.cols, " elements are not whole blocks of ", dtype_block_elems(W.dtype));
  }
  if (n_tokens == 0 || W.rows == 0) return;
  RowsFn rows = portable_rows;
#if defined(TF_HAVE_AVX512_KERNELS)
  if (use_avx512()) rows = avx512_kernel(W.dtype, n_tokens);
#endif
  const int64_t tasks = (W.rows + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel for schedule(static) if (W.rows * W.cols >= kMinParallelElems)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t r0 = task * kRowsPerTask;
    rows(y, x, W, n_tokens, beta, r0, std::min(W.rows, r0 + kRowsPerTask));
  }
}

}  // namespace tf::cpu
