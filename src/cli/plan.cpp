#include "src/cli/plan.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <numeric>
#include <optional>

#include "offload/host_overheads.h"
#include "offload/weight_store.h"
#include "src/cli/common.h"
#include "src/cli/rates.h"
#include "src/core/error.h"
#include "src/core/process_memory.h"
#include "src/data/chat_template.h"
#include "src/dist/comm.h"
#include "src/dist/device_sum.h"
#include "src/io/spill.h"
#include "src/model/scratch_shape.h"

namespace tf::cli {

using offload::PlanItem;
using offload::Tier;
using offload::WeightTier;

namespace {

// The host's available memory (MemAvailable of /proc/meminfo: free memory plus what the kernel can
// reclaim without swapping), or nothing where it cannot be read.
std::optional<uint64_t> available_host_memory() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  uint64_t kib = 0;
  std::string unit;
  while (in >> key >> kib >> unit)
    if (key == "MemAvailable:") return kib * 1024;
  return std::nullopt;
}

std::optional<WeightTier> parse_weight_tier(const std::string& s) {
  if (s == "resident") return WeightTier::Resident;
  if (s == "host") return WeightTier::Host;
  if (s == "disk") return WeightTier::Disk;
  return std::nullopt;
}

const char* policy_name(CheckpointPolicy p) {
  switch (p) {
    case CheckpointPolicy::None: return "none";
    case CheckpointPolicy::PerBlock: return "per block";
    case CheckpointPolicy::PerBlockOffload: return "per block, inputs in host memory";
  }
  return "?";
}

// The policies a backend can run, in the order auto tries them: the kept block inputs go to host
// memory only from a device (the cpu's memory is the host).
std::vector<CheckpointPolicy> policies_of(const Backend& be) {
  if (be.host_memory()) return {CheckpointPolicy::None, CheckpointPolicy::PerBlock};
  return {CheckpointPolicy::None, CheckpointPolicy::PerBlock, CheckpointPolicy::PerBlockOffload};
}

std::string gib(uint64_t bytes) {
  return format_bytes(double(bytes));
}

std::string tokens_detail(const FinetuneOptions& o) {
  return std::to_string(o.micro_batch) + " x " + std::to_string(o.seq_len) + " tokens";
}

// The weight tiers a backend can stream from: the cpu's memory is the host, so it has no host tier.
uint64_t file_bytes_or_zero(const std::string& path) {
  std::error_code ec;
  const uintmax_t n = path.empty() ? 0 : std::filesystem::file_size(path, ec);
  return ec ? 0 : uint64_t(n);
}

// Records of a JSONL file (one per line; 0 for none), counted by newlines a block at a time. A
// stream (a pipe, a device) has no size to plan by and is not read here.
uint64_t line_count(const std::string& path) {
  std::error_code ec;
  if (path.empty() || !std::filesystem::is_regular_file(path, ec)) return 0;
  std::ifstream in(path, std::ios::binary);
  std::vector<char> block(size_t(1) << 20);
  uint64_t lines = 0;
  char last = '\n';
  while (in) {
    in.read(block.data(), std::streamsize(block.size()));
    const std::streamsize n = in.gcount();
    if (n <= 0) break;
    lines += uint64_t(std::count(block.data(), block.data() + n, '\n'));
    last = block[size_t(n - 1)];
  }
  return lines + (last == '\n' ? 0 : 1);
}

std::vector<WeightTier> tiers_of(const Backend& be) {
  if (be.host_memory()) return {WeightTier::Resident, WeightTier::Disk};
  return {WeightTier::Resident, WeightTier::Host, WeightTier::Disk};
}

// Refuses a --weights choice the model or backend cannot take, naming why (the weight store's own
// checks, and a config alone, which has no file to stream from).
void check_tier(WeightTier t, const Backend& be, const io::ModelDescription& d, int ranks) {
  if (t == WeightTier::Resident) return;
  TF_CHECK(t != WeightTier::Disk || !d.config_only, "--weights disk streams the model file: ", d.path,
           " is a config alone");
  offload::WeightStore::footprint(d.weights, t, be, ranks);
}

}  // namespace

const char* policy_option(CheckpointPolicy p) {
  switch (p) {
    case CheckpointPolicy::None: return "none";
    case CheckpointPolicy::PerBlock: return "block";
    case CheckpointPolicy::PerBlockOffload: return "offload";
  }
  return "?";
}

LoraConfig lora_config(const FinetuneOptions& o) {
  LoraConfig l;
  l.rank = o.lora_rank;
  l.alpha = o.lora_alpha;
  l.dropout = o.lora_dropout;
  l.rslora = o.rslora;
  l.targets = parse_lora_targets(o.lora_targets);
  l.seed = o.seed;
  return l;
}

offload::Budget resolve_budget(const FinetuneOptions& o, const Backend& be) {
  offload::Budget b;
  const std::optional<uint64_t> host_auto = available_host_memory();
  const bool host_only = be.host_memory();
  if (o.max_mem != "auto") {
    const uint64_t v = parse_size("--max-mem", o.max_mem);
    (host_only ? b.host : b.device) = v;
  } else if (!host_only) {
    b.device = be.memory_capacity();
  }
  if (o.max_host_mem != "auto") {
    const uint64_t v = parse_size("--max-host-mem", o.max_host_mem);
    b.host = b.host ? std::min(*b.host, v) : v;
  } else if (!b.host) {
    b.host = host_auto;
  }
  return b;
}

