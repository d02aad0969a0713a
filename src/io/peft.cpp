// defines: PEFT adapter directories (export_peft, import_peft: adapter_config.json and
// adapter_model.safetensors in PEFT's names, B's q/k rows in HF's order), peft_tensor_name
#include "src/io/peft.h"

#include <unistd.h>

#include <charconv>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "src/core/dtype.h"
#include "src/core/error.h"
#include "src/io/durable.h"
#include "src/io/gguf_lora.h"
#include "src/io/safetensors.h"

namespace tf::io {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using nlohmann::ordered_json;

constexpr const char* kConfigFile = "adapter_config.json";
constexpr const char* kWeightsFile = "adapter_model.safetensors";
constexpr std::string_view kPrefix = "base_model.model.model.layers.";

// PEFT files hold q/k rows in HF's split-half order; a model in GGUF's interleaved order needs its
// B rows of q and k reordered on the way out and in.
bool reorders_rows(const LlamaConfig& model, LoraTarget t) {
  return model.rope_layout == RopeLayout::Interleaved && (t == LoraTarget::Q || t == LoraTarget::K);
}

const char* block_of(LoraTarget t) {
  return t == LoraTarget::Gate || t == LoraTarget::Up || t == LoraTarget::Down ? "mlp" : "self_attn";
}

// (layer, module, is_b) of a PEFT tensor name of one of the model's modules, or nothing when it is
// not one.
struct ParsedName {
  int layer;
  LoraModule module;
  bool is_b;
};

std::optional<ParsedName> parse_tensor_name(std::string_view name, const LlamaConfig& model) {
  if (name.substr(0, kPrefix.size()) != kPrefix) return std::nullopt;
  name.remove_prefix(kPrefix.size());
  int layer = 0;
  const auto [end, ec] = std::from_chars(name.data(), name.data() + name.size(), layer);
  // Digits only, without leading zeros, so each tensor has exactly one spelling.
  if (ec != std::errc() || layer < 0 || (name[0] == '0' && end - name.data() > 1)) return std::nullopt;
  name.remove_prefix(size_t(end - name.data()));
  for (const LoraModule& m : lora_modules(model)) {
    for (bool is_b : {false, true}) {
      std::string rest = ".";
      rest.append(block_of(m.first)).append(".").append(m.name);
      rest.append(is_b ? ".lora_B.weight" : ".lora_A.weight");
      if (name == rest) return ParsedName{layer, m, is_b};
    }
  }
  return std::nullopt;
}

// The model's module names, for messages: "q_proj, k_proj, ..." or "qkv_proj, o_proj, ...".
std::string module_names(const LlamaConfig& model) {
  std::string names;
  for (const LoraModule& m : lora_modules(model)) names += (names.empty() ? "" : ", ") + std::string(m.name);
  return names;
}

json read_config(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  TF_CHECK(in, path.string(), ": missing; ", path.parent_path().string(),
           " is not a PEFT adapter directory (it needs adapter_config.json and adapter_model.safetensors)");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  try {
    json j = json::parse(text);
    TF_CHECK(j.is_object(), path.string(), ": expected a JSON object");
    return j;
  } catch (const json::exception& e) {
    TF_FAIL(path.string(), ": not valid JSON: ", e.what());
  }
}

// Fills `dst` (n floats) from a tensor stored as F32, BF16 or F16.
void to_f32(float* dst, const SafetensorsTensor& t) {
  const size_t n = size_t(t.numel());
  const std::byte* src = t.bytes.data();
  switch (t.dtype) {
    case StDType::F32: std::memcpy(dst, src, n * 4); return;
    case StDType::BF16:
    case StDType::F16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = t.dtype == StDType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
      }
      return;
    default: break;
  }
  TF_FAIL("unreachable dtype for ", t.name);
}

}  // namespace

std::string peft_tensor_name(int layer, LoraTarget t, bool is_b) {
  return peft_tensor_name(layer, LoraModule{t, 1, lora_target_name(t)}, is_b);
}

std::string peft_tensor_name(int layer, const LoraModule& m, bool is_b) {
  return std::string(kPrefix) + std::to_string(layer) + "." + block_of(m.first) + "." + m.name +
         (is_b ? ".lora_B.weight" : ".lora_A.weight");
}

