// defines: the kernel scratch of host_overheads against what the tracker counts beyond a model's
// memory plan
#include <gtest/gtest.h>
#include <sys/wait.h>

#include "kernels/ops.h"
#include "offload/host_overheads.h"
#include "src/io/quantize_weights.h"
#include "src/model/llama.h"
#include "tests/cli_test_util.h"
#include "tests/model_test_util.h"

namespace tf::test {
namespace {

struct ScratchCase {
  const char* name;
  io::QuantMode quant;  // None: f32 weights; Bf16; Nf4 for every matrix, the tied lm_head included
  int threads;
};

// The tracker's peak over one training step beyond what the model's memory plan allocates, and the
// kernel scratch host_overheads predicts, from a process of its own: the scratch is kept per
// thread for the process's life, so a step in this one would find it grown by an earlier test, and
// OpenMP's thread pool does not survive a fork once started.
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

// The kernel scratch is computed from the kernels' own sizes, so it is exact: a comparison of RSS,
// within its 5%, would hide an error in it.
TEST(PlanKernelScratch, IsWhatTheTrackerCountsBeyondTheMemoryPlan) {
  for (const ScratchCase& sc :
       {ScratchCase{"f32", io::QuantMode::None, 1}, ScratchCase{"f32", io::QuantMode::None, 2},
        ScratchCase{"bf16", io::QuantMode::Bf16, 1}, ScratchCase{"nf4", io::QuantMode::Nf4, 2}}) {
    const auto [measured, predicted] = scratch_in_child(sc);
    EXPECT_EQ(measured, predicted) << sc.name << ", " << sc.threads << " threads";
  }
}

}  // namespace
}  // namespace tf::test
