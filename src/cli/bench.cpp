// defines: tf::cli::run_bench
#include "src/cli/bench.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/bf16_gemm.h"
#include "kernels/cpu/threads.h"
#include "kernels/ops.h"
#include "kernels/profile.h"
#include "offload/direct_reader.h"
#include "src/cli/commands.h"
#include "src/cli/common.h"
#include "src/cli/options.h"
#include "src/cli/plan.h"
#include "src/core/alloc.h"
#include "src/core/error.h"
#include "src/core/process_memory.h"
#include "src/core/rng.h"
#include "src/io/describe.h"
#include "src/io/durable.h"
#include "src/io/model_loader.h"
#include "src/io/quantize_weights.h"
#include "src/model/llama.h"
#include "src/train/trainer.h"

namespace tf::cli {

namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

// The first line of /proc/cpuinfo naming `key`, after its colon.
std::string cpuinfo(const std::string& key) {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key, 0) != 0) continue;
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    const size_t start = line.find_first_not_of(' ', colon + 1);
    return start == std::string::npos ? "" : line.substr(start);
  }
  return "";
}

// The instruction-set extensions the kernels care about, as the kernel reports them.
std::vector<std::string> isa_flags() {
  std::istringstream flags(" " + cpuinfo("flags") + " ");
  std::vector<std::string> have;
  std::string f;
  const std::vector<std::string> wanted = {"avx2",        "fma",         "f16c",     "avx512f", "avx512bw",
                                           "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"};
  while (flags >> f)
    if (std::find(wanted.begin(), wanted.end(), f) != wanted.end()) have.push_back(f);
  return have;
}

uint64_t mem_total() {
  std::ifstream in("/proc/meminfo");
  std::string key, unit;
  uint64_t kib = 0;
  while (in >> key >> kib >> unit)
    if (key == "MemTotal:") return kib * 1024;
  return 0;
}

struct Figure {
  std::string name, shape;
  double seconds = 0;  // the best of the timed calls
  double work = 0;     // FLOPs, or bytes for a memory-bound op
  bool bytes = false;
  double rate() const { return seconds > 0 ? work / seconds : 0; }
};

// The best time of `reps` calls of `f`, after one untimed call (thread start-up, first touch of
// pages, a device's lazy set-up), each call ending when the backend has finished it.
double best_time(Backend& be, int reps, const std::function<void()>& f) {
  f();
  be.synchronize();
  double best = 1e300;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    f();
    be.synchronize();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
}

std::string dims(std::initializer_list<int64_t> d) {
  std::string s;
  for (int64_t v : d) s += (s.empty() ? "" : "x") + std::to_string(v);
  return s;
}

// A buffer of `n` floats on the backend, filled with small values that keep every op finite.
DeviceMem filled(Backend& be, int64_t n, float scale, uint64_t seed) {
  DeviceMem m = be.alloc_unplanned(size_t(n) * sizeof(float), MemTag::Workspace, "bench operand");
  std::vector<float> host(static_cast<size_t>(n));
  const Philox rng(seed, 1);
  for (size_t i = 0; i < host.size(); ++i) host[i] = scale * rng.normal(uint64_t(i));
  be.upload_n(m.as<float>(), host.data(), host.size());
  return m;
}

// FLOPs of one training step that are useful work: the frozen projections' forward and input
// gradients, the adapters' forward and both gradients, causal attention's forward and backward
// (its scores formed again), lm_head's logits and input gradient; recomputation is not counted.
double train_flops(const LlamaConfig& c, const LoraConfig& lora, int batch, int seq) {
  const double n = double(batch) * seq;
  double base = 0, adapters = 0;
  for (WeightSlot s : {WeightSlot::Q, WeightSlot::K, WeightSlot::V, WeightSlot::O, WeightSlot::Gate,
                       WeightSlot::Up, WeightSlot::Down}) {
    const auto [rows, cols] = weight_shape(c, s);
    base += double(rows) * double(cols);
    if (lora.has(*lora_target_of(s))) adapters += double(lora.rank) * double(rows + cols);
  }
  const double attention = 2.0 * double(seq) * seq * c.n_heads * c.head_dim * batch;
  return c.n_layers * (4 * n * base + 6 * n * adapters + 3.5 * attention) +
         4 * n * double(c.vocab) * c.hidden;
}

