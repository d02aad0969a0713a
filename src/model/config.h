// defines: tf::LlamaConfig (architecture of a Llama-family model), tf::LoraConfig, tf::LoraTarget
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/ops.h"

namespace tf {

// Architecture of a decoder-only Llama-family model (Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama).
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
  // Sliding-window attention (Mistral, Qwen2): with sliding_window W > 0, the layers marked in
  // sliding_layers (every layer when it is empty) attend each query's W latest keys, itself
  // included; the others attend all earlier keys.
  int sliding_window = 0;
  std::vector<bool> sliding_layers;
  // Dropout on the attention probabilities in training; tightfit runs without, so finetune refuses
  // a model whose config asks for it.
  float attention_dropout = 0.0f;
  int max_positions = 2048;
  std::string architecture = "llama";

  int q_dim() const { return n_heads * head_dim; }
  int kv_dim() const { return n_kv_heads * head_dim; }
  // The attention scores' scale: 1/sqrt(head_dim), times the square of the rotary attention factor
  // (yarn's), which HF multiplies into both q's and k's cos and sin.
  float attention_scale() const;
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
