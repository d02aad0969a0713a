// defines: tests of a model trained with its per-layer weights streamed (offload::WeightStore): on
// the cpu from the model file (GGUF with Q8_0 blocks, safetensors bf16) and on the simulated device
// from host memory, each against the same model with resident weights, bit for bit; the file's pages
// of streamed tensors never mapped in; a file truncated or changed after loading refused by name.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "gguf_test_util.h"
#include "kernels/backend.h"
#include "kernels/ops.h"
#include "model_test_util.h"
#include "src/core/error.h"
#include "src/core/process_memory.h"
#include "src/io/describe.h"
#include "src/io/model_loader.h"
#include "src/io/quantize_weights.h"
#include "src/io/spill.h"
#include "src/model/llama.h"
#include "src/train/trainer.h"
#include "tests/cli_test_util.h"
#include "tests/sim_test_util.h"
#include "tests/stream_test_util.h"
#include "tests/test_util.h"

namespace tf {
namespace {

using offload::WeightTier;
using test::BatchData;
using test::synthetic_batch;

LlamaConfig stream_config() {
  LlamaConfig c = test::tiny_config(64);
  c.n_layers = 3;  // a block that is neither the first nor the last
  return c;
}

LoraConfig stream_lora() {
  LoraConfig l = test::lora_r8();
  l.dropout = 0.1f;
  return l;
}

TrainConfig train_config(int steps) {
  TrainConfig t;
  t.lr.peak_lr = 1e-2f;
  t.lr.total_steps = steps;
  t.lr.warmup_steps = 1;
  return t;
}

// What a few training steps, a loss, logits and two decoding calls give: everything compared with ==.
struct Run {
  std::vector<double> losses;
  std::vector<float> lora, logits, decoded;
  double eval = 0;
};

Run run(LlamaModel& m, int steps) {
  Run r;
  Trainer t(m, train_config(steps));
  for (int s = 0; s < steps; ++s) {
    const BatchData data = synthetic_batch(2, 12, m.config().vocab, uint64_t(s), 7, 1);
    const Batch b = data.view(true);
    r.losses.push_back(t.step({&b, 1}).loss);
  }
  const LoraState host = m.lora().host_copy();
  r.lora.assign(host.params.as<float>(), host.params.as<float>() + host.n_params);
  const BatchData data = synthetic_batch(1, 10, m.config().vocab, 77);
  r.eval = m.forward_loss(data.view()).mean();
  r.logits.resize(size_t(10 * m.config().vocab));
  m.forward_logits(data.view(), r.logits.data());
  KvCache cache = m.make_kv_cache(16);
  r.decoded.resize(size_t(2 * m.config().vocab));
  m.decode(cache, data.tokens.data(), 6, r.decoded.data());
  m.decode(cache, data.tokens.data() + 6, 1, r.decoded.data() + m.config().vocab);
  return r;
}

void expect_same(const Run& a, const Run& b) {
  ASSERT_EQ(a.losses.size(), b.losses.size());
  for (size_t i = 0; i < a.losses.size(); ++i) EXPECT_EQ(a.losses[i], b.losses[i]) << "step " << i;
  EXPECT_EQ(a.eval, b.eval);
  EXPECT_TRUE(a.lora == b.lora) << "LoRA parameters differ";
  EXPECT_TRUE(a.logits == b.logits) << "logits differ";
  EXPECT_TRUE(a.decoded == b.decoded) << "decoded logits differ";
}

// Pages of the per-layer tensors mapped in, leaving out the 64 KiB after the last global tensor
// (the kernel maps neighbouring pages of a read fault in, "fault-around").
size_t layer_pages_present(const LlamaWeights& w) {
  size_t n = 0;
  const std::byte* globals_end = nullptr;
  for (const WeightRef* g : {&w.embed, &w.final_norm, &w.lm_head})
    globals_end = std::max(globals_end,
                           static_cast<const std::byte*>(g->data) + dtype_bytes(g->dtype, g->rows * g->cols));
  LlamaWeights::for_each_slot(w.config, [&](WeightSlot s, int layer) {
    if (!is_layer_slot(s)) return;
    const WeightRef& r = w.slot(s, layer);
    const auto* begin = static_cast<const std::byte*>(r.data);
    const size_t bytes = size_t(dtype_bytes(r.dtype, r.rows * r.cols));
    const std::byte* from = std::max(begin, globals_end + (64 << 10));
    if (from < begin + bytes) n += test::present_pages(from, size_t(begin + bytes - from));
  });
  return n;
}

class StreamTrain : public ::testing::TestWithParam<CheckpointPolicy> {};

// A GGUF base with f32 tensors and Q8_0 ffn_down, kept as stored: the disk tier reads each block
// from the file, Q8_0 blocks as they are.
TEST_P(StreamTrain, CpuFromAGgufFileMatchesResidentBitForBit) {
  test::TempDir tmp;
  LlamaConfig cfg = stream_config();
  cfg.hidden = 64;  // rows of ffn_down a multiple of Q8_0's 32 elements, and blocks of several pages
  cfg.intermediate = 128;
  cfg.head_dim = cfg.rope.head_dim = 16;  // what a GGUF file without attention.key_length says
  const test::GgufBase base(cfg, (tmp.dir / "m.gguf").string());
  const LoraConfig lora = stream_lora();
  io::LoadedModel resident = io::load_model(base.path, true, io::QuantMode::Keep);
  io::LoadedModel streamed = io::load_model(base.path, true, io::QuantMode::Keep);
  const MemoryPlan plan =
      LlamaModel::memory_plan(streamed.weights, lora, GetParam(), 24, cpu_backend(), WeightTier::Disk);
  LlamaModel r(std::move(resident.weights), lora, GetParam(), 24);
  LlamaModel d(std::move(streamed.weights), lora, GetParam(), 24, cpu_backend(), WeightTier::Disk);
  EXPECT_EQ(d.weight_tier(), WeightTier::Disk);
  expect_same(run(r, 4), run(d, 4));

  // Every per-layer tensor is read once per pass: f32 except the Q8_0 ffn_down (34 bytes a 32).
  const int64_t H = cfg.hidden, I = cfg.intermediate;
  const int64_t f32 = 2 * H + H * (cfg.q_dim() + 2 * cfg.kv_dim()) + cfg.q_dim() * H + 2 * H * I;
  EXPECT_EQ(plan.streamed_bytes, uint64_t(cfg.n_layers * (4 * f32 + H * I / 32 * 34)));
  EXPECT_TRUE(plan.host.empty()) << "on the cpu the read buffers are the backend's memory";
  EXPECT_EQ(plan.bytes(MemTag::Weights), 2 * plan.allocs[0].bytes);
  EXPECT_EQ(plan.allocs[0].what, "streamed block buffer");

  // The resident model computed from the mapping; the streamed one never touched its layers' pages.
  EXPECT_GT(layer_pages_present(r.weights()), 0u);
  EXPECT_EQ(layer_pages_present(d.weights()), 0u);
}

// bf16 safetensors kept as stored, trained on the cpu from the file; one layer too, whose block is
// both the first and the last of every pass.
TEST_P(StreamTrain, CpuFromSafetensorsMatchesResidentBitForBit) {
  test::TempDir tmp;
  for (int layers : {3, 1}) {
    LlamaConfig cfg = stream_config();
    cfg.n_layers = layers;
    const std::string dir = test::write_bf16_model_dir(cfg, tmp.dir / std::to_string(layers));
    const LoraConfig lora = stream_lora();
    LlamaModel r(io::load_model(dir, true, io::QuantMode::Keep).weights, lora, GetParam(), 24);
    LlamaModel d(io::load_model(dir, true, io::QuantMode::Keep).weights, lora, GetParam(), 24, cpu_backend(),
                 WeightTier::Disk);
    expect_same(run(r, 3), run(d, 3));
  }
}

// A base converted at load (bf16 safetensors to NF4; a GGUF's f32 and Q8_0 tensors to int8) streams
// from the spill file the loader writes its per-layer tensors to, one at a time: the results are
// the resident model's bit for bit; the file is what spill_bytes planned and is written again with
// the same bytes (a resumed run rebuilds it); host memory held at most one converted layer tensor
// beside the resident ones; the file's mapping is never read; the file goes with the weights.
TEST_P(StreamTrain, CpuFromTheSpillFileOfAConvertedBaseMatchesResidentBitForBit) {
  test::TempDir tmp;
  const LlamaConfig cfg = stream_config();
  const std::string dir = test::write_bf16_model_dir(cfg, tmp.dir / "hf");
  LlamaConfig gcfg = cfg;
  gcfg.hidden = 64;  // rows of ffn_down a multiple of Q8_0's 32 elements
  gcfg.intermediate = 128;
  gcfg.head_dim = gcfg.rope.head_dim = 16;
  const test::GgufBase gguf(gcfg, (tmp.dir / "m.gguf").string());
  const LoraConfig lora = stream_lora();
  struct Case {
    std::string path;
    io::QuantMode quant;
    DType dtype;
  };
  for (const Case& c :
       {Case{dir, io::QuantMode::Nf4, DType::NF4}, Case{gguf.path, io::QuantMode::Int8, DType::INT8}}) {
    SCOPED_TRACE(c.path);
    const io::SpillOptions spill{(tmp.dir / "spill.bin").string()};
    const io::ModelDescription desc = io::describe_model(c.path, c.quant);
    const uint64_t planned = io::spill_bytes(desc.source, c.quant);
    // What the load may hold at once: the resident tensors it converts and one layer tensor.
    uint64_t resident_bytes = 0, largest_layer = 0;
    LlamaWeights::for_each_slot(desc.weights.config, [&](WeightSlot s, int layer) {
      const WeightRef& r = desc.weights.slot(s, layer);
      if (r.dtype == desc.source.slot(s, layer).dtype) return;
      if (is_layer_slot(s))
        largest_layer = std::max(largest_layer, uint64_t(io::stored_bytes(r)));
      else
        resident_bytes += uint64_t(io::stored_bytes(r));
    });
    {
      LlamaModel r(io::load_model(c.path, true, c.quant).weights, lora, GetParam(), 24);
      MemTracker& mem = MemTracker::instance();
      const size_t before = mem.current(MemTag::Weights);
      mem.reset_peaks();
      io::LoadedModel m = io::load_model(c.path, true, c.quant, &spill);
      EXPECT_LE(mem.peak(MemTag::Weights) - before, resident_bytes + largest_layer);
      EXPECT_GT(largest_layer, 0u);
      EXPECT_EQ(m.weights.blocks[1].down.dtype, c.dtype);
      const auto it = std::find_if(m.weights.files.begin(), m.weights.files.end(),
                                   [&](const MappedFile& f) { return f.path == spill.path; });
      ASSERT_NE(it, m.weights.files.end());
      const MappedFile mapped = *it;
      EXPECT_EQ(std::filesystem::file_size(spill.path), planned);
      EXPECT_EQ(mapped.bytes, planned);
      const std::string first = test::slurp(spill.path);
      {
        const io::SpillOptions again{(tmp.dir / "again.bin").string()};
        const io::LoadedModel m2 = io::load_model(c.path, true, c.quant, &again);
        EXPECT_TRUE(test::slurp(again.path) == first) << "a spill file written again differs";
      }
      EXPECT_FALSE(std::filesystem::exists(tmp.dir / "again.bin"));
      LlamaModel d(std::move(m.weights), lora, GetParam(), 24, cpu_backend(), WeightTier::Disk);
      expect_same(run(r, 3), run(d, 3));
      EXPECT_EQ(test::present_pages(mapped.begin, size_t(mapped.bytes)), 0u);
    }
    EXPECT_FALSE(std::filesystem::exists(spill.path));
  }
}

// The simulated device copies each block from host memory into its slots on the copy stream; the
// simulator reports any op that reads a slot before its copy landed, or a copy into a slot that an
// op still reads, as a race.
TEST_P(StreamTrain, SimtFromHostMatchesResidentBitForBit) {
  const LlamaConfig cfg = stream_config();
  const LoraConfig lora = stream_lora();
  const std::unique_ptr<Backend> be = make_backend("simt");
  LlamaModel r(init_random_weights(cfg, DType::BF16, 3, 0.25f), lora, GetParam(), 24, *be);
  LlamaModel h(init_random_weights(cfg, DType::BF16, 3, 0.25f), lora, GetParam(), 24, *be, WeightTier::Host);
  expect_same(run(r, 3), run(h, 3));
}

// NF4 matrices with double-quantized absmax stream as placed: codes, absmax codes and nested scales
// copied into their places in the slot.
TEST(StreamQuantized, SimtNf4FromHostMatchesResidentBitForBit) {
  const LlamaConfig cfg = stream_config();
  const auto nf4_base = [&] {
    LlamaWeights w = init_random_weights(cfg, DType::F32, 42, 0.25f);
    LlamaWeights::for_each_slot(cfg, [&](WeightSlot slot, int layer) {
      if (io::is_matrix_slot(slot))
        w.slot(slot, layer) =
            io::store_weight(w.slot(slot, layer), io::QuantMode::Nf4, w, hf_weight_name(slot, layer));
    });
    return w;
  };
  const std::unique_ptr<Backend> be = make_backend("simt");
  LlamaModel r(nf4_base(), stream_lora(), CheckpointPolicy::PerBlock, 24, *be);
  LlamaModel h(nf4_base(), stream_lora(), CheckpointPolicy::PerBlock, 24, *be, WeightTier::Host);
  EXPECT_EQ(h.weights().blocks[0].q.dtype, DType::NF4);
  EXPECT_NE(h.weights().blocks[0].q.scales.nested, nullptr);
  expect_same(run(r, 2), run(h, 2));
}

INSTANTIATE_TEST_SUITE_P(Policies, StreamTrain,
                         ::testing::Values(CheckpointPolicy::PerBlock, CheckpointPolicy::None),
                         [](const ::testing::TestParamInfo<CheckpointPolicy>& p) {
                           return std::string(p.param == CheckpointPolicy::None ? "keep_all" : "per_block");
                         });

// The acceptance case of streaming from disk on the cpu: 32 layers of f32 weights (72 MiB) trained
// within a quarter of that. What the run holds besides: the two read buffers (2 x 2.3 MiB, the
// largest block twice), the tied embedding read from the mapping (0.25 MiB), LoRA state,
// activations and gradients for 32 tokens (about 3 MiB), and the ops', OpenBLAS's and the
// allocator's own memory for two threads; the bound leaves that last part about 8 MiB (measured
// here: 10.4 MiB of growth against the bound of 18 MiB). The same model resident
// maps in every page of its layers, which the second run checks the measure sees.
//
// Each run is a death test in its threadsafe style: the test binary runs again for this test alone,
// so that the peak RSS it reads is its own. The child writes the model, trains 2 steps and exits 0
// when the growth of its peak RSS over what it held before loading lies within the bounds, else 1
// with the figures on stderr.
TEST(StreamMemory, AModelFourTimesTheBudgetTrainsFromDiskWithinIt) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  test::TempDir tmp;
  LlamaConfig cfg = test::tiny_config(256);
  cfg.hidden = 256;
  cfg.intermediate = 512;
  cfg.n_layers = 32;
  cfg.head_dim = cfg.rope.head_dim = 64;
  const uint64_t layer_bytes = uint64_t(cfg.n_layers) * sizeof(float) *
                               uint64_t(2 * cfg.hidden + 2 * cfg.hidden * (cfg.q_dim() + cfg.kv_dim()) +
                                        3 * cfg.hidden * cfg.intermediate);
  const auto run_within = [&](WeightTier tier, uint64_t low, uint64_t high) {
    const test::GgufBase base(cfg, (tmp.dir / "m.gguf").string(), false);
    // Two threads, whatever the machine: each thread's scratch (the ops' and OpenBLAS's) counts.
    cpu::set_num_threads(2);
    set_memory_policy();
    const uint64_t before = process_memory().rss;
    {
      LoraConfig lora = test::lora_r8();
      lora.rank = 4;
      lora.targets = (1u << int(LoraTarget::Q)) | (1u << int(LoraTarget::V));
      LlamaModel m(io::load_model(base.path, true, io::QuantMode::Keep).weights, lora,
                   CheckpointPolicy::PerBlock, 32, cpu_backend(), tier);
      Trainer t(m, train_config(2));
      for (int s = 0; s < 2; ++s) {
        const BatchData data = synthetic_batch(1, 32, m.config().vocab, uint64_t(s));
        const Batch b = data.view();
        t.step({&b, 1});
      }
    }
    const uint64_t growth = process_memory().peak_rss - before;
    std::fprintf(stderr, "%s: peak RSS grew by %.2f MiB (bounds %.2f to %.2f MiB)\n",
                 offload::weight_tier_name(tier), double(growth) / (1 << 20), double(low) / (1 << 20),
                 double(high) / (1 << 20));
    std::exit(growth >= low && growth <= high ? 0 : 1);
  };
  EXPECT_EXIT(run_within(WeightTier::Disk, 0, layer_bytes / 4), ::testing::ExitedWithCode(0),
              "peak RSS grew by");
  EXPECT_EXIT(run_within(WeightTier::Resident, layer_bytes, 2 * layer_bytes), ::testing::ExitedWithCode(0),
              "peak RSS grew by");
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// A spill file is the loader's own: a load that fails while converting removes it; a file already
// at its path is refused and left as it was, a stale spill file too unless the caller may replace
// it (finetune's run directory); a disk without the room is refused before anything converts,
// naming both sizes.
TEST(StreamSpill, IsRemovedOnErrorAndNeverOverwritesAFileNorFillsADisk) {
  test::TempDir tmp;
  const LlamaConfig cfg = stream_config();
  const std::string dir = test::write_bf16_model_dir(cfg, tmp.dir / "hf");
  const std::string path = (tmp.dir / "spill.bin").string();
  const io::SpillOptions spill{path};

  {
    // A NaN in the last layer's down projection: NF4 cannot take it, after the other layers went
    // to the file.
    const std::string bad = (tmp.dir / "bad").string();
    std::filesystem::copy(dir, bad);
    const std::string file = bad + "/model.safetensors";
    const io::SafetensorsFile st = io::SafetensorsFile::open(file);
    // Its tensors tile the data section, which ends the file.
    const std::byte* first = st.tensors().front().bytes.data();
    const std::byte* end = st.tensors().back().bytes.data() + st.tensors().back().bytes.size();
    const uint64_t data_start = std::filesystem::file_size(file) - uint64_t(end - first);
    const uint64_t at =
        data_start +
        uint64_t(st.find(hf_weight_name(WeightSlot::Down, cfg.n_layers - 1))->bytes.data() - first);
    std::fstream out(file, std::ios::in | std::ios::out | std::ios::binary);
    out.seekp(std::streamoff(at));
    const uint16_t nan = 0x7fc0;
    out.write(reinterpret_cast<const char*>(&nan), sizeof nan);
    out.close();
    const std::string e = error_of([&] { io::load_model(bad, true, io::QuantMode::Nf4, &spill); });
    test::expect_contains(e, {"a non-finite weight cannot be quantized to nf4"});
    EXPECT_FALSE(std::filesystem::exists(path)) << "the spill file outlived a failed load";
  }

  // Someone's file at the path, and a spill file a killed run left.
  std::ofstream(path) << "mine";
  std::string e = error_of([&] { io::load_model(dir, true, io::QuantMode::Nf4, &spill); });
  test::expect_contains(e, {path.c_str(), "exists", "never overwrites a file it did not create"});
  io::SpillOptions stale = spill;
  stale.replace_stale = true;
  e = error_of([&] { io::load_model(dir, true, io::QuantMode::Nf4, &stale); });
  test::expect_contains(e, {"never overwrites a file it did not create"});
  EXPECT_EQ(test::slurp(path), "mine");
  std::ofstream(path) << io::kSpillMagic << "the rest of a killed run's file";
  e = error_of([&] { io::load_model(dir, true, io::QuantMode::Nf4, &spill); });
  test::expect_contains(e, {"never overwrites a file it did not create"});
  {
    const io::LoadedModel m = io::load_model(dir, true, io::QuantMode::Nf4, &stale);
    EXPECT_EQ(m.weights.files.front().path, path);
  }
  EXPECT_FALSE(std::filesystem::exists(path));

  // A disk one byte short.
  const uint64_t need =
      io::spill_bytes(io::describe_model(dir, io::QuantMode::Nf4).source, io::QuantMode::Nf4);
  io::SpillOptions full = spill;
  std::string asked;
  full.free_bytes = [&](const std::string& d) -> std::optional<uint64_t> {
    asked = d;
    return need - 1;
  };
  e = error_of([&] { io::load_model(dir, true, io::QuantMode::Nf4, &full); });
  test::expect_contains(e, {"needs", std::to_string(need).c_str(), std::to_string(need - 1).c_str(),
                            "are free there", "--spill-dir"});
  EXPECT_EQ(asked, tmp.dir.string());
  EXPECT_FALSE(std::filesystem::exists(path));
  // Nothing per layer converts under keep: no file, and no question asked.
  asked.clear();
  const io::LoadedModel kept = io::load_model(dir, true, io::QuantMode::Keep, &full);
  EXPECT_TRUE(asked.empty());
  EXPECT_FALSE(std::filesystem::exists(path));
}

// The file's per-layer tensors lie after the global ones (test::GgufBase writes them first), so the
// file can lose its tail without the mapping of the globals faulting. Whichever block is read next
// fails, naming the file and the tensor, and so does every later pass: no block comes from a
// half-read buffer.
TEST(StreamFile, TruncatedAfterLoadingFailsNamingFileAndTensor) {
  test::TempDir tmp;
  const LlamaConfig cfg = stream_config();
  const test::GgufBase base(cfg, (tmp.dir / "m.gguf").string(), false);
  LlamaModel m(io::load_model(base.path, true, io::QuantMode::Keep).weights, stream_lora(),
               CheckpointPolicy::PerBlock, 16, cpu_backend(), WeightTier::Disk);
  const BatchData data = synthetic_batch(1, 8, cfg.vocab, 1);
  m.forward_loss(data.view());
  const io::GgufFile f = io::GgufFile::open(base.path);
  std::filesystem::resize_file(base.path, f.data_offset() + f.tensor("blk.1.attn_norm.weight").offset);
  for (int pass = 0; pass < 2; ++pass) {
    const std::string e = error_of([&] { m.forward_loss(data.view()); });
    test::expect_contains(
        e, {"reading tensor model.layers.", base.path.c_str(), "the model file changed since it was loaded"});
  }
}

TEST(StreamFile, ChangedAfterLoadingIsRefused) {
  test::TempDir tmp;
  const LlamaConfig cfg = stream_config();
  const test::GgufBase base(cfg, (tmp.dir / "m.gguf").string(), false);
  LlamaModel m(io::load_model(base.path, true, io::QuantMode::Keep).weights, stream_lora(),
               CheckpointPolicy::PerBlock, 16, cpu_backend(), WeightTier::Disk);
  const BatchData data = synthetic_batch(1, 8, cfg.vocab, 1);
  m.forward_loss(data.view());
  {
    // Same size, other bytes: a tensor of layer 1 rewritten in place.
    const io::GgufFile f = io::GgufFile::open(base.path);
    std::fstream out(base.path, std::ios::in | std::ios::out | std::ios::binary);
    out.seekp(std::streamoff(f.data_offset() + f.tensor("blk.1.attn_q.weight").offset));
    const std::vector<char> junk(64, 'x');
    out.write(junk.data(), std::streamsize(junk.size()));
  }
  std::filesystem::last_write_time(base.path,
                                   std::filesystem::last_write_time(base.path) + std::chrono::seconds(2));
  const std::string e = error_of([&] { m.forward_loss(data.view()); });
  test::expect_contains(
      e, {"reading tensor model.layers.", base.path.c_str(), "the model file changed since it was loaded"});
}

}  // namespace
}  // namespace tf