void export_peft(const std::string& dir, const LoraState& lora, const LlamaConfig& model,
                 const std::string& base_model_name_or_path) {
  fs::path final_dir = fs::path(dir).lexically_normal();
  if (!final_dir.has_filename()) final_dir = final_dir.parent_path();  // "out/adapter/"
  const fs::path parent = final_dir.has_parent_path() ? final_dir.parent_path() : fs::path(".");
  std::error_code ec;
  fs::create_directories(parent, ec);
  TF_CHECK(!ec, parent.string(), ": cannot create: ", ec.message());
  std::string staged_name = ".";
  staged_name.append(final_dir.filename().string()).append(".tmp-").append(std::to_string(::getpid()));
  const fs::path staged = parent / staged_name;
  fs::remove_all(staged, ec);
  fs::create_directory(staged, ec);
  TF_CHECK(!ec, staged.string(), ": cannot create: ", ec.message());

  try {
    std::vector<SafetensorsWriteTensor> tensors;
    // HF-ordered copies of B must outlive write_safetensors, which reads the tensors' bytes.
    std::vector<Buffer> hf_rows;
    ordered_json modules = ordered_json::array();
    for (const LoraModule& m : lora_modules(model)) {
      if (lora.config.has(m.first)) modules.push_back(m.name);
    }
    for (int l = 0; l < int(lora.layers.size()); ++l) {
      for (const LoraModule& m : lora_modules(model)) {
        const LoraAdapter a = lora.module(l, m);
        if (!a.active()) continue;
        const float* b = a.B;
        if (m.count == 1 && reorders_rows(model, m.first)) {
          hf_rows.emplace_back(size_t(a.out) * size_t(a.rank) * sizeof(float), MemTag::Lora, false);
          permute_qk_rows(hf_rows.back().as<float>(), a.B, a.out, a.rank, model.head_dim, false);
          b = hf_rows.back().as<float>();
        }
        tensors.push_back({peft_tensor_name(l, m, false),
                           StDType::F32,
                           {a.rank, a.in},
                           std::as_bytes(std::span<const float>(a.A, size_t(a.rank) * size_t(a.in)))});
        tensors.push_back({peft_tensor_name(l, m, true),
                           StDType::F32,
                           {a.out, a.rank},
                           std::as_bytes(std::span<const float>(b, size_t(a.out) * size_t(a.rank)))});
      }
    }
    // save_pretrained writes this metadata; some loaders check it.
    write_safetensors((staged / kWeightsFile).string(), tensors, {{"format", "pt"}});

    // The fields PEFT's LoraConfig serialises, at the values that mean "plain LoRA". Older PEFT
    // versions refuse keys they do not know, so keys added only recently (lora_bias, eva_config,
    // exclude_modules, ...) are left out; a loader fills in their defaults.
    ordered_json cfg;
    cfg["alpha_pattern"] = ordered_json::object();
    cfg["auto_mapping"] = nullptr;
    cfg["base_model_name_or_path"] = base_model_name_or_path;
    cfg["bias"] = "none";
    cfg["fan_in_fan_out"] = false;
    cfg["inference_mode"] = true;
    cfg["init_lora_weights"] = true;
    cfg["layers_pattern"] = nullptr;
    cfg["layers_to_transform"] = nullptr;
    cfg["lora_alpha"] = lora.config.alpha;
    cfg["lora_dropout"] = lora.config.dropout;
    cfg["modules_to_save"] = nullptr;
    cfg["peft_type"] = "LORA";
    cfg["r"] = lora.config.rank;
    cfg["rank_pattern"] = ordered_json::object();
    cfg["revision"] = nullptr;
    cfg["target_modules"] = modules;
    cfg["task_type"] = "CAUSAL_LM";
    cfg["use_dora"] = false;
    cfg["use_rslora"] = lora.config.rslora;
    write_file_synced((staged / kConfigFile).string(), cfg.dump(2) + "\n");
    fsync_dir(staged.string());
    replace_dir(staged.string(), final_dir.string());
  } catch (...) {
    fs::remove_all(staged, ec);
    throw;
  }
}