namespace {

// The data files' sizes, read once per plan (counting lines reads a file whole).
struct DataSizes {
  uint64_t train_bytes = 0, eval_bytes = 0, train_lines = 0, eval_lines = 0;
};

DataSizes data_sizes(const FinetuneOptions& o) {
  return {file_bytes_or_zero(o.data), file_bytes_or_zero(o.eval_data), line_count(o.data),
          line_count(o.eval_data)};
}

// The byte model's names of the two kinds of copies the cost model times.
constexpr const char* kStreamedItem = "base weights streamed per pass";
constexpr const char* kOffloadedItem = "saved block inputs";
constexpr const char* kSpillItem = "spill file of the converted layers";
// The weight store's allocation of this rank's shares (WeightStore::footprint), and its plan item.
constexpr const char* kShardsAlloc = "weight shards";

std::string shards_detail(const FinetuneOptions& o) {
  return "1/" + std::to_string(o.ranks) + " of each layer's block; the block all-gathered from the " +
         std::to_string(o.ranks) + " ranks just before use";
}

// The tiers the plan's table of alternatives shows: the backend's, and with several ranks the
// ranks' shares (--shard-weights).
std::vector<WeightTier> shown_tiers(const Backend& be, const FinetuneOptions& o) {
  std::vector<WeightTier> v = tiers_of(be);
  if (o.ranks >= 2) v.push_back(WeightTier::Shard);
  return v;
}

// `l` for tier t: split over the ranks under Shard, whole otherwise.
ModelLayout layout_for(ModelLayout l, WeightTier t, const FinetuneOptions& o) {
  l.shard_ranks = t == WeightTier::Shard ? o.ranks : 1;
  return l;
}

// Host memory that converting one per-layer tensor into the spill file holds at once (store_weight,
// then SpillFile::write): the converted copy, the f32 rows of one chunk, an NF4 target's f32 absmax
// (double quantization needs them whole), a double-quantized NF4 source's absmax undone, and the
// source's pages of the file mapping, read for the conversion and dropped after it.
uint64_t spill_conversion_bytes(const WeightRef& source, const WeightRef& converted) {
  const int64_t rows = source.rows, cols = source.cols, n = rows * cols;
  const int64_t whole = kNf4Block / std::gcd(cols, int64_t(kNf4Block));
  const int64_t chunk = std::min(rows, std::max(whole, io::kWeightChunkElems / cols / whole * whole));
  const uint64_t blocks = uint64_t((n + kNf4Block - 1) / kNf4Block);
  uint64_t bytes = uint64_t(io::stored_bytes(converted)) + uint64_t(chunk * cols) * sizeof(float) +
                   uint64_t(dtype_bytes(source.dtype, n));
  if (converted.dtype == DType::NF4) bytes += blocks * sizeof(float);
  if (source.dtype == DType::NF4 && source.scales.nested) bytes += blocks * sizeof(float);
  return bytes;
}

offload::Plan model_bytes(const FinetuneOptions& o, const io::ModelDescription& d, const Backend& be,
                          CheckpointPolicy policy, WeightTier tier, uint64_t startup_rss,
                          const DataSizes& data, const ModelLayout& layout) {
  const LlamaConfig& c = d.weights.config;
  const LoraConfig lora = lora_config(o);
  const int64_t max_tokens = int64_t(o.micro_batch) * o.seq_len;
  const MemoryPlan mp = LlamaModel::memory_plan(d.weights, lora, policy, max_tokens, be, tier, layout);
  const Tier mine = be.host_memory() ? Tier::Host : Tier::Device;
  offload::Plan plan;

  // The backend's allocations, the weights placed there summed into one line.
  std::map<std::string, size_t> index;
  auto add = [&](const std::string& component, const std::string& detail, Tier t, uint64_t bytes) {
    if (bytes == 0) return;
    const auto [it, fresh] = index.emplace(component + "/" + offload::tier_name(t), plan.items.size());
    if (fresh)
      plan.items.push_back({component, detail, t, bytes, false});
    else
      plan.items[it->second].bytes += bytes;
  };
  for (const PlannedAlloc& a : mp.allocs) {
    const uint64_t bytes = be.footprint(a.bytes);
    if (a.what == kShardsAlloc) {
      add(kShardsItem, shards_detail(o), mine, bytes);
    } else if (a.tag == MemTag::Weights && a.what != "streamed block buffer") {
      add("base weights", "placed as the backend computes with them", mine, bytes);
    } else if (a.what == "saved activations") {
      add(a.what,
          std::string(policy_name(policy)) + ", " + tokens_detail(o) + ", " + std::to_string(c.n_layers) +
              " layers",
          mine, bytes);
    } else if (a.what == "MLP chunk") {
      add(a.what,
          "gate, up and activation of " + std::to_string(layout.mlp_chunk) + " of " +
              std::to_string(max_tokens) + " rows at a time",
          mine, bytes);
    } else {
      add(a.what, "", mine, bytes);
    }
  }
  if (mine == Tier::Device) {
    // The device takes the arena as one block in its allocation granules, and the op launchers'
    // scratch slots besides it, each at its largest request of a step.
    const uint64_t arena = be.reserved_bytes(mp.total);
    add("device arena rounding", "to the device's allocation granule", Tier::Device, arena - mp.total);
    const ScratchShape shape = model_scratch_shape(d.weights, lora, o.micro_batch, o.seq_len, true, layout);
    for (const PlannedAlloc& a : be.scratch_plan(shape)) add(a.what, tokens_detail(o), Tier::Device, a.bytes);
  }
  for (const PlannedAlloc& a : mp.host)
    add(a.what == kShardsAlloc ? kShardsItem : a.what, a.what == kShardsAlloc ? shards_detail(o) : "",
        Tier::Host, a.bytes);

  // Base weights converted at load live in host memory of their own for the whole run (on a device
  // backend too: the model keeps its host copy); the pages of the file mapping that the run reads,
  // for kept weights, are part of host_overheads.
  // Disk streams the layers from the files, Shard copies its shares from them: a converted layer
  // goes to the spill file either way.
  const bool from_files = tier == WeightTier::Disk || tier == WeightTier::Shard;
  uint64_t converted = 0, streamed_tensors = 0, spilling = 0;
  bool non_f32 = false, half = false;
  uint32_t quantized = 0;
  LlamaWeights::for_each_slot(c, [&](WeightSlot s, int layer) {
    const WeightRef& r = d.weights.slot(s, layer);
    if (io::is_matrix_slot(s)) {
      non_f32 = non_f32 || r.dtype != DType::F32;
      half = half || r.dtype == DType::BF16 || r.dtype == DType::F16;
      const std::optional<LoraTarget> t = lora_target_of(s);
      if (t && is_quantized(r.dtype)) quantized |= 1u << unsigned(*t);
    }
    if (from_files && is_layer_slot(s)) {
      // Kept tensors stream from the model file; converted ones, and those whose absmax the loader
      // decoded, from the spill file the loader writes them to, one at a time. Cut into shares,
      // they are read once from there, their pages dropped.
      const WeightRef& src = d.source.slot(s, layer);
      if (r.dtype == src.dtype && r.data == src.data) {
        streamed_tensors += uint64_t(io::stored_bytes(r));
      } else {
        spilling = std::max(spilling, spill_conversion_bytes(src, r));
      }
      return;
    }
    const WeightRef& src = d.source.slot(s, layer);
    if (r.dtype != src.dtype || r.data != src.data) converted += uint64_t(io::stored_bytes(r));
  });
  add("base weights converted at load", "--quant " + o.quant, Tier::Host, converted);
  const uint64_t spilled = from_files ? io::spill_bytes(d.source, quant_option(o.quant)) : 0;
  if (spilled) {
    plan.items.push_back({"converting a layer's tensor to the spill file",
                          "the largest: converted, its f32 chunk and absmax, its source pages", Tier::Host,
                          spilling, true});
    add(kSpillItem,
        "--quant " + o.quant + ", written at load" + (o.spill_dir.empty() ? "" : " in " + o.spill_dir) +
            ", removed at the end",
        Tier::Disk, spilled);
  }
  offload::HostOverheadInputs in;
  in.startup_rss = startup_rss;
  in.cpu_backend = be.host_memory();
  in.threads = cpu::num_threads();
  in.config = c;
  in.max_tokens = max_tokens;
  in.loss_rows = layout.loss_rows;
  in.seq_len = o.seq_len;
  in.lora = lora;
  in.lm_head_dtype = d.weights.lm_head.dtype;
  in.non_f32_matrices = non_f32;
  in.half_matrices = half;
  in.quantized_projections = quantized;
  in.model_file_bytes = d.file_bytes;
  in.streamed_tensor_bytes = streamed_tensors;
  in.dropped_bytes = d.dropped_bytes;
  in.gguf_metadata_bytes = d.gguf_metadata_bytes;
  in.tokenizer_file_bytes = d.tokenizer_file_bytes;
  in.train_data_bytes = data.train_bytes;
  in.eval_data_bytes = data.eval_bytes;
  in.train_data_lines = data.train_lines;
  in.eval_data_lines = data.eval_lines;
  in.example_bytes = sizeof(data::Example);
  in.lora_params = int64_t(LoraState::memory_plan(c, lora)[0].bytes / sizeof(float));
  in.steps = o.steps;
  for (PlanItem& i : offload::host_overheads(in)) plan.items.push_back(std::move(i));
  if (mp.streamed_bytes)
    add(kStreamedItem, std::string("from ") + offload::weight_tier_name(tier), Tier::Disk, mp.streamed_bytes);
  if (mine == Tier::Device) {
    // Checkpoints and the divergence check read a host copy of the adapters and their moments.
    const auto lora_plan = LoraState::memory_plan(c, lora);
    uint64_t bytes = 0;
    for (const PlannedAlloc& a : lora_plan) bytes += a.bytes;
    plan.items.push_back({"LoRA state copied to the host", "while saving", Tier::Host, bytes, true});
  }
  if (o.ranks > 1) {
    // Data parallel: every rank gathers the ranks' LoRA gradients to add them in rank order
    // (dist::Communicator::all_reduce_sum), into a buffer made for each sum; a device backend's
    // gradients are gathered by NCCL into a device buffer kept for the run where NCCL is built
    // (dist::DeviceSum), else summed in a host copy kept for the run.
    const std::string per_rank = "on each of " + std::to_string(o.ranks) + " ranks";
    const std::string rounds = std::to_string(o.ranks) + " ranks x " +
                               std::to_string(std::min(in.lora_params, dist::kSumChunkValues)) +
                               " floats a round";
    if (mine == Tier::Device && dist::nccl_built()) {
      add("gradient sum: the ranks' gradients gathered by NCCL", rounds + ", outside the arena, " + per_rank,
          Tier::Device, uint64_t(dist::sum_gather_values(o.ranks, in.lora_params)) * sizeof(float));
    } else {
      plan.items.push_back(
          {"gradient sum: the ranks' gradients gathered", rounds + ", while summing, " + per_rank, Tier::Host,
           uint64_t(dist::sum_gather_values(o.ranks, in.lora_params)) * sizeof(float), true});
      if (mine == Tier::Device)
        add("gradient sum: LoRA gradients copied to the host", per_rank, Tier::Host,
            uint64_t(in.lora_params) * sizeof(float));
    }
  }
  return plan;
}

// The micro-batches a plan tries, largest first: the given one, or under auto every count that
// divides the step's sequences.
std::vector<int> micro_batches(const FinetuneOptions& o) {
  if (!o.micro_batch_auto) return {o.micro_batch};
  std::vector<int> out;
  for (int m = std::min(o.batch_size, 4096); m >= 1; --m)
    if (o.batch_size % m == 0) out.push_back(m);
  return out;
}

FinetuneOptions with_micro_batch(const FinetuneOptions& o, int m) {
  FinetuneOptions v = o;
  v.micro_batch = m;
  if (o.micro_batch_auto) v.grad_accum = o.batch_size / m;
  return v;
}

// The cost model's rates for a backend's kind: nominal, or the cpu's measured by tightfit bench
// (--rates).
offload::CostRates cost_rates(const Backend& be, const FinetuneOptions& o) {
  if (!o.rates.empty()) {
    TF_CHECK(be.host_memory(), "--rates calibrates the cpu's rates, but this run is on ", be.name());
    return bench_rates(o.rates, cpu::num_threads());
  }
  return be.host_memory() ? offload::CostRates::cpu(cpu::num_threads()) : offload::CostRates::device();
}

std::string seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, s < 10 ? "%.2f s" : "%.0f s", s);
  return buf;
}

}  // namespace

