#include "src/io/merge.h"

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <vector>

#include "kernels/cpu/dequant.h"
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

std::optional<LoraTarget> target_of(WeightSlot s) {
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

// LlamaWeights::slot without the write access it grants.
WeightRef slot_of(const LlamaWeights& w, WeightSlot s, int layer) {
  if (!is_layer_slot(s))
    return s == WeightSlot::Embed ? w.embed : s == WeightSlot::FinalNorm ? w.final_norm : w.lm_head;
  const BlockWeights& b = w.blocks[size_t(layer)];
  switch (s) {
    case WeightSlot::AttnNorm: return b.attn_norm;
    case WeightSlot::Q: return b.q;
    case WeightSlot::K: return b.k;
    case WeightSlot::V: return b.v;
    case WeightSlot::O: return b.o;
    case WeightSlot::QBias: return b.q_bias;
    case WeightSlot::KBias: return b.k_bias;
    case WeightSlot::VBias: return b.v_bias;
    case WeightSlot::MlpNorm: return b.mlp_norm;
    case WeightSlot::Gate: return b.gate;
    case WeightSlot::Up: return b.up;
    default: return b.down;
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

void to_f32(float* dst, const void* src, DType dtype, int64_t n) {
  switch (dtype) {
    case DType::F32: std::memcpy(dst, src, size_t(n) * 4); return;
    case DType::BF16:
    case DType::F16: {
      const auto* h = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = dtype == DType::BF16 ? bf16_to_f32(h[i]) : f16_to_f32(h[i]);
      return;
    }
    default: break;
  }
  TF_FAIL("merge: base weights must be f32, bf16 or f16, not ", dtype_name(dtype));
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
                        : arch == "mistral" ? "MistralForCausalLM"
                                            : "LlamaForCausalLM"};
  j["model_type"] = arch == "qwen2" || arch == "mistral" ? arch : "llama";
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
  j["mlp_bias"] = false;
  j["rope_theta"] = cfg.rope.theta;
  switch (cfg.rope.scaling) {
    case RopeScalingType::None: j["rope_scaling"] = nullptr; break;
    case RopeScalingType::Linear:
      j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", cfg.rope.factor}};
      break;
    case RopeScalingType::Llama3:
      j["rope_scaling"] = {{"rope_type", "llama3"},
                           {"factor", cfg.rope.factor},
                           {"low_freq_factor", cfg.rope.low_freq_factor},
                           {"high_freq_factor", cfg.rope.high_freq_factor},
                           {"original_max_position_embeddings", cfg.rope.original_max_positions}};
      break;
  }
  j["torch_dtype"] = torch_dtype_name(torch_dtype);
  return j;
}

void export_merged_hf(const std::string& dir, const LlamaWeights& base, const LoraState& lora,
                      const MergedHfOptions& options) {
  const LlamaConfig& cfg = base.config;
  check_lora_fits(lora, cfg, dir);
  TF_CHECK(options.max_shard_bytes > 0, dir, ": max_shard_bytes must be positive");
  const float scale = lora.config.scale();
  const bool unpermute = cfg.rope_layout == RopeLayout::Interleaved;

  struct Entry {
    std::string name;
    WeightSlot slot;
    int layer;
    WeightRef w;
  };
  std::vector<Entry> entries;
  LlamaWeights::for_each_slot(cfg, [&](WeightSlot slot, int layer) {
    entries.push_back({hf_weight_name(slot, layer), slot, layer, slot_of(base, slot, layer)});
  });

  // Greedy shards in slot order, each at most max_shard_bytes unless one tensor alone is larger.
  std::vector<std::vector<size_t>> shards(1);
  int64_t shard_bytes = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const WeightRef& w = entries[i].w;
    const int64_t bytes = w.rows * w.cols * int64_t(dtype_size(options.dtype.value_or(w.dtype)));
    if (!shards.back().empty() && shard_bytes + bytes > options.max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(i);
    shard_bytes += bytes;
  }

  StagedDir staged(dir);
  ordered_json weight_map = ordered_json::object();
  int64_t total_bytes = 0;
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string file = shards.size() == 1 ? "model.safetensors" : shard_name(s, shards.size());
    std::vector<Buffer> data;
    std::vector<SafetensorsWriteTensor> tensors;
    for (size_t i : shards[s]) {
      const Entry& e = entries[i];
      const int64_t n = e.w.rows * e.w.cols;
      const DType out_dtype = options.dtype.value_or(e.w.dtype);
      const size_t bytes = size_t(n) * dtype_size(out_dtype);
      const std::optional<LoraTarget> t = target_of(e.slot);
      const bool adapted = t && lora.at(e.layer, *t).active();
      const bool qk = e.slot == WeightSlot::Q || e.slot == WeightSlot::K || e.slot == WeightSlot::QBias ||
                      e.slot == WeightSlot::KBias;
      data.emplace_back(bytes, MemTag::Weights, false);
      if (adapted || (unpermute && qk) || out_dtype != e.w.dtype) {
        Buffer f32(size_t(n) * sizeof(float), MemTag::Workspace, false);
        to_f32(f32.as<float>(), e.w.data, e.w.dtype, n);
        if (adapted) merge_lora_delta(f32.as<float>(), lora.at(e.layer, *t), scale);
        if (unpermute && qk) {
          // A bias is one value per row of the projection: permute it as a column.
          const bool bias = e.w.rows == 1;
          Buffer hf(size_t(n) * sizeof(float), MemTag::Workspace, false);
          permute_qk_rows(hf.as<float>(), f32.as<float>(), bias ? e.w.cols : e.w.rows, bias ? 1 : e.w.cols,
                          cfg.head_dim, false);
          f32 = std::move(hf);
        }
        from_f32(data.back().data(), f32.as<float>(), out_dtype, n);
      } else {
        std::memcpy(data.back().data(), e.w.data, bytes);
      }
      std::vector<int64_t> shape =
          e.w.rows == 1 ? std::vector<int64_t>{e.w.cols} : std::vector<int64_t>{e.w.rows, e.w.cols};
      tensors.push_back({e.name, to_st_dtype(out_dtype), std::move(shape),
                         std::span<const std::byte>(data.back().as<std::byte>(), bytes)});
      weight_map[e.name] = file;
      total_bytes += int64_t(bytes);
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
  const std::string config =
      have_config && !unpermute && !options.dtype
          ? read_file(base_dir / "config.json")
          : hf_config_json(cfg, options.dtype.value_or(base.embed.dtype)).dump(2) + "\n";
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
  std::map<GgmlType, std::pair<int, std::string>> by_written;  // count, the base types it replaced
  for (const auto& [types, n] : s.adapted) {
    auto& [count, were] = by_written[types.first];
    count += n;
    were += std::string(were.empty() ? "" : ", ") + ggml_type_info(uint32_t(types.second)).name;
  }
  std::string line;
  for (const auto& [type, entry] : by_written)
    line += std::to_string(entry.first) + " adapted tensors written as " +
            ggml_type_info(uint32_t(type)).name + " (were " + entry.second + "); ";
  return line + std::to_string(s.copied) + " tensors copied as they are";
}

MergedGgufSummary export_merged_gguf(const std::string& path, const GgufFile& base, const LoraState& lora,
                                     RopeLayout lora_rows) {
  const LlamaConfig cfg = llama_config_from_gguf(base);
  check_lora_fits(lora, cfg, base.path());
  const float scale = lora.config.scale();
  const bool permute = lora_rows == RopeLayout::SplitHalf && gguf_permutes_qk(cfg);

  GgufWriter w(base.alignment());
  for (const auto& [key, value] : base.metadata()) {
    // The writer states its own alignment; a base that is itself a merged export gets a new mark.
    if (key != "general.alignment" && key != kGgufExportKey) w.add_value(key, value);
  }
  w.add_string(kGgufExportKey, "merged");
  std::vector<Buffer> merged;  // must outlive write()
  MergedGgufSummary summary;
  int n_merged = 0;
  for (const GgufTensorInfo& ti : base.tensors()) {
    const std::vector<int64_t> ne(ti.ne.begin(), ti.ne.begin() + ti.n_dims);
    const auto parsed = parse_gguf_llama_tensor_name(ti.name);
    const std::optional<LoraTarget> t =
        parsed && parsed->layer < cfg.n_layers ? target_of(parsed->role) : std::nullopt;
    if (!t || !lora.at(parsed->layer, *t).active()) {
      w.add_tensor(ti.name, ti.type, ne, ti.data, size_t(ti.n_bytes));
      ++summary.copied;
      continue;
    }
    LoraAdapter a = lora.at(parsed->layer, *t);
    TF_CHECK(ti.n_dims == 2 && ti.ne[0] == a.in && ti.ne[1] == a.out, base.path(), ": tensor '", ti.name,
             "' has ne [", ti.ne[0], ", ", ti.ne[1], "] but the adapter needs [", a.in, ", ", a.out, "]");
    Buffer f32(size_t(ti.n_elements) * sizeof(float), MemTag::Workspace, false);
    ref::dequantize_rows(ti.type, ti.data, ti.n_elements, f32.as<float>());
    // (P B) A = P (B A): permuting B's rows puts the whole delta in GGUF's row order.
    Buffer b_gguf;
    if (permute && (*t == LoraTarget::Q || *t == LoraTarget::K)) {
      b_gguf = Buffer(size_t(a.out) * size_t(a.rank) * sizeof(float), MemTag::Lora, false);
      permute_qk_rows(b_gguf.as<float>(), a.B, a.out, a.rank, cfg.head_dim, true);
      a.B = b_gguf.as<float>();
    }
    merge_lora_delta(f32.as<float>(), a, scale);

    const bool keep_type = ti.type == GgmlType::F32 || ti.type == GgmlType::F16 || ti.type == GgmlType::BF16;
    const GgmlType out_type = keep_type ? ti.type : GgmlType::F16;
    const DType out_dtype = out_type == GgmlType::F16    ? DType::F16
                            : out_type == GgmlType::BF16 ? DType::BF16
                                                         : DType::F32;
    const size_t bytes = size_t(ti.n_elements) * dtype_size(out_dtype);
    merged.emplace_back(bytes, MemTag::Weights, false);
    from_f32(merged.back().data(), f32.as<float>(), out_dtype, ti.n_elements);
    w.add_tensor(ti.name, out_type, ne, merged.back().data(), bytes);
    ++summary.adapted[{out_type, ti.type}];
    ++n_merged;
  }
  int n_active = 0;
  for (const auto& layer : lora.layers)
    for (const LoraAdapter& a : layer) n_active += a.active() ? 1 : 0;
  TF_CHECK(n_merged == n_active, base.path(), ": only ", n_merged, " of the adapter's ", n_active,
           " projections have a tensor in the base");
  w.write(path);
  return summary;
}

}  // namespace tf::io
