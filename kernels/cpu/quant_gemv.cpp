// defines: tf::cpu::quant_gemv, tf::cpu::quant_gemv_t (small-batch matmuls by W^T and by W straight
//          from quantized blocks)
#include "kernels/cpu/quant_gemv.h"

#include <algorithm>

#include "kernels/cpu/avx2_blocks.h"
#include "kernels/cpu/avx512_blocks.h"
#include "kernels/cpu/isa.h"
#include "src/core/error.h"
#include "src/core/parallel.h"
#include "src/core/pool.h"

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

// The most floats of dx one quant_gemv_t task accumulates into (n_tokens x its columns): 16 KiB,
// which stays in L1 while every row of W adds into it.
constexpr int64_t kAccumFloats = 4096;
// A quant_gemv_t range reads a run of each row, and a run that ends before its row does leaves the
// hardware prefetchers behind (at 1 token on one thread, a [4096 x 4096] q8_0 weight read in
// half-row runs took 3x the time of whole rows; fetching each run this many rows ahead, 1.8x).
constexpr int64_t kPrefetchRows = 4;

using RowsFn = void (*)(float* y, const float* x, const WeightRef& W, int64_t n_tokens, float beta,
                        int64_t r0, int64_t r1);
// dx[t, c0..c1) += sum_r dy[t, r] W[r, c0..c1), one row after another, for c0 and c1 on ggml
// blocks of a row (c1 may be W.cols).
using ColsFn = void (*)(float* dx, const float* dy, const WeightRef& W, int64_t n_tokens, int64_t c0,
                        int64_t c1);

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