offload::Plan byte_model(const FinetuneOptions& o, const io::ModelDescription& d, const Backend& be,
                         CheckpointPolicy policy, WeightTier tier, uint64_t startup_rss,
                         const ModelLayout& layout) {
  return model_bytes(o, d, be, policy, tier, startup_rss, data_sizes(o), layout);
}

std::vector<ModelLayout> model_layouts(const FinetuneOptions& o, int64_t max_tokens, const Backend& be,
                                       const LlamaConfig& c, DType lm_head_dtype) {
  std::vector<int64_t> chunks{0};
  if (o.mlp_chunk != "auto") {
    char* end = nullptr;
    const long long rows = std::strtoll(o.mlp_chunk.c_str(), &end, 10);
    TF_CHECK(!o.mlp_chunk.empty() && *end == '\0' && rows > 0,
             "--mlp-chunk must be auto or a positive count of rows, got '", o.mlp_chunk, "'");
    chunks = {rows >= max_tokens ? 0 : int64_t(rows)};
  } else {
    for (int64_t rows = max_tokens / 2; rows >= kMinMlpChunk; rows /= 2) chunks.push_back(rows);
  }
  TF_CHECK(o.embedding == "auto" || o.embedding == "device" || o.embedding == "host",
           "--embedding must be auto, device or host, got '", o.embedding, "'");
  TF_CHECK(o.embedding != "host" || !be.host_memory(), "--embedding host: the ", be.name(),
           " backend's memory is host memory already; use auto or device");
  TF_CHECK(o.embedding != "host" || !c.tie_embeddings,
           "--embedding host: the model ties lm_head to the embedding table, which lm_head reads where "
           "the model runs; use auto or device");
  std::vector<bool> embeds{o.embedding == "host"};
  if (o.embedding == "auto" && !be.host_memory() && !c.tie_embeddings) embeds.push_back(true);
  std::vector<int64_t> losses{0};
  if (o.loss_chunk != "auto") {
    char* end = nullptr;
    const long long rows = std::strtoll(o.loss_chunk.c_str(), &end, 10);
    TF_CHECK(!o.loss_chunk.empty() && *end == '\0' && rows > 0,
             "--loss-chunk must be auto or a positive count of rows, got '", o.loss_chunk, "'");
    losses = {rows >= max_tokens ? 0 : int64_t(rows)};
  } else if (!(be.host_memory() && is_quantized(lm_head_dtype))) {
    // The cpu's quantized lm_head keeps no logits per row, and would dequantize the table per call.
    for (int64_t rows : kLossChunks)
      if (rows < max_tokens) losses.push_back(rows);
  }
  // The table in host memory costs an upload of the micro-batch's rows; chunks of the MLP cost its
  // gate and up products again in the backward: the first is tried first, and kept while chunking.
  // Fewer rows per call of the loss make its lm_head products slow and save little, so they come
  // last, with everything else at its smallest.
  std::vector<ModelLayout> v;
  for (bool host : embeds) v.push_back({chunks.front(), host, losses.front()});
  for (size_t i = 1; i < chunks.size(); ++i) v.push_back({chunks[i], embeds.back(), losses.front()});
  for (size_t i = 1; i < losses.size(); ++i) v.push_back({chunks.back(), embeds.back(), losses[i]});
  for (ModelLayout& l : v) l.shard_ranks = o.shard_weights ? o.ranks : 1;
  return v;
}

