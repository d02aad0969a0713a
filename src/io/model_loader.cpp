// defines: tf::io::load_model (HF directories and GGUF files: weights, tokenizer, chat template),
// weight_slot_of, read_hf_tokenizer, gguf_vocab
#include "src/io/model_loader.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "kernels/cpu/dequant.h"
#include "src/core/error.h"
#include "src/io/gguf_model.h"
#include "src/io/hf_model.h"

namespace tf::io {

namespace fs = std::filesystem;

namespace {

GgufLlamaTensor gguf_tensor_of(WeightSlot slot, int layer) {
  for (int r = 0; r <= int(GgufLlamaRole::Output); ++r)
    if (weight_slot_of(GgufLlamaRole(r)) == slot) {
      const bool global = !is_layer_slot(slot);
      return {GgufLlamaRole(r), global ? -1 : layer};
    }
  TF_FAIL("weight ", hf_weight_name(slot, layer), " has no GGUF tensor");
}

// Says when a mode quantized matrices that the file stores quantized in another type: their values
// are the new type's quantization of the old type's dequantized values, two roundings from the
// weights the file was made from.
void note_requantized(const LlamaWeights& source, QuantMode quant, const std::string& path) {
  std::map<std::string, int> from;
  LlamaWeights::for_each_slot(source.config, [&](WeightSlot slot, int layer) {
    const DType was = source.slot(slot, layer).dtype;
    if (is_matrix_slot(slot) && is_quantized(was) && is_quantized(stored_dtype(was, quant)) &&
        stored_dtype(was, quant) != was)
      ++from[std::string(dtype_name(was))];
  });
  if (from.empty()) return;
  std::string types;
  for (const auto& [name, count] : from)
    types += (types.empty() ? "" : ", ") + std::to_string(count) + " " + name;
  std::fprintf(stderr,
               "note: %s: --quant %s quantized again matrices the file stores quantized (%s): each was "
               "dequantized exactly and its values quantized to %s, a second rounding on top of the "
               "file's; --quant keep computes with the file's blocks as they are\n",
               path.c_str(), std::string(quant_mode_name(quant)).c_str(), types.c_str(),
               std::string(quant_mode_name(quant)).c_str());
}

LlamaWeights gguf_weights(std::shared_ptr<const GgufFile> f, const LlamaConfig& cfg, QuantMode quant,
                          const SpillOptions* spill) {
  // Every tensor is found and checked first, so that the spill file is sized, and refused, before
  // anything converts.
  LlamaWeights source;
  source.config = cfg;
  source.blocks.resize(size_t(cfg.n_layers));
  std::vector<std::string> names;
  LlamaWeights::for_each_slot(cfg, [&](WeightSlot slot, int layer) {
    // phi3's attn_qkv and ffn_up are split by rows; blocks run along a row, so a row range of any
    // ggml type is a matrix of its own, exactly.
    const std::optional<FusedRows> fused = fused_rows(cfg, slot);
    const GgufLlamaTensor role =
        fused ? GgufLlamaTensor{fused->qkv ? GgufLlamaRole::AttnQkv : GgufLlamaRole::FfnUp, layer}
              : gguf_tensor_of(slot, layer);
    const std::string name = gguf_llama_tensor_name(role);
    const GgufTensorInfo& t = f->tensor(name);
    const auto [rows, cols] = weight_shape(cfg, slot);
    const int64_t file_rows = fused ? fused->rows : rows;
    TF_CHECK(t.row_length() == cols && t.n_rows() == file_rows, f->path(), ": tensor ", name, " has ",
             t.n_rows(), " rows of ", t.row_length(), ", expected ", file_rows, " rows of ", cols);
    const GgmlTypeInfo info = ggml_type_info(uint32_t(t.type));
    const std::optional<DType> dtype = dtype_of_ggml(t.type);
    TF_CHECK(info.supported && dtype, f->path(), ": tensor ", name, " has ggml type ", info.name,
             ", which tightfit cannot dequantize (it reads ", ref::dequantizable_type_names(), ")");
    const int64_t offset = fused ? dtype_bytes(*dtype, fused->row0 * cols) : 0;
    source.slot(slot, layer) = WeightRef{t.data + offset, *dtype, rows, cols};
    names.push_back(fused ? hf_weight_name(slot, layer) : name);
    if (is_matrix_slot(slot)) check_storable(quant, cols, f->path() + ": tensor " + names.back());
  });
  const uint64_t spilled = spill ? spill_bytes(source, quant) : 0;
  const std::shared_ptr<SpillFile> file = spilled ? std::make_shared<SpillFile>(*spill, spilled) : nullptr;
  LlamaWeights w;
  w.config = cfg;
  w.blocks.resize(size_t(cfg.n_layers));
  size_t i = 0;
  LlamaWeights::for_each_slot(cfg, [&](WeightSlot slot, int layer) {
    const WeightRef& stored = source.slot(slot, layer);
    w.slot(slot, layer) = store_layer_weight(source, stored, is_matrix_slot(slot) ? quant : QuantMode::None,
                                             w, names[i++], file.get(), slot, layer);
    drop_source_pages(stored, w.slot(slot, layer));
  });
  if (file) SpillFile::attach(file, w);
  note_requantized(source, quant, f->path());
  if (cfg.tie_embeddings) w.lm_head = w.embed;
  // The data section, where every tensor kept as stored points (tensor offsets count from it).
  const GgufTensorInfo& first = f->tensors().front();
  w.files.push_back(MappedFile::of(f->path(), first.data - first.offset, f->data_offset(),
                                   f->file_size() - f->data_offset()));
  w.keepalive.push_back(f);
  return w;
}

nlohmann::json read_json_if_present(const fs::path& p) {
  if (!fs::exists(p)) return nullptr;
  std::ifstream in(p);
  nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  TF_CHECK(!j.is_discarded(), p.string(), ": not valid JSON");
  return j;
}

// tokenizer_config.json's special tokens may be strings or {"content": ...} objects.
std::string token_text(const nlohmann::json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string())
    return v["content"].get<std::string>();
  return {};
}

// The model's chat template as transformers finds it: chat_template.jinja (where transformers 5
// saves it) before tokenizer_config.json's chat_template, which is a string or a list of
// {name, template} of which the one named "default" is the chat template.
void read_chat_template(const fs::path& dir, const nlohmann::json& cfg, const std::string& where,
                        LoadedModel& m) {
  const fs::path jinja = dir / "chat_template.jinja";
  if (fs::exists(jinja)) {
    std::ifstream in(jinja, std::ios::binary);
    TF_CHECK(in, jinja.string(), ": cannot read the chat template");
    m.chat_template.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    m.chat_template_source = jinja.string();
    return;
  }
  if (!cfg.is_object() || !cfg.contains("chat_template") || cfg["chat_template"].is_null()) return;
  const nlohmann::json& t = cfg["chat_template"];
  m.chat_template_source = where + ": chat_template";
  if (t.is_string()) {
    m.chat_template = t.get<std::string>();
    return;
  }
  TF_CHECK(t.is_array(), where, ": chat_template must be a string or a list of {name, template}");
  std::string names;
  for (const nlohmann::json& e : t) {
    TF_CHECK(e.is_object() && e.contains("name") && e["name"].is_string() && e.contains("template") &&
                 e["template"].is_string(),
             where, ": each entry of the chat_template list must be {\"name\": ..., \"template\": ...}");
    const std::string name = e["name"].get<std::string>();
    if (name == "default") {
      m.chat_template = e["template"].get<std::string>();
      m.chat_template_source = where + ": chat_template \"default\"";
      return;
    }
    names += (names.empty() ? "" : ", ") + name;
  }
  TF_FAIL(where, ": the chat_template list has no template named \"default\" (it has ", names,
          "); choose a format with --template");
}

void load_hf_tokenizer(const fs::path& dir, LoadedModel& m) {
  m.tokenizer = read_hf_tokenizer(dir.string());
  const nlohmann::json cfg = read_json_if_present(dir / "tokenizer_config.json");
  const std::string where = (dir / "tokenizer_config.json").string();
  read_chat_template(dir, cfg, where, m);
  if (!cfg.is_object()) return;
  if (!m.tokenizer) return;
  auto id_of = [&](const char* key, int32_t fallback) {
    if (!cfg.contains(key)) return fallback;
    const std::string text = token_text(cfg[key]);
    if (text.empty()) return fallback;
    const auto id = m.tokenizer->token_to_id(text);
    TF_CHECK(id.has_value(), where, ": ", key, " \"", text, "\" is not in the vocabulary");
    return *id;
  };
  m.tokenizer->set_special_ids(id_of("bos_token", m.tokenizer->bos_id()),
                               id_of("eos_token", m.tokenizer->eos_id()),
                               id_of("pad_token", m.tokenizer->pad_id()));
  auto flag = [&](const char* key, bool fallback) {
    return cfg.contains(key) && cfg[key].is_boolean() ? cfg[key].get<bool>() : fallback;
  };
  m.tokenizer->set_add_bos_eos(flag("add_bos_token", m.tokenizer->adds_bos()),
                               flag("add_eos_token", m.tokenizer->adds_eos()));
}

}  // namespace