LlamaWeights bench_weights(const BenchOptions& o, std::string& what) {
  const io::QuantMode mode = quant_option(o.quant);
  if (!o.model.empty()) {
    what = o.model;
    return io::load_model(o.model, true, mode).weights;
  }
  const LlamaConfig c = named_config(o.config);
  what = o.config + " (random weights)";
  LlamaWeights w = init_random_weights(c, DType::F32, 1);
  if (mode == io::QuantMode::Keep || mode == io::QuantMode::None) return w;
  LlamaWeights::for_each_slot(c, [&](WeightSlot slot, int layer) {
    if (io::is_matrix_slot(slot))
      w.slot(slot, layer) = io::store_weight(w.slot(slot, layer), mode, w, hf_weight_name(c, slot, layer));
  });
  return w;
}

// The tensors' views without what keeps their memory: the planner reads shapes and dtypes only.
LlamaWeights views_of(const LlamaWeights& w) {
  LlamaWeights v;
  v.config = w.config;
  v.embed = w.embed;
  v.final_norm = w.final_norm;
  v.lm_head = w.lm_head;
  v.blocks = w.blocks;
  return v;
}

std::string rate_text(const Figure& f) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f.bytes ? "%.2f GB/s" : "%.2f GFLOP/s", f.rate() / 1e9);
  return buf;
}

// The fixed cost of one op on the backend: rmsnorm over r and 2r rows of `hidden` (r x hidden about
// 64 Ki floats: enough for the cpu kernels to fork their threads, few enough for the cores' caches;
// fewer rows where a call of 2r takes over 2 ms, as on the simulated device), each the best of 5
// runs of up to 100 calls (as many as take about 10 ms, at least 3), extrapolated to no rows. Zero
// where the noise of the two leaves no positive fixed part.
struct OpCost {
  int64_t rows = 0;
  double small_s = 0, large_s = 0;  // per call, at r and 2r rows
  double fixed_s() const { return std::max(0.0, 2 * small_s - large_s); }
};

OpCost op_cost(Backend& be, const WeightRef& norm, int64_t hidden, float eps) {
  const int64_t most = std::max<int64_t>(1, (int64_t(1) << 16) / hidden);
  DeviceMem x = filled(be, 2 * most * hidden, 0.5f, 21), y = filled(be, 2 * most * hidden, 0.0f, 22),
            rstd = filled(be, 2 * most, 0.0f, 23);
  auto run = [&](int64_t rows, int calls) {
    for (int i = 0; i < calls; ++i)
      be.rmsnorm_forward(y.as<float>(), rstd.as<float>(), x.as<float>(), norm, rows, hidden, eps);
  };
  auto once = [&](int64_t rows) {
    const auto t0 = Clock::now();
    run(rows, 1);
    be.synchronize();
    return std::chrono::duration<double>(Clock::now() - t0).count();
  };
  OpCost c;
  c.rows = 1;
  double large = once(2);
  while (c.rows < most && large < 2e-3) {
    c.rows = std::min(most, 2 * c.rows);
    large = once(2 * c.rows);
  }
  const int calls = int(std::clamp(0.01 / std::max(large, 1e-9), 3.0, 100.0));
  auto per_call = [&](int64_t rows) { return best_time(be, 5, [&] { run(rows, calls); }) / calls; };
  c.small_s = per_call(c.rows);
  c.large_s = per_call(2 * c.rows);
  return c;
}

