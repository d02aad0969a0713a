// defines: LlamaConfig::validate and n_params, the LoRA target names and lists, LoraConfig::scale
#include "src/model/config.h"

#include <cmath>
#include <sstream>

#include "src/core/error.h"

namespace tf {

void LlamaConfig::validate(const std::string& source) const {
  auto positive = [&](int v, const char* field) {
    TF_CHECK(v > 0, source, ": ", field, " must be positive, got ", v);
  };
  positive(hidden, "hidden size");
  positive(intermediate, "intermediate size");
  positive(n_layers, "number of layers");
  positive(n_heads, "number of attention heads");
  positive(n_kv_heads, "number of key/value heads");
  positive(head_dim, "head dimension");
  positive(vocab, "vocabulary size");
  TF_CHECK(n_heads % n_kv_heads == 0, source, ": attention heads (", n_heads,
           ") must be a multiple of key/value heads (", n_kv_heads, ")");
  TF_CHECK(head_dim % 2 == 0, source, ": head dimension must be even for rotary embeddings, got ", head_dim);
  TF_CHECK(rope.head_dim == head_dim, source, ": rotary dimension ", rope.head_dim,
           " differs from the head dimension ", head_dim, " (partial rotary is not supported)");
  TF_CHECK(rope.theta > 0 && std::isfinite(rope.theta), source, ": rope theta must be positive, got ",
           rope.theta);
  TF_CHECK(!has_local_rope() || (rope_local.head_dim == head_dim && std::isfinite(rope_local.theta)), source,
           ": the sliding layers' rotary dimension ", rope_local.head_dim,
           " differs from the head dimension ", head_dim);
  TF_CHECK(embed_scale > 0 && std::isfinite(embed_scale), source, ": embedding scale must be positive, got ",
           embed_scale);
  TF_CHECK(query_pre_attn_scalar >= 0 && std::isfinite(query_pre_attn_scalar), source,
           ": query_pre_attn_scalar must be positive, got ", query_pre_attn_scalar);
  TF_CHECK(rms_eps > 0 && std::isfinite(rms_eps), source, ": rms norm epsilon must be positive, got ",
           rms_eps);
  TF_CHECK(sliding_window >= 0, source, ": sliding window must be positive (or 0 for none), got ",
           sliding_window);
  TF_CHECK(sliding_layers.empty() || sliding_layers.size() == size_t(n_layers), source, ": ",
           sliding_layers.size(), " layers are marked sliding or full, but the model has ", n_layers);
  TF_CHECK(attention_dropout >= 0 && attention_dropout < 1, source,
           ": attention dropout must be in [0, 1), got ", attention_dropout);
  // Guards the int arithmetic of activation sizes: every per-token row must stay far below 2^31.
  TF_CHECK(int64_t(n_heads) * head_dim < (1 << 24) && intermediate < (1 << 24) && hidden < (1 << 24), source,
           ": dimensions are implausibly large");
}

float LlamaConfig::attention_scale(int layer) const {
  // Without an attention factor (m = 1) this is exactly the f32 1/sqrt(head_dim) of the kernels' tests.
  const float m = rope_attention_factor(rope_of(layer));
  const float d = query_pre_attn_scalar > 0 ? query_pre_attn_scalar : float(head_dim);
  return 1.0f / std::sqrt(d) * (m * m);
}

int64_t LlamaConfig::n_params() const {
  const int64_t h = hidden, attn = h * q_dim() * 2 + h * kv_dim() * 2;
  const int64_t mlp = 3 * h * intermediate;
  const int64_t bias = attention_bias ? q_dim() + 2 * kv_dim() : 0;
  const int64_t norms = (sandwich_norms ? 4 : 2) * h + (qk_norm ? 2 * head_dim : 0);
  const int64_t per_layer = attn + mlp + norms + bias;
  return int64_t(vocab) * h * (tie_embeddings ? 1 : 2) + per_layer * n_layers + h;
}

const char* lora_target_name(LoraTarget t) {
  switch (t) {
    case LoraTarget::Q: return "q_proj";
    case LoraTarget::K: return "k_proj";
    case LoraTarget::V: return "v_proj";
    case LoraTarget::O: return "o_proj";
    case LoraTarget::Gate: return "gate_proj";
    case LoraTarget::Up: return "up_proj";
    case LoraTarget::Down: return "down_proj";
    case LoraTarget::Count: break;
  }
  return "?";
}

uint32_t parse_lora_targets(const std::string& list) {
  uint32_t mask = 0;
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) {
    const auto b = item.find_first_not_of(" \t"), e = item.find_last_not_of(" \t");
    TF_CHECK(b != std::string::npos, "empty entry in LoRA target list '", list, "'");
    item = item.substr(b, e - b + 1);
    if (item == "all") {
      mask |= (1u << kLoraTargetCount) - 1;
      continue;
    }
    // PEFT's names of Phi-3's fused modules; on an unfused model they adapt each projection.
    if (item == "qkv_proj" || item == "qkv" || item == "gate_up_proj" || item == "gate_up") {
      const bool qkv = item[0] == 'q';
      mask |= qkv ? 7u << int(LoraTarget::Q) : 3u << int(LoraTarget::Gate);
      continue;
    }
    bool found = false;
    for (int i = 0; i < kLoraTargetCount; ++i) {
      const std::string full = lora_target_name(LoraTarget(i));
      if (item == full || item == full.substr(0, full.find('_'))) {
        mask |= 1u << i;
        found = true;
      }
    }
    TF_CHECK(found, "unknown LoRA target '", item, "'; expected a list of q_proj, k_proj, v_proj, o_proj, ",
             "gate_proj, up_proj, down_proj, qkv_proj, gate_up_proj (or q, k, v, o, gate, up, down, qkv, ",
             "gate_up, or all)");
  }
  TF_CHECK(mask != 0, "the LoRA target list is empty");
  return mask;
}

