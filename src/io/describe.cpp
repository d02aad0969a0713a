#include "src/io/describe.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "src/io/hf_model.h"
#include "src/io/model_loader.h"
#include "src/io/spill.h"

namespace tf::io {

namespace fs = std::filesystem;

namespace {

// What size computations read of a described NF4 weight's scales: whether they are
// double-quantized (a non-null `nested`). Nothing is ever read through it.
const float kDescribedNested = 0.0f;

DType config_dtype(const nlohmann::json& j, const std::string& source) {
  if (!j.contains("torch_dtype")) return DType::BF16;
  const nlohmann::json& t = j["torch_dtype"];
  TF_CHECK(t.is_string(), source, ": torch_dtype must be a string, got ", t.dump());
  const std::string name = t.get<std::string>();
  if (name == "bfloat16") return DType::BF16;
  if (name == "float16") return DType::F16;
  if (name == "float32") return DType::F32;
  TF_FAIL(source, ": torch_dtype \"", name, "\" is not a dtype tightfit loads (bfloat16, float16, float32)");
}

nlohmann::json read_config(const std::string& path) {
  std::ifstream in(path);
  TF_CHECK(in, path, ": cannot open model config");
  nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  TF_CHECK(j.is_object(), path, ": not a JSON object");
  return j;
}

bool has_safetensors(const fs::path& dir) {
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".safetensors") return true;
  return false;
}

uint64_t weight_file_bytes(const fs::path& path) {
  if (!fs::is_directory(path)) return fs::file_size(path);
  uint64_t n = 0;
  for (const auto& e : fs::directory_iterator(path))
    if (e.path().extension() == ".safetensors") n += fs::file_size(e.path());
  return n;
}

// Every matrix as `mode` stores it; norms and biases stay float (f32 where the file quantized one).
void apply_mode(ModelDescription& d, QuantMode mode) {
  LlamaWeights& w = d.weights;
  w.config = d.source.config;
  w.blocks.resize(d.source.blocks.size());
  LlamaWeights::for_each_slot(w.config, [&](WeightSlot s, int layer) {
    const WeightRef& source = d.source.slot(s, layer);
    WeightRef& r = w.slot(s, layer);
    r = source;
    const DType to = stored_dtype(r.dtype, is_matrix_slot(s) ? mode : QuantMode::None);
    if (is_matrix_slot(s) && to != r.dtype)
      check_storable(mode, r.cols, d.path + ": " + hf_weight_name(s, layer));
    // A weight whose absmax the loader decoded (bnb4bit_rows) is in memory of its own, as if
    // converted, and goes to the spill file under --weights disk.
    const bool in_memory = kept_in_memory(d.source, source);
    if (to == r.dtype && !in_memory) {
      d.kept_bytes += uint64_t(stored_bytes(r));
      return;
    }
    d.source_converted_bytes += uint64_t(stored_bytes(source));
    d.dropped_bytes +=
        droppable_bytes(source.data, uint64_t(dtype_bytes(source.dtype, source.rows * source.cols)));
    r = WeightRef(nullptr, to, r.rows, r.cols);
    if (to == DType::NF4 && !in_memory) r.scales.nested = &kDescribedNested;
    d.stored_bytes += uint64_t(stored_bytes(r));
  });
  if (w.config.tie_embeddings) w.lm_head = w.embed;
  w.files = d.source.files;
}

}  // namespace

ModelDescription describe_model(const std::string& path, QuantMode quant) {
  TF_CHECK(fs::exists(path), path, ": no such model file or directory");
  ModelDescription d;
  d.path = path;
  const bool config_file = !fs::is_directory(path) && fs::path(path).extension() == ".json";
  if (config_file || (fs::is_directory(path) && !has_safetensors(path))) {
    const std::string cfg_path = config_file ? path : (fs::path(path) / "config.json").string();
    const nlohmann::json j = read_config(cfg_path);
    d.config_only = true;
    LlamaWeights& w = d.source;
    w.config = llama_config_from_hf(j, cfg_path);
    w.blocks.resize(size_t(w.config.n_layers));
    const DType dtype = config_dtype(j, cfg_path);
    LlamaWeights::for_each_slot(w.config, [&](WeightSlot s, int layer) {
      const auto [rows, cols] = weight_shape(w.config, s);
      w.slot(s, layer) = WeightRef(nullptr, dtype, rows, cols);
      d.file_bytes += uint64_t(stored_bytes(w.slot(s, layer)));
    });
    if (w.config.tie_embeddings) w.lm_head = w.embed;
  } else {
    // Under keep the loader maps the files and validates their headers; no tensor is read.
    LoadedModel m = load_model(path, true, QuantMode::Keep);
    d.source = std::move(m.weights);
    d.file_bytes = weight_file_bytes(path);
    if (m.gguf) d.gguf_metadata_bytes = m.gguf->data_offset();
    for (const char* name : {"tokenizer.json", "tokenizer.model"}) {
      const fs::path t = fs::path(path) / name;
      if (fs::is_directory(path) && fs::exists(t)) {
        d.tokenizer_file_bytes = fs::file_size(t);
        break;
      }
    }
  }
  apply_mode(d, quant);
  return d;
}

}  // namespace tf::io