// Each element takes out + a w in the same instructions wherever the chunks fall (the vector body
// and the scalar tail contract alike, or not at all), so the chunks may follow the column range.
void portable_cols(float* dx, const float* dy, const WeightRef& W, int64_t n_tokens, int64_t c0, int64_t c1) {
  float w[kPortableChunk];
  for (int64_t r = 0; r < W.rows; ++r) {
    for (int64_t k0 = c0; k0 < c1; k0 += kPortableChunk) {
      const int64_t n = std::min(kPortableChunk, c1 - k0);
      dequantize_weight_tile(w, n, W, r, 1, k0, n);
      for (int64_t t = 0; t < n_tokens; ++t) {
        const float a = dy[t * W.rows + r];
        float* out = dx + t * W.cols + k0;
        for (int64_t k = 0; k < n; ++k) out[k] += a * w[k];
      }
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
      const int64_t row_begin = r * W.cols;
      avx512::flat_segments(W, row_begin, row_begin + W.cols, sink,
                            [&](int64_t i) { sink.x = x + (i - row_begin); });
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

// Adds dy[t, r] times each dequantized vector of row r into dx: one FMA per element and row, so
// each element's sum runs over the rows in order.
template <int T>
struct AxpySink {
  float* dx;  // token 0's output at the first column of the current block or segment
  int64_t ldx;
  __m512 a[T];  // dy[t, r] of the current row

  void operator()(int j, __m512 w) {
    for (int t = 0; t < T; ++t) {
      float* p = dx + t * ldx + 16 * j;
      _mm512_storeu_ps(p, _mm512_fmadd_ps(w, a[t], _mm512_loadu_ps(p)));
    }
  }
  // A partial NF4 / INT8 segment: the lanes outside `mask` are neither read nor written.
  void operator()(int64_t o, __m512 w, __mmask16 mask) {
    for (int t = 0; t < T; ++t) {
      float* p = dx + t * ldx + o;
      _mm512_mask_storeu_ps(p, mask, _mm512_fmadd_ps(w, a[t], _mm512_maskz_loadu_ps(mask, p)));
    }
  }
};

// Keeps one block's dequantized vectors of row r for PairSink.
template <int N>
struct CollectSink {
  __m512 w[N];

  void operator()(int j, __m512 v) { w[j] = v; }
};

// Adds row r's vectors (w0, from CollectSink) and row r + 1's into dx in one pass, r's product
// first: the sums of AxpySink on the two rows one after the other, with half the loads and stores.
template <int T>
struct PairSink {
  float* dx;
  int64_t ldx;
  const __m512* w0;
  __m512 a0[T], a1[T];

  void operator()(int j, __m512 w1) {
    for (int t = 0; t < T; ++t) {
      float* p = dx + t * ldx + 16 * j;
      _mm512_storeu_ps(p, _mm512_fmadd_ps(w1, a1[t], _mm512_fmadd_ps(w0[j], a0[t], _mm512_loadu_ps(p))));
    }
  }
};

template <DType D, int T>
void avx512_cols(float* dx, const float* dy, const WeightRef& W, int64_t n_tokens, int64_t c0, int64_t c1) {
  constexpr int64_t kElems = dtype_block_elems(D), kBytes = dtype_block_bytes(D);
  constexpr bool kFlat = D == DType::NF4 || D == DType::INT8;
  const auto* data = static_cast<const uint8_t*>(W.data);
  const auto prefetch = [&](int64_t r) {
    if (r >= W.rows) return;
    const int64_t first = r * W.cols;
    const int64_t end = dtype_bytes(D, first + c1);
    for (int64_t p = dtype_bytes(D, first + c0) & ~int64_t(63); p < end; p += 64)
      _mm_prefetch(reinterpret_cast<const char*>(data + p), _MM_HINT_T0);
  };
  const auto broadcast = [&](__m512* a, int64_t r) {
    for (int t = 0; t < T; ++t) a[t] = _mm512_set1_ps(dy[t * W.rows + r]);
  };
  int64_t r = 0;
  if constexpr (!kFlat) {
    PairSink<T> pair{dx, W.cols, nullptr, {}, {}};
    for (; r + 1 < W.rows; r += 2) {
      prefetch(r + kPrefetchRows);
      prefetch(r + kPrefetchRows + 1);
      broadcast(pair.a0, r);
      broadcast(pair.a1, r + 1);
      const uint8_t* row0 = data + dtype_bytes(D, r * W.cols);
      const uint8_t* row1 = data + dtype_bytes(D, (r + 1) * W.cols);
      for (int64_t b = c0 / kElems; b < c1 / kElems; ++b) {
        CollectSink<int(kElems / 16)> first;
        avx512::decode_block<D>(row0 + b * kBytes, first);
        pair.dx = dx + b * kElems;
        pair.w0 = first.w;
        avx512::decode_block<D>(row1 + b * kBytes, pair);
      }
    }
  }
  AxpySink<T> sink{dx, W.cols, {}};
  for (; r < W.rows; ++r) {
    prefetch(r + kPrefetchRows);
    broadcast(sink.a, r);
    if constexpr (kFlat) {
      const int64_t row_begin = r * W.cols;
      avx512::flat_segments(W, row_begin + c0, row_begin + c1, sink,
                            [&](int64_t i) { sink.dx = dx + (i - row_begin); });
    } else {
      const uint8_t* row = data + dtype_bytes(D, r * W.cols);
      for (int64_t b = c0 / kElems; b < c1 / kElems; ++b) {
        sink.dx = dx + b * kElems;
        avx512::decode_block<D>(row + b * kBytes, sink);
      }
    }
  }
}

template <DType D, int T>
struct RowsKernel {
  static constexpr RowsFn fn = avx512_rows<D, T>;
};
template <DType D, int T>
struct ColsKernel {
  static constexpr ColsFn fn = avx512_cols<D, T>;
};

TF_AVX512_END

TF_AVX2_BEGIN

// As DotSink, eight lanes at a time; a partial NF4 / INT8 segment's elements go to a scalar sum
// per token.
template <int T>
struct DotSink8 {
  const float* x;
  int64_t ldx;
  __m256 acc[T][2];
  float rest[T];

  void operator()(int j, __m256 w) {
    for (int t = 0; t < T; ++t)
      acc[t][j & 1] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * ldx + 8 * j), acc[t][j & 1]);
  }
  void one(int64_t o, float w) {
    for (int t = 0; t < T; ++t) rest[t] += w * x[t * ldx + o];
  }
};

inline float sum8(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

template <DType D, int T>
void avx2_rows(float* y, const float* x, const WeightRef& W, int64_t n_tokens, float beta, int64_t r0,
               int64_t r1) {
  constexpr int64_t kElems = dtype_block_elems(D), kBytes = dtype_block_bytes(D);
  const auto* data = static_cast<const uint8_t*>(W.data);
  for (int64_t r = r0; r < r1; ++r) {
    DotSink8<T> sink{x, W.cols, {}, {}};  // the sums start at zero
    if constexpr (D == DType::NF4 || D == DType::INT8) {
      const int64_t row_begin = r * W.cols;
      avx2::flat_segments(W, row_begin, row_begin + W.cols, sink,
                          [&](int64_t i) { sink.x = x + (i - row_begin); });
    } else {
      const uint8_t* row = data + dtype_bytes(D, r * W.cols);
      for (int64_t b = 0; b < W.cols / kElems; ++b) {
        sink.x = x + b * kElems;
        avx2::decode_block<D>(row + b * kBytes, sink);
      }
    }
    for (int t = 0; t < T; ++t)
      store(y[t * W.rows + r], sum8(_mm256_add_ps(sink.acc[t][0], sink.acc[t][1])) + sink.rest[t], beta);
  }
}

template <DType D, int T>
struct Avx2RowsKernel {
  static constexpr RowsFn fn = avx2_rows<D, T>;
};

TF_AVX2_END

// Kernel<D, T> names the kernel template (AVX-512 or AVX2) for dtype D and T tokens.
template <template <DType, int> class Kernel, DType D>
auto for_tokens(int64_t n_tokens) {
  switch (n_tokens) {
    case 1: return Kernel<D, 1>::fn;
    case 2: return Kernel<D, 2>::fn;
    case 3: return Kernel<D, 3>::fn;
    case 4: return Kernel<D, 4>::fn;
    case 5: return Kernel<D, 5>::fn;
    case 6: return Kernel<D, 6>::fn;
    case 7: return Kernel<D, 7>::fn;
    default: return Kernel<D, 8>::fn;
  }
}

// Kernel<D, T>::fn for the weight's dtype D and n_tokens tokens.
template <template <DType, int> class Kernel>
auto kernel_for_dtype(DType dtype, int64_t n_tokens) {
  switch (dtype) {
    case DType::Q4_0: return for_tokens<Kernel, DType::Q4_0>(n_tokens);
    case DType::Q4_1: return for_tokens<Kernel, DType::Q4_1>(n_tokens);
    case DType::Q5_0: return for_tokens<Kernel, DType::Q5_0>(n_tokens);
    case DType::Q5_1: return for_tokens<Kernel, DType::Q5_1>(n_tokens);
    case DType::Q8_0: return for_tokens<Kernel, DType::Q8_0>(n_tokens);
    case DType::Q2_K: return for_tokens<Kernel, DType::Q2_K>(n_tokens);
    case DType::Q3_K: return for_tokens<Kernel, DType::Q3_K>(n_tokens);
    case DType::Q4_K: return for_tokens<Kernel, DType::Q4_K>(n_tokens);
    case DType::Q5_K: return for_tokens<Kernel, DType::Q5_K>(n_tokens);
    case DType::Q6_K: return for_tokens<Kernel, DType::Q6_K>(n_tokens);
    case DType::NF4: return for_tokens<Kernel, DType::NF4>(n_tokens);
    default: return for_tokens<Kernel, DType::INT8>(n_tokens);
  }
}

#endif  // TF_HAVE_AVX512_KERNELS

// The checks both directions share; `op` names the caller.
void check_quant_gemv(const char* op, const WeightRef& W, int64_t n_tokens) {
  TF_CHECK(is_quantized(W.dtype), op, ": weight dtype ", dtype_name(W.dtype), " is not quantized");
  TF_CHECK(n_tokens >= 0 && n_tokens <= kQuantGemvMaxTokens, op, ": ", n_tokens, " tokens, expected 0 to ",
           kQuantGemvMaxTokens);
  TF_CHECK(W.rows >= 0 && W.cols >= 0, op, ": negative weight shape ", W.rows, " x ", W.cols);
  if (W.dtype == DType::NF4 || W.dtype == DType::INT8) {
    TF_CHECK(W.scales.absmax, op, ": ", dtype_name(W.dtype), " weight without its absmax");
  } else {
    TF_CHECK(W.cols % dtype_block_elems(W.dtype) == 0, op, ": ", dtype_name(W.dtype), " rows of ", W.cols,
             " elements are not whole blocks of ", dtype_block_elems(W.dtype));
  }
}

}  // namespace

void quant_gemv(float* y, const float* x, const WeightRef& W, int64_t n_tokens, float beta) {
  check_quant_gemv("quant_gemv", W, n_tokens);
  if (n_tokens == 0 || W.rows == 0) return;
  RowsFn rows = portable_rows;
#if defined(TF_HAVE_AVX512_KERNELS)
  if (use_avx512()) {
    rows = kernel_for_dtype<RowsKernel>(W.dtype, n_tokens);
  } else if (use_avx2()) {
    rows = kernel_for_dtype<Avx2RowsKernel>(W.dtype, n_tokens);
  }
#endif
  const int64_t tasks = (W.rows + kRowsPerTask - 1) / kRowsPerTask;
  const auto task = [&](int64_t t) {
    const int64_t r0 = t * kRowsPerTask;
    rows(y, x, W, n_tokens, beta, r0, std::min(W.rows, r0 + kRowsPerTask));
  };
  if (W.rows * W.cols >= kMinParallelElems) {
    pool_for(tasks, task);
  } else {
    for (int64_t t = 0; t < tasks; ++t) task(t);
  }
}

// Each element of dx starts as beta dx and takes one product per row, rows in order, whichever task
// owns its column: so the column ranges may follow the thread count without changing a bit. A
// range is as wide as its dx slice allows in L1, and narrower where that leaves a thread idle;
// wide ranges read long runs of each row of W.
void quant_gemv_t(float* dx, const float* dy, const WeightRef& W, int64_t n_tokens, float beta) {
  check_quant_gemv("quant_gemv_t", W, n_tokens);
  if (n_tokens == 0 || W.cols == 0) return;
  ColsFn cols = portable_cols;
#if defined(TF_HAVE_AVX512_KERNELS)
  if (use_avx512()) cols = kernel_for_dtype<ColsKernel>(W.dtype, n_tokens);
#endif
  // Ranges start on a row's ggml blocks. NF4 / INT8 blocks run over the flattened tensor and any
  // start works for them; multiples of 64 keep a range on whole blocks where rows hold whole blocks.
  const int64_t align = W.dtype == DType::NF4 || W.dtype == DType::INT8 ? 64 : dtype_block_elems(W.dtype);
  const auto align_up = [align](int64_t n) { return (n + align - 1) / align * align; };
  const bool parallel = W.rows * W.cols >= kMinParallelElems;
  const int64_t per_thread = align_up((W.cols + num_threads() - 1) / num_threads());
  const int64_t fits = std::max(align, kAccumFloats / n_tokens / align * align);
  const int64_t width = parallel ? std::min(fits, per_thread) : fits;
  const int64_t tasks = (W.cols + width - 1) / width;
  const auto task = [&](int64_t i) {
    const int64_t c0 = i * width, c1 = std::min(W.cols, c0 + width);
    for (int64_t t = 0; t < n_tokens; ++t)
      for (float* p = dx + t * W.cols + c0; p < dx + t * W.cols + c1; ++p)
        *p = beta == 0.0f ? 0.0f : beta * *p;
    cols(dx, dy, W, n_tokens, c0, c1);
  };
  if (parallel) {
    pool_for(tasks, task);
  } else {
    for (int64_t i = 0; i < tasks; ++i) task(i);
  }
}

}  // namespace tf::cpu
