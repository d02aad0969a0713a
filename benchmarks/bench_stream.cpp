// defines: bench_stream, the CPU training step with the per-layer base weights streamed from the
// model file (--weights disk) against the same step with them resident, at several token counts,
// and how much of the reading the step hides
//
//   build/benchmarks/bench_stream [--layers N] [--hidden H] [--tokens 64,256,1024] [--steps S] [--dir D]
//
// Writes a GGUF model of f32 weights (by default 8 layers of hidden 1024: about 360 MB) into D
// (default the directory of this binary), loads it twice as stored, and times S training steps
// (after one warm-up) of each at each token count: resident (the ops read the mapping, which the
// page cache holds after the warm-up) and streamed (each block read with O_DIRECT into one of two
// buffers while the previous block computes). In the same run it times the reads alone: the blocks
// of one step in its use order through the same weight store, nothing computed. Prints the step
// times, their ratio, and the share of the read time the step hides:
// 1 - (streamed - resident) / reads, within [0, 1] (the machine's noise can push it past either),
// and each run's peak RSS (the peak restarted before it loads).
//
// OMP_WAIT_POLICY matters: OpenMP threads that spin between parallel regions (libgomp's default)
// take every core when there are as many threads as cores, and the reads, which need CPU time of
// their own (the kernel's completions, or the pread thread), then come late; the short steps of few
// tokens show it most. libgomp reads the variable when it loads, so it is set in the environment of
// the run (OMP_WAIT_POLICY=passive), not here; the output says which policy ran.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "offload/weight_store.h"
#include "src/core/process_memory.h"
#include "src/core/rng.h"
#include "src/io/gguf.h"
#include "src/io/gguf_model.h"
#include "src/io/model_loader.h"
#include "src/model/llama.h"
#include "src/train/trainer.h"

using namespace tf;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

namespace {

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Every matrix takes its values from one random buffer and every norm from one buffer of ones: what
// is timed is the bytes, not the values.
void write_model(const LlamaConfig& c, const std::string& path) {
  const int64_t widest = std::max<int64_t>(int64_t(c.intermediate) * c.hidden, int64_t(c.vocab) * c.hidden);
  std::vector<float> values(static_cast<size_t>(widest));
  const std::vector<float> ones(static_cast<size_t>(c.hidden), 1.0f);
  const Philox rng(7, 1);
  for (size_t i = 0; i < values.size(); ++i) values[i] = 0.02f * (rng.uniform(uint64_t(i)) - 0.5f);
  io::GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_u32("llama.embedding_length", uint32_t(c.hidden));
  w.add_u32("llama.feed_forward_length", uint32_t(c.intermediate));
  w.add_u32("llama.block_count", uint32_t(c.n_layers));
  w.add_u32("llama.attention.head_count", uint32_t(c.n_heads));
  w.add_u32("llama.attention.head_count_kv", uint32_t(c.n_kv_heads));
  w.add_f32("llama.attention.layer_norm_rms_epsilon", c.rms_eps);
  w.add_string_array("tokenizer.ggml.tokens", std::vector<std::string>(size_t(c.vocab), "t"));
  const auto matrix = [&](const std::string& name, int64_t rows, int64_t cols) {
    w.add_tensor(name, GgmlType::F32, {cols, rows}, values.data(), size_t(rows * cols) * 4);
  };
  const auto norm = [&](const std::string& name) {
    w.add_tensor(name, GgmlType::F32, {c.hidden}, ones.data(), size_t(c.hidden) * 4);
  };
  matrix("token_embd.weight", c.vocab, c.hidden);
  norm("output_norm.weight");
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    norm(p + "attn_norm.weight");
    matrix(p + "attn_q.weight", c.q_dim(), c.hidden);
    matrix(p + "attn_k.weight", c.kv_dim(), c.hidden);
    matrix(p + "attn_v.weight", c.kv_dim(), c.hidden);
    matrix(p + "attn_output.weight", c.hidden, c.q_dim());
    norm(p + "ffn_norm.weight");
    matrix(p + "ffn_gate.weight", c.intermediate, c.hidden);
    matrix(p + "ffn_up.weight", c.intermediate, c.hidden);
    matrix(p + "ffn_down.weight", c.hidden, c.intermediate);
  }
  w.write(path);
}

Batch make_batch(int64_t tokens, int vocab, std::vector<int32_t>& ids, std::vector<int32_t>& targets,
                 std::vector<int32_t>& pos) {
  const int seq = int(std::min<int64_t>(tokens, 256));
  const Philox rng(3, 0);
  ids.resize(size_t(tokens));
  targets.resize(size_t(tokens));
  pos.resize(size_t(tokens));
  for (int64_t i = 0; i < tokens; ++i) {
    ids[size_t(i)] = int32_t(rng.u32(uint64_t(i)) % uint32_t(vocab));
    pos[size_t(i)] = int32_t(i % seq);
  }
  for (int64_t i = 0; i < tokens; ++i)
    targets[size_t(i)] = (i + 1) % seq == 0 ? kIgnoreIndex : ids[size_t(i + 1)];
  return Batch{int(tokens / seq), seq, ids.data(), targets.data(), pos.data(), nullptr};
}