// The model file read as `--weights disk` streams it: the largest of the files the weights point
// into, its tensors' window from the start, up to 1 GiB, through the direct reader (around the page
// cache) in 8 MiB reads, 8 in flight.
struct DiskRead {
  std::string path, mode;
  uint64_t bytes = 0;
  double seconds = 0;
  double rate() const { return seconds > 0 ? double(bytes) / seconds : 0; }
};

DiskRead disk_read(const MappedFile& f) {
  constexpr uint64_t kChunk = uint64_t(8) << 20, kLimit = uint64_t(1) << 30;
  constexpr unsigned kInFlight = 8;
  offload::DirectReader reader(f.path, kInFlight);
  DiskRead d{f.path, reader.mode(), std::min(f.bytes, kLimit), 0};
  const size_t span = offload::DirectReader::aligned_span(0, kChunk) + offload::DirectReader::kAlign;
  Buffer pool(span * kInFlight + offload::DirectReader::kAlign, MemTag::Workspace, /*zero=*/false);
  std::byte* const base = offload::DirectReader::align_buffer(pool.data());
  std::vector<uint64_t> tickets(kInFlight, 0);
  const auto t0 = Clock::now();
  unsigned slot = 0;
  for (uint64_t at = 0; at < d.bytes; at += kChunk, slot = (slot + 1) % kInFlight) {
    if (at >= kInFlight * kChunk) reader.wait(tickets[slot]);
    const uint64_t offset = f.offset + at, bytes = std::min(kChunk, d.bytes - at);
    tickets[slot] =
        reader.submit(offset, bytes, base + slot * span, offload::DirectReader::aligned_span(offset, bytes));
  }
  reader.drain();
  d.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return d;
}

}  // namespace