std::vector<LoraModule> lora_modules(const LlamaConfig& model) {
  std::vector<LoraModule> m;
  if (model.fused_qkv) {
    m.push_back({LoraTarget::Q, 3, "qkv_proj"});
  } else {
    for (LoraTarget t : {LoraTarget::Q, LoraTarget::K, LoraTarget::V})
      m.push_back({t, 1, lora_target_name(t)});
  }
  m.push_back({LoraTarget::O, 1, lora_target_name(LoraTarget::O)});
  if (model.fused_gate_up) {
    m.push_back({LoraTarget::Gate, 2, "gate_up_proj"});
  } else {
    for (LoraTarget t : {LoraTarget::Gate, LoraTarget::Up}) m.push_back({t, 1, lora_target_name(t)});
  }
  m.push_back({LoraTarget::Down, 1, lora_target_name(LoraTarget::Down)});
  return m;
}

LoraModule lora_module_of(const LlamaConfig& model, LoraTarget t) {
  for (const LoraModule& m : lora_modules(model))
    if (m.covers(t)) return m;
  TF_FAIL("LoRA target ", int(t), " is not a projection");
}

void check_lora_targets(const LlamaConfig& model, uint32_t targets) {
  for (const LoraModule& m : lora_modules(model)) {
    const uint32_t part = targets & m.mask();
    if (part == 0 || part == m.mask()) continue;
    std::string named, others;
    for (int i = 0; i < m.count; ++i) {
      const auto t = LoraTarget(int(m.first) + i);
      std::string& list = targets & (1u << int(t)) ? named : others;
      list += (list.empty() ? "" : ", ") + std::string(lora_target_name(t));
    }
    TF_FAIL("the LoRA targets name ", named, " but not ", others, ": ", model.architecture,
            " stores them as one ", "matrix, ", m.name, ", which LoRA adapts whole (as PEFT does); target ",
            m.name, " instead");
  }
}

float LoraConfig::scale() const {
  return rslora ? alpha / std::sqrt(float(rank)) : alpha / float(rank);
}

}  // namespace tf
