// defines: tf::rope_inv_freq, tf::cpu::rope_forward, tf::cpu::rope_backward
#include <cmath>
#include <numbers>

#include "kernels/ops.h"
#include "src/core/error.h"

namespace tf {

// Follows HF transformers' _compute_default_rope_parameters and _compute_llama3_parameters step by
// step in float32, including how PyTorch evaluates `scalar / tensor` (reciprocal of the tensor,
// then a multiply), so the frequencies agree with the Python ones to within an ulp or two (powf
// and division-by-scalar rounding may differ between libraries).
void rope_inv_freq(const RopeParams& p, float* inv_freq) {
  TF_CHECK(p.head_dim > 0 && p.head_dim % 2 == 0, "rope head_dim must be positive and even, got ",
           p.head_dim);
  TF_CHECK(p.theta > 0.0f, "rope theta must be positive, got ", p.theta);
  const int half = p.head_dim / 2;
  for (int i = 0; i < half; ++i) {
    inv_freq[i] = 1.0f / std::pow(p.theta, float(2 * i) / float(p.head_dim));
  }
  switch (p.scaling) {
    case RopeScalingType::None: return;
    case RopeScalingType::Linear:
      TF_CHECK(p.factor > 0.0f, "linear rope scaling factor must be positive, got ", p.factor);
      for (int i = 0; i < half; ++i) inv_freq[i] /= p.factor;
      return;
    case RopeScalingType::Llama3: {
      TF_CHECK(p.factor > 0.0f, "llama3 rope scaling factor must be positive, got ", p.factor);
      TF_CHECK(p.low_freq_factor > 0.0f && p.high_freq_factor > p.low_freq_factor,
               "llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor, got ", p.low_freq_factor,
               " and ", p.high_freq_factor);
      TF_CHECK(p.original_max_positions > 0, "llama3 rope original_max_position_embeddings must be positive");
      const double old_len = p.original_max_positions;
      // Python evaluates these scalar expressions in double; PyTorch then rounds them to float32.
      const float low_freq_wavelen = float(old_len / p.low_freq_factor);
      const float high_freq_wavelen = float(old_len / p.high_freq_factor);
      const float two_pi = float(2.0 * std::numbers::pi);
      const float band = float(double(p.high_freq_factor) - double(p.low_freq_factor));
      for (int i = 0; i < half; ++i) {
        const float f = inv_freq[i];
        const float wavelen = (1.0f / f) * two_pi;
        const float scaled = wavelen > low_freq_wavelen ? f / p.factor : f;
        const float smooth = ((1.0f / wavelen) * float(old_len) - p.low_freq_factor) / band;
        const float smoothed = (1.0f - smooth) * scaled / p.factor + smooth * scaled;
        const bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
        inv_freq[i] = medium ? smoothed : scaled;
      }
      return;
    }
  }
  TF_FAIL("unknown rope scaling type ", int(p.scaling));
}

namespace cpu {

namespace {

// Rotates by sign * angle. cos/sin depend only on (token, i), so they are computed once per token
// and shared by all heads; the values are the same float32 expressions as the reference.
void rope_rotate(float* x, const int32_t* pos, const float* inv_freq, int64_t n_tokens, int n_heads,
                 int head_dim, RopeLayout layout, float sign) {
  TF_CHECK(head_dim > 0 && head_dim % 2 == 0 && head_dim <= 1024,
           "rope head_dim must be even and in [2, 1024], got ", head_dim);
  const int half = head_dim / 2;
  // Below about 32k elements the OpenMP fork/join costs more than the rotation.
#pragma omp parallel for schedule(static) if (n_tokens * n_heads * head_dim >= (1 << 15))
  for (int64_t t = 0; t < n_tokens; ++t) {
    float cs[512], sn[512];
    for (int i = 0; i < half; ++i) {
      const float angle = float(pos[t]) * inv_freq[i];
      cs[i] = std::cos(angle);
      sn[i] = sign * std::sin(angle);
    }
    for (int h = 0; h < n_heads; ++h) {
      float* xh = x + (t * n_heads + h) * head_dim;
      if (layout == RopeLayout::SplitHalf) {
        float* hi = xh + half;
#pragma omp simd
        for (int i = 0; i < half; ++i) {
          const float a = xh[i], b = hi[i];
          xh[i] = a * cs[i] - b * sn[i];
          hi[i] = b * cs[i] + a * sn[i];
        }
      } else {
#pragma omp simd
        for (int i = 0; i < half; ++i) {
          const float a = xh[2 * i], b = xh[2 * i + 1];
          xh[2 * i] = a * cs[i] - b * sn[i];
          xh[2 * i + 1] = b * cs[i] + a * sn[i];
        }
      }
    }
  }
}

}  // namespace

void rope_forward(float* x, const int32_t* pos, const float* inv_freq, int64_t n_tokens, int n_heads,
                  int head_dim, RopeLayout layout) {
  rope_rotate(x, pos, inv_freq, n_tokens, n_heads, head_dim, layout, 1.0f);
}

void rope_backward(float* dx, const int32_t* pos, const float* inv_freq, int64_t n_tokens, int n_heads,
                   int head_dim, RopeLayout layout) {
  rope_rotate(dx, pos, inv_freq, n_tokens, n_heads, head_dim, layout, -1.0f);
}

}  // namespace cpu
}  // namespace tf
