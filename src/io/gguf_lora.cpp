// defines: GGUF LoRA adapters (export_gguf_lora, import_gguf_lora: llama.cpp's names, q/k rows in its
// order), gguf_architecture, the q/k row permutation
#include "src/io/gguf_lora.h"

#include <cmath>
#include <cstring>
#include <map>
#include <optional>
#include <set>
#include <vector>

#include "kernels/cpu/dequant.h"
#include "src/core/error.h"
#include "src/io/gguf.h"
#include "src/io/gguf_model.h"

namespace tf::io {

namespace {

constexpr std::string_view kSuffixA = ".lora_a";
constexpr std::string_view kSuffixB = ".lora_b";
// As in the PEFT reader: far above any useful LoRA rank, and it bounds what a hostile file can
// make us allocate before the shapes are checked against the model.
constexpr int64_t kMaxRank = 4096;

GgufLlamaRole role_of(LoraTarget t) {
  switch (t) {
    case LoraTarget::Q: return GgufLlamaRole::AttnQ;
    case LoraTarget::K: return GgufLlamaRole::AttnK;
    case LoraTarget::V: return GgufLlamaRole::AttnV;
    case LoraTarget::O: return GgufLlamaRole::AttnOutput;
    case LoraTarget::Gate: return GgufLlamaRole::FfnGate;
    case LoraTarget::Up: return GgufLlamaRole::FfnUp;
    case LoraTarget::Down: return GgufLlamaRole::FfnDown;
    case LoraTarget::Count: break;
  }
  TF_FAIL("gguf lora: no GGUF tensor for LoRA target ", int(t));
}

std::optional<LoraTarget> target_of(GgufLlamaRole r) {
  for (int t = 0; t < kLoraTargetCount; ++t)
    if (role_of(LoraTarget(t)) == r) return LoraTarget(t);
  return std::nullopt;
}

bool is_qk(LoraTarget t) {
  return t == LoraTarget::Q || t == LoraTarget::K;
}

// B's q/k rows must be reordered between the adapter's base and a GGUF base of its family.
bool needs_permutation(const LlamaConfig& cfg) {
  return gguf_permutes_qk(cfg) && cfg.rope_layout == RopeLayout::SplitHalf;
}

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

}  // namespace

std::string gguf_architecture(const LlamaConfig& cfg) {
  const std::string& a = cfg.architecture;
  return a == "qwen2" || a == "qwen3" || a == "gemma2" || a == "gemma3" || a == "phi3" ? a : "llama";
}

bool gguf_permutes_qk(const LlamaConfig& cfg) {
  return gguf_architecture(cfg) == "llama";
}

int64_t gguf_qk_row_source(int64_t gguf_row, int head_dim) {
  TF_CHECK(head_dim > 0 && head_dim % 2 == 0, "q/k row permutation: head_dim ", head_dim, " must be even");
  const int64_t half = head_dim / 2;
  const int64_t head = gguf_row / head_dim;
  const int64_t within = gguf_row % head_dim;
  return head * head_dim + (within % 2) * half + within / 2;
}

void permute_qk_rows(float* dst, const float* src, int64_t rows, int64_t cols, int head_dim, bool to_gguf) {
  TF_CHECK(head_dim > 0 && rows % head_dim == 0, "q/k row permutation: ", rows,
           " rows are not a whole number of heads of ", head_dim);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t hf = gguf_qk_row_source(r, head_dim);
    const int64_t from = to_gguf ? hf : r;
    const int64_t to = to_gguf ? r : hf;
    std::memcpy(dst + to * cols, src + from * cols, size_t(cols) * sizeof(float));
  }
}

std::string gguf_lora_tensor_name(int layer, LoraTarget t, bool is_b) {
  return gguf_llama_tensor_name({role_of(t), layer}) + std::string(is_b ? kSuffixB : kSuffixA);
}

std::string gguf_lora_tensor_name(int layer, const LoraModule& m, bool is_b) {
  if (m.count == 1) return gguf_lora_tensor_name(layer, m.first, is_b);
  // phi3's names: attn_qkv, and ffn_up for gate and up together.
  const GgufLlamaRole role = m.first == LoraTarget::Q ? GgufLlamaRole::AttnQkv : GgufLlamaRole::FfnUp;
  return gguf_llama_tensor_name({role, layer}) + std::string(is_b ? kSuffixB : kSuffixA);
}

