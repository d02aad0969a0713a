// Tests: the HF <-> GGUF q/k row permutation (hand-checked indices; permuted weights under
// interleaved rope give the split-half result), the GGUF LoRA export (keys, names, ne, rsLoRA
// folded into alpha, B's q/k rows permuted only for an HF llama base) round-tripping through
// GgufFile and import_gguf_lora, and the importer's refusals of malformed adapters.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <vector>

#include "kernels/ops.h"
#include "src/core/error.h"
#include "src/core/rng.h"
#include "src/io/gguf.h"
#include "src/io/gguf_lora.h"
#include "tests/model_test_util.h"
#include "tests/test_util.h"

namespace tf::io {
namespace {

namespace fs = std::filesystem;
using test::error_of;
using test::TempDir;

constexpr uint32_t kQKVDown = (1u << int(LoraTarget::Q)) | (1u << int(LoraTarget::K)) |
                              (1u << int(LoraTarget::V)) | (1u << int(LoraTarget::Down));

LoraState random_lora(const LlamaConfig& model, bool rslora, uint64_t seed) {
  LoraConfig c;
  c.rank = 4;
  c.alpha = 8.0f;
  c.rslora = rslora;
  c.targets = kQKVDown;
  LoraState s(model, c);
  test::fill_lora_params(s, seed, 7);
  return s;
}

TEST(QkPermutation, MatchesTheConverterIndicesAndInverts) {
  // reshape(heads, 2, 4, ...).swapaxes(1, 2) of an 8-row head: GGUF row 2i + j <- HF row 4j + i.
  const int64_t want[8] = {0, 4, 1, 5, 2, 6, 3, 7};
  for (int64_t r = 0; r < 8; ++r) {
    EXPECT_EQ(gguf_qk_row_source(r, 8), want[r]);
    EXPECT_EQ(gguf_qk_row_source(r + 8, 8), want[r] + 8);  // the next head keeps its block of rows
  }
  const int64_t rows = 24, cols = 3;
  std::vector<float> hf(size_t(rows * cols)), gguf(hf.size()), back(hf.size());
  for (size_t i = 0; i < hf.size(); ++i) hf[i] = float(i);
  permute_qk_rows(gguf.data(), hf.data(), rows, cols, 8, true);
  EXPECT_EQ(gguf[1 * cols + 2], hf[4 * cols + 2]);
  permute_qk_rows(back.data(), gguf.data(), rows, cols, 8, false);
  EXPECT_EQ(back, hf);
  EXPECT_THROW(permute_qk_rows(gguf.data(), hf.data(), rows, cols, 7, true), Error);
  EXPECT_THROW(permute_qk_rows(gguf.data(), hf.data(), 20, cols, 8, true), Error);
}

// The property the permutation exists for: projecting with the permuted weight and rotating with
// interleaved rope gives, row for row, what the HF weight and split-half rope give.
TEST(QkPermutation, PermutedWeightUnderInterleavedRopeEqualsSplitHalf) {
  const int head_dim = 8, in = 12, n_tokens = 5;
  RopeParams p;
  p.head_dim = head_dim;
  p.theta = 10000.0f;
  std::vector<float> inv_freq(head_dim / 2);
  rope_inv_freq(p, inv_freq.data());
  const std::vector<int32_t> pos = {0, 1, 7, 100, 2047};
  for (int heads : {4, 2}) {  // q heads and the fewer kv heads of a GQA model
    const int64_t rows = int64_t(heads) * head_dim;
    const Philox rng(uint64_t(heads), 11);
    std::vector<float> w_hf(size_t(rows * in)), w_gguf(w_hf.size()), x(size_t(n_tokens * in));
    for (size_t i = 0; i < w_hf.size(); ++i) w_hf[i] = rng.normal(i);
    for (size_t i = 0; i < x.size(); ++i) x[i] = rng.normal(w_hf.size() + i);
    permute_qk_rows(w_gguf.data(), w_hf.data(), rows, in, head_dim, true);
    // x W^T in double, rounded once: both layouts see bit-identical inputs before rope.
    const auto project = [&](const std::vector<float>& w) {
      std::vector<float> y(size_t(n_tokens * rows));
      for (int t = 0; t < n_tokens; ++t)
        for (int64_t r = 0; r < rows; ++r) {
          double s = 0;
          for (int i = 0; i < in; ++i) s += double(x[size_t(t * in + i)]) * double(w[size_t(r * in + i)]);
          y[size_t(t * rows + r)] = float(s);
        }
      return y;
    };
    std::vector<float> q_hf = project(w_hf), q_gguf = project(w_gguf);
    cpu::rope_forward(q_hf.data(), pos.data(), inv_freq.data(), n_tokens, heads, head_dim,
                      RopeLayout::SplitHalf);
    cpu::rope_forward(q_gguf.data(), pos.data(), inv_freq.data(), n_tokens, heads, head_dim,
                      RopeLayout::Interleaved);
    double max_abs = 0, max_diff = 0;
    for (int t = 0; t < n_tokens; ++t)
      for (int64_t r = 0; r < rows; ++r) {
        const float want = q_hf[size_t(t * rows + gguf_qk_row_source(r, head_dim))];
        max_abs = std::max(max_abs, double(std::fabs(want)));
        max_diff = std::max(max_diff, double(std::fabs(q_gguf[size_t(t * rows + r)] - want)));
      }
    // Both layouts rotate the same pair (a, b) by the same angle: a cos - b sin, a sin + b cos.
    // Only the order of the two roundings can differ, so the results agree to a few f32 ulps of
    // the largest value (2^-21 ~ 4.8e-7 leaves room for 4 ulps); a wrong pairing is off by O(1).
    EXPECT_LE(max_diff, 4.8e-7 * max_abs) << heads << " heads";
    EXPECT_GT(max_abs, 1.0);
  }
}

TEST(GgufLora, ExportWritesLlamaCppKeysNamesAndShapes) {
  TempDir tmp;
  const LlamaConfig model = test::tiny_config();  // HF llama: q/k rows in split-half order
  const LoraState lora = random_lora(model, true, 1);
  const std::string path = (tmp.dir / "adapter.gguf").string();
  export_gguf_lora(path, lora, model);

  const GgufFile f = GgufFile::open(path);
  EXPECT_EQ(f.get_string("general.architecture"), "llama");
  EXPECT_EQ(f.get_string("general.type"), "adapter");
  EXPECT_EQ(f.get_string("adapter.type"), "lora");
  // rsLoRA: scale = 8 / sqrt(4) = 4; llama.cpp applies alpha / rank, so alpha = 4 * 4 = 16.
  EXPECT_EQ(f.get_f32("adapter.lora.alpha"), 16.0f);
  EXPECT_EQ(f.tensors().size(), size_t(model.n_layers * 4 * 2));

  const GgufTensorInfo& qa = f.tensor("blk.1.attn_q.weight.lora_a");
  EXPECT_EQ(qa.type, GgmlType::F32);
  EXPECT_EQ(qa.n_dims, 2);
  EXPECT_EQ(qa.ne[0], model.hidden);  // in
  EXPECT_EQ(qa.ne[1], 4);             // rank
  const GgufTensorInfo& kb = f.tensor("blk.1.attn_k.weight.lora_b");
  EXPECT_EQ(kb.ne[0], 4);               // rank
  EXPECT_EQ(kb.ne[1], model.kv_dim());  // out
  const GgufTensorInfo& db = f.tensor("blk.0.ffn_down.weight.lora_b");
  EXPECT_EQ(db.ne[1], model.hidden);
  EXPECT_EQ(f.find_tensor("blk.0.attn_output.weight.lora_a"), nullptr);  // not a target

  // A as stored (PEFT's [r, in] is ggml's ne [in, r]); V's B untouched; K's B rows permuted.
  const LoraAdapter& k = lora.at(1, LoraTarget::K);
  EXPECT_EQ(std::memcmp(f.tensor("blk.1.attn_k.weight.lora_a").data, k.A, size_t(k.rank * k.in) * 4), 0);
  const LoraAdapter& v = lora.at(1, LoraTarget::V);
  EXPECT_EQ(std::memcmp(f.tensor("blk.1.attn_v.weight.lora_b").data, v.B, size_t(v.out * v.rank) * 4), 0);
  const float* kb_data = reinterpret_cast<const float*>(kb.data);
  for (int64_t r = 0; r < k.out; ++r)
    for (int j = 0; j < k.rank; ++j)
      EXPECT_EQ(kb_data[r * k.rank + j], k.B[gguf_qk_row_source(r, model.head_dim) * k.rank + j]);
  EXPECT_NE(std::memcmp(kb.data, k.B, size_t(k.out * k.rank) * 4), 0);
}

TEST(GgufLora, RoundTripsThroughTheImporter) {
  TempDir tmp;
  LlamaConfig hf = test::tiny_config();
  LlamaConfig gguf_base = hf;
  gguf_base.rope_layout = RopeLayout::Interleaved;
  LlamaConfig qwen = hf;
  qwen.architecture = "qwen2";
  for (const LlamaConfig* m : {&hf, &gguf_base, &qwen}) {
    const LlamaConfig& model = *m;
    for (bool rslora : {false, true}) {
      const LoraState lora = random_lora(model, rslora, 2);
      const std::string path = (tmp.dir / "a.gguf").string();
      export_gguf_lora(path, lora, model);
      const LoraState back = import_gguf_lora(path, model);
      EXPECT_EQ(back.config.rank, 4);
      EXPECT_EQ(back.config.targets, kQKVDown);
      EXPECT_FALSE(back.config.rslora);
      EXPECT_FLOAT_EQ(back.config.scale(), lora.config.scale());
      ASSERT_EQ(back.n_params, lora.n_params);
      EXPECT_EQ(std::memcmp(back.params.data(), lora.params.data(), size_t(lora.n_params) * 4), 0);

      // Only an HF llama base has its q rows permuted in the file.
      const GgufFile f = GgufFile::open(path);
      const LoraAdapter& q = lora.at(0, LoraTarget::Q);
      const bool same =
          std::memcmp(f.tensor("blk.0.attn_q.weight.lora_b").data, q.B, size_t(q.out * q.rank) * 4) == 0;
      EXPECT_EQ(same, m != &hf) << model.architecture;
      EXPECT_EQ(f.get_string("general.architecture"), model.architecture == "qwen2" ? "qwen2" : "llama");
    }
  }
}

// Writes a one-layer-target adapter for tiny_config, edited by `edit` before writing.
std::string write_adapter(const fs::path& dir, const std::function<void(GgufWriter&)>& edit,
                          bool standard_keys = true) {
  static std::vector<float> a(size_t(4 * 32), 0.5f), b(size_t(32 * 4), 0.25f);
  GgufWriter w;
  if (standard_keys) {
    w.add_string("general.architecture", "llama");
    w.add_string("general.type", "adapter");
    w.add_string("adapter.type", "lora");
  }
  for (int l = 0; l < 2; ++l) {
    w.add_tensor(gguf_lora_tensor_name(l, LoraTarget::Q, false), GgmlType::F32, {32, 4}, a.data(),
                 a.size() * 4);
    if (l == 0 || standard_keys)
      w.add_tensor(gguf_lora_tensor_name(l, LoraTarget::Q, true), GgmlType::F32, {4, 32}, b.data(),
                   b.size() * 4);
  }
  edit(w);
  const std::string path = (dir / "edited.gguf").string();
  w.write(path);
  return path;
}

TEST(GgufLora, ZeroAlphaMeansScaleOne) {
  TempDir tmp;
  const std::string path = write_adapter(tmp.dir, [](GgufWriter&) {});
  const LoraState s = import_gguf_lora(path, test::tiny_config());
  EXPECT_EQ(s.config.scale(), 1.0f);
  EXPECT_EQ(s.at(1, LoraTarget::Q).A[5], 0.5f);
}

TEST(GgufLoraBad, RefusesMalformedAdapters) {
  TempDir tmp;
  const LlamaConfig model = test::tiny_config();
  const auto err = [&](const std::function<void(GgufWriter&)>& edit, bool standard = true) {
    const std::string path = write_adapter(tmp.dir, edit, standard);
    return error_of([&] { import_gguf_lora(path, model); });
  };
  std::vector<float> buf(64 * 64, 0.0f);
  std::vector<uint8_t> q8(size_t(34 * 4 * 32 / 32), 0);

  EXPECT_NE(err([](GgufWriter&) {}, false).find("general.type is missing"), std::string::npos);
  EXPECT_NE(err([](GgufWriter& w) { w.add_f32("adapter.lora.alpha", -1.0f); }).find("non-negative"),
            std::string::npos);
  EXPECT_NE(err([&](GgufWriter& w) {
              w.add_tensor("blk.0.attn_norm.weight", GgmlType::F32, {32}, buf.data(), 32 * 4);
            }).find("'blk.0.attn_norm.weight' is not a LoRA tensor"),
            std::string::npos);
  EXPECT_NE(err([&](GgufWriter& w) {
              w.add_tensor("token_embd.weight.lora_a", GgmlType::F32, {32, 4}, buf.data(), 128 * 4);
            }).find("does not adapt a projection"),
            std::string::npos);
  EXPECT_NE(err([&](GgufWriter& w) {
              w.add_tensor("blk.2.attn_v.weight.lora_a", GgmlType::F32, {32, 4}, buf.data(), 128 * 4);
            }).find("is for block 2 but the model has 2 blocks"),
            std::string::npos);
  EXPECT_NE(err([&](GgufWriter& w) {
              w.add_tensor("blk.0.attn_v.weight.lora_a", GgmlType::F32, {32, 5}, buf.data(), 160 * 4);
            }).find("rank 5 but other tensors have rank 4"),
            std::string::npos);
  EXPECT_NE(err([&](GgufWriter& w) {
              w.add_tensor("blk.0.attn_v.weight.lora_a", GgmlType::F32, {33, 4}, buf.data(), 132 * 4);
            }).find("has ne [33, 4] but the model needs [32, 4]"),
            std::string::npos);
  EXPECT_NE(err([&](GgufWriter& w) {
              w.add_tensor("blk.0.attn_v.weight.lora_a", GgmlType::Q8_0, {32, 4}, q8.data(), q8.size());
            }).find("is Q8_0; LoRA tensors must be F32, F16 or BF16"),
            std::string::npos);
  // V adapted in block 0 only: LoraState needs every block to have the same targets.
  EXPECT_NE(err([&](GgufWriter& w) {
              w.add_tensor("blk.0.attn_v.weight.lora_a", GgmlType::F32, {32, 4}, buf.data(), 128 * 4);
              w.add_tensor("blk.0.attn_v.weight.lora_b", GgmlType::F32, {4, 16}, buf.data(), 64 * 4);
            }).find("'blk.1.attn_v.weight.lora_a' is missing"),
            std::string::npos);
  {
    GgufWriter w;
    w.add_string("general.architecture", "qwen2");
    w.add_string("general.type", "adapter");
    w.add_string("adapter.type", "lora");
    const std::string path = (tmp.dir / "qwen.gguf").string();
    w.write(path);
    EXPECT_NE(error_of([&] {
                import_gguf_lora(path, model);
              }).find("architecture 'qwen2' but the model is 'llama'"),
              std::string::npos);
  }
  // Block 1 has its lora_a but no lora_b.
  {
    GgufWriter w;
    const std::vector<float> a(128, 1.0f);
    w.add_string("general.architecture", "llama");
    w.add_string("general.type", "adapter");
    w.add_string("adapter.type", "lora");
    w.add_tensor("blk.0.attn_q.weight.lora_a", GgmlType::F32, {32, 4}, a.data(), 512);
    w.add_tensor("blk.0.attn_q.weight.lora_b", GgmlType::F32, {4, 32}, a.data(), 512);
    w.add_tensor("blk.1.attn_q.weight.lora_a", GgmlType::F32, {32, 4}, a.data(), 512);
    const std::string path = (tmp.dir / "unpaired.gguf").string();
    w.write(path);
    EXPECT_NE(
        error_of([&] { import_gguf_lora(path, model); }).find("'blk.1.attn_q.weight.lora_b' is missing"),
        std::string::npos);
  }
  // A truncated adapter is refused by the reader, naming the file.
  {
    const std::string good = write_adapter(tmp.dir, [](GgufWriter&) {});
    fs::resize_file(good, fs::file_size(good) - 100);
    EXPECT_NE(error_of([&] { import_gguf_lora(good, model); }).find(good), std::string::npos);
  }
}

}  // namespace
}  // namespace tf::io
