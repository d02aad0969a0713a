// defines: tf::io::export_peft, import_peft, peft_tensor_name (LoRA adapters in the Hugging Face PEFT
//          format: adapter_config.json + adapter_model.safetensors)
#pragma once

#include <string>

#include "src/model/lora.h"

namespace tf::io {

// PEFT's name for one LoRA matrix of a Llama-family model, e.g.
// "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight" (A is [r, in], B is [out, r]).
std::string peft_tensor_name(int layer, LoraTarget t, bool is_b);
// A module's tensor: "base_model.model.model.layers.N.self_attn.qkv_proj.lora_A.weight" for Phi-3's.
std::string peft_tensor_name(int layer, const LoraModule& m, bool is_b);

// Writes `lora`'s parameters as a PEFT adapter directory `dir`: adapter_config.json (LORA,
// CAUSAL_LM, r, lora_alpha, lora_dropout, use_rslora, target_modules, base_model_name_or_path)
// and adapter_model.safetensors (f32). `model` is the model `lora` belongs to. PEFT adapters
// apply to HF checkpoints (transformers also reorders a GGUF's q/k rows into HF order when it
// loads one), so when `model` holds q/k rows in GGUF's interleaved order, B's q and k rows are
// written un-permuted to HF's split-half order. The directory is built beside `dir` and swapped in
// when complete, so an existing adapter there is replaced only by a complete new one.
void export_peft(const std::string& dir, const LoraState& lora, const LlamaConfig& model,
                 const std::string& base_model_name_or_path);

// A PEFT adapter read back: its LoRA config (rank, alpha, rslora, dropout, targets from
// adapter_config.json) and weights laid out for `model`, B's q/k rows permuted to GGUF's
// interleaved order when `model` holds its q/k rows in that order; the AdamW moments are zero.
struct PeftAdapter {
  LoraState lora;
  std::string base_model_name_or_path;
};

// Reads a PEFT LoRA adapter directory for `model`. Refuses, with a tf::Error naming the file and
// the problem: a missing or malformed adapter_config.json, a peft_type other than LORA, options
// this trainer does not implement (DoRA, biases, fan_in_fan_out, per-layer rank or alpha patterns,
// layers_to_transform, modules_to_save), target modules our Llama block does not have, tensors that
// are unknown, missing, of another rank or shape than the config and model imply. A, B in f32,
// bf16 or f16 are accepted (converted to f32).
PeftAdapter import_peft(const std::string& dir, const LlamaConfig& model);

}  // namespace tf::io
