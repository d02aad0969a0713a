// defines: tf::io::export_gguf_lora, import_gguf_lora (LoRA adapters in llama.cpp's GGUF adapter
//          format), gguf_qk_row_source / permute_qk_rows (HF split-half <-> GGUF interleaved q/k
//          row order), gguf_architecture, gguf_lora_tensor_name
//
// The format, as llama.cpp's llama_adapter_lora_init reads it: metadata general.type = "adapter",
// general.architecture = the base's GGUF architecture (must match the model it is applied to),
// adapter.type = "lora", adapter.lora.alpha (f32); tensors "<base tensor name>.lora_a" with
// ne = [in, rank] and "<base tensor name>.lora_b" with ne = [rank, out], i.e. row-major A [rank, in]
// and B [out, rank] exactly as PEFT stores them (no transposition). llama.cpp computes
// y += (alpha / rank) * B (A x), with rank read from lora_b's ne[0], and treats alpha = 0 as a
// scale of 1.
#pragma once

#include <cstdint>
#include <string>

#include "src/model/lora.h"

namespace tf::io {

// The GGUF architecture name llama.cpp gives a converted model of `cfg`'s family: Llama, Mistral,
// SmolLM and TinyLlama convert to "llama"; Qwen2 keeps "qwen2".
std::string gguf_architecture(const LlamaConfig& cfg);

// Whether GGUF files of `cfg`'s family store q/k rows permuted for the interleaved rotation. The
// HF->GGUF converter permutes them only for the "llama" architecture; Qwen2 is rotated with the
// split-half (NEOX) layout by llama.cpp and keeps HF's order.
bool gguf_permutes_qk(const LlamaConfig& cfg);

// The HF (split-half) row that GGUF (interleaved) row `gguf_row` of a q or k projection holds. The
// converter reshapes the [heads * head_dim, in] weight to [heads, 2, head_dim / 2, in] and swaps
// the two middle axes, so within a head GGUF row 2i + j is HF row j * head_dim / 2 + i: the pair
// (i, i + head_dim / 2) that split-half rope rotates together becomes the adjacent pair (2i, 2i + 1)
// that interleaved rope rotates together.
int64_t gguf_qk_row_source(int64_t gguf_row, int head_dim);

// dst = the rows of src ([rows, cols] row-major, rows a multiple of head_dim) reordered from HF
// to GGUF order (to_gguf) or back. src and dst must not overlap.
void permute_qk_rows(float* dst, const float* src, int64_t rows, int64_t cols, int head_dim, bool to_gguf);

// "blk.3.attn_q.weight.lora_a" for (3, Q, false).
std::string gguf_lora_tensor_name(int layer, LoraTarget t, bool is_b);
// The name of a module's tensor: its projection's for an unfused one, phi3's
// "blk.N.attn_qkv.weight.lora_a" and "blk.N.ffn_up.weight.lora_b" for qkv_proj and gate_up_proj.
std::string gguf_lora_tensor_name(int layer, const LoraModule& m, bool is_b);

// A string key that every GGUF file tightfit exports carries ("lora" in an adapter, "merged" in a
// merged model), so that a later export may replace the file without --force. Readers ignore
// keys they do not know.
inline constexpr const char* kGgufExportKey = "tightfit.export";

// Writes `lora` as a llama.cpp GGUF LoRA adapter at `path` (atomically: temporary file + rename).
// `base` is the model the adapter was trained on: its architecture names general.architecture, and
// when it is an HF model (rope_layout SplitHalf) of a family whose GGUF files permute q/k, B's rows
// of q and k are permuted to GGUF order so that the adapter applies to the converted base (an
// adapter trained on a GGUF base is already in that order). Tensors are f32.
//
// Scaling: llama.cpp always scales by alpha / rank, so adapter.lora.alpha is written as
// lora.config.scale() * rank: equal to lora_alpha for plain LoRA, and alpha * sqrt(rank) for
// rsLoRA (scale alpha / sqrt(rank)), folding rsLoRA in without touching the weights.
void export_gguf_lora(const std::string& path, const LoraState& lora, const LlamaConfig& base);

// A GGUF LoRA adapter read back for `model`: rank from the tensors, alpha from adapter.lora.alpha
// (so scale() = alpha / rank is what llama.cpp applies; rslora false, dropout 0), targets from the
// tensors present. B's q/k rows are permuted back to `model`'s order when `model` is an HF model of
// a permuting family. Refuses, with a tf::Error naming the file and the problem: a file that is not
// a LoRA adapter, an architecture other than `model`'s, tensors that are unknown, unpaired, of
// another shape or rank, of a type other than F32/F16/BF16, for layers the model lacks, or present
// for some layers but not others.
LoraState import_gguf_lora(const std::string& path, const LlamaConfig& model);

}  // namespace tf::io
