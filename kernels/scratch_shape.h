// defines: tf::ScratchShape (what sizes the device scratch of a run's op launchers: the micro-batch,
// the attention geometry, the frozen matrices as loaded, the LoRA parameters, training or forward
// only) and tf::ScratchNeeds (per rt::scratch slot, the largest size a launcher asks for). Plain
// C++17, so that nvcc compiles the launchers that fill it.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/ops.h"
#include "src/core/error.h"

namespace tf {

struct ScratchShape {
  // A micro-batch at its largest: rows, and tokens per row (attention's scratch depends on both).
  int batch = 1;
  int seq = 1;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  // Whether rows may hold several documents (the packed batches finetune makes): attention then
  // also takes each tile's document range.
  bool doc_ids = true;
  // The frozen matrices the run multiplies by, as loaded into host memory (the backend maps each
  // to what it places): the per-layer attention projections and the MLP's (one of each dtype and
  // shape is enough), and lm_head.
  std::vector<WeightRef> projections;
  std::vector<WeightRef> mlp_projections;
  WeightRef lm_head;
  // Rows of tokens the MLP's products take at a time (LlamaModel's ModelLayout::mlp_chunk); 0: all.
  int64_t mlp_rows = 0;
  // Rows of tokens per call of the loss (ModelLayout::loss_rows); 0: all.
  int64_t loss_rows = 0;
  int64_t lora_params = 0;  // the adapters' parameters, whose gradient norm each step takes
  bool train = true;        // a training step (forward and backward), or a forward pass alone (eval)
  int64_t max_tokens() const { return int64_t(batch) * seq; }
  int64_t mlp_tokens() const { return mlp_rows > 0 ? std::min(mlp_rows, max_tokens()) : max_tokens(); }
  int64_t loss_tokens() const { return loss_rows > 0 ? std::min(loss_rows, max_tokens()) : max_tokens(); }
};

inline constexpr int kScratchSlotCount = 64;  // the slots both runtimes have

struct ScratchNeeds {
  struct Slot {
    size_t bytes = 0;
    const char* what = nullptr;  // the launcher's name for it, set by the first request
  };
  std::array<Slot, kScratchSlotCount> slots{};
  void need(int slot, const char* what, size_t bytes) {
    TF_CHECK(slot >= 0 && slot < kScratchSlotCount, "scratch slot ", slot, " (", what, ") is not in 0..",
             kScratchSlotCount - 1);
    Slot& s = slots[size_t(slot)];
    s.bytes = std::max(s.bytes, bytes);
    if (!s.what) s.what = what;
  }
};

}  // namespace tf