struct StepRun {
  double seconds = 0;
  uint64_t peak_rss = 0;  // the process's peak RSS while the model was loaded and trained
};

// Seconds per step of `steps` training steps after one warm-up, and the peak RSS of the run.
StepRun step_time(const std::string& path, offload::WeightTier tier, int64_t tokens, int steps) {
  reset_peak_rss();
  LoraConfig lora;
  lora.rank = 16;
  lora.alpha = 32;
  LlamaModel model(io::load_model(path, true, io::QuantMode::Keep).weights, lora, CheckpointPolicy::PerBlock,
                   tokens, cpu_backend(), tier);
  TrainConfig tc;
  tc.lr.total_steps = steps + 1;
  Trainer trainer(model, tc);
  std::vector<int32_t> ids, targets, pos;
  const Batch b = make_batch(tokens, model.config().vocab, ids, targets, pos);
  trainer.step({&b, 1});
  const auto t0 = Clock::now();
  for (int s = 0; s < steps; ++s) trainer.step({&b, 1});
  return {seconds_since(t0) / steps, process_memory().peak_rss};
}

// Seconds to bring in the blocks of one training step in its use order, with nothing computed.
double read_time(const std::string& path, int steps) {
  const io::LoadedModel m = io::load_model(path, true, io::QuantMode::Keep);
  offload::WeightStore store(m.weights, offload::WeightTier::Disk, cpu_backend());
  const int L = m.weights.config.n_layers;
  const auto pass = [&] {
    for (int l = 0; l < L; ++l) {
      store.acquire(l, l + 1 < L ? l + 1 : l - 1);
      store.release(l);
    }
    for (int l = L - 1; l >= 0; --l) {
      store.acquire(l, l > 0 ? l - 1 : 1);
      store.release(l);
    }
  };
  pass();
  const auto t0 = Clock::now();
  for (int s = 0; s < steps; ++s) pass();
  return seconds_since(t0) / steps;
}

std::vector<int64_t> parse_list(const char* s) {
  std::vector<int64_t> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');) out.push_back(std::atoll(item.c_str()));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int layers = 8, hidden = 1024, steps = 2;
  std::vector<int64_t> token_counts = {64, 256, 1024};
  fs::path dir = fs::path(argv[0]).parent_path();
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "error: %s needs a value\n", a.c_str());
        std::exit(1);
      }
      return argv[++i];
    };
    if (a == "--layers")
      layers = std::atoi(next());
    else if (a == "--hidden")
      hidden = std::atoi(next());
    else if (a == "--tokens")
      token_counts = parse_list(next());
    else if (a == "--steps")
      steps = std::atoi(next());
    else if (a == "--dir")
      dir = next();
    else {
      std::fprintf(stderr, "error: unknown option %s\n", a.c_str());
      return 1;
    }
  }
  LlamaConfig c;
  c.hidden = hidden;
  c.intermediate = hidden * 11 / 4 / 64 * 64;
  c.n_layers = layers;
  c.n_heads = hidden / 64;
  c.n_kv_heads = std::max(1, c.n_heads / 4);
  c.head_dim = 64;
  c.rope.head_dim = 64;
  c.vocab = 1024;
  c.tie_embeddings = true;
  c.max_positions = 4096;
  const std::string path = (dir / "bench_stream.gguf").string();
  write_model(c, path);
  const double mb = double(fs::file_size(path)) / 1e6;
  const char* wait_policy = std::getenv("OMP_WAIT_POLICY");
  std::printf("model: %s, %.0f MB of f32 weights (%d layers, hidden %d, intermediate %d), LoRA r=16\n",
              path.c_str(), mb, c.n_layers, c.hidden, c.intermediate);
  std::printf("threads %d, OMP_WAIT_POLICY %s\n", cpu::num_threads(), wait_policy ? wait_policy : "unset");
  const double reads = read_time(path, steps);
  std::printf("reads of one step alone (%d blocks, %s): %.3f s\n", 2 * c.n_layers - 2,
              offload::DirectReader(path).mode().c_str(), reads);
  std::printf("%8s %12s %12s %8s %8s %14s %14s\n", "tokens", "resident s", "streamed s", "ratio", "hidden",
              "resident RSS", "streamed RSS");
  for (int64_t tokens : token_counts) {
    const StepRun resident = step_time(path, offload::WeightTier::Resident, tokens, steps);
    const StepRun streamed = step_time(path, offload::WeightTier::Disk, tokens, steps);
    std::printf("%8lld %12.3f %12.3f %8.2f %7.0f%% %10.1f MiB %10.1f MiB\n", static_cast<long long>(tokens),
                resident.seconds, streamed.seconds, streamed.seconds / resident.seconds,
                100.0 * std::clamp(1.0 - (streamed.seconds - resident.seconds) / reads, 0.0, 1.0),
                double(resident.peak_rss) / double(1 << 20), double(streamed.peak_rss) / double(1 << 20));
  }
  fs::remove(path);
  return 0;
}
