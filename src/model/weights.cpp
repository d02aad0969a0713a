// defines: the HF names, LoRA targets and shapes of the weight slots, BlockWeights::slot,
// LlamaWeights::slot and for_each_slot, MappedFile::of, init_random_weights
#include "src/model/weights.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>

#include "src/core/error.h"
#include "src/core/rng.h"

namespace tf {

std::string hf_weight_name(WeightSlot slot, int layer) {
  const std::string p = "model.layers." + std::to_string(layer) + ".";
  switch (slot) {
    case WeightSlot::AttnNorm: return p + "input_layernorm.weight";
    case WeightSlot::Q: return p + "self_attn.q_proj.weight";
    case WeightSlot::K: return p + "self_attn.k_proj.weight";
    case WeightSlot::V: return p + "self_attn.v_proj.weight";
    case WeightSlot::O: return p + "self_attn.o_proj.weight";
    case WeightSlot::QBias: return p + "self_attn.q_proj.bias";
    case WeightSlot::KBias: return p + "self_attn.k_proj.bias";
    case WeightSlot::VBias: return p + "self_attn.v_proj.bias";
    case WeightSlot::MlpNorm: return p + "post_attention_layernorm.weight";
    case WeightSlot::Gate: return p + "mlp.gate_proj.weight";
    case WeightSlot::Up: return p + "mlp.up_proj.weight";
    case WeightSlot::Down: return p + "mlp.down_proj.weight";
    case WeightSlot::QNorm: return p + "self_attn.q_norm.weight";
    case WeightSlot::KNorm: return p + "self_attn.k_norm.weight";
    case WeightSlot::PostAttnNorm: return p + "post_attention_layernorm.weight";
    case WeightSlot::PostMlpNorm: return p + "post_feedforward_layernorm.weight";
    case WeightSlot::Embed: return "model.embed_tokens.weight";
    case WeightSlot::FinalNorm: return "model.norm.weight";
    case WeightSlot::LmHead: return "lm_head.weight";
  }
  return {};
}

std::string hf_weight_name(const LlamaConfig& cfg, WeightSlot slot, int layer) {
  if (cfg.sandwich_norms && slot == WeightSlot::MlpNorm)
    return "model.layers." + std::to_string(layer) + ".pre_feedforward_layernorm.weight";
  return hf_weight_name(slot, layer);
}

std::optional<LoraTarget> lora_target_of(WeightSlot s) {
  switch (s) {
    case WeightSlot::Q: return LoraTarget::Q;
    case WeightSlot::K: return LoraTarget::K;
    case WeightSlot::V: return LoraTarget::V;
    case WeightSlot::O: return LoraTarget::O;
    case WeightSlot::Gate: return LoraTarget::Gate;
    case WeightSlot::Up: return LoraTarget::Up;
    case WeightSlot::Down: return LoraTarget::Down;
    default: return std::nullopt;
  }
}

std::pair<int64_t, int64_t> weight_shape(const LlamaConfig& c, WeightSlot slot) {
  switch (slot) {
    case WeightSlot::AttnNorm:
    case WeightSlot::MlpNorm:
    case WeightSlot::PostAttnNorm:
    case WeightSlot::PostMlpNorm:
    case WeightSlot::FinalNorm: return {1, c.hidden};
    case WeightSlot::QNorm:
    case WeightSlot::KNorm: return {1, c.head_dim};
    case WeightSlot::Q: return {c.q_dim(), c.hidden};
    case WeightSlot::K:
    case WeightSlot::V: return {c.kv_dim(), c.hidden};
    case WeightSlot::O: return {c.hidden, c.q_dim()};
    case WeightSlot::QBias: return {1, c.q_dim()};
    case WeightSlot::KBias:
    case WeightSlot::VBias: return {1, c.kv_dim()};
    case WeightSlot::Gate:
    case WeightSlot::Up: return {c.intermediate, c.hidden};
    case WeightSlot::Down: return {c.hidden, c.intermediate};
    case WeightSlot::Embed:
    case WeightSlot::LmHead: return {c.vocab, c.hidden};
  }
  return {0, 0};
}

std::optional<FusedRows> fused_rows(const LlamaConfig& c, WeightSlot slot) {
  const int64_t q = c.q_dim(), kv = c.kv_dim(), i = c.intermediate;
  if (c.fused_qkv) {
    if (slot == WeightSlot::Q) return FusedRows{true, 0, q + 2 * kv};
    if (slot == WeightSlot::K) return FusedRows{true, q, q + 2 * kv};
    if (slot == WeightSlot::V) return FusedRows{true, q + kv, q + 2 * kv};
  }
  if (c.fused_gate_up) {
    if (slot == WeightSlot::Gate) return FusedRows{false, 0, 2 * i};
    if (slot == WeightSlot::Up) return FusedRows{false, i, 2 * i};
  }
  return std::nullopt;
}

std::string hf_fused_weight_name(bool qkv, int layer) {
  return "model.layers." + std::to_string(layer) +
         (qkv ? ".self_attn.qkv_proj.weight" : ".mlp.gate_up_proj.weight");
}

WeightRef& BlockWeights::slot(WeightSlot s) {
  switch (s) {
    case WeightSlot::AttnNorm: return attn_norm;
    case WeightSlot::Q: return q;
    case WeightSlot::K: return k;
    case WeightSlot::V: return v;
    case WeightSlot::O: return o;
    case WeightSlot::QBias: return q_bias;
    case WeightSlot::KBias: return k_bias;
    case WeightSlot::VBias: return v_bias;
    case WeightSlot::MlpNorm: return mlp_norm;
    case WeightSlot::Gate: return gate;
    case WeightSlot::Up: return up;
    case WeightSlot::Down: return down;
    case WeightSlot::QNorm: return q_norm;
    case WeightSlot::KNorm: return k_norm;
    case WeightSlot::PostAttnNorm: return post_attn_norm;
    case WeightSlot::PostMlpNorm: return post_mlp_norm;
    default: break;
  }
  TF_FAIL("weight slot ", int(s), " is not a per-layer slot");
}

bool LlamaWeights::owns(const void* p) const {
  const auto at = reinterpret_cast<uintptr_t>(p);
  for (const Tensor& t : owned) {
    const auto begin = reinterpret_cast<uintptr_t>(t.storage.data());
    if (p && at >= begin && at - begin < t.storage.bytes()) return true;
  }
  return false;
}

WeightRef& LlamaWeights::slot(WeightSlot s, int layer) {
  switch (s) {
    case WeightSlot::Embed: return embed;
    case WeightSlot::FinalNorm: return final_norm;
    case WeightSlot::LmHead: return lm_head;
    default: break;
  }
  TF_CHECK(layer >= 0 && size_t(layer) < blocks.size(), "layer ", layer, " out of range");
  return blocks[size_t(layer)].slot(s);
}

void LlamaWeights::for_each_slot(const LlamaConfig& cfg, const std::function<void(WeightSlot, int)>& fn) {
  fn(WeightSlot::Embed, 0);
  for (int l = 0; l < cfg.n_layers; ++l) {
    for (int s = 0; s < int(WeightSlot::Embed); ++s) {
      const auto slot = WeightSlot(s);
      const bool bias = slot == WeightSlot::QBias || slot == WeightSlot::KBias || slot == WeightSlot::VBias;
      if (bias && !cfg.attention_bias) continue;
      if ((slot == WeightSlot::QNorm || slot == WeightSlot::KNorm) && !cfg.qk_norm) continue;
      if ((slot == WeightSlot::PostAttnNorm || slot == WeightSlot::PostMlpNorm) && !cfg.sandwich_norms)
        continue;
      fn(slot, l);
    }
  }
  fn(WeightSlot::FinalNorm, 0);
  if (!cfg.tie_embeddings) fn(WeightSlot::LmHead, 0);
}

MappedFile MappedFile::of(const std::string& path, const void* begin, uint64_t offset, uint64_t bytes) {
  struct stat st {};
  TF_CHECK(::stat(path.c_str(), &st) == 0, path, ": cannot stat: ", std::strerror(errno));
  return MappedFile{path,
                    static_cast<const std::byte*>(begin),
                    offset,
                    bytes,
                    uint64_t(st.st_size),
                    int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec};
}

LlamaWeights init_random_weights(const LlamaConfig& cfg, DType dtype, uint64_t seed, float std) {
  cfg.validate("random model config");
  TF_CHECK(dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F16,
           "random weights must be f32, bf16 or f16, not ", dtype_name(dtype));
  LlamaWeights w;
  w.config = cfg;
  w.blocks.resize(size_t(cfg.n_layers));
  uint64_t stream = 0;
  LlamaWeights::for_each_slot(cfg, [&](WeightSlot slot, int layer) {
    const auto [rows, cols] = weight_shape(cfg, slot);
    const std::string name = hf_weight_name(cfg, slot, layer);
    Tensor t(dtype, {rows, cols}, MemTag::Weights, name);
    const bool norm = is_norm_slot(slot);
    const bool bias = slot == WeightSlot::QBias || slot == WeightSlot::KBias || slot == WeightSlot::VBias;
    const Philox rng(seed, ++stream);
    for (int64_t i = 0; i < rows * cols; ++i) {
      const float x = norm ? 1.0f : bias ? 0.0f : std * rng.normal(uint64_t(i));
      switch (dtype) {
        case DType::F32: t.as<float>()[i] = x; break;
        case DType::BF16: t.as<uint16_t>()[i] = f32_to_bf16(x); break;
        default: t.as<uint16_t>()[i] = f32_to_f16(x); break;
      }
    }
    w.slot(slot, layer) = WeightRef{t.view.data, dtype, rows, cols};
    w.owned.push_back(std::move(t));
  });
  if (cfg.tie_embeddings) w.lm_head = w.embed;
  return w;
}

}  // namespace tf