offload::StepCost predict_step(const FinetuneOptions& o, const io::ModelDescription& d, const Backend& be,
                               CheckpointPolicy policy, WeightTier tier, const offload::Plan& plan,
                               const ModelLayout& layout) {
  offload::CostInputs in;
  in.config = d.weights.config;
  in.lora = lora_config(o);
  in.micro_batch = o.micro_batch;
  in.seq_len = o.seq_len;
  in.grad_accum = o.grad_accum;
  in.recompute = policy != CheckpointPolicy::None;
  for (const PlanItem& i : plan.items) {
    if (i.component == kStreamedItem) in.streamed_bytes += i.bytes;
    if (i.component == kOffloadedItem) in.offloaded_bytes += i.bytes;
  }
  in.streamed_from_disk = tier == WeightTier::Disk;
  if (tier == WeightTier::Shard)
    in.gathered_bytes = offload::WeightStore::footprint(d.weights, tier, be, o.ranks).gathered_bytes;
  in.mlp_chunk = layout.mlp_chunk;
  in.loss_rows = layout.loss_rows;
  if (layout.host_embedding && !be.host_memory())
    in.uploaded_bytes =
        uint64_t(o.micro_batch) * uint64_t(o.seq_len) * uint64_t(in.config.hidden) * sizeof(float);
  in.lora_params = int64_t(LoraState::memory_plan(in.config, in.lora)[0].bytes / sizeof(float));
  const offload::CostRates rates = cost_rates(be, o);
  return offload::step_cost(in, rates);
}