void export_gguf_lora(const std::string& path, const LoraState& lora, const LlamaConfig& base) {
  const bool permute = needs_permutation(base);
  GgufWriter w;
  w.add_string("general.architecture", gguf_architecture(base));
  w.add_string("general.type", "adapter");
  w.add_string("adapter.type", "lora");
  w.add_string(kGgufExportKey, "lora");
  w.add_f32("adapter.lora.alpha", lora.config.scale() * float(lora.config.rank));

  // Permuted copies of B must outlive write(), which reads the tensors' bytes.
  std::vector<Buffer> permuted;
  for (int l = 0; l < int(lora.layers.size()); ++l) {
    for (const LoraModule& m : lora_modules(lora.model)) {
      const LoraAdapter a = lora.module(l, m);
      if (!a.active()) continue;
      const size_t a_bytes = size_t(a.rank) * size_t(a.in) * sizeof(float);
      const size_t b_bytes = size_t(a.out) * size_t(a.rank) * sizeof(float);
      w.add_tensor(gguf_lora_tensor_name(l, m, false), GgmlType::F32, {a.in, a.rank}, a.A, a_bytes);
      const float* b = a.B;
      if (permute && m.count == 1 && is_qk(m.first)) {
        permuted.emplace_back(b_bytes, MemTag::Lora, false);
        permute_qk_rows(permuted.back().as<float>(), a.B, a.out, a.rank, base.head_dim, true);
        b = permuted.back().as<float>();
      }
      w.add_tensor(gguf_lora_tensor_name(l, m, true), GgmlType::F32, {a.rank, a.out}, b, b_bytes);
    }
  }
  w.write(path);
}

