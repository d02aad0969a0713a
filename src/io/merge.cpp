// defines: merged exports (export_merged_hf, export_merged_gguf), merge_lora_delta, hf_config_json
#include "src/io/merge.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <vector>

#include "kernels/cpu/dequant.h"
#include "kernels/cpu/ref/quantize.h"
#include "kernels/cpu/ref/quantize_ggml.h"
#include "kernels/ops.h"
#include "src/core/error.h"
#include "src/io/durable.h"
#include "src/io/gguf_lora.h"
#include "src/io/gguf_model.h"
#include "src/io/safetensors.h"

namespace tf::io {

namespace {

namespace fs = std::filesystem;
using nlohmann::ordered_json;

constexpr const char* kTokenizerFiles[] = {"tokenizer.json", "tokenizer_config.json",
                                           "special_tokens_map.json", "tokenizer.model",
                                           "generation_config.json"};

std::optional<LoraTarget> target_of(GgufLlamaRole r) {
  switch (r) {
    case GgufLlamaRole::AttnQ: return LoraTarget::Q;
    case GgufLlamaRole::AttnK: return LoraTarget::K;
    case GgufLlamaRole::AttnV: return LoraTarget::V;
    case GgufLlamaRole::AttnOutput: return LoraTarget::O;
    case GgufLlamaRole::FfnGate: return LoraTarget::Gate;
    case GgufLlamaRole::FfnUp: return LoraTarget::Up;
    case GgufLlamaRole::FfnDown: return LoraTarget::Down;
    default: return std::nullopt;
  }
}

// The adapter must have been made for a model of `cfg`'s shape.
void check_lora_fits(const LoraState& lora, const LlamaConfig& cfg, const std::string& where) {
  TF_CHECK(int(lora.layers.size()) == cfg.n_layers, where, ": the adapter has ", lora.layers.size(),
           " layers but the base model has ", cfg.n_layers);
  for (int l = 0; l < cfg.n_layers; ++l) {
    for (int t = 0; t < kLoraTargetCount; ++t) {
      const LoraAdapter& a = lora.at(l, LoraTarget(t));
      if (!a.active()) continue;
      const auto [in, out] = lora_target_dims(cfg, LoraTarget(t));
      TF_CHECK(a.in == in && a.out == out, where, ": the adapter's ", lora_target_name(LoraTarget(t)),
               " of layer ", l, " is [", a.out, " x ", a.in, "] but the base's is [", out, " x ", in, "]");
    }
  }
}

// Rows per tile of a [rows, cols] matrix: a multiple of `unit` (rows that must stay together in a
// tile) of about `elems` elements, at most all of them.
int64_t tile_rows(int64_t rows, int64_t cols, int64_t unit, int64_t elems) {
  return std::min(rows, std::max<int64_t>(1, elems / std::max<int64_t>(cols, 1) / unit) * unit);
}

// dst ([n, w.cols] f32) = rows [r0, r0 + n) of `w`, of any storage dtype, plus scale * B A for
// those rows when `a` is given.
void merged_rows(float* dst, const WeightRef& w, const LoraAdapter* a, float scale, int64_t r0, int64_t n) {
  cpu::dequantize_weight_tile(dst, w.cols, w, r0, n, 0, w.cols);
  if (!a) return;
  LoraAdapter rows = *a;
  rows.B += r0 * a->rank;
  rows.out = int(n);
  merge_lora_delta(dst, rows, scale);
}

// Rows [r0, r0 + n) of the layer's fused qkv_proj (or gate_up_proj) into dst, each projection's
// rows with its adapter merged.
void fused_merged_rows(float* dst, const LlamaWeights& base, const LoraState& lora, bool qkv, int layer,
                       float scale, int64_t r0, int64_t n) {
  for (WeightSlot s : {WeightSlot::Q, WeightSlot::K, WeightSlot::V, WeightSlot::Gate, WeightSlot::Up}) {
    const std::optional<FusedRows> f = fused_rows(base.config, s);
    if (!f || f->qkv != qkv) continue;
    const WeightRef& w = base.slot(s, layer);
    const int64_t begin = std::max(r0, f->row0), end = std::min(r0 + n, f->row0 + w.rows);
    if (begin >= end) continue;
    const LoraAdapter& a = lora.at(layer, *lora_target_of(s));
    merged_rows(dst + (begin - r0) * w.cols, w, a.active() ? &a : nullptr, scale, begin - f->row0,
                end - begin);
  }
}

// Stores n f32 values as `dtype` (round to nearest even for bf16 and f16).
void from_f32(void* dst, const float* src, DType dtype, int64_t n) {
  switch (dtype) {
    case DType::F32: std::memcpy(dst, src, size_t(n) * 4); return;
    case DType::BF16:
    case DType::F16: {
      auto* h = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) h[i] = dtype == DType::BF16 ? f32_to_bf16(src[i]) : f32_to_f16(src[i]);
      return;
    }
    default: break;
  }
  TF_FAIL("merge: cannot store weights as ", dtype_name(dtype));
}

// A directory built beside `dir` and swapped in by publish(); removed if never published.
class StagedDir {
 public:
  explicit StagedDir(const std::string& dir) {
    final_ = fs::path(dir).lexically_normal();
    if (!final_.has_filename()) final_ = final_.parent_path();  // "out/merged/"
    const fs::path parent = final_.has_parent_path() ? final_.parent_path() : fs::path(".");
    std::error_code ec;
    fs::create_directories(parent, ec);
    TF_CHECK(!ec, parent.string(), ": cannot create: ", ec.message());
    staged_ = parent / ("." + final_.filename().string() + ".tmp-" + std::to_string(::getpid()));
    fs::remove_all(staged_, ec);
    fs::create_directory(staged_, ec);
    TF_CHECK(!ec, staged_.string(), ": cannot create: ", ec.message());
  }
  ~StagedDir() {
    std::error_code ec;
    if (!published_) fs::remove_all(staged_, ec);
  }
  StagedDir(const StagedDir&) = delete;
  StagedDir& operator=(const StagedDir&) = delete;
  const fs::path& path() const { return staged_; }
  void publish() {
    fsync_dir(staged_.string());
    replace_dir(staged_.string(), final_.string());
    published_ = true;
  }

