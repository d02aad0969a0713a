// defines: tf::io::llama_config_from_gguf (a GGUF's metadata as a LlamaConfig), the GGUF tensor names
// of a Llama-family block (parse_gguf_llama_tensor_name, gguf_llama_tensor_name)
#include "src/io/gguf_model.h"

#include <charconv>
#include <climits>
#include <cmath>
#include <vector>

#include "src/core/error.h"

namespace tf::io {
namespace {

int positive_int(const GgufFile& f, const std::string& key) {
  const int64_t v = f.get_int(key);
  if (v <= 0 || v > INT_MAX) TF_FAIL(f.path(), ": metadata key '", key, "' must be a positive int, got ", v);
  return int(v);
}

float positive_float(const GgufFile& f, const std::string& key) {
  const double v = f.get_float(key);
  if (!(v > 0) || !std::isfinite(float(v)))
    TF_FAIL(f.path(), ": metadata key '", key, "' must be a positive finite number, got ", v);
  return float(v);
}

float float_or(const GgufFile& f, const std::string& key, float fallback) {
  return f.has(key) ? float(f.get_float(key)) : fallback;
}

// `<arch>.rope.scaling.*`: none, linear and yarn, every key read or refused by name (llama.cpp
// reads more of them than HF's yarn has, and a key ignored here would change the frequencies).
void read_rope_scaling(const GgufFile& f, const std::string& p, RopeParams& rope, bool phi3) {
  const std::string prefix = p + "rope.scaling.";
  const std::string type = f.has(prefix + "type") ? std::string(f.get_string(prefix + "type")) : "none";
  for (const auto& [key, value] : f.metadata()) {
    if (key.compare(0, prefix.size(), prefix) != 0) continue;
    const std::string field = key.substr(prefix.size());
    // "finetuned" records how the model was trained, not how it rotates.
    if (field == "type" || field == "finetuned") continue;
    if (field == "factor" && type != "none") continue;
    // phi3's longrope: the length that selects its factors and their attention factor (read_longrope).
    if (phi3 && (field == "original_context_length" || field == "attn_factor")) continue;
    if (type == "yarn" &&
        (field == "original_context_length" || field == "yarn_beta_fast" || field == "yarn_beta_slow"))
      continue;
    // Neutral values of llama.cpp's yarn knobs, which HF's yarn has no spelling for.
    const bool neutral = (field == "yarn_ext_factor" || field == "yarn_attn_factor" ||
                          field == "attn_factor" || field == "factor")
                             ? f.get_float(key) == 1.0
                         : field == "yarn_log_multiplier" ? f.get_float(key) == 0.0
                                                          : false;
    if (neutral) continue;
    TF_FAIL(f.path(), ": metadata key '", key, "' is not supported with rope scaling type '", type,
            "' (tightfit would rotate with other frequencies than llama.cpp)");
  }
  if (type == "linear") {
    rope.scaling = RopeScalingType::Linear;
    rope.factor = positive_float(f, prefix + "factor");
  } else if (type == "yarn") {
    rope.scaling = RopeScalingType::Yarn;
    rope.factor = positive_float(f, prefix + "factor");
    rope.original_max_positions = positive_int(f, prefix + "original_context_length");
    rope.beta_fast = float_or(f, prefix + "yarn_beta_fast", 32.0f);
    rope.beta_slow = float_or(f, prefix + "yarn_beta_slow", 1.0f);
    if (!(rope.beta_fast > 0) || !(rope.beta_slow > 0))
      TF_FAIL(f.path(), ": ", prefix, "yarn_beta_fast and yarn_beta_slow must be positive, got ",
              rope.beta_fast, " and ", rope.beta_slow);
  } else if (type == "none" && f.has(p + "rope.scale_linear")) {
    // Older files spell linear scaling as a bare factor.
    rope.factor = positive_float(f, p + "rope.scale_linear");
    rope.scaling = rope.factor == 1.0f ? RopeScalingType::None : RopeScalingType::Linear;
  } else if (type != "none") {
    TF_FAIL(f.path(), ": rope scaling type '", type, "' is not supported (none, linear or yarn)");
  }
}

// phi3's longrope (convert_hf_to_gguf's Phi3MiniModel): rope_factors_short.weight and
// rope_factors_long.weight, rope.scaling.original_context_length (llama.cpp takes the long factors
// for a context past it, transformers for positions past it, which the model refuses) and
// rope.scaling.attn_factor on cos and sin.
void read_longrope(const GgufFile& f, const std::string& p, RopeParams& rope, int max_positions) {
  const GgufTensorInfo* short_f = f.find_tensor("rope_factors_short.weight");
  const GgufTensorInfo* long_f = f.find_tensor("rope_factors_long.weight");
  if (!short_f && !long_f) return;
  const int64_t half = rope.head_dim / 2;
  std::vector<float> factors[2];
  for (int i = 0; i < 2; ++i) {
    const GgufTensorInfo* t = i == 0 ? short_f : long_f;
    const char* name = i == 0 ? "rope_factors_short.weight" : "rope_factors_long.weight";
    if (!t || t->type != GgmlType::F32 || t->n_elements != half)
      TF_FAIL(f.path(), ": ", name, " must hold ", half, " f32 factors (rope dimensions / 2) beside ",
              i == 0 ? "rope_factors_long.weight" : "rope_factors_short.weight");
    const auto* v = reinterpret_cast<const float*>(t->data);
    for (int64_t k = 0; k < half; ++k)
      if (!(v[k] > 0) || !std::isfinite(v[k])) TF_FAIL(f.path(), ": ", name, " factor ", k, " is ", v[k]);
    factors[i].assign(v, v + half);
  }
  rope.scaling = RopeScalingType::LongRope;
  rope.freq_factors = std::move(factors[0]);
  rope.long_factors = std::move(factors[1]);
  rope.original_max_positions = positive_int(f, p + "rope.scaling.original_context_length");
  rope.factor = float(double(max_positions) / rope.original_max_positions);
  rope.attention_factor =
      f.has(p + "rope.scaling.attn_factor") ? positive_float(f, p + "rope.scaling.attn_factor") : 0.0f;
}

// gemma2 and gemma3 as llama.cpp's llama_model_gemma2 / llama_model_gemma3 read them: with a
// sliding window (gemma2: 4096 when the key is absent), the layers of
// attention.sliding_window_pattern slide (a bool per layer, or every n-th layer full, when the key
// is absent 2 for gemma2 and 6 for gemma3); gemma3's sliding layers rotate with rope.freq_base_swa
// (10000 when absent) unscaled, gemma2's with rope.freq_base unless the file names a base of their
// own; the norms hold 1 + w already (the converter adds the 1); embeddings scale by sqrtf(hidden);
// scores by 1/sqrt(head_dim), or 1/sqrt(hidden / heads) for the 27B models (gemma_pytorch's
// query_pre_attn_scalar: 46 layers of gemma2, 62 of gemma3). gemma2 soft-caps its attention scores
// and final logits (attn_logit_softcapping 50 and final_logit_softcapping 30 when absent); gemma3
// has q/k norms, and caps its final logits only where the file sets the cap.
void read_gemma(const GgufFile& f, const std::string& p, LlamaConfig& c) {
  const bool gemma2 = c.architecture == "gemma2";
  // A gemma3 file may hold 0 for "no cap"; gemma2's caps must be positive. Gemma 3's attention cap
  // is refused, as transformers' Gemma 3 does not apply it.
  const auto cap = [&](const char* key, float gemma2_default) {
    if (!f.has(p + key)) return gemma2 ? gemma2_default : 0.0f;
    if (!gemma2 && f.get_float(p + key) == 0.0) return 0.0f;
    return positive_float(f, p + key);
  };
  c.attn_softcap = cap("attn_logit_softcapping", 50.0f);
  c.final_softcap = cap("final_logit_softcapping", 30.0f);
  if (!gemma2 && c.attn_softcap != 0.0f)
    TF_FAIL(f.path(), ": ", p,
            "attn_logit_softcapping is set; tightfit soft-caps attention scores for gemma2 "
            "only (transformers' Gemma 3 ignores the field)");
  if (gemma2 && !f.has(p + "attention.sliding_window")) c.sliding_window = 4096;
  c.qk_norm = !gemma2;
  c.sandwich_norms = true;
  c.activation = MlpActivation::GeluTanh;
  c.embed_scale = std::sqrt(float(c.hidden));
  c.query_pre_attn_scalar =
      c.n_layers == (gemma2 ? 46 : 62) ? float(c.hidden / c.n_heads) : float(c.head_dim);
  if (c.sliding_window == 0) return;
  const std::string key = p + "attention.sliding_window_pattern";
  c.sliding_layers.assign(size_t(c.n_layers), false);
  if (f.has(key) && f.value(key).type == GgufValueType::Array) {
    const GgufValue& v = f.value(key);
    if (v.elem_type != GgufValueType::Bool || v.count != uint64_t(c.n_layers))
      TF_FAIL(f.path(), ": ", key, " must hold a bool for each of the ", c.n_layers, " layers");
    for (int l = 0; l < c.n_layers; ++l) c.sliding_layers[size_t(l)] = v.raw[l] != 0;
  } else {
    const int64_t n = f.has(key) ? f.get_int(key) : gemma2 ? 2 : 6;
    if (n < 0 || n > INT_MAX) TF_FAIL(f.path(), ": ", key, " must be a non-negative int, got ", n);
    for (int l = 0; l < c.n_layers; ++l) c.sliding_layers[size_t(l)] = n == 0 || l % n < n - 1;
  }
  if (gemma2 && !f.has(p + "rope.freq_base_swa")) return;
  c.rope_local.head_dim = c.rope.head_dim;
  c.rope_local.theta =
      f.has(p + "rope.freq_base_swa") ? positive_float(f, p + "rope.freq_base_swa") : 10000.0f;
}

}  // namespace

LlamaConfig llama_config_from_gguf(const GgufFile& f) {
  const std::string_view arch = f.get_string("general.architecture");
  if (arch == "qwen3moe" || arch == "qwen2moe")
    TF_FAIL(
        f.path(), ": general.architecture is '", arch,
        "', a mixture of experts, which tightfit does not run (its dense qwen2 and qwen3 models it does)");
  if (arch != "llama" && arch != "qwen2" && arch != "qwen3" && arch != "phi3" && arch != "gemma2" &&
      arch != "gemma3")
    TF_FAIL(f.path(), ": general.architecture is '", arch,
            "'; tightfit runs 'llama', 'qwen2', 'qwen3', 'phi3', 'gemma2' and 'gemma3' GGUF models only");
  const std::string p = std::string(arch) + ".";
  LlamaConfig c;
  c.architecture = std::string(arch);
  c.hidden = positive_int(f, p + "embedding_length");
  c.intermediate = positive_int(f, p + "feed_forward_length");
  c.n_layers = positive_int(f, p + "block_count");
  c.n_heads = positive_int(f, p + "attention.head_count");
  c.n_kv_heads =
      f.has(p + "attention.head_count_kv") ? positive_int(f, p + "attention.head_count_kv") : c.n_heads;
  if (f.has(p + "attention.key_length")) {
    c.head_dim = positive_int(f, p + "attention.key_length");
  } else {
    if (c.hidden % c.n_heads != 0)
      TF_FAIL(f.path(), ": embedding_length ", c.hidden, " is not a multiple of head_count ", c.n_heads);
    c.head_dim = c.hidden / c.n_heads;
  }
  if (f.has(p + "attention.value_length") && positive_int(f, p + "attention.value_length") != c.head_dim)
    TF_FAIL(f.path(), ": attention.value_length differs from the key length ", c.head_dim);
  c.rms_eps = positive_float(f, p + "attention.layer_norm_rms_epsilon");
  c.max_positions = f.has(p + "context_length") ? positive_int(f, p + "context_length") : c.max_positions;
  if (f.has(p + "attention.sliding_window")) {
    // Every layer slides (0: none, as llama.cpp's converter writes for all-full models); a per-layer
    // pattern of sliding and full layers is not one tightfit reads.
    const int64_t w = f.get_int(p + "attention.sliding_window");
    if (w < 0 || w > INT_MAX)
      TF_FAIL(f.path(), ": metadata key '", p, "attention.sliding_window' must be a non-negative int, got ",
              w);
    c.sliding_window = int(w);
    if (w > 0 && arch != "gemma2" && arch != "gemma3" && f.has(p + "attention.sliding_window_pattern"))
      TF_FAIL(f.path(), ": ", p,
              "attention.sliding_window_pattern (sliding and full attention layers mixed) is not supported");
  }

  c.rope.head_dim =
      f.has(p + "rope.dimension_count") ? positive_int(f, p + "rope.dimension_count") : c.head_dim;
  c.rope.theta = f.has(p + "rope.freq_base") ? positive_float(f, p + "rope.freq_base") : 10000.0f;
  read_rope_scaling(f, p, c.rope, arch == "phi3");
  if (arch == "phi3") {
    c.fused_qkv = c.fused_gate_up = true;
    read_longrope(f, p, c.rope, c.max_positions);
  }
  // Llama 3.1-style scaling is stored as precomputed per-frequency divisors.
  if (const GgufTensorInfo* freqs = f.find_tensor("rope_freqs.weight")) {
    if (freqs->type != GgmlType::F32 || freqs->n_elements != c.rope.head_dim / 2)
      TF_FAIL(f.path(), ": rope_freqs.weight must hold ", c.rope.head_dim / 2,
              " f32 factors (head_dim / 2), got ", freqs->n_elements, " of ",
              ggml_type_info(uint32_t(freqs->type)).name);
    const auto* factors = reinterpret_cast<const float*>(freqs->data);
    c.rope.freq_factors.assign(factors, factors + freqs->n_elements);
  }
  // llama.cpp's converter permutes q/k rows for the interleaved rotation of its llama
  // architecture; qwen2 and qwen3 keep HF's rows and rotate split halves (llama.cpp's NEOX rope).
  c.rope_layout = arch == "llama" ? RopeLayout::Interleaved : RopeLayout::SplitHalf;

  const GgufTensorInfo& embd = f.tensor("token_embd.weight");
  if (embd.n_dims != 2 || embd.ne[0] != c.hidden)
    TF_FAIL(f.path(), ": token_embd.weight has ne [", embd.ne[0], ", ", embd.ne[1], "] (", embd.n_dims,
            " dims); expected [", c.hidden, ", vocab]");
  if (f.has(p + "vocab_size")) {
    c.vocab = positive_int(f, p + "vocab_size");
  } else if (f.has("tokenizer.ggml.tokens")) {
    const GgufValue& toks = f.get_array("tokenizer.ggml.tokens", GgufValueType::String);
    if (toks.count == 0 || toks.count > uint64_t(INT_MAX))
      TF_FAIL(f.path(), ": tokenizer.ggml.tokens has ", toks.count, " entries");
    c.vocab = int(toks.count);
  } else {
    c.vocab = int(embd.ne[1]);
  }
  if (embd.ne[1] != c.vocab)
    TF_FAIL(f.path(), ": token_embd.weight has ", embd.ne[1], " rows but the vocabulary has ", c.vocab,
            " tokens");
  c.tie_embeddings = f.find_tensor("output.weight") == nullptr;
  // Every qwen2 block has q/k/v biases: a file without them is broken, not a model without.
  c.attention_bias = arch == "qwen2" || f.find_tensor("blk.0.attn_q.bias") != nullptr;
  c.qk_norm = arch == "qwen3";
  if (arch == "gemma2" || arch == "gemma3") read_gemma(f, p, c);
  c.validate(f.path());
  return c;
}

namespace {
struct RoleName {
  GgufLlamaRole role;
  std::string_view name;  // the part after "blk.N." for per-block roles, the full name otherwise
  bool per_block;
};
constexpr RoleName kRoleNames[] = {
    {GgufLlamaRole::TokenEmbd, "token_embd.weight", false},
    {GgufLlamaRole::AttnNorm, "attn_norm.weight", true},
    {GgufLlamaRole::AttnQ, "attn_q.weight", true},
    {GgufLlamaRole::AttnK, "attn_k.weight", true},
    {GgufLlamaRole::AttnV, "attn_v.weight", true},
    {GgufLlamaRole::AttnQBias, "attn_q.bias", true},
    {GgufLlamaRole::AttnKBias, "attn_k.bias", true},
    {GgufLlamaRole::AttnVBias, "attn_v.bias", true},
    {GgufLlamaRole::AttnOutput, "attn_output.weight", true},
    {GgufLlamaRole::FfnNorm, "ffn_norm.weight", true},
    {GgufLlamaRole::FfnGate, "ffn_gate.weight", true},
    {GgufLlamaRole::FfnUp, "ffn_up.weight", true},
    {GgufLlamaRole::FfnDown, "ffn_down.weight", true},
    {GgufLlamaRole::AttnQNorm, "attn_q_norm.weight", true},
    {GgufLlamaRole::AttnKNorm, "attn_k_norm.weight", true},
    {GgufLlamaRole::AttnPostNorm, "post_attention_norm.weight", true},
    {GgufLlamaRole::FfnPostNorm, "post_ffw_norm.weight", true},
    {GgufLlamaRole::OutputNorm, "output_norm.weight", false},
    {GgufLlamaRole::Output, "output.weight", false},
    {GgufLlamaRole::AttnQkv, "attn_qkv.weight", true},
};
}  // namespace

std::optional<GgufLlamaTensor> parse_gguf_llama_tensor_name(std::string_view name) {
  constexpr std::string_view kBlk = "blk.";
  if (name.substr(0, kBlk.size()) == kBlk) {
    const std::string_view rest = name.substr(kBlk.size());
    int layer = -1;
    const auto [end, ec] = std::from_chars(rest.data(), rest.data() + rest.size(), layer);
    if (ec != std::errc() || end == rest.data() || layer < 0 || *end != '.') return std::nullopt;
    if (rest[0] == '0' && end - rest.data() > 1) return std::nullopt;  // "blk.01." is not a canonical name
    const std::string_view suffix = rest.substr(size_t(end - rest.data()) + 1);
    for (const RoleName& r : kRoleNames)
      if (r.per_block && r.name == suffix) return GgufLlamaTensor{r.role, layer};
    return std::nullopt;
  }
  for (const RoleName& r : kRoleNames)
    if (!r.per_block && r.name == name) return GgufLlamaTensor{r.role, -1};
  return std::nullopt;
}

std::string gguf_llama_tensor_name(GgufLlamaTensor t) {
  for (const RoleName& r : kRoleNames) {
    if (r.role != t.role) continue;
    if (!r.per_block) return std::string(r.name);
    TF_CHECK(t.layer >= 0, "gguf tensor name: ", r.name, " needs a block index");
    return "blk." + std::to_string(t.layer) + "." + std::string(r.name);
  }
  TF_FAIL("gguf tensor name: unknown role ", int(t.role));
}

}  // namespace tf::io
