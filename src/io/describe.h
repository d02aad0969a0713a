// defines: tf::io::ModelDescription, describe_model (a model's shapes and the storage dtype of every
// base tensor under a QuantMode, from its headers or a config.json alone, without reading weights)
#pragma once

#include <cstdint>
#include <string>

#include "src/io/quantize_weights.h"
#include "src/model/weights.h"

namespace tf::io {

struct ModelDescription {
  std::string path;  // as given
  // Every slot with its shape and the dtype it is stored in once loaded under the mode (NF4 with
  // double-quantized absmax where the mode quantizes to NF4). A tensor the mode keeps points into
  // the file's mapping, never read; a converted one has no data. For sizes only: what
  // LlamaModel::memory_plan and Backend::placed_weight_bytes take.
  LlamaWeights weights;
  // The same slots as the file stores them (for a config alone: in its torch_dtype), keeping the
  // file mapped.
  LlamaWeights source;
  bool config_only = false;             // described from config.json alone: no weight files were read
  uint64_t file_bytes = 0;              // the model's weight files on disk (0 for a config alone)
  uint64_t kept_bytes = 0;              // bytes of tensors computed with in place, from the file
  uint64_t stored_bytes = 0;            // bytes of tensors converted at load (memory of their own)
  uint64_t source_converted_bytes = 0;  // bytes of the file read to convert them
  uint64_t dropped_bytes = 0;           // of those, the whole pages the loader drops once converted
  uint64_t gguf_metadata_bytes = 0;     // a GGUF's bytes before its tensor data (its vocabulary among them)
  uint64_t tokenizer_file_bytes = 0;    // tokenizer.json or tokenizer.model of a directory
};

// `path` is an HF directory (config.json with or without its safetensors), a .gguf file, or a
// config.json file. Reads headers and configs only: a GGUF's tensor table, safetensors headers,
// config.json (whose torch_dtype, default bf16, is the stored dtype of a config alone).
ModelDescription describe_model(const std::string& path, QuantMode quant);

}  // namespace tf::io
