// defines: tf::io::is_bnb4bit_checkpoint (the bitsandbytes quantization_config of an HF
//          config.json), bnb4bit_weight (a bitsandbytes NF4 weight of a safetensors checkpoint viewed
//          in place as an NF4 WeightRef, every companion tensor checked), bnb4bit_rows (a row range
//          of one, for the projections of a fused matrix)
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>

#include "kernels/ops.h"
#include "src/io/safetensors.h"
#include "src/model/weights.h"

namespace tf::io {

// A checkpoint saved from a model loaded with BitsAndBytesConfig(load_in_4bit=True): each
// quantized Linear weight W is stored by bitsandbytes' Linear4bit as
//   W                 u8 [(n + 1) / 2, 1]  NF4 codes, two per byte (element 2j in the high nibble)
//   W.absmax          per-64 absmax: f32 [blocks], or u8 [blocks] codes when double-quantized
//   W.quant_map       f32 [16]   the NF4 codebook
//   W.nested_absmax   f32 [ceil(blocks / 256)]  (double quantization only)
//   W.nested_quant_map f32 [256] the signed dynamic map (double quantization only)
//   W.quant_state.bitsandbytes__nf4  u8: the JSON of quant_type, blocksize, dtype, shape and, when
//                     double-quantized, nested_blocksize, nested_offset, nested_dtype
// (QuantState.as_dict(packed=True)). Other weights (embeddings, lm_head, norms) stay float.
// Whether a model was saved so (double quantization or not is seen per tensor); false when `config`
// has no quantization_config. Throws, naming `source`, for any other quantization than
// bitsandbytes 4-bit NF4 with uint8 storage (8-bit LLM.int8, fp4, methods such as gptq or awq).
bool is_bnb4bit_checkpoint(const nlohmann::json& config, const std::string& source);

// The NF4 weight `name` ([rows, cols]) of `model`, its codes and absmax used in place from the
// mapping. Checks that every companion tensor is present with the expected dtype and size, that
// quant_map is kNf4Code and nested_quant_map the dynamic map bit for bit, that the quant_state
// JSON says nf4, blocksize 64 (nested 256) and this shape; each failure is a tf::Error naming the
// file and tensor.
WeightRef bnb4bit_weight(const SafetensorsModel& model, const std::string& name, int64_t rows, int64_t cols);

// Rows [row0, row0 + rows) of `whole`, an NF4 weight as bnb4bit_weight gives it (Phi-3's fused
// qkv_proj and gate_up_proj), as a weight of its own with the same values. Its codes and absmax are
// used in place; where the rows begin inside a group of kNf4NestedBlock double-quantized blocks, so
// that a nested scale is shared with the rows before, its absmax are decoded to f32 into a tensor
// `w` owns (LlamaWeights::owns), the values the kernels decode. Rows that begin inside a 64-element
// block are refused naming `name`: such a block's absmax is shared by two projections.
WeightRef bnb4bit_rows(const WeightRef& whole, int64_t row0, int64_t rows, LlamaWeights& w,
                       const std::string& name);

}  // namespace tf::io