WeightSlot weight_slot_of(GgufLlamaRole role) {
  switch (role) {
    case GgufLlamaRole::TokenEmbd: return WeightSlot::Embed;
    case GgufLlamaRole::AttnNorm: return WeightSlot::AttnNorm;
    case GgufLlamaRole::AttnQ: return WeightSlot::Q;
    case GgufLlamaRole::AttnK: return WeightSlot::K;
    case GgufLlamaRole::AttnV: return WeightSlot::V;
    case GgufLlamaRole::AttnQBias: return WeightSlot::QBias;
    case GgufLlamaRole::AttnKBias: return WeightSlot::KBias;
    case GgufLlamaRole::AttnVBias: return WeightSlot::VBias;
    case GgufLlamaRole::AttnOutput: return WeightSlot::O;
    case GgufLlamaRole::FfnNorm: return WeightSlot::MlpNorm;
    case GgufLlamaRole::FfnGate: return WeightSlot::Gate;
    case GgufLlamaRole::FfnUp: return WeightSlot::Up;
    case GgufLlamaRole::FfnDown: return WeightSlot::Down;
    case GgufLlamaRole::AttnQNorm: return WeightSlot::QNorm;
    case GgufLlamaRole::AttnKNorm: return WeightSlot::KNorm;
    case GgufLlamaRole::AttnPostNorm: return WeightSlot::PostAttnNorm;
    case GgufLlamaRole::FfnPostNorm: return WeightSlot::PostMlpNorm;
    case GgufLlamaRole::OutputNorm: return WeightSlot::FinalNorm;
    case GgufLlamaRole::Output: return WeightSlot::LmHead;
    // The fused matrix whose first rows are q's (fused_rows).
    case GgufLlamaRole::AttnQkv: return WeightSlot::Q;
  }
  TF_FAIL("unknown GGUF tensor role");
}

