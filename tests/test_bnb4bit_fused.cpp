// A bitsandbytes 4-bit weight of fused projections (Phi-3's qkv_proj and gate_up_proj) cut into its
// projections: io::bnb4bit_rows on NF4 weights quantized here, and the checkpoint of
// tests/fixtures/bnb4bit_phi3 (tools/make_bnb4bit_fixture.py: a Phi3ForCausalLM quantized whole by
// bitsandbytes on the CPU and saved by transformers), whose k_proj and v_proj begin inside a nested
// group of qkv_proj's absmax and whose up_proj begins gate_up_proj's second one.
#include <gtest/gtest.h>

#include <filesystem>
#include <random>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/ref/quantize.h"
#include "kernels/ops.h"
#include "model_test_util.h"
#include "op_test_util.h"
#include "src/io/bnb4bit.h"
#include "src/io/describe.h"
#include "src/io/hf_model.h"
#include "src/io/model_loader.h"
#include "src/io/quantize_weights.h"
#include "src/io/safetensors.h"
#include "src/io/spill.h"
#include "src/model/llama.h"
#include "test_util.h"

namespace tf {
namespace {

using io::QuantMode;

const std::string kDir = std::string(TIGHTFIT_FIXTURES) + "/bnb4bit_phi3";

// The f32 values of rows [r0, r0 + n) of a weight, as the cpu kernels decode them.
std::vector<float> rows_of(const WeightRef& w, int64_t r0, int64_t n) {
  std::vector<float> y(size_t(n * w.cols));
  cpu::dequantize_weight_tile(y.data(), w.cols, w, r0, n, 0, w.cols);
  return y;
}

// An NF4 weight [rows, cols] of random values, with f32 absmax or double-quantized ones.
struct Nf4Weight {
  std::vector<uint8_t> codes, absmax_codes;
  std::vector<float> absmax, nested;
  WeightRef weight;

