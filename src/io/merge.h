// defines: tf::io::merge_lora_delta (W += scale * B A in f32), export_merged_hf (the base with the
//          adapter merged, as an HF safetensors directory, optionally with its decoder matrices as
//          bitsandbytes NF4), export_merged_gguf (the same as a GGUF file, from a GGUF base) with
//          its MergedGgufOptions and MergedGgufSummary, hf_config_json (an HF config.json for a
//          tf::LlamaConfig), bnb4bit_quantization_config (transformers' quantization_config of an
//          NF4 checkpoint)
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

// The "quantization_config" transformers writes into config.json for a model loaded with
// BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
// and computing in `compute_dtype`, which from_pretrained reads back to load the NF4 weights.
nlohmann::ordered_json bnb4bit_quantization_config(DType compute_dtype);

// Elements of f32 in a merge's tile of rows (4 MiB): what a merge holds in f32 at a time, whatever
// the size of the matrix.
constexpr int64_t kMergeTileElems = int64_t(1) << 20;

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
  // When set, every float tensor is written as this dtype (bf16 or f16) instead of its base
  // dtype: a GGUF base loaded with QuantMode::None holds its quantized tensors as f32, which
  // would make the directory several times the size of the file it came from. A quantized base
  // tensor (a base loaded with QuantMode::Keep) is written as this dtype, or when it is unset as
  // the embedding's dtype if that is a float type, else f16.
  std::optional<DType> dtype;
  // Store the projection matrices of the decoder layers (q, k, v, o, gate, up, down) as
  // bitsandbytes NF4 with double-quantized absmax, as transformers' save_pretrained does for a
  // model loaded in 4 bits: W becomes u8 codes [(n + 1) / 2, 1] plus W.absmax (u8 codes of the
  // per-64 absmax), W.quant_map, W.nested_absmax, W.nested_quant_map and
  // W.quant_state.bitsandbytes__nf4 (the JSON of quant_type, blocksize, dtype, shape and the
  // nested scale's blocksize, dtype and offset), and config.json gets quantization_config. The
  // embedding, lm_head, norms and biases stay float, as transformers leaves them. The merged
  // weights are rounded to their float dtype before quantizing, so each matrix is byte for byte
  // what bitsandbytes makes of the same export without nf4.
  bool nf4 = false;
  // Rows are merged about this many elements at a time (at least the rows a tile must hold whole:
  // a head's q/k rows, a whole NF4 block); the result does not depend on it.
  int64_t tile_elems = kMergeTileElems;
};

// Writes the base `base` with `lora` merged (W' = W + scale * B A for every adapted projection,
// computed in f32) as an HF model directory `dir`, built beside it and swapped in when complete.
// The base's tensors may be of any storage dtype; each is dequantized, merged and stored a bounded
// tile of rows at a time, so no whole matrix is ever held in f32. Every float tensor keeps its base
// dtype (bf16, f16 or f32), or is written as options.dtype. `lora` must be in the
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
// as they are", or with several base types "... written as Q8_0 (were 12 F32, 2 Q8_0); ...".
std::string describe(const MergedGgufSummary& s);

// How export_merged_gguf stores the merged tensors.
struct MergedGgufOptions {
  // F16: quantized base tensors become F16 (half the size of F32, within f16's rounding of the f32
  // merge) and F32 / F16 / BF16 ones keep their type. A type ref::ggml_quantizable accepts
  // (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1): every merged tensor is quantized to it with ggml's reference
  // quantizer (rows must be whole blocks of 32).
  GgmlType type = GgmlType::F16;
  // Instead of `type`, each merged tensor keeps its base type: float types as they are, quantized
  // ones re-quantized when ref::ggml_quantizable accepts them; a base with adapted tensors of other
  // types (the k-quants) is refused before anything is written, naming the types.
  bool keep_base_types = false;
  // Rows are merged about this many elements at a time; the result does not depend on it.
  int64_t tile_elems = kMergeTileElems;
};

// Writes the GGUF base `base` with `lora` merged as a GGUF file at `path` (atomically). Every
// metadata key of the base is copied in order; tensors the adapter does not touch are copied byte
// for byte in their own type; merged tensors are dequantized a tile of rows at a time, merged in
// f32 and written as `options` says. `lora_rows` is the q/k row order of the adapter's weights:
// Interleaved for an adapter trained on this GGUF base, SplitHalf for one trained on the HF
// original (its q/k deltas are then permuted to GGUF order).
MergedGgufSummary export_merged_gguf(const std::string& path, const GgufFile& base, const LoraState& lora,
                                     RopeLayout lora_rows, const MergedGgufOptions& options = {});

}  // namespace tf::io