 private:
  fs::path final_, staged_;
  bool published_ = false;
};

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  TF_CHECK(in, p.string(), ": cannot open");
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  TF_CHECK(!in.bad(), p.string(), ": read error");
  return s;
}

std::string shard_name(size_t i, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i + 1, n);
  return buf;
}

const char* torch_dtype_name(DType t) {
  switch (t) {
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
    default: return "float32";
  }
}

// The llama3 rope scaling whose frequencies a GGUF's per-frequency divisors (rope_freqs.weight)
// give, as llama.cpp's converter derives them: an HF config spells rope scaling by parameters,
// never by the divisors. Llama 3.1-3.3 use low_freq_factor 1 and high_freq_factor 4, the factor is
// the largest divisor; the original context length is searched among powers of two.
RopeParams llama3_of_freq_factors(const RopeParams& rope) {
  TF_CHECK(rope.scaling == RopeScalingType::None, "config.json for the merged model: the base has both rope ",
           rope_scaling_name(rope.scaling), " scaling and rope_freqs.weight, which HF cannot describe");
  const size_t half = rope.freq_factors.size();
  std::vector<float> want(half), got(half);
  rope_inv_freq(rope, want.data());
  RopeParams p = rope;
  p.freq_factors.clear();
  p.scaling = RopeScalingType::Llama3;
  p.factor = *std::max_element(rope.freq_factors.begin(), rope.freq_factors.end());
  p.low_freq_factor = 1.0f;
  p.high_freq_factor = 4.0f;
  for (int len = 16; len <= (1 << 24); len *= 2) {
    p.original_max_positions = len;
    rope_inv_freq(p, got.data());
    bool same = true;
    // The converter computes the divisors in double from float32 frequencies: a few ulps apart.
    for (size_t i = 0; i < half && same; ++i) same = std::abs(got[i] - want[i]) <= 1e-5f * want[i];
    if (same) return p;
  }
  TF_FAIL("config.json for the merged model: the base's rope_freqs.weight is not llama3 rope scaling with ",
          "low_freq_factor 1 and high_freq_factor 4, so no HF rope_scaling describes it; export the merge as "
          "GGUF (--format merged --out FILE.gguf)");
}

}  // namespace

void merge_lora_delta(float* w, const LoraAdapter& a, float scale) {
  // W[out, in] += scale * B[out, r] A[r, in]; OpenBLAS accumulates each element's r products in f32.
  cpu::matmul(w, a.in, MatOperand{a.B, DType::F32, a.rank, false}, MatOperand{a.A, DType::F32, a.in, false},
              a.out, a.in, a.rank, scale, 1.0f);
}