int run_bench(const BenchOptions& o) {
  TF_CHECK(o.seq >= 1 && o.seq <= 1 << 20, "--seq must be in [1, 1048576], got ", o.seq);
  TF_CHECK(o.micro_batch >= 1 && o.micro_batch <= 4096, "--micro-batch must be in [1, 4096], got ",
           o.micro_batch);
  TF_CHECK(o.steps >= 1 && o.steps <= 1000, "--steps must be in [1, 1000], got ", o.steps);
  TF_CHECK(o.lora_rank >= 1 && o.lora_rank <= 4096, "--lora-rank must be in [1, 4096], got ", o.lora_rank);
  cpu::set_num_threads(o.threads);
  check_matmul_option(o.matmul, o.device);
  const uint64_t startup = process_memory().rss;
  std::string device_note;
  std::unique_ptr<Backend> be = make_backend(o.device, &device_note, parse_attention(o.attention));
  std::string what;
  LlamaWeights weights = bench_weights(o, what);
  const MappedFile* largest = nullptr;
  for (const MappedFile& f : weights.files)
    if (!largest || f.bytes > largest->bytes) largest = &f;
  const std::optional<MappedFile> model_file = largest ? std::optional(*largest) : std::nullopt;
  const LlamaConfig c = weights.config;
  const int64_t N = int64_t(o.micro_batch) * o.seq, H = c.hidden, I = c.intermediate, V = c.vocab;

  const std::vector<std::string> isa = isa_flags();
  std::string isa_text;
  for (const std::string& f : isa) isa_text += (isa_text.empty() ? "" : " ") + f;
  json machine = {
      {"cpu", cpuinfo("model name")},     {"hardware_threads", std::thread::hardware_concurrency()},
      {"threads", cpu::num_threads()},    {"isa", isa},
      {"memory_bytes", mem_total()},      {"backend", be->describe()},
      {"wait_policy", cpu::wait_policy()}};
  if (const std::optional<uint64_t> cap = be->memory_capacity()) machine["device_memory_bytes"] = *cap;
  std::printf("machine   %s; %u hardware threads, %d used; %s; %s memory\n", cpuinfo("model name").c_str(),
              std::thread::hardware_concurrency(), cpu::num_threads(),
              isa_text.empty() ? "no AVX2 or AVX-512" : isa_text.c_str(),
              format_bytes(double(mem_total())).c_str());
  std::printf("threads   %s\n", cpu::wait_policy().c_str());
  std::printf("backend   %s%s\n", device_note.empty() ? be->describe().c_str() : device_note.c_str(),
              be->host_memory() ? " (no GPU in use: the cpu backend's benchmarks)" : "");
  std::printf(
      "model     %s: %s, %d layers, hidden %d, intermediate %d, %d heads (%d kv) of %d, vocab %d; "
      "base %s; %lld tokens per micro-batch (%d x %d)\n",
      what.c_str(), c.architecture.c_str(), c.n_layers, c.hidden, c.intermediate, c.n_heads, c.n_kv_heads,
      c.head_dim, c.vocab, std::string(dtype_name(weights.blocks.at(0).gate.dtype)).c_str(), (long long)N,
      o.micro_batch, o.seq);

  // First a short training run (LoRA on all projections, as the plan would run it within the
  // machine's memory, on random tokens), so that its peak memory is its own; then the ops.
  FinetuneOptions fo;
  fo.model = o.model;
  fo.quant = o.quant;
  fo.seq_len = o.seq;
  fo.micro_batch = o.micro_batch;
  fo.batch_size = o.micro_batch;
  fo.lora_rank = o.lora_rank;
  fo.lora_alpha = float(2 * o.lora_rank);
  fo.lora_dropout = 0;
  fo.steps = o.steps + 1;
  io::ModelDescription d;
  if (o.model.empty()) {
    d.weights = views_of(weights);
    d.source = views_of(weights);
    // Random weights are resident as a fully read model file's pages would be.
    LlamaWeights::for_each_slot(c, [&](WeightSlot s, int layer) {
      d.file_bytes += uint64_t(io::stored_bytes(weights.slot(s, layer)));
    });
  } else {
    d = io::describe_model(o.model, quant_option(o.quant));
  }
  const RunPlan plan = plan_run(fo, d, *be, resolve_budget(fo, *be), startup);
  const LoraConfig lora = lora_config(fo);
  MemTracker& mem = be->tracker();
  be->reserve(LlamaModel::memory_plan(weights, lora, plan.policy, N, *be, plan.tier, plan.layout).total);
  LlamaModel model(std::move(weights), lora, plan.policy, N, *be, plan.tier, plan.layout);
  // The products run as finetune's would on this machine: the ops below and the training run.
  const std::string matmul_line = apply_matmul_option(o.matmul, *be, model.weights());
  const std::string precision =
      be->host_memory() ? cpu::matmul_precision_name(cpu::matmul_precision()) : "bf16";
  machine["matmul"] = precision;
  if (!matmul_line.empty()) std::printf("matmul    %s\n", matmul_line.c_str());
  TrainConfig tc;
  tc.lr.peak_lr = 1e-4f;
  tc.lr.total_steps = o.steps + 1;
  Trainer trainer(model, tc);
  std::vector<int32_t> tokens(static_cast<size_t>(N)), targets(static_cast<size_t>(N)),
      pos(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) {
    tokens[size_t(i)] = int32_t((i * 104729 + 17) % V);
    targets[size_t(i)] = int32_t((i * 7919 + 3) % V);
    pos[size_t(i)] = int32_t(i % o.seq);
  }
  const Batch batch{o.micro_batch, o.seq, tokens.data(), targets.data(), pos.data(), nullptr};
  trainer.step({&batch, 1});
  be->synchronize();
  mem.reset_peaks();
  reset_peak_rss();
  const auto t0 = Clock::now();
  for (int s = 0; s < o.steps; ++s) trainer.step({&batch, 1});
  be->synchronize();
  const double step_s = std::chrono::duration<double>(Clock::now() - t0).count() / o.steps;
  Figure train{"training step (LoRA r" + std::to_string(o.lora_rank) + ", all projections)",
               dims({o.micro_batch, o.seq}), step_s, train_flops(model.config(), lora, o.micro_batch, o.seq)};
  const ProcessMemory pm = process_memory();
  const uint64_t tracked = mem.peak_total();
  const offload::Tier home = be->host_memory() ? offload::Tier::Host : offload::Tier::Device;
  const uint64_t predicted = plan.plan.peak(home);
  const uint64_t measured = be->host_memory() ? pm.peak_rss : be->device_memory_peak().value_or(tracked);
  // --profile: as many steps again, each op timed, apart from the timed steps, whose figures the
  // profile's waits for each op would slow on a device.
  std::optional<OpProfile> profile;
  if (o.profile) {
    profile.emplace();
    be->set_profile(&*profile);
    for (int s = 0; s < o.steps; ++s) {
      const auto p0 = Clock::now();
      trainer.step({&batch, 1});
      be->synchronize();
      profile->add_step(std::chrono::duration<double>(Clock::now() - p0).count());
    }
    be->set_profile(nullptr);
  }

  // The ops, on the model's own shapes, in the backend's memory.
  std::vector<Figure> figs;
  OpCost cost;
  {
    const int reps = 5;
    DeviceMem x = filled(*be, N * std::max(H, I), 0.5f, 1),
              y = filled(*be, N * std::max({H, I, int64_t(c.q_dim())}), 0.5f, 2);
    DeviceMem w_up = filled(*be, I * H, 0.05f, 3), w_down = filled(*be, H * I, 0.05f, 4);
    auto gemm = [&](const char* name, const DeviceMem& w, int64_t in, int64_t out) {
      Figure f{name, dims({N, in, out}), 0, 2.0 * double(N) * double(in) * double(out)};
      f.seconds = best_time(*be, reps, [&] {
        be->matmul(y.as<float>(), out, MatOperand{x.as<float>(), DType::F32, in, false},
                   MatOperand{w.as<float>(), DType::F32, in, true}, N, out, in, 1.0f, 0.0f);
      });
      figs.push_back(f);
    };
    gemm("gemm f32 (up shape)", w_up, H, I);
    gemm("gemm f32 (down shape)", w_down, I, H);
    // The frozen matrices as the model placed them; streamed blocks, which it places only in
    // turn, are placed as stored into memory of their own beside its arena.
    const LlamaWeights& placed = model.placed_weights();
    const bool resident = model.weight_tier() == offload::WeightTier::Resident;
    std::vector<DeviceMem> storage;
    auto place = [&](const WeightRef& w, const char* name) {
      const size_t bytes = be->placed_weight_bytes(w);
      if (bytes == 0) return be->place_weight_at(w, name, nullptr, Stream::Compute);
      storage.push_back(be->alloc_unplanned(bytes, MemTag::Weights, name));
      return be->place_weight_at(w, name, storage.back().data(), Stream::Compute);
    };
    const BlockWeights& b0 = model.weights().blocks.at(0);
    const WeightRef gate = resident ? placed.blocks.at(0).gate : place(b0.gate, "bench gate");
    const WeightRef down = resident ? placed.blocks.at(0).down : place(b0.down, "bench down");
    // On the cpu, the precision of a product with a weight of this dtype (f32 and f16 ones stay f32).
    const auto products = [&](DType weight) -> std::string {
      if (!be->host_memory()) return ")";
      return cpu::matmul_precision() == cpu::MatmulPrecision::BF16 && cpu::bf16_path_takes(weight)
                 ? ", bf16 products)"
                 : ", f32 products)";
    };
    Figure fwd{std::string("linear forward (") + std::string(dtype_name(gate.dtype)) + products(gate.dtype),
               dims({N, H, I}), 0, 2.0 * double(N) * double(H) * double(I)};
    fwd.seconds =
        best_time(*be, reps, [&] { be->linear_forward(y.as<float>(), x.as<float>(), gate, N, 0.0f); });
    figs.push_back(fwd);
    Figure bwd{
        std::string("linear input grad (") + std::string(dtype_name(down.dtype)) + products(down.dtype),
        dims({N, H, I}), 0, 2.0 * double(N) * double(H) * double(I)};
    bwd.seconds =
        best_time(*be, reps, [&] { be->linear_backward_input(y.as<float>(), x.as<float>(), down, N, 0.0f); });
    figs.push_back(bwd);

    const AttentionShape a{o.micro_batch, o.seq, c.n_heads, c.n_kv_heads, c.head_dim, c.attention_scale(), 0};
    DeviceMem q = filled(*be, N * c.q_dim(), 0.5f, 5), k = filled(*be, N * c.kv_dim(), 0.5f, 6),
              v = filled(*be, N * c.kv_dim(), 0.5f, 7), out = filled(*be, N * c.q_dim(), 0.0f, 8),
              lse = filled(*be, N * c.n_heads, 0.0f, 9), dq = filled(*be, N * c.q_dim(), 0.0f, 10),
              dk = filled(*be, N * c.kv_dim(), 0.0f, 11), dv = filled(*be, N * c.kv_dim(), 0.0f, 12);
    const double att = 2.0 * double(o.seq) * o.seq * c.n_heads * c.head_dim * o.micro_batch;
    const std::string ashape = dims({o.micro_batch, o.seq, c.n_heads, c.head_dim});
    Figure af{"attention forward (causal)", ashape, 0, att};
    af.seconds = best_time(*be, reps, [&] {
      be->attention_forward(out.as<float>(), lse.as<float>(), q.as<float>(), k.as<float>(), v.as<float>(),
                            nullptr, a);
    });
    figs.push_back(af);
    Figure ab{"attention backward", ashape, 0, 2.5 * att};
    ab.seconds = best_time(*be, reps, [&] {
      be->attention_backward(dq.as<float>(), dk.as<float>(), dv.as<float>(), out.as<float>(), q.as<float>(),
                             k.as<float>(), v.as<float>(), out.as<float>(), lse.as<float>(), nullptr, a);
    });
    figs.push_back(ab);

    const WeightRef head = placed.lm_head;
    DeviceMem t = be->alloc_unplanned(size_t(N) * sizeof(int32_t), MemTag::Workspace, "bench targets");
    be->upload_n(t.as<int32_t>(), targets.data(), targets.size());
    Figure lf{std::string("loss: lm_head + cross-entropy, fwd + bwd (") +
                  std::string(dtype_name(head.dtype)) + products(head.dtype),
              dims({N, H, V}), 0, 4.0 * double(N) * double(H) * double(V)};
    lf.seconds = best_time(*be, reps, [&] {
      int64_t valid = 0;
      be->lm_head_cross_entropy(y.as<float>(), &valid, x.as<float>(), head, t.as<int32_t>(), N, 1.0f);
    });
    figs.push_back(lf);

    const WeightRef norm = placed.final_norm;
    Figure nf{"rmsnorm forward", dims({N, H}), 0, double(N) * double(H) * 2 * sizeof(float), true};
    nf.seconds = best_time(*be, reps, [&] {
      be->rmsnorm_forward(y.as<float>(), lse.as<float>(), x.as<float>(), norm, N, H, c.rms_eps);
    });
    figs.push_back(nf);
    cost = op_cost(*be, norm, H, c.rms_eps);
  }
  const std::optional<DiskRead> disk = model_file ? std::optional(disk_read(*model_file)) : std::nullopt;
  double ceiling = 0;
  for (const Figure& f : figs)
    if (!f.bytes) ceiling = std::max(ceiling, f.rate());

  std::printf("\n%-52s %-18s %10s %16s %9s\n", "op", "shape", "time", "rate", "of ceiling");
  auto row = [&](const Figure& f) {
    char pct[16] = "-";
    if (!f.bytes && ceiling > 0) std::snprintf(pct, sizeof pct, "%.0f%%", 100.0 * f.rate() / ceiling);
    std::printf("%-52s %-18s %8.3f ms %16s %9s\n", f.name.c_str(), f.shape.c_str(), f.seconds * 1e3,
                rate_text(f).c_str(), pct);
  };
  for (const Figure& f : figs) row(f);
  row(train);
  const std::string policy = policy_option(plan.policy);
  std::printf("\ntraining  %.1f tokens/s; checkpointing %s, weights %s\n", double(N) / step_s, policy.c_str(),
              offload::weight_tier_name(plan.tier));
  std::printf("memory    %s peak %s measured (%s), %s tracked; the plan predicted %s\n",
              offload::tier_name(home), format_bytes(double(measured)).c_str(),
              be->host_memory() ? "RSS" : "device", format_bytes(double(tracked)).c_str(),
              format_bytes(double(predicted)).c_str());
  if (cost.fixed_s() > 0)
    std::printf("op cost   %.1f us per op (rmsnorm forward: %.1f us at %lld rows, %.1f us at %lld)\n",
                cost.fixed_s() * 1e6, cost.small_s * 1e6, (long long)cost.rows, cost.large_s * 1e6,
                (long long)(2 * cost.rows));
  else
    std::printf("op cost   not resolved: rmsnorm forward took %.1f us at %lld rows and %.1f us at %lld\n",
                cost.small_s * 1e6, (long long)cost.rows, cost.large_s * 1e6, (long long)(2 * cost.rows));
  if (disk)
    std::printf("disk      %.2f GB/s reading %s of %s (%s)\n", disk->rate() / 1e9,
                format_bytes(double(disk->bytes)).c_str(), disk->path.c_str(), disk->mode.c_str());
  else
    std::printf("disk      not measured: no model file (--model) whose tensors stream from it\n");
  if (profile)
    std::printf("\nprofile   the training step's ops over %d more steps, each op timed:\n%s", o.steps,
                profile->table().c_str());

  if (!o.json.empty()) {
    json ops = json::array();
    auto entry = [&](const Figure& f) {
      json j = {{"name", f.name},
                {"shape", f.shape},
                {"seconds", f.seconds},
                {"rate", f.rate()},
                {"unit", f.bytes ? "B/s" : "FLOP/s"}};
      j["of_ceiling"] = !f.bytes && ceiling > 0 ? json(f.rate() / ceiling) : json(nullptr);
      return j;
    };
    for (const Figure& f : figs) ops.push_back(entry(f));
    json doc = {{"machine", machine},
                {"model",
                 {{"name", what},
                  {"architecture", c.architecture},
                  {"layers", c.n_layers},
                  {"hidden", c.hidden},
                  {"vocab", c.vocab},
                  {"base_dtype", dtype_name(model.weights().blocks.at(0).gate.dtype)}}},
                {"tokens_per_micro_batch", N},
                {"ceiling_flops", ceiling},
                {"ops", ops},
                {"train", entry(train)},
                {"tokens_per_s", double(N) / step_s},
                {"checkpointing", policy},
                {"weights", offload::weight_tier_name(plan.tier)},
                {"memory",
                 {{"tier", offload::tier_name(home)},
                  {"measured_peak", measured},
                  {"tracked_peak", tracked},
                  {"predicted_peak", predicted}}}};
    doc["op_cost"] = {{"op", "rmsnorm forward"},
                      {"rows", {cost.rows, 2 * cost.rows}},
                      {"seconds", {cost.small_s, cost.large_s}},
                      {"seconds_per_op", cost.fixed_s() > 0 ? json(cost.fixed_s()) : json(nullptr)}};
    doc["disk"] = disk ? json{{"file", disk->path},
                              {"mode", disk->mode},
                              {"bytes", disk->bytes},
                              {"seconds", disk->seconds},
                              {"rate", disk->rate()}}
                       : json(nullptr);
    if (profile) doc["profile"] = json::parse(profile->json());
    io::write_file_atomic(o.json, doc.dump(2) + "\n");
  }
  return 0;
}

}  // namespace tf::cli
