// defines: tf::BlockWeights, tf::LlamaWeights (the frozen base model), tf::WeightSlot and the HF
// tensor names, tf::init_random_weights
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "src/core/tensor.h"
#include "src/model/config.h"

namespace tf {

// Every base tensor of a Llama-family model. Per-layer slots come first.
enum class WeightSlot : uint8_t {
  AttnNorm,
  Q,
  K,
  V,
  O,
  QBias,
  KBias,
  VBias,
  MlpNorm,
  Gate,
  Up,
  Down,
  QNorm,         // Qwen3, Gemma 3: [head_dim], applied to each head of q
  KNorm,         // and of k
  PostAttnNorm,  // Gemma 3: on the attention's output, before the residual add
  PostMlpNorm,   // and on the MLP's
  // (per layer)
  Embed,
  FinalNorm,
  LmHead,  // global
};
constexpr bool is_layer_slot(WeightSlot s) {
  return s < WeightSlot::Embed;
}
// The HF checkpoint name, e.g. "model.layers.3.self_attn.q_proj.weight" (layer ignored for globals),
// as Llama-architecture checkpoints name it; the config's architecture may name it otherwise (Gemma 3
// calls its MLP's norm pre_feedforward_layernorm and post_attention_layernorm is PostAttnNorm).
std::string hf_weight_name(WeightSlot slot, int layer);
std::string hf_weight_name(const LlamaConfig& cfg, WeightSlot slot, int layer);
// Norm weights (every [1, n] slot but the biases).
constexpr bool is_norm_slot(WeightSlot s) {
  return s == WeightSlot::AttnNorm || s == WeightSlot::MlpNorm || s == WeightSlot::QNorm ||
         s == WeightSlot::KNorm || s == WeightSlot::PostAttnNorm || s == WeightSlot::PostMlpNorm ||
         s == WeightSlot::FinalNorm;
}
// The LoRA target of a projection slot (q, k, v, o, gate, up, down); nothing for the others.
std::optional<LoraTarget> lora_target_of(WeightSlot slot);
// Expected shape [rows, cols] of a slot (biases and norms are [1, n]).
std::pair<int64_t, int64_t> weight_shape(const LlamaConfig& cfg, WeightSlot slot);
// Where a projection lies in a fused matrix of the checkpoint (LlamaConfig::fused_qkv,
// fused_gate_up): rows [row0, row0 + its rows) of a matrix of `rows` rows, qkv_proj / attn_qkv when
// `qkv`, else gate_up_proj / ffn_up. Nothing for a slot stored on its own.
struct FusedRows {
  bool qkv = true;
  int64_t row0 = 0;
  int64_t rows = 0;
};
std::optional<FusedRows> fused_rows(const LlamaConfig& cfg, WeightSlot slot);
// "model.layers.N.self_attn.qkv_proj.weight" or "model.layers.N.mlp.gate_up_proj.weight".
std::string hf_fused_weight_name(bool qkv, int layer);

struct BlockWeights {
  WeightRef attn_norm, q, k, v, o, q_bias, k_bias, v_bias, mlp_norm, gate, up, down, q_norm, k_norm,
      post_attn_norm, post_mlp_norm;
  WeightRef& slot(WeightSlot s);
  const WeightRef& slot(WeightSlot s) const { return const_cast<BlockWeights*>(this)->slot(s); }
};

// A window of a model file that the loader mapped and whose tensors it kept as stored: bytes
// [offset, offset + bytes) of the file lie at `begin`. The disk tier reads such tensors from the file
// by offset and never touches their pages of the mapping. Size and modification time are the file's
// at load, so that a read can tell the file changed since.
struct MappedFile {
  std::string path;
  const std::byte* begin = nullptr;
  uint64_t offset = 0;
  uint64_t bytes = 0;
  uint64_t file_size = 0;
  int64_t mtime_ns = 0;

  // The window of `path` from file offset `offset` at `begin`, `bytes` long, with the file's size and
  // modification time now.
  static MappedFile of(const std::string& path, const void* begin, uint64_t offset, uint64_t bytes);
};

// The frozen base model: views of every tensor plus whatever keeps their memory alive (owned
// tensors, or a mapped file held through `keepalive`).
struct LlamaWeights {
  LlamaConfig config;
  WeightRef embed, final_norm, lm_head;  // lm_head aliases embed when embeddings are tied
  std::vector<BlockWeights> blocks;
  std::vector<Tensor> owned;
  std::vector<std::shared_ptr<const void>> keepalive;
  std::vector<MappedFile> files;  // the mapped windows that tensors kept as stored point into

  WeightRef& slot(WeightSlot s, int layer);
  const WeightRef& slot(WeightSlot s, int layer) const {
    return const_cast<LlamaWeights*>(this)->slot(s, layer);
  }
  // Whether `p` lies in one of the owned tensors (memory of the weights' own, not a mapped file).
  bool owns(const void* p) const;
  // Visits every slot the config uses (biases only with attention_bias, q/k norms with qk_norm, the
  // post norms with sandwich_norms; no lm_head when tied).
  static void for_each_slot(const LlamaConfig& cfg, const std::function<void(WeightSlot, int)>& fn);
};

// A model with HF-style random initialisation (normal * std, norms 1, biases 0), stored in `dtype`.
// HF's std is 0.02; tests that must learn through a frozen random lm_head use a larger one, since
// the final norm bounds every logit by |h| * |w_row| ~ hidden * std.
LlamaWeights init_random_weights(const LlamaConfig& cfg, DType dtype, uint64_t seed, float std = 0.02f);

}  // namespace tf