nlohmann::json RunPlan::to_json() const {
  nlohmann::json j = plan.to_json();
  j["backend"] = backend;
  // Every number is one rank's: the ranks of a data-parallel run each hold the whole model.
  j["ranks"] = ranks;
  j["per_rank"] = ranks > 1;
  j["checkpointing"] = policy_option(policy);
  j["weights"] = offload::weight_tier_name(tier);
  j["budget"]["device"] = budget.device ? nlohmann::json(*budget.device) : nlohmann::json(nullptr);
  j["budget"]["host"] = budget.host ? nlohmann::json(*budget.host) : nlohmann::json(nullptr);
  j["fits"] = fits;
  j["micro_batch"] = micro_batch;
  j["grad_accum"] = grad_accum;
  j["mlp_chunk"] = layout.mlp_chunk;
  j["embedding"] = layout.host_embedding ? "host" : "device";
  j["loss_chunk"] = layout.loss_rows;
  j["predicted_step"] = {{"total_s", cost.total_s},         {"compute_s", cost.compute_s},
                         {"recompute_s", cost.recompute_s}, {"overhead_s", cost.overhead_s},
                         {"copy_s", cost.copy_s},           {"exposed_copy_s", cost.exposed_copy_s},
                         {"optimizer_s", cost.optimizer_s}, {"rates", rates.describe()}};
  j["choices"] = choices;
  uint64_t spill = 0;
  for (const PlanItem& i : plan.items)
    if (i.component == kSpillItem) spill += i.bytes;
  j["spill_file_bytes"] = spill;
  return j;
}