  Nf4Weight(int64_t rows, int64_t cols, bool double_quant) {
    const int64_t n = rows * cols, blocks = ref::quant_blocks(n, kNf4Block);
    std::mt19937 rng(7);
    std::normal_distribution<float> normal;
    std::vector<float> x(static_cast<size_t>(n));
    for (float& v : x) v = normal(rng);
    codes.resize(size_t(ref::nf4_packed_bytes(n)));
    absmax.resize(size_t(blocks));
    ref::quantize_nf4(x.data(), n, codes.data(), absmax.data());
    weight = WeightRef(codes.data(), DType::NF4, rows, cols);
    if (!double_quant) {
      weight.scales.absmax = absmax.data();
      return;
    }
    absmax_codes.resize(size_t(blocks));
    nested.resize(size_t(ref::quant_blocks(blocks, kNf4NestedBlock)));
    weight.scales.offset =
        ref::double_quantize_absmax(absmax.data(), blocks, absmax_codes.data(), nested.data());
    weight.scales.absmax = absmax_codes.data();
    weight.scales.nested = nested.data();
  }
};

// 600 rows of 64: 600 blocks in three nested groups. Each cut holds the whole weight's values bit
// for bit; a cut at a group's start, or any cut of f32 absmax, is a view in place, and one inside a
// group has its absmax decoded into memory the weights own.
TEST(Bnb4bitRows, EachCutHoldsItsRowsOfTheWholeWeight) {
  struct Cut {
    int64_t row0, rows;
    bool in_place;
  };
  for (const bool double_quant : {true, false}) {
    SCOPED_TRACE(double_quant ? "double-quantized absmax" : "f32 absmax");
    const Nf4Weight whole(600, 64, double_quant);
    for (const Cut& c : {Cut{0, 256, true}, Cut{256, 200, true}, Cut{100, 300, !double_quant},
                         Cut{456, 144, !double_quant}, Cut{599, 1, !double_quant}}) {
      SCOPED_TRACE("rows " + std::to_string(c.row0) + " + " + std::to_string(c.rows));
      LlamaWeights w;
      const WeightRef r = io::bnb4bit_rows(whole.weight, c.row0, c.rows, w, "w");
      EXPECT_EQ(r.dtype, DType::NF4);
      EXPECT_EQ(r.rows, c.rows);
      EXPECT_EQ(r.cols, 64);
      EXPECT_EQ(r.data, whole.codes.data() + c.row0 * 32);
      EXPECT_EQ(w.owned.empty(), c.in_place);
      EXPECT_EQ(w.owns(r.scales.absmax), !c.in_place);
      if (c.in_place && double_quant) {
        EXPECT_EQ(r.scales.absmax, whole.absmax_codes.data() + c.row0);
        EXPECT_EQ(r.scales.nested, whole.nested.data() + c.row0 / kNf4NestedBlock);
        EXPECT_EQ(r.scales.offset, whole.weight.scales.offset);
      } else {
        EXPECT_EQ(r.scales.nested, nullptr);
      }
      if (c.in_place && !double_quant) {
        EXPECT_EQ(r.scales.absmax, whole.absmax.data() + c.row0);
      }
      const std::vector<float> want = rows_of(whole.weight, c.row0, c.rows), got = rows_of(r, 0, c.rows);
      EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0);
    }
  }
}

// Rows of 96 elements: a cut at row 2 begins block 3, at row 1 inside block 1, whose absmax the
// projections before and after would share.
TEST(Bnb4bitRows, ACutInsideABlockIsRefusedByName) {
  const Nf4Weight whole(20, 96, true);
  LlamaWeights w;
  EXPECT_EQ(io::bnb4bit_rows(whole.weight, 2, 4, w, "w").data, whole.codes.data() + 96);
  const std::string e = test::error_of([&] { io::bnb4bit_rows(whole.weight, 1, 4, w, "m: tensor qkv"); });
  EXPECT_NE(
      e.find("m: tensor qkv: the bitsandbytes 4-bit weight of fused projections [20, 96] is cut into its "
             "projections at row 1, element 96, inside one of its 64-element blocks"),
      std::string::npos)
      << e;
  EXPECT_NE(e.find("--quant nf4"), std::string::npos) << e;
}

TEST(Bnb4bitPhi3, FusedProjectionsAreCutInPlaceOrDecoded) {
  auto file = std::make_shared<const io::SafetensorsModel>(io::SafetensorsModel::open(kDir));
  const LlamaConfig cfg = io::read_hf_config(kDir + "/config.json");
  ASSERT_TRUE(cfg.fused_qkv && cfg.fused_gate_up);
  const LlamaWeights w = io::weights_from_safetensors(file, cfg, QuantMode::Keep, true);
  const std::string qkv = "model.layers.1.self_attn.qkv_proj.weight",
                    gate_up = "model.layers.1.mlp.gate_up_proj.weight";
  const auto* qkv_codes = file->get(qkv).bytes.data();
  const BlockWeights& b = w.blocks[1];
  // q: 64 rows of 64 from the start; k and v begin at blocks 64 and 96 of qkv's one nested group.
  EXPECT_EQ(static_cast<const void*>(b.q.data), static_cast<const void*>(qkv_codes));
  EXPECT_EQ(b.q.scales.absmax, static_cast<const void*>(file->get(qkv + ".absmax").bytes.data()));
  EXPECT_EQ(static_cast<const void*>(b.k.data), static_cast<const void*>(qkv_codes + 64 * 64 / 2));
  EXPECT_EQ(static_cast<const void*>(b.v.data), static_cast<const void*>(qkv_codes + 96 * 64 / 2));
  for (const WeightRef* r : {&b.k, &b.v}) {
    EXPECT_TRUE(w.owns(r->scales.absmax));
    EXPECT_EQ(r->scales.nested, nullptr);
  }
  // up: 256 rows from block 256, the start of gate_up's second nested group.
  const auto* up_absmax = file->get(gate_up + ".absmax").bytes.data() + 256;
  EXPECT_EQ(b.up.scales.absmax, static_cast<const void*>(up_absmax));
  EXPECT_EQ(static_cast<const void*>(b.up.scales.nested),
            static_cast<const void*>(file->get(gate_up + ".nested_absmax").bytes.data() + sizeof(float)));

  // The projections' values, end to end, are bitsandbytes' dequantization of the fused weight, and
  // the decoded absmax its double-quantized ones.
  const auto expected = io::SafetensorsFile::open(kDir + "/expected.safetensors");
  std::vector<float> got;
  for (const WeightRef* r : {&b.q, &b.k, &b.v}) {
    const std::vector<float> rows = rows_of(*r, 0, r->rows);
    got.insert(got.end(), rows.begin(), rows.end());
  }
  const TensorView want = expected.view("dequant." + qkv);
  ASSERT_EQ(int64_t(got.size()), want.numel());
  EXPECT_EQ(std::memcmp(got.data(), want.data, got.size() * sizeof(float)), 0);
  const TensorView absmax = expected.view("absmax." + qkv);
  ASSERT_EQ(absmax.numel(), 128);
  EXPECT_EQ(std::memcmp(b.k.scales.absmax, absmax.as<float>() + 64, 32 * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(b.v.scales.absmax, absmax.as<float>() + 96, 32 * sizeof(float)), 0);
}

std::vector<float> logits_of(LlamaModel& model, const io::SafetensorsFile& expected) {
  const TensorView ids = expected.view("input_ids");
  const int batch = int(ids.dim(0)), seq = int(ids.dim(1));
  std::vector<int32_t> pos;
  for (int i = 0; i < batch; ++i)
    for (int t = 0; t < seq; ++t) pos.push_back(t);
  std::vector<float> logits(size_t(batch * seq * model.config().vocab));
  model.forward_logits(Batch{batch, seq, ids.as<int32_t>(), nullptr, pos.data(), nullptr}, logits.data());
  return logits;
}

LoraConfig inert_lora() {
  LoraConfig l;
  l.rank = 1;
  l.targets = parse_lora_targets("o");
  return l;
}

// transformers ran f32 maths on the dequantized weights; only the summation order differs (the
// bound of the Llama bnb4bit test), where a projection cut at the wrong row or with the wrong
// absmax moves logits by O(1e-1). Streamed from disk, the projections with decoded absmax go
// through the spill file, and the logits are those of the resident load bit for bit.
TEST(Bnb4bitPhi3, LogitsAreThoseOfTheDequantizedModelResidentOrStreamed) {
  const auto expected = io::SafetensorsFile::open(kDir + "/expected.safetensors");
  const int64_t tokens = expected.view("input_ids").numel();
  std::vector<float> resident;
  for (QuantMode mode : {QuantMode::Keep, QuantMode::None}) {
    SCOPED_TRACE(io::quant_mode_name(mode));
    LlamaModel model(io::load_hf_model(kDir, mode), inert_lora(), CheckpointPolicy::None, tokens);
    EXPECT_EQ(model.weights().blocks[0].k.dtype, mode == QuantMode::Keep ? DType::NF4 : DType::F32);
    const std::vector<float> logits = logits_of(model, expected);
    EXPECT_LT(test::rel_norm_error(logits.data(), expected.view("logits").as<float>(), logits.size()), 1e-5);
    if (mode == QuantMode::Keep) resident = logits;
  }

  const test::TempDir tmp;
  const io::SpillOptions spill{(tmp.dir / "spill.bin").string()};
  const io::ModelDescription d = io::describe_model(kDir, QuantMode::Keep);
  {
    io::LoadedModel m = io::load_model(kDir, true, QuantMode::Keep, &spill);
    // k and v of both layers: 32 rows of 64 codes and 32 f32 absmax each, every part on its own page.
    EXPECT_EQ(std::filesystem::file_size(spill.path), io::spill_bytes(d.source, QuantMode::Keep));
    EXPECT_EQ(io::spill_bytes(d.source, QuantMode::Keep), io::kSpillAlign * (1 + 4 * 2));
    EXPECT_EQ(int64_t(d.kept_bytes + d.stored_bytes), io::weight_memory(m.weights).bytes());
    EXPECT_TRUE(m.weights.owned.empty()) << "the decoded absmax live in the spill file alone";
    LlamaModel streamed(std::move(m.weights), inert_lora(), CheckpointPolicy::PerBlock, tokens, cpu_backend(),
                        offload::WeightTier::Disk);
    const std::vector<float> logits = logits_of(streamed, expected);
    EXPECT_EQ(std::memcmp(logits.data(), resident.data(), logits.size() * sizeof(float)), 0);
  }
  EXPECT_FALSE(std::filesystem::exists(spill.path));
}

}  // namespace
}  // namespace tf
