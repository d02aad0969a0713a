// defines: tf::offload::HostOverheadInputs, host_overheads (the planner's byte model of the host
// memory a run takes that no tracked buffer holds: the process and its thread pools, the per-thread
// kernel scratch, the model file's mapped pages, the tokenizer, the dataset, and the transient
// peaks of loading, checkpointing and exporting)
#pragma once

#include <cstdint>
#include <vector>

#include "offload/plan.h"
#include "src/core/dtype.h"
#include "src/model/config.h"

namespace tf::offload {

// What host_overheads needs, all known before anything loads (from the options, file sizes and the
// model's config).
struct HostOverheadInputs {
  // RSS of the process the plan is for before it loads anything: its binary and shared libraries
  // as loaded, which depend on the build (about 10 MiB without CUDA, 150 MiB and more where CUDA's
  // libraries are linked). 0: the calling process's RSS now, right for a process that plans its own
  // run before loading (finetune) and for `tightfit plan`, the same binary.
  uint64_t startup_rss = 0;
  int threads = 1;  // OpenMP and OpenBLAS threads of the run (after --threads 0 is resolved)
  // Whether the model runs on the cpu backend, whose kernels and OpenBLAS threads work in host
  // memory, as do its LoRA state and activations (a device backend keeps those in its own).
  bool cpu_backend = true;
  LlamaConfig config;
  int64_t max_tokens = 0;  // micro-batch x seq-len
  int64_t loss_rows = 0;   // rows per call of the loss (ModelLayout::loss_rows; 0: max_tokens)
  int seq_len = 0;
  LoraConfig lora;  // rank and targets (the PEFT export copies some adapters' B to reorder them)
  // Storage of the lm_head (the embedding when tied) as the run computes with it, which selects the
  // cross-entropy kernel and its scratch; whether any base matrix is stored as anything but f32;
  // of those, whether any is bf16 or f16 (matmul widens those a tile at a time) and which of the
  // layers' matrices are quantized (linear dequantizes those a tile at a time; bit i =
  // LoraTarget(i), the projection of the same name). A caller that sets only non_f32_matrices gets
  // the scratch of both, for every projection.
  DType lm_head_dtype = DType::F32;
  bool non_f32_matrices = false;
  bool half_matrices = false;
  uint32_t quantized_projections = 0;
  // The files load_model maps: a GGUF file, or every safetensors file of a model directory.
  uint64_t model_file_bytes = 0;
  // Of those, tensor bytes that --weights disk reads with the direct reader instead of through the
  // mapping, or whose pages --shard-weights drops once it has cut them into shares (0 when the
  // weights are resident).
  uint64_t streamed_tensor_bytes = 0;
  // Of those, the pages of tensors converted at load that the loader drops once converted
  // (io::drop_source_pages): they are read once and leave the process.
  uint64_t dropped_bytes = 0;
  // A GGUF file's bytes before its tensor data (metadata and tensor infos; 0 for safetensors): its
  // vocabulary is parsed from there into the tokenizer.
  uint64_t gguf_metadata_bytes = 0;
  // tokenizer.json or tokenizer.model beside a model directory (0 for a GGUF's vocabulary).
  uint64_t tokenizer_file_bytes = 0;
  // --data, and --eval-data when given (0 when not): bytes and lines (every record is one line; 0
  // lines: not counted, bounded from the bytes).
  uint64_t train_data_bytes = 0;
  uint64_t eval_data_bytes = 0;
  uint64_t train_data_lines = 0;
  uint64_t eval_data_lines = 0;
  // Bytes of one parsed record beside its strings (sizeof(data::Example), given by the caller: the
  // dataset's types live above this layer).
  uint64_t example_bytes = 0;
  int64_t lora_params = 0;  // LoRA parameters (LoraState::n_params)
  int64_t steps = 0;        // optimizer steps of the run (the report reads one metrics line each)
};

// The untracked host memory of a run as PlanItems of Tier::Host (load-time peaks `transient`),
// each detail saying how it is sized. Buffers the backend's tracker counts (LlamaModel::memory_plan,
// weights converted at load) are not among them, except the per-thread kernel scratch, which the
// tracker counts but no memory plan lists.
std::vector<PlanItem> host_overheads(const HostOverheadInputs& in);

}  // namespace tf::offload