PeftAdapter import_peft(const std::string& dir, const LlamaConfig& model) {
  const fs::path root(dir);
  const fs::path cfg_path = root / kConfigFile;
  const std::string where = cfg_path.string();
  const json cfg = read_config(cfg_path);

  LoraConfig lc;
  std::string base_model;
  try {
    TF_CHECK(cfg.contains("peft_type") && cfg.at("peft_type").is_string(), where, ": no peft_type");
    const std::string type = cfg.at("peft_type").get<std::string>();
    TF_CHECK(type == "LORA", where, ": peft_type is '", type, "'; only LORA adapters can be loaded");
    TF_CHECK(cfg.contains("r") && cfg.at("r").is_number_integer(), where,
             ": r (the LoRA rank) must be an integer");
    lc.rank = cfg.at("r").get<int>();
    TF_CHECK(lc.rank >= 1 && lc.rank <= 4096, where, ": r = ", lc.rank, " is outside [1, 4096]");
    TF_CHECK(cfg.contains("lora_alpha") && cfg.at("lora_alpha").is_number(), where,
             ": lora_alpha must be a number");
    lc.alpha = cfg.at("lora_alpha").get<float>();
    TF_CHECK(lc.alpha > 0, where, ": lora_alpha must be positive, got ", lc.alpha);
    lc.rslora = cfg.value("use_rslora", false);
    lc.dropout = cfg.value("lora_dropout", 0.0f);
    TF_CHECK(lc.dropout >= 0 && lc.dropout < 1, where, ": lora_dropout must be in [0, 1), got ", lc.dropout);
    const auto refuse_set = [&](const char* key, const char* meaning) {
      if (!cfg.contains(key)) return;
      const json& v = cfg.at(key);
      const bool set = !(v.is_null() || (v.is_boolean() && !v.get<bool>()) || (v.is_object() && v.empty()) ||
                         (v.is_array() && v.empty()));
      TF_CHECK(!set, where, ": ", key, " = ", v.dump(), " (", meaning, ") is not supported by tightfit");
    };
    refuse_set("use_dora", "DoRA");
    refuse_set("fan_in_fan_out", "transposed weights");
    refuse_set("rank_pattern", "per-module ranks");
    refuse_set("alpha_pattern", "per-module alphas");
    refuse_set("layers_to_transform", "adapting only some layers");
    refuse_set("modules_to_save", "fully trained extra modules");
    const std::string bias = cfg.value("bias", "none");
    TF_CHECK(bias == "none", where, ": bias = '", bias, "' (trained biases) is not supported by tightfit");
    const json& tm = cfg.contains("target_modules") ? cfg.at("target_modules") : json();
    TF_CHECK(tm.is_array() && !tm.empty(), where,
             ": target_modules must be a non-empty list of module names, got ", tm.dump());
    lc.targets = 0;
    for (const json& m : tm) {
      TF_CHECK(m.is_string(), where, ": target_modules holds a non-string ", m.dump());
      const std::string mod = m.get<std::string>();
      bool known = false;
      for (const LoraModule& lm : lora_modules(model)) {
        if (mod == lm.name) {
          lc.targets |= lm.mask();
          known = true;
        }
      }
      TF_CHECK(known, where, ": target module '", mod, "' is not a projection of the ", model.architecture,
               " block (", module_names(model), ")");
    }
    base_model = cfg.value("base_model_name_or_path", "");
  } catch (const json::exception& e) {
    TF_FAIL(where, ": malformed adapter config: ", e.what());
  }

  const fs::path weights_path = root / kWeightsFile;
  std::error_code ec;
  TF_CHECK(fs::exists(weights_path, ec), weights_path.string(), ": missing",
           fs::exists(root / "adapter_model.bin", ec)
               ? " (only adapter_model.bin is present: pickled adapters are "
                 "not read; re-save it with safe_serialization=True)"
               : "");
  const SafetensorsFile file = SafetensorsFile::open(weights_path.string());
  PeftAdapter out{LoraState(model, lc), base_model};
  LoraState& lora = out.lora;
  std::memset(lora.params.data(), 0, lora.params.bytes());

  std::set<std::string> seen;
  for (const SafetensorsTensor& t : file.tensors()) {
    const auto parsed = parse_tensor_name(t.name, model);
    TF_CHECK(
        parsed.has_value(), file.path(), ": unexpected tensor ", t.name,
        " (expected base_model.model.model.layers.N.<self_attn|mlp>.<module>.lora_<A|B>.weight, module one "
        "of ",
        module_names(model), ")");
    TF_CHECK(parsed->layer < model.n_layers, file.path(), ": tensor ", t.name, " is for layer ",
             parsed->layer, " but the model has ", model.n_layers, " layers");
    TF_CHECK(lc.has(parsed->module.first), file.path(), ": tensor ", t.name, " adapts ", parsed->module.name,
             ", which is not in target_modules of ", where);
    const LoraAdapter a = lora.module(parsed->layer, parsed->module);
    TF_CHECK(t.dtype == StDType::F32 || t.dtype == StDType::BF16 || t.dtype == StDType::F16, file.path(),
             ": tensor ", t.name, " is ", st_dtype_name(t.dtype), "; LoRA weights must be F32, BF16 or F16");
    const std::vector<int64_t> want =
        parsed->is_b ? std::vector<int64_t>{a.out, a.rank} : std::vector<int64_t>{a.rank, a.in};
    if (t.shape.size() == 2) {
      const int64_t rank = parsed->is_b ? t.shape[1] : t.shape[0];
      TF_CHECK(rank == a.rank, file.path(), ": tensor ", t.name, " ", t.shape_str(), " has rank ", rank,
               " but ", where, " says r = ", a.rank);
    }
    TF_CHECK(t.shape == want, file.path(), ": tensor ", t.name, " has shape ", t.shape_str(),
             " but the model needs [", want[0], ", ", want[1], "]");
    if (parsed->is_b && parsed->module.count == 1 && reorders_rows(model, parsed->module.first)) {
      Buffer hf_order(size_t(t.numel()) * sizeof(float), MemTag::Lora, false);
      to_f32(hf_order.as<float>(), t);
      permute_qk_rows(a.B, hf_order.as<float>(), a.out, a.rank, model.head_dim, true);
    } else {
      to_f32(parsed->is_b ? a.B : a.A, t);
    }
    seen.insert(t.name);
  }
  for (int l = 0; l < model.n_layers; ++l) {
    for (const LoraModule& m : lora_modules(model)) {
      if (!lc.has(m.first)) continue;
      for (bool is_b : {false, true}) {
        const std::string name = peft_tensor_name(l, m, is_b);
        TF_CHECK(seen.count(name), file.path(), ": tensor ", name, " is missing (target_modules in ", where,
                 " lists ", m.name, " and the model has ", model.n_layers, " layers)");
      }
    }
  }
  return out;
}

}  // namespace tf::io