ordered_json hf_config_json(const LlamaConfig& cfg, DType torch_dtype) {
  ordered_json j;
  const std::string& arch = cfg.architecture;
  j["architectures"] = {arch == "qwen2"     ? "Qwen2ForCausalLM"
                        : arch == "qwen3"   ? "Qwen3ForCausalLM"
                        : arch == "phi3"    ? "Phi3ForCausalLM"
                        : arch == "mistral" ? "MistralForCausalLM"
                                            : "LlamaForCausalLM"};
  j["model_type"] =
      arch == "qwen2" || arch == "qwen3" || arch == "mistral" || arch == "phi3" ? arch : "llama";
  j["hidden_size"] = cfg.hidden;
  j["intermediate_size"] = cfg.intermediate;
  j["num_hidden_layers"] = cfg.n_layers;
  j["num_attention_heads"] = cfg.n_heads;
  j["num_key_value_heads"] = cfg.n_kv_heads;
  j["head_dim"] = cfg.head_dim;
  j["vocab_size"] = cfg.vocab;
  j["hidden_act"] = "silu";
  j["rms_norm_eps"] = cfg.rms_eps;
  j["max_position_embeddings"] = cfg.max_positions;
  j["tie_word_embeddings"] = cfg.tie_embeddings;
  j["attention_bias"] = cfg.attention_bias;
  // transformers reads an absent sliding_window as 4096 for Mistral and Qwen2: it is always written.
  if (cfg.architecture == "mistral") {
    TF_CHECK(cfg.sliding_layers.empty(), "a Mistral config slides its window in every layer; this model's ",
             "window is per layer");
    j["sliding_window"] = cfg.sliding_window > 0 ? ordered_json(cfg.sliding_window) : ordered_json(nullptr);
  } else if (cfg.architecture == "qwen2" || cfg.architecture == "qwen3") {
    j["use_sliding_window"] = cfg.sliding_window > 0;
    j["sliding_window"] = cfg.sliding_window > 0 ? ordered_json(cfg.sliding_window) : ordered_json(nullptr);
    if (cfg.sliding_window > 0) {
      ordered_json types = ordered_json::array();
      for (int l = 0; l < cfg.n_layers; ++l)
        types.push_back(cfg.window(l) > 0 ? "sliding_attention" : "full_attention");
      j["layer_types"] = types;
    }
  } else if (cfg.architecture == "phi3") {
    // Phi3ForCausalLM slides in every layer when sliding_window is set; null is none.
    TF_CHECK(cfg.sliding_layers.empty(), "a Phi-3 config slides its window in every layer; this model's ",
             "window is per layer");
    j["sliding_window"] = cfg.sliding_window > 0 ? ordered_json(cfg.sliding_window) : ordered_json(nullptr);
    if (cfg.rope.scaling == RopeScalingType::LongRope)
      j["original_max_position_embeddings"] = cfg.rope.original_max_positions;
  } else if (cfg.architecture == "gemma3") {
    // Gemma3TextConfig's own spelling, as the real checkpoints ship it: rope_theta and rope_scaling
    // are the full layers', rope_local_base_freq the sliding layers'.
    j["architectures"] = {"Gemma3ForCausalLM"};
    j["model_type"] = "gemma3_text";
    j["hidden_act"] = "gelu_pytorch_tanh";
    j["hidden_activation"] = "gelu_pytorch_tanh";
    j["sliding_window"] = cfg.sliding_window > 0 ? ordered_json(cfg.sliding_window) : ordered_json(nullptr);
    ordered_json types = ordered_json::array();
    for (int l = 0; l < cfg.n_layers; ++l)
      types.push_back(cfg.sliding_layer(l) ? "sliding_attention" : "full_attention");
    j["layer_types"] = types;
    const float q = cfg.query_pre_attn_scalar > 0 ? cfg.query_pre_attn_scalar : float(cfg.head_dim);
    j["query_pre_attn_scalar"] = q == std::round(q) ? ordered_json(int64_t(q)) : ordered_json(q);
    TF_CHECK(!cfg.has_local_rope() || cfg.rope_local.scaling == RopeScalingType::None,
             "a Gemma 3 config names its sliding layers' rope base only, not their ",
             rope_scaling_name(cfg.rope_local.scaling), " scaling");
    j["rope_local_base_freq"] = cfg.has_local_rope() ? cfg.rope_local.theta : cfg.rope.theta;
    j["final_logit_softcapping"] = nullptr;
    j["attn_logit_softcapping"] = nullptr;
  } else if (cfg.architecture == "gemma2") {
    // Gemma2Config: one rope base for every layer, the layers' kinds in layer_types, and the caps
    // (null for none, which transformers reads as no capping).
    TF_CHECK(!cfg.has_local_rope(), "a Gemma 2 config has one rope base for every layer; this model's ",
             "sliding layers rotate with a base of their own");
    j["architectures"] = {"Gemma2ForCausalLM"};
    j["model_type"] = "gemma2";
    j["hidden_act"] = "gelu_pytorch_tanh";
    j["hidden_activation"] = "gelu_pytorch_tanh";
    j["sliding_window"] = cfg.sliding_window > 0 ? ordered_json(cfg.sliding_window) : ordered_json(nullptr);
    ordered_json types = ordered_json::array();
    for (int l = 0; l < cfg.n_layers; ++l)
      types.push_back(cfg.window(l) > 0 ? "sliding_attention" : "full_attention");
    j["layer_types"] = types;
    const float q = cfg.query_pre_attn_scalar > 0 ? cfg.query_pre_attn_scalar : float(cfg.head_dim);
    j["query_pre_attn_scalar"] = q == std::round(q) ? ordered_json(int64_t(q)) : ordered_json(q);
    j["final_logit_softcapping"] =
        cfg.final_softcap > 0 ? ordered_json(cfg.final_softcap) : ordered_json(nullptr);
    j["attn_logit_softcapping"] =
        cfg.attn_softcap > 0 ? ordered_json(cfg.attn_softcap) : ordered_json(nullptr);
  } else {
    TF_CHECK(cfg.sliding_window == 0, "a ", cfg.architecture,
             " config has no sliding window; this model's is ", cfg.sliding_window);
  }
  j["mlp_bias"] = false;
  j["rope_theta"] = cfg.rope.theta;
  // Longrope's short factors are its own; other per-frequency factors are a GGUF's llama3 scaling.
  const bool own_factors = cfg.rope.freq_factors.empty() || cfg.rope.scaling == RopeScalingType::LongRope;
  const RopeParams rope = own_factors ? cfg.rope : llama3_of_freq_factors(cfg.rope);
  switch (rope.scaling) {
    case RopeScalingType::None: j["rope_scaling"] = nullptr; break;
    case RopeScalingType::Linear:
    case RopeScalingType::Dynamic:
      j["rope_scaling"] = {{"rope_type", rope_scaling_name(rope.scaling)}, {"factor", rope.factor}};
      break;
    case RopeScalingType::Llama3:
      j["rope_scaling"] = {{"rope_type", "llama3"},
                           {"factor", rope.factor},
                           {"low_freq_factor", rope.low_freq_factor},
                           {"high_freq_factor", rope.high_freq_factor},
                           {"original_max_position_embeddings", rope.original_max_positions}};
      break;
    case RopeScalingType::Yarn: {
      ordered_json y = {{"rope_type", "yarn"},
                        {"factor", rope.factor},
                        {"original_max_position_embeddings", rope.original_max_positions},
                        {"beta_fast", rope.beta_fast},
                        {"beta_slow", rope.beta_slow},
                        {"truncate", rope.truncate}};
      if (rope.attention_factor > 0) y["attention_factor"] = rope.attention_factor;
      if (rope.mscale != 0) y["mscale"] = rope.mscale;
      if (rope.mscale_all_dim != 0) y["mscale_all_dim"] = rope.mscale_all_dim;
      j["rope_scaling"] = y;
      break;
    }
    case RopeScalingType::LongRope: {
      ordered_json r = {{"rope_type", "longrope"},
                        {"short_factor", rope.freq_factors},
                        {"long_factor", rope.long_factors},
                        {"original_max_position_embeddings", rope.original_max_positions},
                        {"factor", rope.factor}};
      if (rope.attention_factor > 0) r["attention_factor"] = rope.attention_factor;
      j["rope_scaling"] = r;
      break;
    }
  }
  j["torch_dtype"] = torch_dtype_name(torch_dtype);
  return j;
}

