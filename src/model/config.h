// defines: tf::LlamaConfig (architecture of a Llama-family model), tf::LoraConfig, tf::LoraTarget
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/ops.h"

namespace tf {

// The MLP's gated activation: silu(gate) * up (Llama), or gelu(gate) * up with gelu's tanh
// approximation (Gemma's gelu_pytorch_tanh).
enum class MlpActivation : uint8_t { SiLU, GeluTanh };

// Architecture of a decoder-only Llama-family model (Llama 2/3, Mistral, Qwen2/3, Gemma 2/3, SmolLM,
// TinyLlama).
struct LlamaConfig {
  int hidden = 0;
  int intermediate = 0;
  int n_layers = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;  // usually hidden / n_heads
  int vocab = 0;
  float rms_eps = 1e-5f;
  RopeParams rope;  // rope.head_dim == head_dim
  // How q/k rows are ordered in the stored weights: HF checkpoints rotate split halves; GGUF
  // files store q/k permuted for the interleaved rotation.
  RopeLayout rope_layout = RopeLayout::SplitHalf;
  bool tie_embeddings = false;
  bool attention_bias = false;  // q/k/v biases (Qwen2)
  // Qwen3 and Gemma 3: q and k are RMS-normalised per head (weights [head_dim], eps rms_eps) after
  // their projections and before the rotation.
  bool qk_norm = false;
  // Gemma 3: the MLP's activation, the embedding rows' scale (sqrt(hidden)), norms on the attention
  // and MLP outputs before each residual add ("sandwich" norms), and scores scaled by
  // query_pre_attn_scalar^-0.5 (0: by head_dim's).
  MlpActivation activation = MlpActivation::SiLU;
  float embed_scale = 1.0f;
  bool sandwich_norms = false;
  float query_pre_attn_scalar = 0.0f;
  // Gemma 3: the sliding layers rotate with rope_local (theta 0: with rope, as the others).
  RopeParams rope_local = [] {
    RopeParams off;
    off.theta = 0.0f;
    return off;
  }();
  // Sliding-window attention (Mistral, Qwen2): with sliding_window W > 0, the layers marked in
  // sliding_layers (every layer when it is empty) attend each query's W latest keys, itself
  // included; the others attend all earlier keys.
  int sliding_window = 0;
  std::vector<bool> sliding_layers;
  // Gemma 2's logit soft-capping, c * tanh(x / c) for a cap c > 0 (0: none): of every layer's
  // scaled attention scores (attn_logit_softcapping, AttentionShape::softcap) and of the lm_head's
  // logits, in the loss and in generation (final_logit_softcapping).
  float attn_softcap = 0.0f;
  float final_softcap = 0.0f;
  // Dropout on the attention probabilities in training; tightfit runs without, so finetune refuses
  // a model whose config asks for it.
  float attention_dropout = 0.0f;
  // Phi-3's dropouts on each residual branch (resid_pdrop) and on the embeddings (embd_pdrop):
  // finetune refuses them as it does attention_dropout.
  float residual_dropout = 0.0f;
  float embedding_dropout = 0.0f;
  // Phi-3 stores q, k and v as one [q_dim + 2 kv_dim, hidden] matrix (qkv_proj) and gate and up as
  // one [2 intermediate, hidden] (gate_up_proj, gate's rows first). The loaders split them by rows
  // into the per-projection slots; LoRA adapts each as one module (lora_modules), as PEFT does.
  bool fused_qkv = false;
  bool fused_gate_up = false;
  int max_positions = 2048;
  std::string architecture = "llama";

  int q_dim() const { return n_heads * head_dim; }
  // Whether layer l is a sliding layer (with no window set, Gemma 3's still rotate with rope_local).
  bool sliding_layer(int layer) const {
    return sliding_layers.empty() ? sliding_window > 0 : bool(sliding_layers[size_t(layer)]);
  }
  // Layer l's rotary parameters: rope_local for a sliding layer when it is set, else rope.
  const RopeParams& rope_of(int layer) const {
    return has_local_rope() && sliding_layer(layer) ? rope_local : rope;
  }
  // Whether the sliding layers rotate with a table of their own.
  bool has_local_rope() const { return rope_local.theta > 0; }
  int kv_dim() const { return n_kv_heads * head_dim; }
  // Layer l's attention scores' scale: 1/sqrt(head_dim) (or query_pre_attn_scalar's), times the
  // square of its rotary attention factor (yarn's), which HF multiplies into both q's and k's cos and sin.
  float attention_scale(int layer = 0) const;
  // Layer l's attention window (AttentionShape::window): 0 for full causal attention.
  int window(int layer) const {
    return sliding_window > 0 && (sliding_layers.empty() || sliding_layers[size_t(layer)]) ? sliding_window
                                                                                           : 0;
  }
  // Checks internal consistency; throws tf::Error naming `source` and the offending field.
  void validate(const std::string& source) const;
  // Number of base-model parameters.
  int64_t n_params() const;
};

// The seven projections LoRA can adapt, in the order used for storage and export.
enum class LoraTarget : uint8_t { Q, K, V, O, Gate, Up, Down, Count };
constexpr int kLoraTargetCount = int(LoraTarget::Count);
const char* lora_target_name(LoraTarget t);  // "q_proj", ... (HF / PEFT module names)
// Parses a comma-separated list such as "q_proj,v_proj" or "q,v" or "all"; returns a bit mask.
uint32_t parse_lora_targets(const std::string& list);

// What PEFT adapts as one nn.Linear: a projection, or for a model with fused projections one of its
// fused matrices, covering `count` consecutive targets from `first` (qkv_proj: q, k, v; gate_up_proj:
// gate, up). A module's adapter is one A [rank, in] and one B [sum of its targets' outputs, rank].
struct LoraModule {
  LoraTarget first = LoraTarget::Q;
  int count = 1;
  const char* name = "";  // PEFT's module name: "q_proj", ..., "qkv_proj", "gate_up_proj"
  uint32_t mask() const { return ((1u << count) - 1) << int(first); }
  bool covers(LoraTarget t) const { return int(t) >= int(first) && int(t) < int(first) + count; }
};
// The model's modules in storage and export order: the seven projections of an unfused model, or
// qkv_proj, o_proj, gate_up_proj, down_proj for Phi-3.
std::vector<LoraModule> lora_modules(const LlamaConfig& model);
// The module covering projection t.
LoraModule lora_module_of(const LlamaConfig& model, LoraTarget t);
// Checks that `targets` adapts each fused module whole; throws naming what to target instead.
void check_lora_targets(const LlamaConfig& model, uint32_t targets);

struct LoraConfig {
  int rank = 16;
  float alpha = 32.0f;
  bool rslora = false;  // scale alpha / sqrt(rank) instead of alpha / rank
  float dropout = 0.0f;
  uint32_t targets = (1u << kLoraTargetCount) - 1;  // bit i = LoraTarget(i); default all seven
  uint64_t seed = 0;

  float scale() const;
  bool has(LoraTarget t) const { return targets & (1u << int(t)); }
};

}  // namespace tf
