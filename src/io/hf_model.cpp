// defines: tf::io::llama_config_from_hf and read_hf_config (a config.json as a LlamaConfig),
// weights_from_safetensors, load_hf_model
#include "src/io/hf_model.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <vector>

#include "kernels/ops.h"
#include "src/core/error.h"
#include "src/io/bnb4bit.h"

namespace tf::io {

namespace {

using nlohmann::json;

const json* find_key(const json& j, const char* key) {
  auto it = j.find(key);
  return it == j.end() || it->is_null() ? nullptr : &*it;
}

int get_int(const json& j, const char* key, const std::string& source, std::optional<int> fallback = {}) {
  const json* v = find_key(j, key);
  if (!v) {
    TF_CHECK(fallback.has_value(), source, ": missing required field \"", key, "\"");
    return *fallback;
  }
  TF_CHECK(v->is_number_integer(), source, ": field \"", key, "\" must be an integer, got ", v->dump());
  const int64_t x = v->get<int64_t>();
  TF_CHECK(x >= 0 && x <= (int64_t(1) << 30), source, ": field \"", key, "\" is out of range: ", x);
  return int(x);
}

float get_float(const json& j, const char* key, const std::string& source, float fallback) {
  const json* v = find_key(j, key);
  if (!v) return fallback;
  TF_CHECK(v->is_number(), source, ": field \"", key, "\" must be a number, got ", v->dump());
  return v->get<float>();
}

bool get_bool(const json& j, const char* key, const std::string& source, bool fallback) {
  const json* v = find_key(j, key);
  if (!v) return fallback;
  TF_CHECK(v->is_boolean(), source, ": field \"", key, "\" must be true or false, got ", v->dump());
  return v->get<bool>();
}

// Fields of a rope scaling object that do not change the frequencies: its type and (in
// rope_parameters) the base theta, read by the caller.
bool is_rope_identity_field(const std::string& key) {
  return key == "rope_type" || key == "type" || key == "rope_theta";
}

// Reads HF's rope_scaling / rope_parameters. Every field is either read or refused by name: one
// tightfit ignored would rotate with frequencies other than the ones the model was trained with.
void parse_rope_scaling(const json& r, const json& config, const std::string& source, int max_positions,
                        RopeParams& rope) {
  TF_CHECK(r.is_object(), source, ": rope scaling must be an object, got ", r.dump());
  std::string type = "default";
  for (const char* key : {"rope_type", "type"}) {
    if (const json* t = find_key(r, key)) {
      TF_CHECK(t->is_string(), source, ": rope scaling \"", key, "\" must be a string");
      type = t->get<std::string>();
      break;
    }
  }
  const std::string where = source + " rope scaling";
  static const std::map<std::string, std::set<std::string>> kFields = {
      {"default", {}},
      {"linear", {"factor"}},
      // transformers' dynamic NTK reads max_position_embeddings, not this field.
      {"dynamic", {"factor", "original_max_position_embeddings"}},
      {"llama3", {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}},
      {"yarn",
       {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
        "mscale_all_dim", "truncate"}},
      {"longrope",
       {"factor", "original_max_position_embeddings", "attention_factor", "short_factor", "long_factor"}},
      {"su",
       {"factor", "original_max_position_embeddings", "attention_factor", "short_factor", "long_factor"}},
  };
  const auto known = kFields.find(type);
  TF_CHECK(known != kFields.end(), where, ": rope type \"", type,
           "\" is not supported (supported: default, linear, dynamic, llama3, yarn, longrope)");
  for (const auto& [key, value] : r.items()) {
    if (is_rope_identity_field(key) || known->second.count(key) || value.is_null()) continue;
    if (key == "partial_rotary_factor" && value.is_number() && value.get<double>() == 1.0) continue;
    TF_FAIL(where, ": field \"", key, "\" of rope type \"", type, "\" is not supported (",
            key == "partial_rotary_factor" ? "partial rotary embeddings"
                                           : "tightfit would rotate with other frequencies than the model's",
            ")");
  }
  if (type == "default") return;
  // HF's standardize_rope_params: the pretraining length is the config's own field, else its
  // max_position_embeddings.
  const int original_default = get_int(config, "original_max_position_embeddings", source, max_positions);
  rope.factor = get_float(r, "factor", where, 1.0f);
  TF_CHECK(rope.factor > 0, where, ": factor must be positive, got ", rope.factor);
  if (type == "linear") {
    rope.scaling = RopeScalingType::Linear;
  } else if (type == "dynamic") {
    rope.scaling = RopeScalingType::Dynamic;
    rope.original_max_positions = max_positions;
  } else if (type == "llama3") {
    rope.scaling = RopeScalingType::Llama3;
    rope.low_freq_factor = get_float(r, "low_freq_factor", where, 1.0f);
    rope.high_freq_factor = get_float(r, "high_freq_factor", where, 4.0f);
    rope.original_max_positions = get_int(r, "original_max_position_embeddings", where, original_default);
    TF_CHECK(rope.high_freq_factor > rope.low_freq_factor && rope.low_freq_factor > 0, where,
             ": need 0 < low_freq_factor < high_freq_factor");
    TF_CHECK(rope.original_max_positions > 0, where, ": original_max_position_embeddings must be positive");
  } else if (type == "longrope" || type == "su") {
    // transformers' _compute_longrope_parameters: the short factors up to the pretraining length,
    // the attention factor derived from max_position_embeddings / that length unless given.
    rope.scaling = RopeScalingType::LongRope;
    rope.original_max_positions = get_int(r, "original_max_position_embeddings", where, original_default);
    TF_CHECK(rope.original_max_positions > 0, where, ": original_max_position_embeddings must be positive");
    if (!find_key(r, "factor")) rope.factor = float(double(max_positions) / rope.original_max_positions);
    rope.attention_factor = get_float(r, "attention_factor", where, 0.0f);
    TF_CHECK(rope.attention_factor >= 0, where, ": attention_factor must be positive, got ",
             rope.attention_factor);
    const size_t half = size_t(rope.head_dim / 2);
    auto factors = [&](const char* key) {
      const json* f = find_key(r, key);
      TF_CHECK(f && f->is_array() && f->size() == half, where, ": ", key, " must list ", half,
               " factors (head_dim / 2), got ", f ? f->dump() : "nothing");
      std::vector<float> v;
      for (const json& x : *f) {
        TF_CHECK(x.is_number() && x.get<double>() > 0, where, ": ", key, " holds ", x.dump(),
                 "; the factors must be positive numbers");
        v.push_back(x.get<float>());
      }
      return v;
    };
    rope.freq_factors = factors("short_factor");
    rope.long_factors = factors("long_factor");
  } else {
    rope.scaling = RopeScalingType::Yarn;
    rope.original_max_positions = get_int(r, "original_max_position_embeddings", where, original_default);
    TF_CHECK(rope.original_max_positions > 0, where, ": original_max_position_embeddings must be positive");
    if (!find_key(r, "factor")) rope.factor = float(double(max_positions) / rope.original_max_positions);
    rope.attention_factor = get_float(r, "attention_factor", where, 0.0f);
    rope.mscale = get_float(r, "mscale", where, 0.0f);
    rope.mscale_all_dim = get_float(r, "mscale_all_dim", where, 0.0f);
    // HF reads `beta_fast or 32`: a zero means the default too.
    rope.beta_fast = get_float(r, "beta_fast", where, 0.0f);
    rope.beta_slow = get_float(r, "beta_slow", where, 0.0f);
    if (rope.beta_fast == 0.0f) rope.beta_fast = 32.0f;
    if (rope.beta_slow == 0.0f) rope.beta_slow = 1.0f;
    rope.truncate = get_bool(r, "truncate", where, true);
    TF_CHECK(rope.attention_factor >= 0, where, ": attention_factor must be positive, got ",
             rope.attention_factor);
    TF_CHECK(rope.beta_fast > 0 && rope.beta_slow > 0, where, ": beta_fast and beta_slow must be positive");
  }
}

// The per-layer sliding window, as transformers 5 builds it: MistralForCausalLM slides in every
// layer (its config's sliding_window, 4096 when the key is absent, none when null); Qwen2 slides
// only under use_sliding_window, in the layers from max_window_layers on (28 when absent), unless
// layer_types names each layer's kind. Attention fields tightfit cannot honour are refused by name.
void parse_attention(const json& j, const std::string& arch, const std::string& source, LlamaConfig& c) {
  const bool gemma2 = arch == "Gemma2ForCausalLM";
  TF_CHECK(find_key(j, "attention_chunk_size") == nullptr, source, ": \"attention_chunk_size\" is set (",
           j["attention_chunk_size"].dump(), "); tightfit's attention does not implement it");
  // transformers' Gemma3ForCausalLM keeps the field but never applies it: a model trained with it
  // set trained without the cap, so honouring it would not be that model.
  TF_CHECK(gemma2 || find_key(j, "attn_logit_softcapping") == nullptr, source,
           ": \"attn_logit_softcapping\" is set (", j["attn_logit_softcapping"].dump(),
           "); tightfit soft-caps attention scores for Gemma2ForCausalLM only",
           arch == "Gemma3ForCausalLM" ? " (transformers' Gemma 3 ignores the field; set it to null)" : "");
  c.attention_dropout = get_float(j, "attention_dropout", source, 0.0f);
  const bool null_window = j.contains("sliding_window") && j["sliding_window"].is_null();
  const bool qwen = arch == "Qwen2ForCausalLM" || arch == "Qwen3ForCausalLM";
  if (arch == "MistralForCausalLM") {
    c.sliding_window = null_window ? 0 : get_int(j, "sliding_window", source, 4096);
  } else if (arch == "Phi3ForCausalLM") {
    // Phi3Config's sliding_window defaults to null, and transformers applies it in every layer.
    c.sliding_window = null_window ? 0 : get_int(j, "sliding_window", source, 0);
    TF_CHECK(!j.contains("sliding_window") || null_window || c.sliding_window > 0, source,
             ": sliding_window must be positive or null, got 0");
  } else if (arch == "Gemma3ForCausalLM" || gemma2) {
    c.sliding_window = null_window ? 0 : get_int(j, "sliding_window", source, 4096);
  } else if (qwen && get_bool(j, "use_sliding_window", source, false)) {
    c.sliding_window = null_window ? 0 : get_int(j, "sliding_window", source, 4096);
  }
  TF_CHECK(
      !j.contains("sliding_window") || null_window || c.sliding_window > 0 || arch != "MistralForCausalLM",
      source, ": sliding_window must be positive or null, got 0");
  if (const json* types = find_key(j, "layer_types")) {
    TF_CHECK(types->is_array() && types->size() == size_t(c.n_layers), source,
             ": \"layer_types\" must list one attention kind for each of the ", c.n_layers, " layers, got ",
             types->dump());
    std::vector<bool> sliding;
    for (const json& t : *types) {
      const bool ok = t.is_string() && (t == "full_attention" || t == "sliding_attention");
      TF_CHECK(ok, source, ": \"layer_types\" entry ", t.dump(),
               " is not one tightfit runs (full_attention, sliding_attention)");
      sliding.push_back(t == "sliding_attention");
    }
    const bool any_sliding = std::find(sliding.begin(), sliding.end(), true) != sliding.end();
    TF_CHECK(!any_sliding || c.sliding_window > 0, source,
             ": \"layer_types\" has sliding_attention layers but the config sets no sliding window",
             qwen ? " (use_sliding_window is false or sliding_window null)" : "");
    const bool all_sliding = std::find(sliding.begin(), sliding.end(), false) == sliding.end();
    TF_CHECK(arch != "MistralForCausalLM" || c.sliding_window == 0 || all_sliding, source,
             ": \"layer_types\" has full_attention layers, but MistralForCausalLM slides its window in every "
             "layer (alternating layers are Ministral's, which tightfit does not load)");
    if (qwen || arch == "Gemma3ForCausalLM" || gemma2) c.sliding_layers = std::move(sliding);
  } else if (qwen && c.sliding_window > 0) {
    const int first = get_int(j, "max_window_layers", source, 28);
    for (int l = 0; l < c.n_layers; ++l) c.sliding_layers.push_back(l >= first);
  } else if (arch == "Gemma3ForCausalLM") {
    // transformers' Gemma3TextConfig: every pattern-th layer is full, the others slide.
    const int pattern = get_int(j, "sliding_window_pattern", source, 6);
    TF_CHECK(pattern > 0, source, ": sliding_window_pattern must be positive");
    for (int l = 0; l < c.n_layers; ++l) c.sliding_layers.push_back((l + 1) % pattern != 0);
  } else if (gemma2) {
    // transformers' Gemma2Config: the even layers slide, the odd ones are full.
    for (int l = 0; l < c.n_layers; ++l) c.sliding_layers.push_back(l % 2 == 0);
  }
}

// A logit cap: absent, the family's default (0: none); null, none; else positive.
float get_softcap(const json& j, const char* key, const std::string& source, float fallback) {
  if (find_key(j, key) == nullptr) return j.contains(key) ? 0.0f : fallback;
  const float cap = get_float(j, key, source, fallback);
  TF_CHECK(cap > 0 && std::isfinite(cap), source, ": \"", key, "\" must be positive or null, got ", cap);
  return cap;
}

// What Gemma 2 and Gemma 3 share beyond the Llama fields: causal attention only, no biases, GeGLU
// with gelu's tanh approximation, sandwich norms, embeddings scaled by sqrt(hidden) and scores by
// query_pre_attn_scalar^-0.5. `name` and `encoder` name the family and its bidirectional variant.
void parse_gemma_block(const json& j, const std::string& source, const char* name, const char* encoder,
                       LlamaConfig& c) {
  TF_CHECK(!get_bool(j, "use_bidirectional_attention", source, false), source,
           ": use_bidirectional_attention is set (", encoder, "); tightfit trains causal models");
  TF_CHECK(!c.attention_bias, source, ": ", name,
           " with attention_bias (an o_proj bias too) is not supported");
  std::string act = "gelu_pytorch_tanh";
  for (const char* key : {"hidden_activation", "hidden_act"})
    if (const json* a = find_key(j, key)) {
      TF_CHECK(a->is_string(), source, ": \"", key, "\" must be a string");
      act = a->get<std::string>();
      break;
    }
  TF_CHECK(act == "gelu_pytorch_tanh" || act == "gelu_new", source, ": hidden activation \"", act,
           "\" is not supported for ", name, " (gelu_pytorch_tanh, gelu's tanh approximation, is)");
  c.activation = MlpActivation::GeluTanh;
  c.sandwich_norms = true;
  c.embed_scale = std::sqrt(float(c.hidden));
  c.query_pre_attn_scalar = get_float(j, "query_pre_attn_scalar", source, 256.0f);
  TF_CHECK(c.query_pre_attn_scalar > 0, source, ": query_pre_attn_scalar must be positive");
}

// Gemma 2 is Gemma 3's block without the q/k norms, with one rope base, and with its attention
// scores and final logits soft-capped (attn_logit_softcapping, 50 when absent, and
// final_logit_softcapping, 30).
void parse_gemma2(const json& j, const std::string& source, LlamaConfig& c) {
  parse_gemma_block(j, source, "Gemma 2", "an encoder Gemma 2", c);
  c.attn_softcap = get_softcap(j, "attn_logit_softcapping", source, 50.0f);
  c.final_softcap = get_softcap(j, "final_logit_softcapping", source, 30.0f);
}

// Gemma 3's text model beyond the Llama fields: GeGLU with gelu's tanh approximation, q/k norms,
// sandwich norms, embeddings scaled by sqrt(hidden) (transformers casts the scale to the model's
// dtype; in f32 it is sqrtf(hidden), llama.cpp's), scores by query_pre_attn_scalar^-0.5, and the
// sliding layers' own rope base: rope_local_base_freq beside rope_theta and rope_scaling (the global
// layers', as the real checkpoints ship them), or transformers 5's rope_parameters per layer type.
// Gemma3TextConfig's final soft cap is optional (null in the released checkpoints): set, it caps
// the logits as Gemma 2's does (its attention cap is refused in parse_attention).
void parse_gemma3(const json& j, const std::string& source, LlamaConfig& c) {
  parse_gemma_block(j, source, "Gemma 3", "EmbeddingGemma", c);
  c.final_softcap = get_softcap(j, "final_logit_softcapping", source, 0.0f);
  c.qk_norm = true;
  c.rope.theta = get_float(j, "rope_theta", source, 1000000.0f);
  c.rope_local.head_dim = c.head_dim;
  c.rope_local.theta = get_float(j, "rope_local_base_freq", source, 10000.0f);
  if (const json* rp = find_key(j, "rope_parameters")) {
    TF_CHECK(rp->is_object(), source, ": rope_parameters must be an object");
    for (const auto& [key, value] : rp->items()) {
      TF_CHECK(key == "full_attention" || key == "sliding_attention", source, ": rope_parameters key \"", key,
               "\" is not one of Gemma 3's layer types (full_attention, sliding_attention)");
      RopeParams& rope = key == "full_attention" ? c.rope : c.rope_local;
      const std::string where = source + " rope_parameters." + key;
      rope.theta = get_float(value, "rope_theta", where, rope.theta);
      parse_rope_scaling(value, j, where, c.max_positions, rope);
    }
  } else if (const json* rs = find_key(j, "rope_scaling")) {
    parse_rope_scaling(*rs, j, source, c.max_positions, c.rope);
  }
}

// Gemma's RMSNorm scales by 1 + w: its norms are held as f32 1 + w, as llama.cpp's converter
// stores them (exact for a bf16 or f16 w of magnitude above 2^-14; the weights are frozen).
WeightRef one_plus(const WeightRef& stored, LlamaWeights& w, const std::string& name) {
  Tensor t(DType::F32, {stored.rows, stored.cols}, MemTag::Weights, name);
  cpu::dequantize_weight_tile(t.as<float>(), stored.cols, stored, 0, stored.rows, 0, stored.cols);
  for (int64_t i = 0; i < stored.rows * stored.cols; ++i) t.as<float>()[i] += 1.0f;
  const WeightRef r{t.view.data, DType::F32, stored.rows, stored.cols};
  w.owned.push_back(std::move(t));
  return r;
}

// Gemma 3 with its vision tower (Gemma3ForConditionalGeneration): its text model, from text_config
// with Gemma3TextConfig's defaults for the fields the shipped configs leave out (gemma-3-4b's names
// four of them); weights_from_safetensors finds its weights under the text model's prefix.
LlamaConfig gemma3_text_config(const json& j, const std::string& source) {
  const json* t = find_key(j, "text_config");
  TF_CHECK(t && t->is_object(), source, ": Gemma3ForConditionalGeneration has no text_config object");
  json text = {{"vocab_size", 262208},      {"hidden_size", 2304},
               {"intermediate_size", 9216}, {"num_hidden_layers", 26},
               {"num_attention_heads", 8},  {"num_key_value_heads", 4},
               {"head_dim", 256},           {"max_position_embeddings", 131072}};
  text.update(*t);
  text["architectures"] = {"Gemma3ForCausalLM"};
  return llama_config_from_hf(text, source + " text_config");
}

json read_json(const std::string& path) {
  std::ifstream in(path);
  TF_CHECK(in, path, ": cannot open model config");
  json j = json::parse(in, nullptr, false);
  TF_CHECK(!j.is_discarded(), path, ": not valid JSON");
  return j;
}

}  // namespace

LlamaConfig llama_config_from_hf(const json& j, const std::string& source) {
  TF_CHECK(j.is_object(), source, ": a model config must be a JSON object");
  std::string arch;
  if (const json* a = find_key(j, "architectures")) {
    TF_CHECK(a->is_array() && !a->empty() && (*a)[0].is_string(), source,
             ": \"architectures\" must be a non-empty list of names");
    arch = (*a)[0].get<std::string>();
  } else if (const json* m = find_key(j, "model_type"); m && m->is_string()) {
    const std::string t = m->get<std::string>();
    arch = t == "llama"         ? "LlamaForCausalLM"
           : t == "mistral"     ? "MistralForCausalLM"
           : t == "qwen2"       ? "Qwen2ForCausalLM"
           : t == "qwen3"       ? "Qwen3ForCausalLM"
           : t == "gemma3_text" ? "Gemma3ForCausalLM"
           : t == "gemma2"      ? "Gemma2ForCausalLM"
           : t == "phi3"        ? "Phi3ForCausalLM"
                                : t;
  }
  TF_CHECK(arch != "Qwen3MoeForCausalLM" && arch != "Qwen2MoeForCausalLM", source, ": architecture \"", arch,
           "\" is a mixture of experts, which tightfit does not run (its dense Qwen2/Qwen3 models it does)");
  TF_CHECK(arch != "GemmaForCausalLM", source, ": architecture \"", arch,
           "\" (the first Gemma) is not supported (Gemma2ForCausalLM and Gemma3ForCausalLM are)");
  if (arch == "Gemma3ForConditionalGeneration") return gemma3_text_config(j, source);
  TF_CHECK(arch == "LlamaForCausalLM" || arch == "MistralForCausalLM" || arch == "Qwen2ForCausalLM" ||
               arch == "Qwen3ForCausalLM" || arch == "Phi3ForCausalLM" || arch == "Gemma2ForCausalLM" ||
               arch == "Gemma3ForCausalLM",
           source, ": architecture \"", arch,
           "\" is not supported (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
           "Qwen3ForCausalLM, Phi3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM)");

  LlamaConfig c;
  c.architecture = arch == "Qwen2ForCausalLM"     ? "qwen2"
                   : arch == "Qwen3ForCausalLM"   ? "qwen3"
                   : arch == "MistralForCausalLM" ? "mistral"
                   : arch == "Phi3ForCausalLM"    ? "phi3"
                                                  : "llama";
  c.qk_norm = c.architecture == "qwen3";
  const bool gemma3 = arch == "Gemma3ForCausalLM", gemma2 = arch == "Gemma2ForCausalLM";
  if (gemma3) c.architecture = "gemma3";
  if (gemma2) c.architecture = "gemma2";
  c.hidden = get_int(j, "hidden_size", source);
  c.intermediate = get_int(j, "intermediate_size", source);
  c.n_layers = get_int(j, "num_hidden_layers", source);
  c.n_heads = get_int(j, "num_attention_heads", source);
  TF_CHECK(c.n_heads > 0, source, ": num_attention_heads must be positive");
  c.n_kv_heads = get_int(j, "num_key_value_heads", source, c.n_heads);
  // transformers' Qwen3Config defaults head_dim to 128, not hidden / heads.
  c.head_dim = get_int(j, "head_dim", source,
                       c.architecture == "qwen3" ? 128
                       : gemma3 || gemma2        ? 256
                                                 : c.hidden / c.n_heads);
  c.vocab = get_int(j, "vocab_size", source);
  c.rms_eps = get_float(j, "rms_norm_eps", source, 1e-6f);
  c.max_positions = get_int(j, "max_position_embeddings", source, 2048);
  c.tie_embeddings = get_bool(j, "tie_word_embeddings", source, gemma3 || gemma2);
  // Qwen2 always has q/k/v biases; Llama declares them with attention_bias.
  c.attention_bias = arch == "Qwen2ForCausalLM" || get_bool(j, "attention_bias", source, false);
  TF_CHECK(!get_bool(j, "mlp_bias", source, false), source, ": MLP biases (mlp_bias) are not supported");
  parse_attention(j, arch, source, c);
  if (arch == "Phi3ForCausalLM") {
    c.fused_qkv = c.fused_gate_up = true;
    c.residual_dropout = get_float(j, "resid_pdrop", source, 0.0f);
    c.embedding_dropout = get_float(j, "embd_pdrop", source, 0.0f);
  }
  c.rope.head_dim = c.head_dim;
  c.rope.theta = get_float(j, "rope_theta", source, 10000.0f);
  if (gemma2) parse_gemma2(j, source, c);
  if (gemma3) {
    parse_gemma3(j, source, c);
  } else if (const json* rp = find_key(j, "rope_parameters")) {
    c.rope.theta = get_float(*rp, "rope_theta", source + " rope_parameters", c.rope.theta);
    parse_rope_scaling(*rp, j, source + " rope_parameters", c.max_positions, c.rope);
  } else if (const json* rs = find_key(j, "rope_scaling")) {
    parse_rope_scaling(*rs, j, source, c.max_positions, c.rope);
  }
  if (const json* prf = find_key(j, "partial_rotary_factor"))
    TF_CHECK(prf->is_number() && prf->get<double>() == 1.0, source, ": partial_rotary_factor ", prf->dump(),
             " is not supported (partial rotary embeddings)");
  // Phi3Config renames a "yarn" (or "su") rope type to longrope before transformers reads it.
  TF_CHECK(arch != "Phi3ForCausalLM" || c.rope.scaling == RopeScalingType::None ||
               c.rope.scaling == RopeScalingType::LongRope,
           source, ": Phi3ForCausalLM rotates with default or longrope rope (transformers reads a yarn type ",
           "as longrope), not ", rope_scaling_name(c.rope.scaling));
  c.rope_layout = RopeLayout::SplitHalf;
  c.validate(source);
  return c;
}

LlamaConfig read_hf_config(const std::string& path) {
  return llama_config_from_hf(read_json(path), path);
}

LlamaWeights weights_from_safetensors(std::shared_ptr<const SafetensorsModel> model, const LlamaConfig& cfg,
                                      QuantMode quant, bool bnb4bit, const SpillOptions* spill) {
  // Gemma3ForConditionalGeneration keeps its text model's model.* under language_model.model. (the
  // hub's checkpoints) or model.language_model. (as transformers 5 saves it).
  std::string text_prefix;
  for (const char* p : {"language_model.model.", "model.language_model."})
    if (!model->find("model.embed_tokens.weight") && model->find(std::string(p) + "embed_tokens.weight"))
      text_prefix = p;
  const auto in_file = [&](const std::string& name) {
    return text_prefix.empty() || name.rfind("model.", 0) != 0 ? name : text_prefix + name.substr(6);
  };
  // Every tensor is found and checked first, so that the spill file is sized, and refused, before
  // anything converts.
  LlamaWeights source;
  source.config = cfg;
  source.blocks.resize(size_t(cfg.n_layers));
  std::vector<std::string> names, file_names;
  LlamaWeights::for_each_slot(cfg, [&](WeightSlot slot, int layer) {
    // A fused matrix (Phi-3's qkv_proj, gate_up_proj) is split into its projections by rows: a row
    // range of the stored tensor is a matrix of its own, exactly.
    const std::optional<FusedRows> fused = fused_rows(cfg, slot);
    const std::string name =
        in_file(fused ? hf_fused_weight_name(fused->qkv, layer) : hf_weight_name(cfg, slot, layer));
    const SafetensorsTensor& t = model->get(name);
    const auto [rows, cols] = weight_shape(cfg, slot);
    const int64_t file_rows = fused ? fused->rows : rows;
    const bool matrix = is_matrix_slot(slot);
    file_names.push_back(name);
    names.push_back(fused ? hf_weight_name(slot, layer) : name);
    if (t.dtype == StDType::U8) {
      TF_CHECK(
          bnb4bit, model->source(), ": tensor ", name,
          " is U8 (a bitsandbytes 4-bit weight?) but config.json has no bitsandbytes quantization_config");
      TF_CHECK(matrix, model->source(), ": tensor ", name,
               " is U8, but norms and biases must be F32, BF16 or F16");
      const WeightRef whole = bnb4bit_weight(*model, name, file_rows, cols);
      source.slot(slot, layer) =
          fused ? bnb4bit_rows(whole, fused->row0, rows, source, model->source() + ": tensor " + name)
                : whole;
      return;
    }
    const bool vector = rows == 1;
    const bool shape_ok = vector ? (t.shape.size() == 1 && t.shape[0] == cols)
                                 : (t.shape.size() == 2 && t.shape[0] == file_rows && t.shape[1] == cols);
    TF_CHECK(shape_ok, model->source(), ": tensor ", name, " has shape ", t.shape_str(), ", expected ",
             vector ? "[" + std::to_string(cols) + "]"
                    : "[" + std::to_string(file_rows) + ", " + std::to_string(cols) + "]");
    const TensorView v = model->view(name);
    TF_CHECK(v.dtype == DType::F32 || v.dtype == DType::BF16 || v.dtype == DType::F16, model->source(),
             ": tensor ", name, " has dtype ", dtype_name(v.dtype), "; weights must be F32, BF16 or F16");
    const int64_t offset = fused ? dtype_bytes(v.dtype, fused->row0 * cols) : 0;
    source.slot(slot, layer) = WeightRef{static_cast<const std::byte*>(v.data) + offset, v.dtype, rows, cols};
  });
  const uint64_t spilled = spill ? spill_bytes(source, quant) : 0;
  const std::shared_ptr<SpillFile> file = spilled ? std::make_shared<SpillFile>(*spill, spilled) : nullptr;
  LlamaWeights w;
  w.config = cfg;
  w.blocks.resize(size_t(cfg.n_layers));
  size_t i = 0;
  LlamaWeights::for_each_slot(cfg, [&](WeightSlot slot, int layer) {
    const WeightRef& src = source.slot(slot, layer);
    const std::string& name = names[i];
    const std::string& file_name = file_names[i++];
    w.slot(slot, layer) = store_layer_weight(source, src, is_matrix_slot(slot) ? quant : QuantMode::None, w,
                                             name, file.get(), slot, layer);
    drop_source_pages(src, w.slot(slot, layer));
    if ((cfg.architecture == "gemma2" || cfg.architecture == "gemma3") && is_norm_slot(slot))
      w.slot(slot, layer) = one_plus(src, w, file_name);
  });
  if (file) SpillFile::attach(file, w);
  // What the loader decoded (bnb4bit_rows) and kept in memory, unless the spill file holds it now.
  else
    for (Tensor& t : source.owned) w.owned.push_back(std::move(t));
  if (cfg.tie_embeddings) w.lm_head = w.embed;
  // Each shard's tensors tile its data section, which ends the file.
  for (const SafetensorsFile& shard : model->shards()) {
    const std::vector<SafetensorsTensor>& ts = shard.tensors();
    if (ts.empty()) continue;
    const std::byte* begin = ts.front().bytes.data();
    const uint64_t bytes = uint64_t(ts.back().bytes.data() + ts.back().bytes.size() - begin);
    const uint64_t file_size = std::filesystem::file_size(shard.path());
    w.files.push_back(MappedFile::of(shard.path(), begin, file_size - bytes, bytes));
  }
  w.keepalive.push_back(std::move(model));
  return w;
}

LlamaWeights load_hf_model(const std::string& dir, QuantMode quant, const SpillOptions* spill) {
  const std::filesystem::path d(dir);
  TF_CHECK(std::filesystem::is_directory(d), dir, ": not a model directory");
  const std::string config_path = (d / "config.json").string();
  const json j = read_json(config_path);
  const LlamaConfig cfg = llama_config_from_hf(j, config_path);
  const bool bnb4bit = is_bnb4bit_checkpoint(j, config_path);
  TF_CHECK(!bnb4bit || (quant != QuantMode::Int8 && !ggml_type_of(quant)), config_path,
           ": a bitsandbytes 4-bit checkpoint cannot be quantized to ", quant_mode_name(quant),
           " (its weights are nf4 already): use keep or nf4 to compute with them as stored, bf16 or none to "
           "dequantize them");
  auto model = std::make_shared<const SafetensorsModel>(SafetensorsModel::open(dir));
  return weights_from_safetensors(std::move(model), cfg, quant, bnb4bit, spill);
}

}  // namespace tf::io
