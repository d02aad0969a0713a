// defines: tf::cpu::swiglu_forward, tf::cpu::swiglu_backward (eight elements at a time on AVX2 CPUs,
// the same bits as one at a time: both take e^x from exp_f32)
#include "kernels/cpu/exp_f32.h"
#include "kernels/cpu/isa.h"
#include "kernels/ops.h"

namespace tf::cpu {

namespace {
// Below this many elements the OpenMP fork/join costs more than the loop.
constexpr int64_t kParallelMin = 1 << 15;
constexpr int64_t kLanes = 8;

inline float sigmoid(float x) {
  return 1.0f / (1.0f + exp_f32(-x));
}

inline void forward_one(float* out, const float* gate, const float* up, int64_t i) {
  out[i] = gate[i] * sigmoid(gate[i]) * up[i];
}

inline void backward_one(float* d_gate, float* d_up, const float* d_out, const float* gate, const float* up,
                         int64_t i) {
  const float g = gate[i];
  const float s = sigmoid(g);
  const float silu = g * s;
  d_gate[i] += d_out[i] * up[i] * (s + silu * (1.0f - s));
  d_up[i] += d_out[i] * silu;
}

}  // namespace

#if defined(TF_HAVE_AVX512_KERNELS)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace {

// The scalar functions' operations in the same order, eight lanes at a time.
inline __m256 sigmoid8(__m256 g) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 minus_g = _mm256_xor_ps(g, _mm256_set1_ps(-0.0f));
  return _mm256_div_ps(one, _mm256_add_ps(one, exp_f32x8(minus_g)));
}

void forward_avx2(float* out, const float* gate, const float* up, int64_t blocks) {
#pragma omp parallel for schedule(static) if (blocks * kLanes >= kParallelMin)
  for (int64_t b = 0; b < blocks; ++b) {
    const __m256 g = _mm256_loadu_ps(gate + b * kLanes);
    const __m256 y = _mm256_mul_ps(_mm256_mul_ps(g, sigmoid8(g)), _mm256_loadu_ps(up + b * kLanes));
    _mm256_storeu_ps(out + b * kLanes, y);
  }
}

void backward_avx2(float* d_gate, float* d_up, const float* d_out, const float* gate, const float* up,
                   int64_t blocks) {
  const __m256 one = _mm256_set1_ps(1.0f);
#pragma omp parallel for schedule(static) if (blocks * kLanes >= kParallelMin)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i = b * kLanes;
    const __m256 g = _mm256_loadu_ps(gate + i), dy = _mm256_loadu_ps(d_out + i);
    const __m256 s = sigmoid8(g), silu = _mm256_mul_ps(g, s);
    const __m256 slope = _mm256_add_ps(s, _mm256_mul_ps(silu, _mm256_sub_ps(one, s)));
    const __m256 dg = _mm256_mul_ps(_mm256_mul_ps(dy, _mm256_loadu_ps(up + i)), slope);
    _mm256_storeu_ps(d_gate + i, _mm256_add_ps(_mm256_loadu_ps(d_gate + i), dg));
    _mm256_storeu_ps(d_up + i, _mm256_add_ps(_mm256_loadu_ps(d_up + i), _mm256_mul_ps(dy, silu)));
  }
}

}  // namespace
#pragma GCC pop_options
#endif

void swiglu_forward(float* out, const float* gate, const float* up, int64_t n) {
  int64_t done = 0;
#if defined(TF_HAVE_AVX512_KERNELS)
  if (use_avx2()) {
    forward_avx2(out, gate, up, n / kLanes);
    done = n / kLanes * kLanes;
  }
#endif
#pragma omp parallel for schedule(static) if (n - done >= kParallelMin)
  for (int64_t i = done; i < n; ++i) forward_one(out, gate, up, i);
}

void swiglu_backward(float* d_gate, float* d_up, const float* d_out, const float* gate, const float* up,
                     int64_t n) {
  int64_t done = 0;
#if defined(TF_HAVE_AVX512_KERNELS)
  if (use_avx2()) {
    backward_avx2(d_gate, d_up, d_out, gate, up, n / kLanes);
    done = n / kLanes * kLanes;
  }
#endif
#pragma omp parallel for schedule(static) if (n - done >= kParallelMin)
  for (int64_t i = done; i < n; ++i) backward_one(d_gate, d_up, d_out, gate, up, i);
}

}  // namespace tf::cpu
