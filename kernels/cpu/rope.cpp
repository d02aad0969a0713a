// defines: tf::rope_inv_freq, tf::rope_attention_factor, tf::rope_scaling_name, tf::cpu::rope_forward,
//          tf::cpu::rope_backward
#include <algorithm>
#include <cmath>
#include <numbers>

#include "kernels/ops.h"
#include "src/core/error.h"

namespace tf {

namespace {

// HF's _compute_yarn_parameters: each frequency blends its interpolated (divided by factor) and
// extrapolated (unchanged) value along a ramp over the dimensions between the correction bounds,
// which Python computes in double and the blend in float32.
void yarn_inv_freq(const RopeParams& p, float* inv_freq) {
  TF_CHECK(p.factor > 0.0f, "yarn rope scaling factor must be positive, got ", p.factor);
  TF_CHECK(p.original_max_positions > 0, "yarn rope original_max_position_embeddings must be positive");
  TF_CHECK(p.beta_fast > 0.0f && p.beta_slow > 0.0f,
           "yarn rope beta_fast and beta_slow must be positive, got ", p.beta_fast, " and ", p.beta_slow);
  const int dim = p.head_dim, half = dim / 2;
  const double log_base = std::log(double(p.theta));
  const auto correction_dim = [&](double rotations) {
    return double(dim) * std::log(double(p.original_max_positions) / (rotations * 2.0 * std::numbers::pi)) /
           (2.0 * log_base);
  };
  double low = correction_dim(p.beta_fast), high = correction_dim(p.beta_slow);
  if (p.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, double(dim - 1));
  if (low == high) high += 0.001;  // as HF: keeps the ramp finite
  for (int i = 0; i < half; ++i) {
    const float pos_freq = std::pow(p.theta, float(2 * i) / float(dim));
    const float extrapolation = 1.0f / pos_freq;
    const float interpolation = 1.0f / (p.factor * pos_freq);
    const float ramp = std::clamp((float(i) - float(low)) / float(high - low), 0.0f, 1.0f);
    const float extrapolation_factor = 1.0f - ramp;
    inv_freq[i] = interpolation * (1.0f - extrapolation_factor) + extrapolation * extrapolation_factor;
  }
}

// HF's get_mscale, in double as Python evaluates it.
double yarn_mscale(double scale, double mscale) {
  return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

void apply_freq_factors(const RopeParams& p, float* inv_freq) {
  if (p.freq_factors.empty()) return;
  const int half = p.head_dim / 2;
  TF_CHECK(int(p.freq_factors.size()) == half, "rope frequency factors: ", p.freq_factors.size(),
           " values for ", half, " frequencies");
  for (int i = 0; i < half; ++i) {
    TF_CHECK(p.freq_factors[size_t(i)] > 0.0f && std::isfinite(p.freq_factors[size_t(i)]),
             "rope frequency factor ", i, " must be positive and finite, got ", p.freq_factors[size_t(i)]);
    inv_freq[i] /= p.freq_factors[size_t(i)];
  }
}

// Follows HF transformers' _compute_default_rope_parameters and _compute_llama3_parameters step by
// step in float32, including how PyTorch evaluates `scalar / tensor` (reciprocal of the tensor,
// then a multiply), so the frequencies agree with the Python ones to within an ulp or two (powf
// and division-by-scalar rounding may differ between libraries).
void scaled_inv_freq(const RopeParams& p, float* inv_freq) {
  TF_CHECK(p.head_dim > 0 && p.head_dim % 2 == 0, "rope head_dim must be positive and even, got ",
           p.head_dim);
  TF_CHECK(p.theta > 0.0f, "rope theta must be positive, got ", p.theta);
  const int half = p.head_dim / 2;
  for (int i = 0; i < half; ++i) {
    inv_freq[i] = 1.0f / std::pow(p.theta, float(2 * i) / float(p.head_dim));
  }
  switch (p.scaling) {
    case RopeScalingType::None:
    case RopeScalingType::Dynamic:
    case RopeScalingType::LongRope: return;
    case RopeScalingType::Linear:
      TF_CHECK(p.factor > 0.0f, "linear rope scaling factor must be positive, got ", p.factor);
      for (int i = 0; i < half; ++i) inv_freq[i] /= p.factor;
      return;
    case RopeScalingType::Yarn: yarn_inv_freq(p, inv_freq); return;
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

}  // namespace

void rope_inv_freq(const RopeParams& p, float* inv_freq) {
  scaled_inv_freq(p, inv_freq);
  apply_freq_factors(p, inv_freq);
}

float rope_attention_factor(const RopeParams& p) {
  if (p.scaling == RopeScalingType::LongRope) {
    if (p.attention_factor > 0.0f) return p.attention_factor;
    // HF's _compute_longrope_parameters, in double as Python evaluates it.
    if (p.factor <= 1.0f) return 1.0f;
    return float(std::sqrt(1.0 + std::log(double(p.factor)) / std::log(double(p.original_max_positions))));
  }
  if (p.scaling != RopeScalingType::Yarn) return 1.0f;
  if (p.attention_factor > 0.0f) return p.attention_factor;
  if (p.mscale != 0.0f && p.mscale_all_dim != 0.0f)
    return float(yarn_mscale(p.factor, p.mscale) / yarn_mscale(p.factor, p.mscale_all_dim));
  return float(yarn_mscale(p.factor, 1.0));
}

const char* rope_scaling_name(RopeScalingType t) {
  switch (t) {
    case RopeScalingType::None: return "default";
    case RopeScalingType::Linear: return "linear";
    case RopeScalingType::Llama3: return "llama3";
    case RopeScalingType::Dynamic: return "dynamic";
    case RopeScalingType::Yarn: return "yarn";
    case RopeScalingType::LongRope: return "longrope";
  }
  return "?";
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