RunPlan plan_run(const FinetuneOptions& o, const io::ModelDescription& d, const Backend& be,
                 const offload::Budget& budget, uint64_t startup_rss) {
  std::vector<CheckpointPolicy> policies;
  for (CheckpointPolicy p :
       {CheckpointPolicy::None, CheckpointPolicy::PerBlock, CheckpointPolicy::PerBlockOffload})
    if (o.checkpointing == policy_option(p)) policies.push_back(p);
  if (o.checkpointing == "auto") policies = policies_of(be);
  TF_CHECK(!policies.empty(), "--checkpointing must be auto, none, block or offload, got '", o.checkpointing,
           "'");
  std::vector<WeightTier> tiers;
  if (o.shard_weights) {
    TF_CHECK(o.ranks >= 2,
             "--shard-weights splits the per-layer weights across the ranks of a data-parallel ",
             "run: launch it under mpirun -np N with N >= 2 (or plan it with --ranks N)");
    TF_CHECK(o.weights == "auto",
             "--shard-weights keeps each rank's share of the weights in host memory and "
             "all-gathers a block before use, which is where --weights ",
             o.weights, " would put them otherwise: leave --weights out");
    check_tier(WeightTier::Shard, be, d, o.ranks);
    tiers = {WeightTier::Shard};
  } else if (o.weights == "auto") {
    tiers = tiers_of(be);
  } else {
    const std::optional<WeightTier> t = parse_weight_tier(o.weights);
    TF_CHECK(t, "--weights must be auto, resident, host or disk, got '", o.weights, "'");
    check_tier(*t, be, d, o.ranks);
    tiers = {*t};
  }
  const std::vector<int> micros = micro_batches(o);
  const DataSizes data = data_sizes(o);
  const offload::CostRates rates = cost_rates(be, o);

  // Every combination that fits, with its predicted step; the fastest is taken, an earlier one
  // (fewer copies, less recomputation, a larger micro-batch) unless a later one is 3% faster.
  struct Candidate {
    WeightTier tier;
    CheckpointPolicy policy;
    int micro_batch;
    double step_s;
  };
  std::vector<Candidate> fitting;
  RunPlan best;
  for (WeightTier t : tiers) {
    if (o.weights == "auto" && t != WeightTier::Resident) {
      try {
        check_tier(t, be, d, o.ranks);
      } catch (const Error&) {
        continue;
      }
    }
    for (CheckpointPolicy p : policies) {
      for (int m : micros) {
        const FinetuneOptions v = with_micro_batch(o, m);
        // The first layout that fits, in model_layouts' order.
        std::optional<offload::Plan> fit;
        ModelLayout layout;
        for (const ModelLayout& l :
             model_layouts(o, int64_t(m) * o.seq_len, be, d.weights.config, d.weights.lm_head.dtype)) {
          offload::Plan plan = model_bytes(v, d, be, p, t, startup_rss, data, l);
          if (!plan.fits(budget)) continue;
          fit = std::move(plan);
          layout = l;
          break;
        }
        if (!fit) continue;
        offload::Plan& plan = *fit;
        const offload::StepCost cost = predict_step(v, d, be, p, t, plan, layout);
        fitting.push_back({t, p, m, cost.total_s});
        if (fitting.size() > 1 && cost.total_s >= best.cost.total_s * 0.97) continue;
        best.plan = std::move(plan);
        best.policy = p;
        best.tier = t;
        best.micro_batch = m;
        best.grad_accum = v.grad_accum;
        best.layout = layout;
        best.cost = cost;
      }
    }
  }
  best.budget = budget;
  best.backend = be.name();
  best.rates = rates;
  best.startup_rss = startup_rss;
  best.ranks = o.ranks;
  best.fits = !fitting.empty();
  // When nothing fits, the run is described as its first candidate would run it, at its smallest
  // micro-batch.
  if (!best.fits) {
    const FinetuneOptions v = with_micro_batch(o, micros.back());
    best.layout =
        model_layouts(o, int64_t(v.micro_batch) * o.seq_len, be, d.weights.config, d.weights.lm_head.dtype)
            .back();
    best.plan = model_bytes(v, d, be, policies.front(), tiers.front(), startup_rss, data, best.layout);
    best.policy = policies.front();
    best.tier = tiers.front();
    best.micro_batch = v.micro_batch;
    best.grad_accum = v.grad_accum;
    best.cost = predict_step(v, d, be, best.policy, best.tier, best.plan, best.layout);
    if (o.checkpointing == "auto" || o.weights == "auto" || o.micro_batch_auto)
      best.choices.push_back("nothing fits the budget");
    return best;
  }
  // Why each option left on auto is what it is: the best run without that choice, or that none fits.
  auto reason = [&](const char* alternative, auto&& keeps) {
    std::optional<double> other;
    for (const Candidate& c : fitting)
      if (keeps(c) && (!other || c.step_s < *other)) other = c.step_s;
    const std::string chosen = "predicted step " + seconds(best.cost.total_s);
    if (!other) return chosen + "; " + alternative + " does not fit";
    return chosen + " against " + seconds(*other) + " " + alternative;
  };
  if (o.checkpointing == "auto")
    best.choices.push_back(
        std::string("checkpointing ") + policy_name(best.policy) + " (auto: " +
        (best.policy == CheckpointPolicy::None
             ? "predicted step " + seconds(best.cost.total_s) + ", nothing recomputed"
             : reason("keeping every block's activations",
                      [](const Candidate& c) { return c.policy == CheckpointPolicy::None; })) +
        ")");
  if (o.weights == "auto" && !o.shard_weights)
    best.choices.push_back(std::string("weights ") + offload::weight_tier_name(best.tier) + " (auto: " +
                           (best.tier == WeightTier::Resident
                                ? "predicted step " + seconds(best.cost.total_s) + ", nothing streamed"
                                : reason("with resident weights",
                                         [](const Candidate& c) { return c.tier == WeightTier::Resident; })) +
                           ")");
  if (o.embedding == "auto" && best.layout.host_embedding)
    best.choices.push_back(
        "embedding table in host memory (auto: with the table on the device and the MLP on all rows "
        "at once, the run does not fit)");
  if (o.mlp_chunk == "auto" && best.layout.mlp_chunk > 0)
    best.choices.push_back("MLP in chunks of " + std::to_string(best.layout.mlp_chunk) + " rows (auto: all " +
                           std::to_string(int64_t(best.micro_batch) * o.seq_len) +
                           " rows at once, or larger chunks, do not fit)");
  if (o.loss_chunk == "auto" && best.layout.loss_rows > 0)
    best.choices.push_back("loss in calls of " + std::to_string(best.layout.loss_rows) +
                           " rows (auto: with the whole micro-batch in one call, or more rows, the run "
                           "does not fit)");
  if (o.micro_batch_auto) {
    const int larger = [&] {
      for (auto it = micros.rbegin(); it != micros.rend(); ++it)
        if (*it > best.micro_batch) return *it;
      return 0;
    }();
    best.choices.push_back("micro-batch " + std::to_string(best.micro_batch) + " x grad-accum " +
                           std::to_string(best.grad_accum) + " (auto: " + std::to_string(o.batch_size) +
                           " sequences per step; " +
                           (larger == 0
                                ? "predicted step " + seconds(best.cost.total_s) + ", the whole step at once"
                                : reason(("with micro-batch " + std::to_string(larger)).c_str(),
                                         [&](const Candidate& c) { return c.micro_batch == larger; })) +
                           ")");
  }
  return best;
}

InferencePlan plan_inference(const InferenceRun& r) {
  InferencePlan p;
  p.backend = make_backend(r.device, &p.device_note, parse_attention(r.attention));
  if (r.weights != "auto") {
    p.tier = weight_tier_option(r.weights);
    return p;
  }
  FinetuneOptions o;
  o.model = r.model;
  o.quant = r.quant;
  o.data = r.data;
  o.device = r.device;
  o.attention = r.attention;
  o.max_mem = r.max_mem;
  o.max_host_mem = r.max_host_mem;
  o.seq_len = r.seq_len;
  o.micro_batch = r.micro_batch;
  o.grad_accum = 1;
  o.batch_size = r.micro_batch;
  o.lora_rank = 1;
  o.lora_alpha = 1;
  o.lora_dropout = 0;
  o.lora_targets = "o";  // inert_lora's: a module of its own in every architecture
  o.checkpointing = "block";
  o.steps = 1;
  const uint64_t startup = process_memory().rss;
  const io::ModelDescription d = io::describe_model(o.model, quant_option(o.quant));
  offload::Budget budget = resolve_budget(o, *p.backend);
  const LlamaConfig& c = d.weights.config;
  const uint64_t kv = 2 * uint64_t(r.kv_tokens) * uint64_t(c.n_layers) * uint64_t(c.kv_dim()) * sizeof(float);
  std::optional<uint64_t>& home = p.backend->host_memory() ? budget.host : budget.device;
  if (home) home = *home > kv ? *home - kv : 0;
  p.run = plan_run(o, d, *p.backend, budget, startup);
  const RunPlan& plan = p.run;
  TF_CHECK(plan.fits, r.model, ": the run does not fit its memory budget with the weights resident or ",
           "streamed (predicted peak ", peaks_text(plan.plan, plan.budget),
           kv ? ", besides a KV cache of " + std::to_string((kv + (1u << 20) - 1) >> 20) + " MiB" : "",
           "); raise --max-mem or --max-host-mem, or use a 4-bit base (--quant nf4)");
  p.tier = plan.tier;
  p.layout = plan.layout;
  p.choices = plan.choices;
  p.choices.push_back(
      "predicted peak " + peaks_text(plan.plan, plan.budget) +
      (kv ? " less " + std::to_string((kv + (1u << 20) - 1) >> 20) + " MiB for the KV cache" : ""));
  return p;
}