ordered_json bnb4bit_quantization_config(DType compute_dtype) {
  ordered_json q;
  q["_load_in_4bit"] = true;
  q["_load_in_8bit"] = false;
  q["bnb_4bit_compute_dtype"] = torch_dtype_name(compute_dtype);
  q["bnb_4bit_quant_storage"] = "uint8";
  q["bnb_4bit_quant_type"] = "nf4";
  q["bnb_4bit_use_double_quant"] = true;
  q["llm_int8_enable_fp32_cpu_offload"] = false;
  q["llm_int8_has_fp16_weight"] = false;
  q["llm_int8_skip_modules"] = nullptr;
  q["llm_int8_threshold"] = 6.0;
  q["load_in_4bit"] = true;
  q["load_in_8bit"] = false;
  q["quant_method"] = "bitsandbytes";
  return q;
}

void export_merged_hf(const std::string& dir, const LlamaWeights& base, const LoraState& lora,
                      const MergedHfOptions& options) {
  const LlamaConfig& cfg = base.config;
  check_lora_fits(lora, cfg, dir);
  TF_CHECK(options.max_shard_bytes > 0, dir, ": max_shard_bytes must be positive");
  TF_CHECK(!options.dtype || *options.dtype == DType::F16 || *options.dtype == DType::BF16, dir,
           ": merged weights are stored as f16 or bf16, not ", dtype_name(*options.dtype));
  const float scale = lora.config.scale();
  const bool unpermute = cfg.rope_layout == RopeLayout::Interleaved;
  const DType quantized_as =
      options.dtype.value_or(is_quantized(base.embed.dtype) ? DType::F16 : base.embed.dtype);

  struct Entry {
    std::string name;
    WeightSlot slot;
    int layer;
    WeightRef w;
    DType dtype;  // stored as, or (nf4) rounded to before quantizing
    bool nf4;
    int64_t bytes;  // in the file, companions included
  };
  std::vector<Entry> entries;
  LlamaWeights::for_each_slot(cfg, [&](WeightSlot slot, int layer) {
    // A fused matrix (Phi-3's qkv_proj, gate_up_proj) is one entry, at its first projection's slot,
    // written from each projection's rows (fused_merged_rows).
    const std::optional<FusedRows> fused = fused_rows(cfg, slot);
    if (fused && fused->row0 > 0) return;
    WeightRef w = base.slot(slot, layer);
    if (fused) w.rows = fused->rows;
    // Gemma's norms are held as 1 + w (hf_model.cpp's one_plus); its files have w, in the model's dtype.
    const bool shifted = (cfg.architecture == "gemma2" || cfg.architecture == "gemma3") && is_norm_slot(slot);
    const DType dtype = is_quantized(w.dtype) || shifted ? quantized_as : options.dtype.value_or(w.dtype);
    const bool nf4 = options.nf4 && lora_target_of(slot).has_value();
    const int64_t n = w.rows * w.cols, blocks = ref::quant_blocks(n, kNf4Block);
    const int64_t bytes =
        nf4 ? ref::nf4_packed_bytes(n) + blocks + 4 * (ref::quant_blocks(blocks, kNf4NestedBlock) + 16 + 256)
            : n * int64_t(dtype_size(dtype));
    entries.push_back({fused ? hf_fused_weight_name(fused->qkv, layer) : hf_weight_name(cfg, slot, layer),
                       slot, layer, w, dtype, nf4, bytes});
  });

  // Greedy shards in slot order, each at most max_shard_bytes unless one tensor alone is larger.
  std::vector<std::vector<size_t>> shards(1);
  int64_t shard_bytes = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    if (!shards.back().empty() && shard_bytes + entries[i].bytes > options.max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(i);
    shard_bytes += entries[i].bytes;
  }

  StagedDir staged(dir);
  ordered_json weight_map = ordered_json::object();
  int64_t total_bytes = 0;
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string file = shards.size() == 1 ? "model.safetensors" : shard_name(s, shards.size());
    std::vector<Buffer> data;
    std::vector<SafetensorsWriteTensor> tensors;
    const auto add = [&](std::string name, StDType dtype, std::vector<int64_t> shape, const void* bytes,
                         size_t n_bytes) {
      weight_map[name] = file;
      total_bytes += int64_t(n_bytes);
      tensors.push_back({std::move(name), dtype, std::move(shape),
                         std::span<const std::byte>(static_cast<const std::byte*>(bytes), n_bytes)});
    };
    const auto buffer = [&](size_t bytes) { return data.emplace_back(bytes, MemTag::Weights, false).data(); };
    for (size_t i : shards[s]) {
      const Entry& e = entries[i];
      const bool shifted =
          (cfg.architecture == "gemma2" || cfg.architecture == "gemma3") && is_norm_slot(e.slot);
      const int64_t rows = e.w.rows, cols = e.w.cols, n = rows * cols;
      const std::optional<LoraTarget> t = lora_target_of(e.slot);
      const LoraAdapter* a = t && lora.at(e.layer, *t).active() ? &lora.at(e.layer, *t) : nullptr;
      const std::optional<FusedRows> fused = fused_rows(cfg, e.slot);
      const bool permute = unpermute && (e.slot == WeightSlot::Q || e.slot == WeightSlot::K ||
                                         e.slot == WeightSlot::QBias || e.slot == WeightSlot::KBias);
      const std::vector<int64_t> shape =
          rows == 1 ? std::vector<int64_t>{cols} : std::vector<int64_t>{rows, cols};
      if (!a && !fused && !permute && !e.nf4 && !shifted && e.dtype == e.w.dtype) {
        const size_t bytes = size_t(n) * dtype_size(e.dtype);
        add(e.name, to_st_dtype(e.dtype), shape, e.w.data, bytes);
        continue;
      }
      // A bias is one value per row of the projection: it is permuted as a column, in one tile.
      const bool bias = rows == 1;
      int64_t unit = permute && !bias ? cfg.head_dim : 1;
      // NF4 tiles start on a 64-element block (two codes per byte, blocks independent).
      if (e.nf4) unit = std::lcm(unit, kNf4Block / std::gcd(cols, int64_t(kNf4Block)));
      const int64_t step = bias ? 1 : tile_rows(rows, cols, unit, options.tile_elems);
      Buffer tile(size_t(step * cols) * sizeof(float), MemTag::Workspace, false);
      Buffer hf(permute ? tile.bytes() : 0, MemTag::Workspace, false);
      const int64_t blocks = ref::quant_blocks(n, kNf4Block);
      Buffer absmax(e.nf4 ? size_t(blocks) * sizeof(float) : 0, MemTag::Workspace, false);
      void* out = buffer(e.nf4 ? size_t(ref::nf4_packed_bytes(n)) : size_t(n) * dtype_size(e.dtype));
      for (int64_t r0 = 0; r0 < rows; r0 += step) {
        const int64_t nr = std::min(step, rows - r0);
        if (fused)
          fused_merged_rows(tile.as<float>(), base, lora, fused->qkv, e.layer, scale, r0, nr);
        else
          merged_rows(tile.as<float>(), e.w, a, scale, r0, nr);
        float* v = tile.as<float>();
        if (shifted)
          for (int64_t k = 0; k < nr * cols; ++k) v[k] -= 1.0f;
        if (permute) {
          permute_qk_rows(hf.as<float>(), v, bias ? cols : nr, bias ? 1 : cols, cfg.head_dim, false);
          v = hf.as<float>();
        }
        if (!e.nf4) {
          from_f32(static_cast<char*>(out) + r0 * cols * int64_t(dtype_size(e.dtype)), v, e.dtype, nr * cols);
          continue;
        }
        // What bitsandbytes would quantize: the merged weights as this export stores them without nf4.
        Buffer rounded(size_t(nr * cols) * dtype_size(e.dtype), MemTag::Workspace, false);
        from_f32(rounded.data(), v, e.dtype, nr * cols);
        cpu::dequantize_weight_tile(v, cols, WeightRef(rounded.data(), e.dtype, nr, cols), 0, nr, 0, cols);
        ref::quantize_nf4(v, nr * cols, static_cast<uint8_t*>(out) + r0 * cols / 2,
                          absmax.as<float>() + r0 * cols / kNf4Block);
      }
      if (!e.nf4) {
        add(e.name, to_st_dtype(e.dtype), shape, out, size_t(n) * dtype_size(e.dtype));
        continue;
      }
      const int64_t nested = ref::quant_blocks(blocks, kNf4NestedBlock);
      auto* codes = static_cast<uint8_t*>(buffer(size_t(blocks)));
      auto* nested_absmax = static_cast<float*>(buffer(size_t(nested) * sizeof(float)));
      const float offset = ref::double_quantize_absmax(absmax.as<float>(), blocks, codes, nested_absmax);
      // QuantState.as_dict(packed=True)'s JSON, spelled as Python's json.dumps spells it.
      const std::string state =
          "{\"quant_type\": \"nf4\", \"blocksize\": " + std::to_string(kNf4Block) + ", \"dtype\": \"" +
          torch_dtype_name(e.dtype) + "\", \"shape\": [" + std::to_string(rows) + ", " +
          std::to_string(cols) + "], \"nested_blocksize\": " + std::to_string(kNf4NestedBlock) +
          ", \"nested_dtype\": \"float32\", \"nested_offset\": " + ordered_json(double(offset)).dump() + "}";
      void* state_bytes = buffer(state.size());
      std::memcpy(state_bytes, state.data(), state.size());
      add(e.name, StDType::U8, {ref::nf4_packed_bytes(n), 1}, out, size_t(ref::nf4_packed_bytes(n)));
      add(e.name + ".absmax", StDType::U8, {blocks}, codes, size_t(blocks));
      add(e.name + ".quant_map", StDType::F32, {16}, kNf4Code, sizeof kNf4Code);
      add(e.name + ".nested_absmax", StDType::F32, {nested}, nested_absmax, size_t(nested) * sizeof(float));
      add(e.name + ".nested_quant_map", StDType::F32, {256}, ref::dynamic_map(), 256 * sizeof(float));
      add(e.name + ".quant_state.bitsandbytes__nf4", StDType::U8, {int64_t(state.size())}, state_bytes,
          state.size());
    }
    write_safetensors((staged.path() / file).string(), tensors, {{"format", "pt"}});
  }
  if (shards.size() > 1) {
    ordered_json index;
    index["metadata"] = {{"total_size", total_bytes}};
    index["weight_map"] = weight_map;
    write_file_synced((staged.path() / "model.safetensors.index.json").string(), index.dump(2) + "\n");
  }

  const fs::path base_dir = options.base_dir;
  std::error_code ec;
  const bool have_config = !options.base_dir.empty() && fs::exists(base_dir / "config.json", ec);
  // A base whose q/k rows are interleaved did not come with an HF config (it is a GGUF file).
  std::string config;
  if (have_config && !unpermute && !options.dtype) {
    config = read_file(base_dir / "config.json");
    ordered_json j = ordered_json::parse(config, nullptr, false);
    TF_CHECK(j.is_object(), (base_dir / "config.json").string(), ": is not a JSON object");
    // A quantized base's quantization_config describes its weights, not these.
    if (options.nf4 || j.contains("quantization_config")) {
      j.erase("quantization_config");
      if (options.nf4) j["quantization_config"] = bnb4bit_quantization_config(quantized_as);
      config = j.dump(2) + "\n";
    }
  } else {
    const DType embed =
        is_quantized(base.embed.dtype) ? quantized_as : options.dtype.value_or(base.embed.dtype);
    ordered_json j = hf_config_json(cfg, embed);
    if (options.nf4) j["quantization_config"] = bnb4bit_quantization_config(embed);
    config = j.dump(2) + "\n";
  }
  write_file_synced((staged.path() / "config.json").string(), config);
  if (!options.base_dir.empty()) {
    for (const char* name : kTokenizerFiles) {
      if (fs::exists(base_dir / name, ec))
        write_file_synced((staged.path() / name).string(), read_file(base_dir / name));
    }
  }
  staged.publish();
}

