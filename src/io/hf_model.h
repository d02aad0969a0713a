// defines: HF model directories in: config.json -> tf::LlamaConfig, safetensors -> tf::LlamaWeights
#pragma once

#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>

#include "src/io/quantize_weights.h"
#include "src/io/safetensors.h"
#include "src/io/spill.h"
#include "src/model/weights.h"

namespace tf::io {

// A parsed HF config (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM; any other
// architecture is refused, naming it). Accepts both rope spellings: rope_theta + rope_scaling and
// transformers 5's rope_parameters. `source` names the file in errors.
LlamaConfig llama_config_from_hf(const nlohmann::json& j, const std::string& source);
LlamaConfig read_hf_config(const std::string& config_json_path);

// Views every base tensor of `cfg` in `model` by its HF name, checking shape and dtype (f32, bf16
// or f16; 1-D norm and bias vectors are [n]; with `bnb4bit`, a matrix may also be a bitsandbytes
// 4-bit NF4 weight, see bnb4bit_weight), then stores each matrix as `quant` says (store_weight).
// The weights keep `model` alive.
// With `spill`, per-layer tensors that convert go to a spill file (load_model).
LlamaWeights weights_from_safetensors(std::shared_ptr<const SafetensorsModel> model, const LlamaConfig& cfg,
                                      QuantMode quant = QuantMode::None, bool bnb4bit = false,
                                      const SpillOptions* spill = nullptr);

// A model directory: config.json plus model.safetensors or a sharded index. A bitsandbytes 4-bit
// checkpoint (quantization_config in config.json) computes with its NF4 weights under keep and
// nf4, dequantizes them under none (f32) and bf16, and refuses int8 (which would quantize twice).
LlamaWeights load_hf_model(const std::string& dir, QuantMode quant = QuantMode::None,
                           const SpillOptions* spill = nullptr);

}  // namespace tf::io
