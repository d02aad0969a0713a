// defines: tf::io::LoadedModel, load_model (an HF model directory or a GGUF file: weights stored
// as a QuantMode says, tokenizer and the model's own chat template); QuantMode and weight_memory
// come with it from src/io/quantize_weights.h
#pragma once

#include <memory>
#include <string>

#include "src/io/gguf.h"
#include "src/io/gguf_model.h"
#include "src/io/quantize_weights.h"
#include "src/io/spill.h"
#include "src/model/weights.h"
#include "tokenizer/tokenizer.h"

namespace tf::io {

enum class ModelFormat : uint8_t { HfDirectory, Gguf };

struct LoadedModel {
  std::string source;  // the path given
  ModelFormat format = ModelFormat::HfDirectory;
  LlamaWeights weights;
  std::unique_ptr<tok::Tokenizer> tokenizer;  // null when the model ships none
  std::string chat_template;                  // the model's Jinja template text; empty if none
  std::string chat_template_source;           // where it was read, for error messages
  std::shared_ptr<const GgufFile> gguf;       // the open GGUF file (format Gguf), for exports
  // The tokens that end a generation: the tokenizer's EOS, and the end-of-turn tokens the model
  // names beside it (a GGUF's tokenizer.ggml.eot_token_id and eom_token_id, the eos_token_id of a
  // directory's generation_config.json, one id or a list): an instruct model often closes its turn
  // with one of those rather than EOS (Gemma's <end_of_turn>, Llama 3's <|eot_id|>).
  std::vector<int32_t> stop_ids;
};

// The model weight a GGUF llama tensor role holds.
WeightSlot weight_slot_of(GgufLlamaRole role);

// Loads `path`: a directory with config.json + safetensors (+ tokenizer.json or tokenizer.model,
// tokenizer_config.json), or a .gguf file. Each matrix is stored as `quant` says (QuantMode):
// under keep a GGUF file's quantized tensors are computed with in place from the mapping, under
// none they are dequantized to f32 once at load; f32/f16/bf16 tensors that a mode keeps are used
// in place. Norms stay float. Throws tf::Error naming the path.
// Without `with_weights`, a GGUF file's tensors are left in the file (whatever their type) and
// `weights` holds only the config; a directory's weights are always read.
// With `spill` (for --weights disk), the per-layer tensors the mode converts are written, as
// converted, to a SpillFile created at spill->path, one at a time, and read from there: host memory
// never holds them all. No file is made when nothing per layer converts.
LoadedModel load_model(const std::string& path, bool with_weights = true, QuantMode quant = QuantMode::None,
                       const SpillOptions* spill = nullptr);

// The tokenizer of an HF model directory; null when it has none. tokenizer.json wins where both it
// and tokenizer.model are present (it carries the added tokens); where the JSON cannot be
// honoured, the sentencepiece model beside it is the same vocabulary, and a note on stderr says
// why. tokenizer_config.json is not read here.
std::unique_ptr<tok::Tokenizer> read_hf_tokenizer(const std::string& dir);

// The tokenizer.ggml.* keys of a GGUF file as plain vocabulary data (the file must have
// tokenizer.ggml.model). Strings are copied, so the result outlives the file.
tok::GgufVocab gguf_vocab(const GgufFile& f);

}  // namespace tf::io