LoraState import_gguf_lora(const std::string& path, const LlamaConfig& model) {
  const GgufFile f = GgufFile::open(path);
  const auto string_key = [&](const char* key) -> std::string_view {
    const GgufValue* v = f.find(key);
    TF_CHECK(v && v->type == GgufValueType::String, path, ": ", key,
             v ? " is not a string" : " is missing; this is not a GGUF LoRA adapter");
    return v->str;
  };
  const std::string_view general_type = string_key("general.type");
  TF_CHECK(general_type == "adapter", path, ": general.type is '", general_type, "', expected 'adapter'");
  const std::string_view adapter_type = string_key("adapter.type");
  TF_CHECK(adapter_type == "lora", path, ": adapter.type is '", adapter_type,
           "'; only 'lora' adapters are read");
  const std::string_view arch = string_key("general.architecture");
  TF_CHECK(arch == gguf_architecture(model), path, ": adapter is for architecture '", arch,
           "' but the model is '", gguf_architecture(model), "'");
  double alpha = 0;
  if (f.has("adapter.lora.alpha")) alpha = f.get_float("adapter.lora.alpha");
  TF_CHECK(std::isfinite(alpha) && alpha >= 0, path, ": adapter.lora.alpha = ", alpha,
           " must be a finite non-negative number");

  // (layer, the module's first target) -> [A, B]
  std::map<std::pair<int, LoraTarget>, std::array<const GgufTensorInfo*, 2>> pairs;
  int64_t rank = -1;
  for (const GgufTensorInfo& ti : f.tensors()) {
    const bool is_b = ends_with(ti.name, kSuffixB);
    TF_CHECK(is_b || ends_with(ti.name, kSuffixA), path, ": tensor '", ti.name,
             "' is not a LoRA tensor (expected <base tensor>.lora_a or .lora_b)");
    const std::string_view base_name = std::string_view(ti.name).substr(0, ti.name.size() - kSuffixA.size());
    const auto parsed = parse_gguf_llama_tensor_name(base_name);
    const auto target = !parsed                                  ? std::nullopt
                        : parsed->role == GgufLlamaRole::AttnQkv ? std::optional(LoraTarget::Q)
                                                                 : target_of(parsed->role);
    TF_CHECK(target.has_value(), path, ": tensor '", ti.name,
             "' does not adapt a projection (attn_q/k/v/qkv/output, ffn_gate/up/down) of a block");
    TF_CHECK(parsed->layer < model.n_layers, path, ": tensor '", ti.name, "' is for block ", parsed->layer,
             " but the model has ", model.n_layers, " blocks");
    // A fused model's adapters are on its fused matrices whole, an unfused model's on each projection.
    const LoraModule module = lora_module_of(model, *target);
    const std::string want_name = gguf_lora_tensor_name(parsed->layer, module, is_b);
    TF_CHECK(ti.name == want_name, path, ": tensor '", ti.name, "' adapts ", lora_target_name(*target),
             " of a ", gguf_architecture(model), " model, whose adapter on it is '", want_name, "' (module ",
             module.name, ")");
    TF_CHECK(ti.type == GgmlType::F32 || ti.type == GgmlType::F16 || ti.type == GgmlType::BF16, path,
             ": tensor '", ti.name, "' is ", ggml_type_info(uint32_t(ti.type)).name,
             "; LoRA tensors must be F32, F16 or BF16");
    const auto [in, out] = lora_module_dims(model, module);
    TF_CHECK(ti.n_dims == 2, path, ": tensor '", ti.name, "' has ", ti.n_dims, " dims, expected 2");
    const int64_t r = is_b ? ti.ne[0] : ti.ne[1];
    TF_CHECK(r >= 1 && r <= kMaxRank, path, ": tensor '", ti.name, "' has rank ", r, ", outside [1, ",
             kMaxRank, "]");
    TF_CHECK(rank < 0 || r == rank, path, ": tensor '", ti.name, "' has rank ", r,
             " but other tensors have rank ", rank, "; tightfit needs one rank for all projections");
    rank = r;
    const int64_t want0 = is_b ? r : in;
    const int64_t want1 = is_b ? out : r;
    TF_CHECK(ti.ne[0] == want0 && ti.ne[1] == want1, path, ": tensor '", ti.name, "' has ne [", ti.ne[0],
             ", ", ti.ne[1], "] but the model needs [", want0, ", ", want1, "]");
    pairs[{parsed->layer, module.first}][is_b ? 1 : 0] = &ti;
  }
  TF_CHECK(!pairs.empty(), path, ": the adapter holds no LoRA tensors");

  LoraConfig lc;
  lc.rank = int(rank);
  // llama.cpp reads a zero (or absent) alpha as "no scaling"; alpha = rank gives that scale of 1.
  lc.alpha = alpha == 0 ? float(rank) : float(alpha);
  lc.dropout = 0;
  lc.targets = 0;
  for (const auto& [key, ab] : pairs) lc.targets |= lora_module_of(model, key.second).mask();
  for (int l = 0; l < model.n_layers; ++l) {
    for (const LoraModule& m : lora_modules(model)) {
      if (!lc.has(m.first)) continue;
      const auto it = pairs.find({l, m.first});
      for (bool is_b : {false, true}) {
        TF_CHECK(it != pairs.end() && it->second[is_b ? 1 : 0], path, ": tensor '",
                 gguf_lora_tensor_name(l, m, is_b), "' is missing (other blocks adapt ", m.name,
                 ", and every block must)");
      }
    }
  }

  LoraState lora(model, lc);
  const bool permute = needs_permutation(model);
  for (const auto& [key, ab] : pairs) {
    const LoraModule m = lora_module_of(model, key.second);
    const LoraAdapter a = lora.module(key.first, m);
    ref::dequantize_rows(ab[0]->type, ab[0]->data, ab[0]->n_elements, a.A);
    if (permute && m.count == 1 && is_qk(key.second)) {
      Buffer gguf_order(size_t(ab[1]->n_elements) * sizeof(float), MemTag::Lora, false);
      ref::dequantize_rows(ab[1]->type, ab[1]->data, ab[1]->n_elements, gguf_order.as<float>());
      permute_qk_rows(a.B, gguf_order.as<float>(), a.out, a.rank, model.head_dim, false);
    } else {
      ref::dequantize_rows(ab[1]->type, ab[1]->data, ab[1]->n_elements, a.B);
    }
  }
  return lora;
}

}  // namespace tf::io
