// defines: the op interface. Every op is declared once (kernels/op_signatures.inc) and implemented
// by each backend in its own namespace with the same signature:
//   tf::ref   plain loops that are obviously right (kernels/cpu/ref/)
//   tf::cpu   the fast CPU versions, checked against tf::ref (kernels/cpu/)
//   tf::cuda  the CUDA versions, checked against tf::cpu (kernels/cuda/)
//
// Conventions shared by all ops:
// - Activations and gradients are f32, row-major, contiguous unless a leading dimension is given.
// - Frozen base weights come as a WeightRef, row-major [rows, cols] (nn.Linear layout:
//   [out_features, in_features]), in any storage dtype; the ops that read a quantized one
//   (linear_*, embedding_forward, lm_head_cross_entropy, dequantize_weight_tile) dequantize a
//   bounded tile at a time and never form a full-precision copy of the matrix.
// - Token-major layouts: a batch of sequences is n_tokens = batch * seq rows; attention tensors
//   are [n_tokens, heads, head_dim].
// - Backward ops ACCUMULATE into their gradient outputs (+=) unless documented otherwise, so the
//   caller zeroes gradients once and branches (residuals, LoRA) add up naturally.
#pragma once

#include <cstdint>
#include <vector>

#include "src/core/dtype.h"

namespace tf {

// The per-block scales of an NF4 or INT8 weight, whose codes are in WeightRef::data. Block b
// covers elements [64 b, 64 b + 64) of the flattened [rows * cols] tensor (the last may be
// partial), so a block may straddle two rows, as in bitsandbytes.
struct QuantScales {
  // One per block: f32 absmax, or (NF4 with double quantization, when `nested` is set) uint8 codes
  // of the signed dynamic map: absmax[b] = dynamic_map[absmax[b]] * nested[b / 256] + offset.
  const void* absmax = nullptr;
  const float* nested = nullptr;
  float offset = 0.0f;
};

// A read-only matrix of frozen base weights, row-major [rows, cols] in any storage dtype: f32,
// bf16 or f16 elements, or a quantized dtype (ggml blocks along each row, cols a multiple of the
// block; NF4 / INT8 codes with `scales`).
struct WeightRef {
  WeightRef() = default;
  WeightRef(const void* data_, DType dtype_, int64_t rows_, int64_t cols_, QuantScales scales_ = {})
      : data(data_), dtype(dtype_), rows(rows_), cols(cols_), scales(scales_) {}

  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0;
  int64_t cols = 0;
  QuantScales scales;
};

// One operand of a matmul: op(X) is X or X^T, where X is stored row-major with leading dimension
// ld (elements). dtype f32, bf16 or f16.
struct MatOperand {
  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t ld = 0;
  bool trans = false;
};

enum class RopeLayout : uint8_t {
  SplitHalf,    // HF: pairs (i, i + d/2)
  Interleaved,  // GGUF / original Llama: pairs (2i, 2i + 1)
};

// How the rotary frequencies are scaled: HF's rope types default, linear, llama3, dynamic (NTK),
// yarn and longrope. Dynamic keeps the default frequencies: transformers changes them only for
// positions at or past original_max_positions, which the model refuses. LongRope (Phi-3) divides
// them by its short factors (held in freq_factors), and by its long factors for a batch whose
// positions reach original_max_positions, as transformers switches per forward pass.
enum class RopeScalingType : uint8_t { None, Linear, Llama3, Dynamic, Yarn, LongRope };

struct RopeParams {
  float theta = 10000.0f;
  int head_dim = 0;  // rotary dimension (all of the head)
  RopeScalingType scaling = RopeScalingType::None;
  float factor = 1.0f;                // Linear, Llama3, Dynamic and Yarn
  float low_freq_factor = 1.0f;       // Llama3
  float high_freq_factor = 4.0f;      // Llama3
  int original_max_positions = 8192;  // Llama3, Yarn, LongRope; Dynamic: the positions it leaves unscaled
  float beta_fast = 32.0f;            // Yarn: the ramp's bounds, in rotations
  float beta_slow = 1.0f;
  bool truncate = true;  // Yarn: the ramp's bounds rounded to whole dimensions
  // Yarn and LongRope: cos and sin are multiplied by this; 0 derives it from factor (yarn: and
  // mscale, mscale_all_dim when both are set, as HF's get_mscale does; longrope:
  // sqrt(1 + ln(factor) / ln(original_max_positions)) above a factor of 1).
  float attention_factor = 0.0f;
  float mscale = 0.0f;
  float mscale_all_dim = 0.0f;
  // Per-frequency divisors [head_dim / 2] (a GGUF's rope_freqs.weight, Llama 3.1 style), applied
  // after the scaling above; empty for none. LongRope's short factors.
  std::vector<float> freq_factors;
  // LongRope: the divisors [head_dim / 2] of a batch that reaches original_max_positions.
  std::vector<float> long_factors;

  bool has_long_factors() const { return scaling == RopeScalingType::LongRope && !long_factors.empty(); }
};

// Geometry of a causal self-attention call. Tokens are [batch * seq] rows; q is [.., n_heads,
// head_dim], k and v are [.., n_kv_heads, head_dim] (grouped-query attention: query head h reads
// kv head h / (n_heads / n_kv_heads)).
struct AttentionShape {
  int batch = 1;
  int seq = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  float scale = 0.0f;  // usually 1/sqrt(head_dim)
  int window = 0;      // sliding window: a query sees its `window` latest keys; 0 sees all (causal)
  // Logit soft-capping (Gemma 2's attn_logit_softcapping): each scaled score s becomes
  // softcap * tanh(s / softcap) before the mask and the softmax; 0 leaves the scores as they are.
  float softcap = 0.0f;
};

// AdamW hyper-parameters for one update; step is 1-based (bias correction).
struct AdamWParams {
  float lr = 1e-4f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  int64_t step = 1;
};

// Fused lm_head + cross-entropy geometry. Targets equal to kIgnoreIndex contribute nothing.
constexpr int32_t kIgnoreIndex = -100;

// Inverse rotary frequencies [head_dim / 2] for the given parameters, with rope scaling applied
// (HF's _compute_default_rope_parameters / _compute_linear_ / _llama3_ / _yarn_parameters, computed
// in f32) and then divided by freq_factors (llama.cpp's rope: theta_i = pos * inv_freq_i / factor_i).
void rope_inv_freq(const RopeParams& p, float* inv_freq);
// The factor HF multiplies the rotary cos and sin by (yarn's attention factor; 1 for the other
// types). q and k both carry it, so the attention scores scale by its square.
float rope_attention_factor(const RopeParams& p);
// "default", "linear", "llama3", "dynamic" or "yarn" (HF's rope_type names).
const char* rope_scaling_name(RopeScalingType t);

#define TF_OP(ret, name, params, args) ret name params;
namespace ref {
#include "kernels/op_signatures.inc"
}  // namespace ref

namespace cpu {
#include "kernels/op_signatures.inc"
void set_num_threads(int n);  // 0 = one per core
int num_threads();
}  // namespace cpu
#undef TF_OP

}  // namespace tf
