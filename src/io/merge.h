// defines: tf::io::merge_lora_delta (W += scale * B A in f32), export_merged_hf (the base with the
//          adapter merged, as an HF safetensors directory), export_merged_gguf (the same as a GGUF
//          file, from a GGUF base) and its MergedGgufSummary, hf_config_json (an HF config.json for a
//          tf::LlamaConfig)
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <utility>

#include "src/io/gguf.h"
#include "src/model/lora.h"
#include "src/model/weights.h"

namespace tf::io {

// w ([a.out, a.in] f32, row-major) += scale * B A, the change LoRA makes to the projection's
// weight (y = x W^T + scale x A^T B^T = x (W + scale B A)^T).
void merge_lora_delta(float* w, const LoraAdapter& a, float scale);

// An HF config.json describing `cfg` (architectures, model_type, sizes, rope, tying, biases) and
// `torch_dtype`.
nlohmann::ordered_json hf_config_json(const LlamaConfig& cfg, DType torch_dtype);

struct MergedHfOptions {
  // The base's HF directory, or empty for a base that has none (a GGUF file). From it config.json
  // is copied as it is (keeping fields tightfit does not model) and the tokenizer files
  // (tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model,
  // generation_config.json) that exist. Without it config.json is written by hf_config_json.
  std::string base_dir;
  // Tensors are split over model-00001-of-0000N.safetensors files of at most this many bytes (a
  // tensor larger than that gets a file of its own) with a model.safetensors.index.json, as
  // save_pretrained does; one file is plain model.safetensors. Memory use is about one shard.
  int64_t max_shard_bytes = int64_t(2) << 30;
  // When set, every tensor is written as this dtype (bf16 or f16) instead of its base dtype: a
  // GGUF base loaded by load_model holds its quantized tensors as f32, which would make the
  // directory several times the size of the file it came from.
  std::optional<DType> dtype;
};

// Writes the base `base` with `lora` merged (W' = W + scale * B A for every adapted projection,
// computed in f32) as an HF model directory `dir`, built beside it and swapped in when complete.
// Every tensor keeps its base dtype (bf16, f16 or f32), or is written as options.dtype. `lora` must be in the
// base's row order (it was trained on it); when the base stores q/k rows in GGUF's interleaved order, the
// merged q/k weights (and biases) are permuted back to HF's split-half order, which HF's rotary embedding
// expects. The adapter's config must fit the base's shapes, or tf::Error.
void export_merged_hf(const std::string& dir, const LlamaWeights& base, const LoraState& lora,
                      const MergedHfOptions& options = {});

// What export_merged_gguf wrote: for each (written type, base type) pair of the merged tensors,
// how many; and how many tensors were copied as they are.
struct MergedGgufSummary {
  std::map<std::pair<GgmlType, GgmlType>, int> adapted;
  int copied = 0;
};

// One line for the user, e.g. "168 adapted tensors written as F16 (were Q4_1); 104 tensors copied
// as they are".
std::string describe(const MergedGgufSummary& s);

// Writes the GGUF base `base` with `lora` merged as a GGUF file at `path` (atomically). Every
// metadata key of the base is copied in order; tensors the adapter does not touch are copied byte
// for byte in their own type; merged tensors keep the base type when it is F32, F16 or BF16, and
// are written as F16 when the base is quantized (half the size of F32, and within f16's rounding
// of the f32 merge; requantize with llama-quantize if wanted). `lora_rows` is the q/k row order of
// the adapter's weights: Interleaved for an adapter trained on this GGUF base, SplitHalf for one
// trained on the HF original (its q/k deltas are then permuted to GGUF order).
MergedGgufSummary export_merged_gguf(const std::string& path, const GgufFile& base, const LoraState& lora,
                                     RopeLayout lora_rows);

}  // namespace tf::io
