// defines: tf::offload::host_overheads (the untracked host memory of a run, component by component,
// each sized by the code that allocates it or by a constant measured as its comment says)
#include "offload/host_overheads.h"

#include <algorithm>
#include <string>

#include "kernels/cpu/attention.h"
#include "src/core/process_memory.h"

namespace tf::offload {

namespace {

constexpr uint64_t kKiB = uint64_t(1) << 10;
constexpr uint64_t kMiB = uint64_t(1) << 20;
constexpr uint64_t kPage = 4 * kKiB;

// Measurements are of the release build without CUDA on OpenBLAS 0.3.21 (its Cooperlake kernels)
// and glibc 2.36, with the allocator policy of set_memory_policy, by finetune runs of random models
// (tightfit init) and SmolLM2-135M: `/usr/bin/time -f %M tightfit finetune --model M --data D
// --out R --steps 2 --threads T ...` for the peak RSS beside R/metrics.jsonl's peak_mem_bytes for
// the tracker's; "untracked" below is that peak RSS - the tracker's peak - the model file's size.
// Per-thread figures compare --threads 1 and 2.

// What running adds to the process besides its threads and the components below: library code
// paged in on first use (OpenBLAS's kernels, libgomp), glibc's main heap and its fragmentation.
// Untracked at one thread minus startup and one thread's pool was 2.7 MiB for hidden 512 and 768.
constexpr uint64_t kRunning = 3 * kMiB;
// Per OpenMP / OpenBLAS thread: OpenBLAS packs GEMM panels into a per-thread buffer of which only
// the pages it touches count; it grows with the widest operand dimension. A second thread added
// 1.1, 1.55, 2.95 and 1.7 MiB for widest dimensions 1408, 2048, 2816 and 1536 (SmolLM2-135M, whose
// 49152-row lm_head GEMM did not add more); 384 floats per column of the widest dimension bound
// them all. Plus the thread's stack and its glibc arena's first pages.
constexpr uint64_t kPanelFloatsPerColumn = 384;
constexpr uint64_t kThreadFixed = 256 * kKiB;
// A GGUF vocabulary parsed into the tokenizer (its token strings, merges and lookup tables): 5.8
// MiB more untracked for SmolLM2-135M's (1.77 MB of metadata) than for a 320-token vocabulary.
constexpr double kGgufVocabPerMetadataByte = 4.0;
// tokenizer.json: the tokenizer built from it stays (10.3 MiB more untracked for SmolLM2-135M's
// 3.52 MB file), and the JSON document it was built from peaks at load (15 MiB above that, sampled).
constexpr double kTokenizerPerFileByte = 3.5;
constexpr double kTokenizerParsePerFileByte = 4.5;
// A chat template adds at most this many tokens to a record (role markers and a model's default
// system prompt).
constexpr uint64_t kTemplateTokens = 128;

uint64_t round_up(uint64_t n, uint64_t to) {
  return (n + to - 1) / to * to;
}

std::string mib(uint64_t bytes) {
  return std::to_string((bytes + kMiB / 2) / kMiB) + " MiB";
}

bool has(uint32_t set, LoraTarget t) {
  return set & (1u << int(t));
}

// Rows and columns of a layer's base matrix for a LoRA target's projection.
std::pair<int64_t, int64_t> matrix_shape(const LlamaConfig& c, LoraTarget t) {
  switch (t) {
    case LoraTarget::Q: return {c.q_dim(), c.hidden};
    case LoraTarget::K:
    case LoraTarget::V: return {c.kv_dim(), c.hidden};
    case LoraTarget::O: return {c.hidden, c.q_dim()};
    case LoraTarget::Gate:
    case LoraTarget::Up: return {c.intermediate, c.hidden};
    case LoraTarget::Down: return {c.hidden, c.intermediate};
    case LoraTarget::Count: break;
  }
  return {0, 0};
}

// The per-thread scratch of kernels/cpu (thread_local tf::Buffers that grow_scratch enlarges), in
// bytes at its peak. Each buffer keeps its largest size for the process's life, and grow_scratch
// allocates the larger buffer before it frees the smaller, so a buffer growing from a to b holds
// a + b for a moment: the peak is at one of those moments, and which buffers exist then follows
// the order of a step (forward through the layers, the loss, backward).
uint64_t kernel_scratch(const HostOverheadInputs& in, std::string& detail) {
  const LlamaConfig& c = in.config;
  const uint64_t N = uint64_t(in.max_tokens), D = uint64_t(c.head_dim), T = uint64_t(std::max(in.threads, 1));
  // attention.cpp: the tiles of every thread of a region in one buffer, first the forward's
  // (64-row blocks: K tile, scores, online softmax's 64 x (D + 2)), then the backward's (as
  // cpu::attention_backward_thread_floats says for its shape, at its largest over the micro-batch's
  // rows: a shorter last micro-batch may take the other way through the tiles), multiples of 16
  // floats each; the backward's row statistics, a float per token and head.
  const uint64_t attn_fwd = 4 * T * round_up(128 * D + 4224, 16);
  const int seq = in.seq_len > 0 ? in.seq_len : int(std::max<int64_t>(in.max_tokens, 1));
  const int64_t batch_rows = std::max<int64_t>(1, in.max_tokens / seq);
  uint64_t bwd_thread = 0;
  for (int64_t b = 1; b <= batch_rows; ++b) {
    AttentionShape s;
    s.batch = int(b);
    s.seq = seq;
    s.n_heads = c.n_heads;
    s.n_kv_heads = c.n_kv_heads;
    s.head_dim = c.head_dim;
    bwd_thread = std::max<uint64_t>(bwd_thread, cpu::attention_backward_thread_floats(s, int(T)));
  }
  const uint64_t attn_bwd = 4 * T * round_up(bwd_thread, 16) + 4 * N * uint64_t(c.n_heads);
  // cross_entropy.cpp, per call of L rows: a quantized lm_head is dequantized a vocabulary tile at
  // a time (with the logits of 256 tokens against it, per-token running max, sum and target logit,
  // and the d_h accumulator); otherwise 64 rows of logits at a time.
  const uint64_t V = uint64_t(c.vocab), H = uint64_t(c.hidden);
  const uint64_t L = in.loss_rows > 0 ? std::min(N, uint64_t(in.loss_rows)) : N;
  uint64_t ce = 0;
  if (is_quantized(in.lm_head_dtype)) {
    const uint64_t tile_rows = std::min({V, uint64_t(4096), std::max<uint64_t>(1, (uint64_t(1) << 22) / H)});
    ce = 4 * (tile_rows * H + std::min<uint64_t>(L, 256) * tile_rows + 2 * L + L * H) + 8 * L;
  } else {
    ce = 4 * std::min<uint64_t>(L, 64) * V;
  }
  const bool coarse = in.non_f32_matrices && !in.half_matrices && in.quantized_projections == 0;
  // matmul.cpp: a bf16 / f16 operand is widened into a fixed 2^20-float tile, allocated whole at
  // the first such product.
  const bool half =
      in.half_matrices || coarse || in.lm_head_dtype == DType::BF16 || in.lm_head_dtype == DType::F16;
  const uint64_t widen = half ? 4 * (uint64_t(1) << 20) : 0;
  // linear.cpp: a quantized weight is dequantized into a tile of at most 2^22 floats (whole when
  // it fits, else up to 2048 columns), grown by the projections in the forward order q, k, v, o,
  // gate, up, down, before the loss and the backward allocate theirs.
  const uint32_t quantized = coarse ? (1u << kLoraTargetCount) - 1 : in.quantized_projections;
  uint64_t tile = 0, tile_growth = 0;
  for (int t = 0; t < kLoraTargetCount; ++t) {
    if (!has(quantized, LoraTarget(t))) continue;
    const auto [rows, cols] = matrix_shape(c, LoraTarget(t));
    const uint64_t elems = uint64_t(rows) * uint64_t(cols);
    const uint64_t limit = uint64_t(1) << 22;
    const uint64_t tc = std::min<uint64_t>(uint64_t(cols), 2048);
    const uint64_t bytes = 4 * (elems <= limit ? elems : std::min<uint64_t>(uint64_t(rows), limit / tc) * tc);
    if (bytes > tile) {
      tile_growth = std::max(tile_growth, tile + bytes);
      tile = bytes;
    }
  }
  detail = "attention tiles of " + std::to_string(T) + " threads, cross-entropy " +
           (is_quantized(in.lm_head_dtype) ? "vocabulary tiles" : "logits") +
           (widen ? ", a bf16 widening tile" : "") + (tile ? ", a dequantized weight tile" : "") +
           " (counted by the tracker as workspace)";
  // The forward's tiles and the widening tile exist from the first layer on; then either the
  // weight tile's largest growth in the forward, or the backward's attention tiles arriving on top
  // of everything else.
  return attn_fwd + widen + std::max(tile_growth, tile + ce + attn_bwd);
}

// Records as parsed (data::Example) and as tokenized (ids and loss flags, and offsets), for a
// JSONL file of `bytes` and `lines`. Strings hold at most the line's bytes, and a heap string
// costs at most as much again (glibc's 16-byte rounding and header); every line is at most one
// Example. Not bounded: a {"messages"} record's data::Message structs (64 bytes each, one per 29
// bytes of JSON at most), which only records of many very short messages make significant. A
// token covers at least one byte of text or is one of the template's, and no example keeps more
// than seq_len; ids and loss flags take 5 bytes a token. A large file is bounded loosely: 16 MB of
// prompt/completion records measured 104 MiB for records and tokens together, bounded by 260.
struct DataBytes {
  uint64_t records = 0, tokens = 0, tokens_max = 0;
};
// Without a line count, every 13 bytes are taken for a line: the shortest record, {"text":"x"} and
// its newline.
constexpr uint64_t kShortestRecordBytes = 13;
DataBytes data_bytes(uint64_t bytes, uint64_t counted_lines, int seq_len, uint64_t example_bytes) {
  const uint64_t lines =
      counted_lines ? counted_lines : (bytes + kShortestRecordBytes - 1) / kShortestRecordBytes;
  DataBytes d;
  d.records = 2 * bytes + lines * (example_bytes + 64);
  d.tokens_max = std::min(bytes + kTemplateTokens * lines, uint64_t(std::max(seq_len, 0)) * lines);
  d.tokens = 5 * d.tokens_max + 8 * (lines + 1);
  return d;
}

}  // namespace

std::vector<PlanItem> host_overheads(const HostOverheadInputs& in) {
  std::vector<PlanItem> items;
  const auto add = [&](std::string component, std::string detail, uint64_t bytes, bool transient) {
    if (bytes) items.push_back({std::move(component), std::move(detail), Tier::Host, bytes, transient});
  };
  const LlamaConfig& c = in.config;
  const uint64_t threads = uint64_t(std::max(in.threads, 1));

  add("process at startup", in.startup_rss ? "measured before loading" : "this process's RSS as it plans",
      in.startup_rss ? in.startup_rss : process_memory().rss, false);
  add("code paged in and heaps", "libraries' code on first use, glibc's main heap", kRunning, false);
  const uint64_t widest = uint64_t(std::max({c.hidden, c.q_dim(), c.intermediate}));
  const uint64_t pools = in.cpu_backend ? threads * (4 * kPanelFloatsPerColumn * widest + kThreadFixed) : 0;
  add("thread pools",
      std::to_string(threads) + " threads: OpenBLAS panels for width " + std::to_string(widest) + ", stacks",
      pools, false);
  std::string scratch_detail;
  const uint64_t scratch = in.cpu_backend ? kernel_scratch(in, scratch_detail) : 0;
  add("kernel scratch", scratch_detail, scratch, false);

  // Every page of the mapping is read once (kept tensors while training, converted ones at load),
  // and the mapping lives as long as the weights, so its pages stay in RssFile; those wholly inside
  // a converted tensor the loader drops once it is converted, and streamed tensors are never read
  // through the mapping.
  const uint64_t gone = in.streamed_tensor_bytes + in.dropped_bytes;
  const uint64_t mapped = in.model_file_bytes > gone ? in.model_file_bytes - gone : 0;
  add("model file mapped",
      in.streamed_tensor_bytes ? "the file less the tensors streamed from disk or cut into shares"
      : in.dropped_bytes ? "the file less the pages of tensors converted at load, dropped once converted"
                         : "every page is read once and stays mapped",
      round_up(mapped, kPage), false);

  if (in.gguf_metadata_bytes)
    add("tokenizer", "the GGUF vocabulary, from " + mib(in.gguf_metadata_bytes) + " of metadata",
        uint64_t(kGgufVocabPerMetadataByte * double(in.gguf_metadata_bytes)), false);
  const DataBytes train = data_bytes(in.train_data_bytes, in.train_data_lines, in.seq_len, in.example_bytes);
  const DataBytes eval = data_bytes(in.eval_data_bytes, in.eval_data_lines, in.seq_len, in.example_bytes);
  add("dataset records", "--data and --eval-data as parsed", train.records + eval.records, false);
  add("tokenized dataset", "at most " + std::to_string(train.tokens_max + eval.tokens_max) + " tokens",
      train.tokens + eval.tokens, false);
  if (in.tokenizer_file_bytes) {
    add("tokenizer", "built from a " + mib(in.tokenizer_file_bytes) + " file",
        uint64_t(kTokenizerPerFileByte * double(in.tokenizer_file_bytes)), false);
    // The JSON document peaks while the model loads, before the LoRA state (parameters, gradients
    // and two moments of 4 bytes each, tracked; in host memory on the cpu), the thread pools'
    // panels, the kernel scratch and the dataset exist: only what it exceeds them by can raise the
    // run's peak.
    const uint64_t parse = uint64_t(kTokenizerParsePerFileByte * double(in.tokenizer_file_bytes));
    const uint64_t lora_state = in.cpu_backend ? 16 * uint64_t(std::max<int64_t>(in.lora_params, 0)) : 0;
    const uint64_t later =
        lora_state + pools + scratch + train.records + eval.records + train.tokens + eval.tokens;
    add("tokenizer file parse", "its JSON document, beyond what is allocated after it",
        parse > later ? parse - later : 0, true);
  }
  // A vector's growth copies its tokens once into a larger block, the smaller still held.
  add("tokenizing", "a growing token array copied", std::max(train.tokens, eval.tokens), true);

  // Saving a checkpoint streams the tensors from the LoRA state itself, then reads the file back
  // through a 1 MiB buffer for its checksum; the header is JSON of a few hundred bytes a tensor.
  const uint64_t lora_tensors = 2 * uint64_t(c.n_layers) * uint64_t(kLoraTargetCount);
  add("checkpoint save", "checksum buffer and headers of " + std::to_string(3 * lora_tensors) + " tensors",
      kMiB + 3 * lora_tensors * 512, true);
  // The PEFT export copies the B of q and k into HF's row order when the model's rotation is
  // interleaved (GGUF files).
  uint64_t reordered = 0;
  if (c.rope_layout == RopeLayout::Interleaved)
    for (LoraTarget t : {LoraTarget::Q, LoraTarget::K})
      if (in.lora.has(t)) reordered += 4 * uint64_t(in.lora.rank) * uint64_t(matrix_shape(c, t).first);
  add("PEFT export", "q and k adapters' B in HF order, headers",
      reordered * uint64_t(c.n_layers) + lora_tensors * 512, true);
  // The report parses every metrics line and writes an HTML page with a point per step.
  add("report", std::to_string(in.steps) + " steps of metrics",
      uint64_t(std::max<int64_t>(in.steps, 1)) * 2 * kKiB, true);
  return items;
}

}  // namespace tf::offload