std::string describe(const MergedGgufSummary& s) {
  // For each written type: the base types it replaced, with how many of each.
  std::map<GgmlType, std::vector<std::pair<GgmlType, int>>> by_written;
  for (const auto& [types, n] : s.adapted) by_written[types.first].push_back({types.second, n});
  std::string line;
  for (const auto& [type, were] : by_written) {
    int count = 0;
    std::string from;
    for (const auto& [base_type, n] : were) {
      count += n;
      from += std::string(from.empty() ? "" : ", ") + (were.size() > 1 ? std::to_string(n) + " " : "") +
              ggml_type_info(uint32_t(base_type)).name;
    }
    line += std::to_string(count) + " adapted tensors written as " + ggml_type_info(uint32_t(type)).name +
            " (were " + from + "); ";
  }
  return line + std::to_string(s.copied) + " tensors copied as they are";
}

MergedGgufSummary export_merged_gguf(const std::string& path, const GgufFile& base, const LoraState& lora,
                                     RopeLayout lora_rows, const MergedGgufOptions& options) {
  const LlamaConfig cfg = llama_config_from_gguf(base);
  check_lora_fits(lora, cfg, base.path());
  TF_CHECK(options.keep_base_types || options.type == GgmlType::F16 || ref::ggml_quantizable(options.type),
           path, ": merged tensors are written as F16 or ", ref::quantizable_ggml_type_names(), ", not ",
           ggml_type_info(uint32_t(options.type)).name);
  const float scale = lora.config.scale();
  const bool permute = lora_rows == RopeLayout::SplitHalf && gguf_permutes_qk(cfg);

  // Each base tensor's adapter, or null for a tensor copied as it is.
  std::vector<const LoraAdapter*> adapters;
  // Each adapted tensor's module (phi3's attn_qkv and ffn_up take a fused one whole); a deque keeps
  // the pointers stable.
  std::deque<LoraAdapter> module_adapters;
  int n_active = 0, n_merged = 0;
  for (int l = 0; l < int(lora.layers.size()); ++l)
    for (const LoraModule& m : lora_modules(cfg)) n_active += lora.module(l, m).active() ? 1 : 0;
  // The base types that cannot be kept, with how many adapted tensors have each.
  std::map<GgmlType, int> not_writable;
  for (const GgufTensorInfo& ti : base.tensors()) {
    const auto parsed = parse_gguf_llama_tensor_name(ti.name);
    const std::optional<LoraTarget> t = !parsed || parsed->layer >= cfg.n_layers ? std::nullopt
                                        : parsed->role == GgufLlamaRole::AttnQkv
                                            ? std::optional(LoraTarget::Q)
                                            : target_of(parsed->role);
    const LoraAdapter* a = nullptr;
    if (t && lora.at(parsed->layer, *t).active())
      a = &module_adapters.emplace_back(lora.module(parsed->layer, lora_module_of(cfg, *t)));
    adapters.push_back(a);
    if (!a) continue;
    ++n_merged;
    TF_CHECK(ti.n_dims == 2 && ti.ne[0] == a->in && ti.ne[1] == a->out, base.path(), ": tensor '", ti.name,
             "' has ne [", ti.ne[0], ", ", ti.ne[1], "] but the adapter needs [", a->in, ", ", a->out, "]");
    TF_CHECK(dtype_of_ggml(ti.type), base.path(), ": tensor '", ti.name, "' is ",
             ggml_type_info(uint32_t(ti.type)).name,
             ", which tightfit cannot dequantize to merge into (it reads ", ref::dequantizable_type_names(),
             ")");
    if (options.keep_base_types && is_quantized(*dtype_of_ggml(ti.type)) && !ref::ggml_quantizable(ti.type))
      ++not_writable[ti.type];
  }
  TF_CHECK(n_merged == n_active, base.path(), ": only ", n_merged, " of the adapter's ", n_active,
           " projections have a tensor in the base");
  if (!not_writable.empty()) {
    std::string types;
    for (const auto& [type, n] : not_writable)
      types += std::string(types.empty() ? "" : ", ") + ggml_type_info(uint32_t(type)).name + " (" +
               std::to_string(n) + " tensor" + (n == 1 ? "" : "s") + ")";
    TF_FAIL(base.path(), ": the adapted tensors cannot all keep their type: tightfit quantizes to ",
            ref::quantizable_ggml_type_names(), ", not ", types, "; write them as F16 or one of those types");
  }

  GgufWriter w(base.alignment());
  for (const auto& [key, value] : base.metadata()) {
    // The writer states its own alignment; a base that is itself a merged export gets a new mark.
    if (key != "general.alignment" && key != kGgufExportKey) w.add_value(key, value);
  }
  w.add_string(kGgufExportKey, "merged");
  std::vector<Buffer> merged;  // must outlive write()
  MergedGgufSummary summary;
  for (size_t k = 0; k < base.tensors().size(); ++k) {
    const GgufTensorInfo& ti = base.tensors()[k];
    const std::vector<int64_t> ne(ti.ne.begin(), ti.ne.begin() + ti.n_dims);
    if (!adapters[k]) {
      w.add_tensor(ti.name, ti.type, ne, ti.data, size_t(ti.n_bytes));
      ++summary.copied;
      continue;
    }
    LoraAdapter a = *adapters[k];
    // (P B) A = P (B A): permuting B's rows puts the whole delta in GGUF's row order.
    Buffer b_gguf;
    const auto parsed = parse_gguf_llama_tensor_name(ti.name);
    if (permute && (parsed->role == GgufLlamaRole::AttnQ || parsed->role == GgufLlamaRole::AttnK)) {
      b_gguf = Buffer(size_t(a.out) * size_t(a.rank) * sizeof(float), MemTag::Lora, false);
      permute_qk_rows(b_gguf.as<float>(), a.B, a.out, a.rank, cfg.head_dim, true);
      a.B = b_gguf.as<float>();
    }

    const DType in_dtype = *dtype_of_ggml(ti.type);
    const GgmlType out_type =
        options.keep_base_types || (options.type == GgmlType::F16 && !is_quantized(in_dtype)) ? ti.type
                                                                                              : options.type;
    const int64_t rows = ti.ne[1], cols = ti.ne[0];
    const GgmlTypeInfo out_info = ggml_type_info(uint32_t(out_type));
    TF_CHECK(cols % out_info.block_elems == 0, base.path(), ": tensor '", ti.name, "' has rows of ", cols,
             " elements, not whole ", out_info.name, " blocks of ", out_info.block_elems);
    const int64_t row_bytes = cols / out_info.block_elems * out_info.block_bytes;
    merged.emplace_back(size_t(rows * row_bytes), MemTag::Weights, false);
    auto* out = merged.back().as<char>();
    const int64_t step = tile_rows(rows, cols, 1, options.tile_elems);
    Buffer tile(size_t(step * cols) * sizeof(float), MemTag::Workspace, false);
    const WeightRef wb(ti.data, in_dtype, rows, cols);
    for (int64_t r0 = 0; r0 < rows; r0 += step) {
      const int64_t nr = std::min(step, rows - r0);
      merged_rows(tile.as<float>(), wb, &a, scale, r0, nr);
      if (ref::ggml_quantizable(out_type))
        ref::quantize_rows_ggml(out_type, tile.as<float>(), nr * cols, out + r0 * row_bytes);
      else
        from_f32(out + r0 * row_bytes, tile.as<float>(), *dtype_of_ggml(out_type), nr * cols);
    }
    w.add_tensor(ti.name, out_type, ne, out, size_t(rows * row_bytes));
    ++summary.adapted[{out_type, ti.type}];
  }
  w.write(path);
  return summary;
}

}  // namespace tf::io