std::unique_ptr<tok::Tokenizer> read_hf_tokenizer(const std::string& dir) {
  const fs::path json = fs::path(dir) / "tokenizer.json", model = fs::path(dir) / "tokenizer.model";
  if (fs::exists(json)) {
    try {
      return std::make_unique<tok::Tokenizer>(tok::Tokenizer::from_tokenizer_json(json.string()));
    } catch (const Error& e) {
      if (!fs::exists(model)) throw;
      std::fprintf(stderr, "note: %s; using the tokenizer.model beside it instead\n", e.what());
    }
  }
  if (fs::exists(model))
    return std::make_unique<tok::Tokenizer>(tok::Tokenizer::from_sentencepiece(model.string()));
  return nullptr;
}

tok::GgufVocab gguf_vocab(const GgufFile& f) {
  tok::GgufVocab v;
  v.model = std::string(f.get_string("tokenizer.ggml.model"));
  if (f.has("tokenizer.ggml.pre")) v.pre = std::string(f.get_string("tokenizer.ggml.pre"));
  for (std::string_view s : f.get_string_array("tokenizer.ggml.tokens")) v.tokens.emplace_back(s);
  if (f.has("tokenizer.ggml.scores")) v.scores = f.get_f32_array("tokenizer.ggml.scores");
  if (f.has("tokenizer.ggml.token_type")) v.token_types = f.get_i32_array("tokenizer.ggml.token_type");
  if (f.has("tokenizer.ggml.merges"))
    for (std::string_view s : f.get_string_array("tokenizer.ggml.merges")) v.merges.emplace_back(s);
  auto id = [&](const char* key) { return f.has(key) ? int32_t(f.get_int(key)) : -1; };
  v.bos_id = id("tokenizer.ggml.bos_token_id");
  v.eos_id = id("tokenizer.ggml.eos_token_id");
  v.unk_id = id("tokenizer.ggml.unknown_token_id");
  v.pad_id = id("tokenizer.ggml.padding_token_id");
  if (f.has("tokenizer.ggml.add_bos_token")) v.add_bos = f.get_bool("tokenizer.ggml.add_bos_token");
  if (f.has("tokenizer.ggml.add_eos_token")) v.add_eos = f.get_bool("tokenizer.ggml.add_eos_token");
  if (f.has("tokenizer.ggml.add_space_prefix"))
    v.add_space_prefix = f.get_bool("tokenizer.ggml.add_space_prefix");
  return v;
}

