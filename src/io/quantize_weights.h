// defines: tf::io::QuantMode (how base weights are stored once loaded), parse_quant_mode,
//          quant_mode_name, is_matrix_slot, store_weight (converting or quantizing one matrix at
//          load in bounded chunks), tf::io::WeightMemory and weight_memory (bytes of base weights by
//          storage dtype)
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/quant_blocks.h"
#include "src/model/weights.h"

namespace tf::io {

// How a loaded model stores its matrices (projections, embedding, lm_head); norms and biases
// always stay in their float type (f32, bf16 or f16; dequantized to f32 if a file quantized one).
//   Keep  compute with the file's own storage: quantized GGUF blocks and bitsandbytes NF4 in place
//   None  f32 or the file's float type: quantized tensors become an f32 copy
//   Bf16  bf16: other types are converted (round to nearest even); bf16 tensors stay in place
//   Int8  tightfit's linear int8 (per-64 absmax), quantized at load
//   Nf4   NF4 with double-quantized absmax, quantized at load (bitsandbytes NF4 kept as it is)
//   Q8_0, Q4_0, Q4_1, Q5_0, Q5_1  ggml's blocks of 32 along each row, quantized at load as ggml's
//         reference quantizers do (ref::quantize_rows_ggml), so the ops compute with them exactly as
//         with a GGUF file of that type; a tensor already of the type is kept in place
// A quantized source of another type is dequantized exactly and quantized again.
enum class QuantMode : uint8_t { Keep, None, Bf16, Int8, Nf4, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 };

// "keep", "none", "bf16", "int8", "nf4", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"; nullopt for
// anything else.
std::optional<QuantMode> parse_quant_mode(std::string_view name);
std::string_view quant_mode_name(QuantMode mode);
// Every mode's name, in QuantMode's order: "keep, none, bf16, int8, nf4, q8_0, q4_0, q4_1, q5_0, q5_1".
std::string quant_mode_names();
// The ggml block type a mode quantizes to, or nothing for the other modes.
std::optional<GgmlType> ggml_type_of(QuantMode mode);
// Whether a matrix of rows of `cols` elements can be stored under `mode`: ggml's blocks lie along
// each row, so their modes need whole blocks of 32 per row (NF4 and INT8 run over the flattened
// tensor and take any shape). Throws naming the tensor `name` otherwise.
void check_storable(QuantMode mode, int64_t cols, const std::string& name);

// The slots QuantMode applies to: every matrix (not the norms and biases).
constexpr bool is_matrix_slot(WeightSlot s) {
  return s == WeightSlot::Q || s == WeightSlot::K || s == WeightSlot::V || s == WeightSlot::O ||
         s == WeightSlot::Gate || s == WeightSlot::Up || s == WeightSlot::Down || s == WeightSlot::Embed ||
         s == WeightSlot::LmHead;
}

// The weight to compute with for `src` (a stored matrix of any dtype, in place in a file mapping)
// under `mode`: `src` itself when the mode keeps its storage, otherwise a converted or quantized
// copy whose memory `w` owns (MemTag::Weights). The conversion goes a bounded chunk of rows at a
// time through at most one f32 scratch chunk (plus the tensor's f32 absmax when quantizing to NF4,
// whose double quantization needs them whole, or reading a double-quantized NF4 source); the
// matrix is never in f32 as a whole unless f32 is the target. Values are read exactly: ggml
// blocks as ggml's reference dequantizes them, NF4 as bitsandbytes does.
// A chunk is about `chunk_elems` elements (at least the rows that hold a whole 64-element block).
// `name` names the tensor in errors (a non-finite element cannot be quantized, a row that is not
// whole blocks of 32 cannot be stored as ggml blocks: check_storable).
constexpr int64_t kWeightChunkElems = int64_t(1) << 16;
WeightRef store_weight(const WeightRef& src, QuantMode mode, LlamaWeights& w, const std::string& name,
                       int64_t chunk_elems = kWeightChunkElems);

// After store_weight converted `src` (a tensor in a read-only file mapping) into `stored`, drops
// the pages that lie wholly inside src's bytes from the process (madvise MADV_DONTNEED: a later read
// would fetch them from the file again), so a converted model does not also keep its source
// resident; pages shared with a neighbouring tensor stay. Nothing when `stored` is `src`. Returns
// the bytes dropped.
uint64_t drop_source_pages(const WeightRef& src, const WeightRef& stored);
// The bytes drop_source_pages drops for a tensor of `bytes` at `data`: the whole pages inside it.
uint64_t droppable_bytes(const void* data, uint64_t bytes);

// The dtype store_weight gives a matrix stored as `src` under `mode`.
DType stored_dtype(DType src, QuantMode mode);
// Bytes of one stored weight: its codes or elements plus their scales (NF4 / INT8 absmax, nested
// absmax included).
int64_t stored_bytes(const WeightRef& r);

// Bytes of a model's base weights by storage dtype: codes plus their scales (ggml blocks hold
// theirs; NF4 / INT8 absmax, nested absmax included). A tied lm_head is counted once, as stored.
struct WeightMemory {
  struct Entry {
    DType dtype = DType::F32;
    int64_t params = 0;
    int64_t bytes = 0;
  };
  std::vector<Entry> by_dtype;  // in DType order, only the dtypes present

  int64_t params() const;
  int64_t bytes() const;
  double bits_per_param() const;
  // "70.1 MiB (q4_1 52.3 MiB, f32 17.8 MiB), 4.52 bits per parameter"
  std::string summary() const;
};
WeightMemory weight_memory(const LlamaWeights& w);

}  // namespace tf::io
