// defines: tests of a float base quantized at load to ggml's block types (--quant q8_0, q4_0,
// q4_1, q5_0, q5_1): the blocks are those a GGUF file of the type made by ggml's reference
// quantizer holds, so training with them gives the losses of that file kept as it is, bit for bit,
// resident and streamed from the spill file; the planner's description predicts their bytes from
// the headers alone; a row that is not whole blocks is refused by name before anything converts.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "gguf_test_util.h"
#include "kernels/backend.h"
#include "kernels/cpu/ref/quantize_ggml.h"
#include "model_test_util.h"
#include "src/io/describe.h"
#include "src/io/gguf.h"
#include "src/io/model_loader.h"
#include "src/io/quantize_weights.h"
#include "src/io/spill.h"
#include "src/model/llama.h"
#include "src/train/trainer.h"
#include "tests/test_util.h"

namespace tf {
namespace {

using io::QuantMode;
using offload::WeightTier;

LlamaConfig ggml_config() {
  LlamaConfig c = test::tiny_config(64);
  c.n_layers = 2;
  c.hidden = 64;  // every row a whole number of 32-element blocks
  c.intermediate = 128;
  c.head_dim = c.rope.head_dim = 16;  // what a GGUF file without attention.key_length says
  return c;
}

// A copy of the f32 GGUF file `src` whose matrices are quantized to `type` by ggml's reference
// quantizer (what llama-quantize writes without an importance matrix) and whose norms stay f32.
void write_quantized_copy(const std::string& src, GgmlType type, const std::string& path) {
  const io::GgufFile f = io::GgufFile::open(src);
  io::GgufWriter w;
  for (const auto& [key, value] : f.metadata()) w.add_value(key, value);
  std::vector<std::vector<uint8_t>> data;
  for (const io::GgufTensorInfo& t : f.tensors()) {
    ASSERT_EQ(t.type, GgmlType::F32) << t.name;
    std::vector<int64_t> ne(t.ne.begin(), t.ne.begin() + t.n_dims);
    if (t.n_dims == 1) {
      w.add_tensor(t.name, GgmlType::F32, ne, t.data, t.n_bytes);
      continue;
    }
    std::vector<uint8_t>& d = data.emplace_back(size_t(dtype_bytes(*dtype_of_ggml(type), t.n_elements)));
    ref::quantize_rows_ggml(type, reinterpret_cast<const float*>(t.data), t.n_elements, d.data());
    w.add_tensor(t.name, type, ne, d.data(), d.size());
  }
  w.write(path);
}

TrainConfig train_config(int steps) {
  TrainConfig t;
  t.lr.peak_lr = 1e-2f;
  t.lr.total_steps = steps;
  t.lr.warmup_steps = 1;
  return t;
}

struct Trained {
  std::vector<double> losses;
  std::vector<float> lora, logits;
};

Trained train(LlamaModel& m, int steps) {
  Trained r;
  Trainer t(m, train_config(steps));
  for (int s = 0; s < steps; ++s) {
    const test::BatchData data = test::synthetic_batch(2, 12, m.config().vocab, uint64_t(s), 7, 1);
    const Batch b = data.view(true);
    r.losses.push_back(t.step({&b, 1}).loss);
  }
  const LoraState host = m.lora().host_copy();
  r.lora.assign(host.params.as<float>(), host.params.as<float>() + host.n_params);
  const test::BatchData data = test::synthetic_batch(1, 10, m.config().vocab, 77);
  r.logits.resize(size_t(10 * m.config().vocab));
  m.forward_logits(data.view(), r.logits.data());
  return r;
}

void expect_same(const Trained& a, const Trained& b) {
  ASSERT_EQ(a.losses.size(), b.losses.size());
  for (size_t i = 0; i < a.losses.size(); ++i) EXPECT_EQ(a.losses[i], b.losses[i]) << "step " << i;
  EXPECT_TRUE(a.lora == b.lora) << "LoRA parameters differ";
  EXPECT_TRUE(a.logits == b.logits) << "logits differ";
}

LoraConfig lora() {
  LoraConfig l = test::lora_r8();
  l.dropout = 0.1f;
  return l;
}

class GgmlQuantLoad : public ::testing::Test {
 protected:
  test::TempDir tmp_;
  LlamaConfig cfg_ = ggml_config();
  test::GgufBase base_{cfg_, (tmp_.dir / "f32.gguf").string(), /*quantize_down=*/false};
};

// Every matrix the f32 base holds, quantized at load, is byte for byte the tensor of the file that
// llama-quantize's reference path would write; training from either gives the same losses, LoRA
// parameters and logits, and so does the converted base streamed from its spill file.
TEST_F(GgmlQuantLoad, TrainingEqualsTheSameBlocksReadFromAGgufFile) {
  for (QuantMode mode : {QuantMode::Q8_0, QuantMode::Q4_1, QuantMode::Q5_0}) {
    const GgmlType type = *io::ggml_type_of(mode);
    SCOPED_TRACE(std::string(io::quant_mode_name(mode)));
    const std::string file = (tmp_.dir / (std::string(io::quant_mode_name(mode)) + ".gguf")).string();
    write_quantized_copy(base_.path, type, file);
    io::LoadedModel converted = io::load_model(base_.path, true, mode);
    io::LoadedModel kept = io::load_model(file, true, QuantMode::Keep);
    LlamaWeights::for_each_slot(cfg_, [&](WeightSlot s, int layer) {
      const WeightRef& a = converted.weights.slot(s, layer);
      const WeightRef& b = kept.weights.slot(s, layer);
      SCOPED_TRACE(hf_weight_name(s, layer));
      ASSERT_EQ(a.dtype, b.dtype);
      EXPECT_EQ(a.dtype, io::is_matrix_slot(s) ? *dtype_of_ggml(type) : DType::F32);
      ASSERT_EQ(io::stored_bytes(a), io::stored_bytes(b));
      EXPECT_EQ(std::memcmp(a.data, b.data, size_t(io::stored_bytes(a))), 0) << "blocks differ";
    });
    // The description from headers predicts exactly what the load stores.
    const io::ModelDescription d = io::describe_model(base_.path, mode);
    EXPECT_EQ(int64_t(d.kept_bytes + d.stored_bytes), io::weight_memory(converted.weights).bytes());

    const LoraConfig l = lora();
    LlamaModel a(std::move(converted.weights), l, CheckpointPolicy::PerBlock, 24);
    LlamaModel b(std::move(kept.weights), l, CheckpointPolicy::PerBlock, 24);
    const Trained want = train(b, 3);
    expect_same(train(a, 3), want);

    const io::SpillOptions spill{(tmp_.dir / "spill.bin").string()};
    io::LoadedModel spilled = io::load_model(base_.path, true, mode, &spill);
    EXPECT_EQ(std::filesystem::file_size(spill.path), io::spill_bytes(d.source, mode));
    {
      LlamaModel s(std::move(spilled.weights), l, CheckpointPolicy::PerBlock, 24, cpu_backend(),
                   WeightTier::Disk);
      expect_same(train(s, 3), want);
    }
    EXPECT_FALSE(std::filesystem::exists(spill.path));
  }
}

// A base whose rows are not whole blocks of 32 is refused by name, by the description the planner
// reads and by the load, before any spill file is made; nf4 takes the same base.
TEST(GgmlQuantRefusal, RowsOfPartialBlocksAreNamed) {
  test::TempDir tmp;
  LlamaConfig cfg = ggml_config();
  cfg.intermediate = 80;  // ffn_down's rows hold 80 elements
  const test::GgufBase base(cfg, (tmp.dir / "odd.gguf").string(), /*quantize_down=*/false);
  const io::SpillOptions spill{(tmp.dir / "spill.bin").string()};
  // The description names the tensor as the model's weight, the loader as the file's tensor.
  const std::string described = test::error_of([&] { io::describe_model(base.path, QuantMode::Q4_0); });
  EXPECT_NE(
      described.find("model.layers.0.mlp.down_proj.weight: rows of 80 elements cannot be quantized to q4_0"),
      std::string::npos)
      << described;
  const std::string loaded =
      test::error_of([&] { io::load_model(base.path, true, QuantMode::Q4_0, &spill); });
  EXPECT_NE(loaded.find("tensor blk.0.ffn_down.weight: rows of 80 elements cannot be quantized to q4_0"),
            std::string::npos)
      << loaded;
  EXPECT_FALSE(std::filesystem::exists(spill.path));
  EXPECT_EQ(io::load_model(base.path, true, QuantMode::Nf4).weights.blocks[0].down.dtype, DType::NF4);
}

}  // namespace
}  // namespace tf