namespace {

// generation_config.json's eos_token_id: an id or a list of them, each a token of the vocabulary.
std::vector<int32_t> generation_stop_ids(const fs::path& dir, int64_t vocab) {
  const fs::path p = dir / "generation_config.json";
  const nlohmann::json j = read_json_if_present(p);
  if (!j.is_object() || !j.contains("eos_token_id") || j["eos_token_id"].is_null()) return {};
  const nlohmann::json& e = j["eos_token_id"];
  std::vector<int32_t> ids;
  for (const nlohmann::json& v : e.is_array() ? e : nlohmann::json::array({e})) {
    TF_CHECK(v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() < vocab, p.string(),
             ": eos_token_id holds ", v.dump(), ", which is not a token id of the vocabulary of ", vocab);
    ids.push_back(int32_t(v.get<int64_t>()));
  }
  return ids;
}

// A GGUF's end-of-turn ids beside EOS, each a token of the vocabulary.
std::vector<int32_t> gguf_stop_ids(const GgufFile& f, int64_t vocab) {
  std::vector<int32_t> ids;
  for (const char* key : {"tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"}) {
    if (!f.has(key)) continue;
    const int64_t id = f.get_int(key);
    TF_CHECK(id >= 0 && id < vocab, f.path(), ": ", key, " is ", id, ", not a token id of the vocabulary of ",
             vocab);
    ids.push_back(int32_t(id));
  }
  return ids;
}

}  // namespace

LoadedModel load_model(const std::string& path, bool with_weights, QuantMode quant,
                       const SpillOptions* spill) {
  LoadedModel m;
  m.source = path;
  TF_CHECK(fs::exists(path), path, ": no such model file or directory");
  if (fs::is_directory(path)) {
    m.format = ModelFormat::HfDirectory;
    m.weights = load_hf_model(path, quant, spill);
    load_hf_tokenizer(path, m);
    m.stop_ids = generation_stop_ids(path, m.weights.config.vocab);
  } else {
    m.format = ModelFormat::Gguf;
    auto f = std::make_shared<const GgufFile>(GgufFile::open(path));
    const LlamaConfig cfg = llama_config_from_gguf(*f);
    if (with_weights) {
      m.weights = gguf_weights(f, cfg, quant, spill);
    } else {
      m.weights.config = cfg;
    }
    if (f->has("tokenizer.ggml.model"))
      m.tokenizer =
          std::make_unique<tok::Tokenizer>(tok::Tokenizer::from_gguf_vocab(gguf_vocab(*f), f->path()));
    m.stop_ids = gguf_stop_ids(*f, cfg.vocab);
    if (f->has("tokenizer.chat_template")) {
      m.chat_template = std::string(f->get_string("tokenizer.chat_template"));
      m.chat_template_source = f->path() + ": tokenizer.chat_template";
    }
    m.gguf = std::move(f);
  }
  if (m.tokenizer)
    TF_CHECK(m.tokenizer->vocab_size() <= size_t(m.weights.config.vocab), path, ": the tokenizer has ",
             m.tokenizer->vocab_size(), " tokens but the model's vocabulary is ", m.weights.config.vocab);
  if (m.tokenizer && m.tokenizer->eos_id() >= 0) m.stop_ids.insert(m.stop_ids.begin(), m.tokenizer->eos_id());
  std::sort(m.stop_ids.begin(), m.stop_ids.end());
  m.stop_ids.erase(std::unique(m.stop_ids.begin(), m.stop_ids.end()), m.stop_ids.end());
  return m;
}

}  // namespace tf::io
