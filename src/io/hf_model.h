// defines: HF model directories in: config.json -> tf::LlamaConfig, safetensors -> tf::LlamaWeights
#pragma once

#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>

#include "src/io/safetensors.h"
#include "src/model/weights.h"

namespace tf::io {

// A parsed HF config (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM; any other
// architecture is refused, naming it). Accepts both rope spellings: rope_theta + rope_scaling and
// transformers 5's rope_parameters. `source` names the file in errors.
LlamaConfig llama_config_from_hf(const nlohmann::json& j, const std::string& source);
LlamaConfig read_hf_config(const std::string& config_json_path);

// Views every base tensor of `cfg` in `model` by its HF name, checking shape and dtype (f32, bf16
// or f16; 1-D norm and bias vectors are [n]). The weights keep `model` alive.
LlamaWeights weights_from_safetensors(std::shared_ptr<const SafetensorsModel> model, const LlamaConfig& cfg);

// A model directory: config.json plus model.safetensors or a sharded index.
LlamaWeights load_hf_model(const std::string& dir);

}  // namespace tf::io