std::string peaks_text(const offload::Plan& p, const offload::Budget& b) {
  std::string s;
  for (Tier t : {Tier::Device, Tier::Host}) {
    const uint64_t peak = p.peak(t);
    const std::optional<uint64_t> limit = t == Tier::Device ? b.device : b.host;
    if (peak == 0 && !limit) continue;
    if (!s.empty()) s += ", ";
    s += std::string(offload::tier_name(t)) + " " + gib(peak) + (limit ? " of " + gib(*limit) : "");
  }
  return s;
}

std::vector<std::string> refusal_lines(const FinetuneOptions& o, const io::ModelDescription& d,
                                       const Backend& be, const RunPlan& plan) {
  std::vector<std::string> lines;
  std::string largest;
  for (const PlanItem& i : plan.plan.largest_over(plan.budget, 3))
    largest += (largest.empty() ? "" : ", ") + i.component + " " + gib(i.bytes);
  lines.push_back("predicted peak " + peaks_text(plan.plan, plan.budget) + "; largest: " + largest);
  struct Change {
    std::string what;
    FinetuneOptions opts;
    io::QuantMode quant;
  };
  const io::QuantMode quant = quant_option(o.quant);
  std::vector<Change> changes;
  auto with = [&](std::string what, auto edit, io::QuantMode q) {
    FinetuneOptions v = o;
    edit(v);
    changes.push_back({std::move(what), v, q});
  };
  if (o.checkpointing != "block")
    with(
        "--checkpointing block", [](FinetuneOptions& v) { v.checkpointing = "block"; }, quant);
  if (!be.host_memory() && o.checkpointing != "offload")
    with(
        "--checkpointing offload", [](FinetuneOptions& v) { v.checkpointing = "offload"; }, quant);
  for (WeightTier t : tiers_of(be))
    if (t != WeightTier::Resident && o.weights != offload::weight_tier_name(t))
      with(
          std::string("--weights ") + offload::weight_tier_name(t),
          [t](FinetuneOptions& v) { v.weights = offload::weight_tier_name(t); }, quant);
  for (int m = o.micro_batch_auto ? 0 : o.micro_batch / 2; m >= 1; m /= 2) {
    const int accum = o.grad_accum * (o.micro_batch / m);
    with(
        "--micro-batch " + std::to_string(m) + " --grad-accum " + std::to_string(accum) +
            " (the same sequences per step)",
        [m, accum](FinetuneOptions& v) {
          v.micro_batch = m;
          v.grad_accum = accum;
        },
        quant);
    if (m == 1) break;
  }
  if (o.seq_len >= 1024)
    with(
        "--seq-len " + std::to_string(o.seq_len / 2), [](FinetuneOptions& v) { v.seq_len /= 2; }, quant);
  if (o.lora_rank >= 2)
    with(
        "--lora-rank " + std::to_string(o.lora_rank / 2), [](FinetuneOptions& v) { v.lora_rank /= 2; },
        quant);
  // A base above 5 bits per weight (Q4_1's) gains from NF4 (4.13).
  bool four_bit = true;
  for (const BlockWeights& b : d.weights.blocks)
    four_bit = four_bit && dtype_bytes(b.q.dtype, 4096) <= 4096 * 5 / 8;
  if (!four_bit && quant != io::QuantMode::Nf4)
    with(
        "--quant nf4", [](FinetuneOptions& v) { v.quant = "nf4"; }, io::QuantMode::Nf4);

  std::vector<std::pair<bool, std::string>> rated;
  std::optional<io::ModelDescription> nf4;
  for (const Change& ch : changes) {
    const io::ModelDescription* desc = &d;
    if (ch.quant != quant) {
      if (!nf4) nf4 = io::describe_model(d.path, ch.quant);
      desc = &*nf4;
    }
    try {
      const RunPlan r = plan_run(ch.opts, *desc, be, plan.budget, plan.startup_rss);
      // What the options left on auto would then choose.
      std::string chosen;
      if (ch.opts.weights == "auto") chosen += std::string("weights ") + offload::weight_tier_name(r.tier);
      if (ch.opts.checkpointing == "auto")
        chosen += std::string(chosen.empty() ? "" : ", ") + "checkpointing " + policy_name(r.policy);
      rated.push_back({r.fits, std::string(r.fits ? "fits with " : "still over with ") + ch.what +
                                   (chosen.empty() ? "" : " (" + chosen + ")") + ": " +
                                   peaks_text(r.plan, r.budget)});
    } catch (const Error&) {
      continue;
    }
  }
  std::stable_sort(rated.begin(), rated.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  for (const auto& [fits, line] : rated) lines.push_back(line);
  return lines;
}

int run_plan(const FinetuneOptions& given, bool json) {
  FinetuneOptions o = given;
  resolve_batching(o);
  TF_CHECK(!o.model.empty(), "--model is required");
  if (o.max_mem != "auto") parse_size("--max-mem", o.max_mem);
  if (o.max_host_mem != "auto") parse_size("--max-host-mem", o.max_host_mem);
  TF_CHECK(o.weights == "auto" || parse_weight_tier(o.weights),
           "--weights must be auto, resident, host or disk, got '", o.weights, "'");
  cpu::set_num_threads(o.threads);
  std::string note;
  std::unique_ptr<Backend> owned;
  Backend* be = nullptr;
  const bool wants_gpu = o.device.rfind("cuda", 0) == 0;
  std::string why;
  if (wants_gpu && count_gpus(&why) == 0) {
    // The CUDA backend's placement rules are the simulated device's: the same source.
    owned = make_backend("simt");
    note = "planned by the CUDA backend's placement rules without a GPU (" + why + ")";
  } else {
    owned = make_backend(o.device, &note, parse_attention(o.attention));
  }
  be = owned.get();
  const uint64_t startup = process_memory().rss;
  const io::ModelDescription d = io::describe_model(o.model, quant_option(o.quant));
  const offload::Budget budget = resolve_budget(o, *be);
  const RunPlan plan = plan_run(o, d, *be, budget, startup);
  const LlamaConfig& c = d.weights.config;
  // The alternatives at the micro-batch the plan runs, each with its smallest layout.
  const FinetuneOptions chosen = with_micro_batch(o, plan.micro_batch);
  const ModelLayout smallest =
      model_layouts(chosen, int64_t(chosen.micro_batch) * chosen.seq_len, *be, c, d.weights.lm_head.dtype)
          .back();
  if (json) {
    nlohmann::json j = plan.to_json();
    j["model"] = o.model;
    j["note"] = note;
    nlohmann::json grid = nlohmann::json::array();
    for (WeightTier t : shown_tiers(*be, o)) {
      for (CheckpointPolicy p : policies_of(*be)) {
        try {
          check_tier(t, *be, d, o.ranks);
        } catch (const Error&) {
          continue;
        }
        const offload::Plan alt = byte_model(chosen, d, *be, p, t, startup, layout_for(smallest, t, o));
        grid.push_back(
            {{"weights", offload::weight_tier_name(t)},
             {"checkpointing", policy_option(p)},
             {"device", alt.peak(Tier::Device)},
             {"host", alt.peak(Tier::Host)},
             {"step_s", predict_step(chosen, d, *be, p, t, alt, layout_for(smallest, t, o)).total_s}});
      }
    }
    j["alternatives"] = grid;
    std::printf("%s\n", j.dump(2).c_str());
    return plan.fits ? 0 : 2;
  }
  std::printf("model: %s (%s, %d layers, hidden %d, %d heads / %d kv, vocab %d)%s\n", o.model.c_str(),
              c.architecture.c_str(), c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.vocab,
              d.config_only ? ", from its config alone" : "");
  std::printf("run: %s per micro-batch, %d per step, LoRA r=%d on %s, --quant %s, on %s%s%s\n",
              tokens_detail(chosen).c_str(), plan.micro_batch * plan.grad_accum, o.lora_rank,
              o.lora_targets.c_str(), o.quant.c_str(), be->name().c_str(), note.empty() ? "" : "; ",
              note.c_str());
  std::printf("weights %s, checkpointing %s\n", offload::weight_tier_name(plan.tier),
              policy_name(plan.policy));
  if (o.ranks > 1)
    std::printf("per rank of %d data-parallel ranks (each %s and sums the gradients)\n", o.ranks,
                plan.tier == WeightTier::Shard
                    ? ("holds 1/" + std::to_string(o.ranks) + " of the layers' weights").c_str()
                    : "holds the whole model");
  for (const std::string& ch : plan.choices) std::printf("  %s\n", ch.c_str());
  std::printf("%s", plan.plan.table().c_str());
  std::printf("predicted peak: %s\n", peaks_text(plan.plan, plan.budget).c_str());
  const offload::StepCost& k = plan.cost;
  std::printf(
      "predicted step: %s (compute %s, recomputation %s, per-op costs %s, copies %s of which %s not hidden, "
      "optimizer %s) at rates %s\n",
      seconds(k.total_s).c_str(), seconds(k.compute_s).c_str(), seconds(k.recompute_s).c_str(),
      seconds(k.overhead_s).c_str(), seconds(k.copy_s).c_str(), seconds(k.exposed_copy_s).c_str(),
      seconds(k.optimizer_s).c_str(), plan.rates.describe().c_str());
  std::printf(
      "smallest budgets (the predicted peaks) and predicted steps by where the weights live and what is "
      "recomputed:\n");
  for (WeightTier t : shown_tiers(*be, o)) {
    try {
      check_tier(t, *be, d, o.ranks);
    } catch (const Error& e) {
      std::printf("  weights %-8s  not possible: %s\n", offload::weight_tier_name(t), e.what());
      continue;
    }
    for (CheckpointPolicy p : policies_of(*be)) {
      const offload::Plan alt = byte_model(chosen, d, *be, p, t, startup, layout_for(smallest, t, o));
      std::printf(
          "  weights %-8s  checkpointing %-9s  %s; step %s\n", offload::weight_tier_name(t), policy_option(p),
          peaks_text(alt, {}).c_str(),
          seconds(predict_step(chosen, d, *be, p, t, alt, layout_for(smallest, t, o)).total_s).c_str());
    }
  }
  if (plan.fits) {
    std::printf("fits\n");
    return 0;
  }
  std::printf("does not fit:\n");
  for (const std::string& line : refusal_lines(o, d, *be, plan)) std::printf("  %s\n", line.c_str());
  return 2;
}

}  // namespace tf::cli
