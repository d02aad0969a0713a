// defines: the CUDA backend's elementwise ops, tf::cuda:: and tf::simt:: add_inplace, add_bias, fill,
// scale_inplace, copy, sum_squares (a fixed-order tree over per-block partials), dropout_forward and
// dropout_backward
// (the CPU's Philox masks, drawn in the kernel); sum_squares_scratch, the rt::scratch of sum_squares
#include <algorithm>
#include <cstdint>

#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/kernel_common.h"
#include "kernels/cuda/port.h"
#include "kernels/cuda/scratch_plan.h"
#include "src/core/error.h"
#include "src/core/rng.h"

namespace tf::TF_PORT_BACKEND {

namespace {

// rt::scratch slot of sum_squares' per-block partials.
constexpr int kSumSquaresSlot = 20;
// sum_squares' first pass launches at most this many blocks; the second pass adds their partials
// in one block. Both depend only on n, so the order of every addition is fixed.
constexpr int kSumThreads = 128;
constexpr int64_t kSumMaxBlocks = 256;

__global__ void add_inplace_kernel(port::gptr<float> y, port::gptr<const float> x, int64_t n) {
  for (int64_t i = grid_first(); i < n; i += grid_stride()) {
    const float xi = x[i], yi = y[i];
    y[i] = yi + xi;
  }
}

template <typename W>
__global__ void add_bias_kernel(port::gptr<float> y, port::gptr<const typename W::Storage> bias, int64_t n,
                                int64_t width) {
  for (int64_t i = grid_first(); i < n; i += grid_stride()) {
    const typename W::Storage b = bias[i % width];
    const float yi = y[i];
    y[i] = yi + W::widen(b);
  }
}

__global__ void fill_kernel(port::gptr<float> x, float value, int64_t n) {
  for (int64_t i = grid_first(); i < n; i += grid_stride()) x[i] = value;
}

__global__ void scale_kernel(port::gptr<float> x, float s, int64_t n) {
  for (int64_t i = grid_first(); i < n; i += grid_stride()) {
    const float xi = x[i];
    x[i] = xi * s;
  }
}

// Products of two floats are exact in double (48 significant bits), so only the additions round.
__global__ void sum_squares_partials(port::gptr<double> partials, port::gptr<const float> x, int64_t n) {
  double s = 0;
  for (int64_t i = grid_first(); i < n; i += grid_stride()) {
    const double xi = x[i];
    s += xi * xi;
  }
  const double block_total = block_sum<kSumThreads>(s);
  if (threadIdx.x == 0) partials[blockIdx.x] = block_total;
}

__global__ void sum_squares_total(port::gptr<double> total, port::gptr<const double> partials,
                                  int n_partials) {
  double s = 0;
  for (int i = int(threadIdx.x); i < n_partials; i += kSumThreads) {
    const double pi = partials[i];
    s += pi;
  }
  const double t = block_sum<kSumThreads>(s);
  if (threadIdx.x == 0) total[0] = t;
}

// Thread b draws Philox block b0 + b and masks the elements of the mask 4 (b0 + b) .. + 3 that are
// in first .. first + n - 1 with its four words, which is element e of the mask taking word e % 4 of
// block e / 4, as Philox::uniform(e) does on the CPU.
// With `backward`, out holds the gradient coming in: dropout of it is added to dx first, then out
// takes dropout(x) (dropout_backward).
__global__ void dropout_kernel(port::gptr<float> out, port::gptr<const float> x, port::gptr<float> dx,
                               bool backward, int64_t n, float p, float keep_scale, Philox rng,
                               uint64_t first) {
  const uint64_t b0 = first / 4;
  const int64_t n_blocks = int64_t((first + uint64_t(n) + 3) / 4 - b0);
  for (int64_t b = grid_first(); b < n_blocks; b += grid_stride()) {
    uint32_t words[4];
    rng.block_words(b0 + uint64_t(b), words);
    for (int j = 0; j < 4; ++j) {
      const uint64_t e = 4 * (b0 + uint64_t(b)) + uint64_t(j);
      if (e < first) continue;
      const int64_t i = int64_t(e - first);
      if (i >= n) break;
      const bool dropped = uint_to_unit_float(words[j]) < p;
      if (backward) {
        const float gi = out[i], dxi = dx[i];
        dx[i] = dxi + (dropped ? 0.0f : mul_rn(gi, keep_scale));
      }
      if (dropped) {
        out[i] = 0.0f;
      } else {
        const float xi = x[i];
        out[i] = xi * keep_scale;
      }
    }
  }
}

// sum_squares' first-pass blocks for n values, and the bytes of their partials and the total.
int64_t sum_blocks(int64_t n) {
  return std::min(kSumMaxBlocks, (n + kSumThreads - 1) / kSumThreads);
}
size_t partials_bytes(int64_t blocks) {
  return size_t(blocks + 1) * sizeof(double);
}

}  // namespace

void add_inplace(float* y, const float* x, int64_t n) {
  if (n <= 0) return;
  port::launch(add_inplace_kernel, on_current_stream("add_inplace", element_blocks(n), kElementThreads), y, x,
               n);
}

void add_bias(float* y, WeightRef bias, int64_t rows, int64_t width) {
  TF_CHECK(bias.rows * bias.cols == width, "add_bias: bias of ", bias.rows, " x ", bias.cols,
           " elements for rows of ", width);
  const int64_t n = rows * width;
  with_stored_weight("add_bias: bias", bias, [&](auto w) {
    using W = decltype(w);
    if (n <= 0) return;
    port::launch(add_bias_kernel<W>, on_current_stream("add_bias", element_blocks(n), kElementThreads), y,
                 static_cast<const typename W::Storage*>(bias.data), n, width);
  });
}

void fill(float* x, float value, int64_t n) {
  if (n <= 0) return;
  port::launch(fill_kernel, on_current_stream("fill", element_blocks(n), kElementThreads), x, value, n);
}

void scale_inplace(float* x, float s, int64_t n) {
  if (n <= 0) return;
  port::launch(scale_kernel, on_current_stream("scale_inplace", element_blocks(n), kElementThreads), x, s, n);
}

void copy(float* dst, const float* src, int64_t n) {
  TF_CHECK(n >= 0, "copy: negative element count ", n);
  if (n > 0) rt::memcpy_d2d(dst, src, size_t(n) * sizeof(float), rt::current_stream());
}

void sum_squares_scratch(ScratchNeeds& s, int64_t n) {
  if (n > 0) s.need(kSumSquaresSlot, "sum_squares' partials", partials_bytes(sum_blocks(n)));
}

double sum_squares(const float* x, int64_t n) {
  if (n <= 0) return 0;
  const int64_t blocks = sum_blocks(n);
  auto* partials = static_cast<double*>(rt::scratch(kSumSquaresSlot, partials_bytes(blocks)));
  double* total = partials + blocks;
  port::launch(sum_squares_partials, on_current_stream("sum_squares_partials", blocks, kSumThreads), partials,
               x, n);
  port::launch(sum_squares_total, on_current_stream("sum_squares_total", 1, kSumThreads), total,
               static_cast<const double*>(partials), int(blocks));
  double result = 0;
  rt::memcpy_d2h(&result, total, sizeof(double), rt::current_stream());
  rt::stream_synchronize(rt::current_stream());
  return result;
}

namespace {

// One thread per Philox block the mask's elements [first, first + n) draw from; `dx` null: the forward.
void launch_dropout(const char* name, float* out, const float* x, float* dx, int64_t n, float p,
                    uint64_t seed, uint64_t stream, uint64_t first) {
  TF_CHECK(p >= 0 && p < 1, name, ": p must be in [0, 1), got ", p);
  if (n <= 0) return;
  const int64_t philox_blocks = int64_t((first + uint64_t(n) + 3) / 4 - first / 4);
  port::launch(dropout_kernel, on_current_stream(name, element_blocks(philox_blocks), kElementThreads), out,
               x, dx, dx != nullptr, n, p, 1.0f / (1.0f - p), Philox(seed, stream), first);
}

}  // namespace

void dropout_forward(float* out, const float* x, int64_t n, float p, uint64_t seed, uint64_t stream,
                     uint64_t first) {
  launch_dropout("dropout_forward", out, x, nullptr, n, p, seed, stream, first);
}

void dropout_backward(float* dx, float* g, const float* x, int64_t n, float p, uint64_t seed, uint64_t stream,
                      uint64_t first) {
  launch_dropout("dropout_backward", g, x, dx, n, p, seed, stream, first);
}

}  // namespace tf::TF_PORT_BACKEND
