// defines: tests of `tightfit export --format merged` onto a GGUF base through the binary: --out
// ending in .gguf gives a GGUF file (untouched tensors as they were, quantized adapted ones as F16,
// BF16 ones kept, the summary line), any other --out an HF directory in f16 or bf16; every merged
// export reports its logits against base + adapter; a .gguf --out for an HF base is refused
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "cli_test_util.h"
#include "gguf_test_util.h"
#include "kernels/cpu/dequant.h"
#include "model_test_util.h"
#include "src/io/gguf.h"
#include "src/io/gguf_model.h"
#include "src/io/hf_model.h"
#include "src/io/peft.h"
#include "src/io/safetensors.h"

namespace tf::test {
namespace {

struct Probe {
  double max_dlogit = -1, rel = -1;
};

// The numbers of the export's "merged vs base + adapter" line; -1 when it has none.
Probe probe_of(const std::string& out) {
  Probe p;
  const size_t at = out.find("merged vs base + adapter on 2 sequences of 16 tokens: ");
  if (at != std::string::npos)
    std::sscanf(out.c_str() + at,
                "merged vs base + adapter on 2 sequences of 16 tokens: max |dlogit| %lf, "
                "relative error %lf",
                &p.max_dlogit, &p.rel);
  return p;
}

class CliMerge : public Cli {
 protected:
  // A GGUF base (GgufBase's, ffn_down as Q8_0, or as BF16 with `bf16_down`) and a run directory
  // "run" on it holding an adapter on every projection, as finetune leaves it.
  void make_gguf_run(bool bf16_down) {
    const GgufBase built(tiny_config(), (dir_ / "q8.gguf").string());
    base_ = (dir_ / "base.gguf").string();
    {
      const io::GgufFile f = io::GgufFile::open(built.path);
      io::GgufWriter w;
      for (const auto& [key, value] : f.metadata())
        if (key != "general.alignment") w.add_value(key, value);
      std::vector<std::vector<uint16_t>> bf16;
      for (const io::GgufTensorInfo& t : f.tensors()) {
        const std::vector<int64_t> ne(t.ne.begin(), t.ne.begin() + t.n_dims);
        if (!bf16_down || t.type != GgmlType::Q8_0) {
          w.add_tensor(t.name, t.type, ne, t.data, size_t(t.n_bytes));
          continue;
        }
        std::vector<float> f32(size_t(t.n_elements));
        ref::dequantize_rows(t.type, t.data, t.n_elements, f32.data());
        bf16.emplace_back(f32.size());
        for (size_t i = 0; i < f32.size(); ++i) bf16.back()[i] = f32_to_bf16(f32[i]);
        w.add_tensor(t.name, GgmlType::BF16, ne, bf16.back().data(), bf16.back().size() * 2);
      }
      w.write(base_);
    }
    const io::GgufFile f = io::GgufFile::open(base_);
    n_tensors_ = int(f.tensors().size());
    const LlamaConfig cfg = io::llama_config_from_gguf(f);
    LoraConfig lc;
    lc.rank = 4;
    lc.alpha = 8;
    lc.targets = parse_lora_targets("q,k,v,o,gate,up,down");
    LoraState lora(cfg, lc);
    fill_lora_params(lora, 6, 5, 0.1f);
    write_run(cfg, lora);
  }

  void write_run(const LlamaConfig& cfg, const LoraState& lora) {
    fs::create_directories(dir_ / "run");
    std::ofstream(dir_ / "run" / "config.json") << nlohmann::json{{"model", base_}}.dump() << "\n";
    io::export_peft((dir_ / "run" / "adapter").string(), lora, cfg, base_);
  }

  Result export_to(const fs::path& out) {
    return run({"export", "--run", (dir_ / "run").string(), "--format", "merged", "--out", out.string()});
  }

  std::string base_;
  int n_tensors_ = 0;
};

TEST_F(CliMerge, GgufOutWritesGgufWithQuantizedAdaptedTensorsAsF16) {
  make_gguf_run(false);
  const Result r = export_to(dir_ / "merged.gguf");
  ASSERT_EQ(r.status, 0) << r.err;
  // Two layers: q, k, v, o, gate and up are F32 in the base; ffn_down is Q8_0.
  EXPECT_NE(
      r.out.find("\n12 adapted tensors written as F32 (were F32); 2 adapted tensors written as F16 (were "
                 "Q8_0); " +
                 std::to_string(n_tensors_ - 14) + " tensors copied as they are\n"),
      std::string::npos)
      << r.out;
  const io::GgufFile base = io::GgufFile::open(base_);
  const io::GgufFile m = io::GgufFile::open((dir_ / "merged.gguf").string());
  EXPECT_EQ(m.get_string(io::kGgufExportKey), "merged");
  EXPECT_EQ(m.tensor("blk.1.ffn_down.weight").type, GgmlType::F16);
  for (const char* name :
       {"token_embd.weight", "output.weight", "output_norm.weight", "blk.0.attn_norm.weight"}) {
    const auto a = base.tensor(name).bytes(), b = m.tensor(name).bytes();
    EXPECT_EQ(m.tensor(name).type, base.tensor(name).type) << name;
    EXPECT_TRUE(std::equal(a.begin(), a.end(), b.begin(), b.end())) << name;
  }
  // Rounding a matrix's weights to f16 (at most 2^-11 of each) changes its products by at most
  // 2^-11 of |W| |x|; the few matrices in series in this two-layer model add a few of those, and
  // 2e-3 is four. The probe against the base alone (without the adapter) reads above 1.
  const Probe p = probe_of(r.out);
  EXPECT_GT(p.max_dlogit, 0) << r.out;
  EXPECT_LT(p.rel, 2e-3) << r.out;
}

TEST_F(CliMerge, DirectoryOutWritesAnF16HfModelInHfRowOrder) {
  make_gguf_run(false);
  const Result r = export_to(dir_ / "merged");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out.find("adapted tensors written as"), std::string::npos) << r.out;
  ASSERT_TRUE(fs::is_directory(dir_ / "merged"));
  EXPECT_TRUE(fs::exists(dir_ / "merged" / ".tightfit-export"));
  const io::SafetensorsModel st = io::SafetensorsModel::open((dir_ / "merged").string());
  for (const std::string& name : st.names()) EXPECT_EQ(st.get(name).dtype, io::StDType::F16) << name;
  const LlamaConfig cfg = io::read_hf_config((dir_ / "merged" / "config.json").string());
  EXPECT_EQ(cfg.rope_layout, RopeLayout::SplitHalf);
  // The probe loads the directory as an HF model: q/k rows left in GGUF's order would rotate the
  // wrong pairs and miss base + adapter by far more than f16 rounding does.
  const Probe p = probe_of(r.out);
  EXPECT_GE(p.max_dlogit, 0) << r.out;
  EXPECT_LT(p.rel, 2e-3) << r.out;
}

TEST_F(CliMerge, Bf16BaseTensorsStayBf16) {
  make_gguf_run(true);
  const Result r = export_to(dir_ / "merged.gguf");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("; 2 adapted tensors written as BF16 (were BF16); "), std::string::npos) << r.out;
  EXPECT_EQ(io::GgufFile::open((dir_ / "merged.gguf").string()).tensor("blk.0.ffn_down.weight").type,
            GgmlType::BF16);
  EXPECT_LT(probe_of(r.out).rel, 1e-2) << r.out;

  const Result d = export_to(dir_ / "merged");
  ASSERT_EQ(d.status, 0) << d.err;
  const io::SafetensorsModel st = io::SafetensorsModel::open((dir_ / "merged").string());
  EXPECT_EQ(st.get("model.layers.0.mlp.down_proj.weight").dtype, io::StDType::BF16);
  EXPECT_EQ(st.get("model.embed_tokens.weight").dtype, io::StDType::BF16);
}

TEST_F(CliMerge, GgufOutForAnHfBaseIsRefused) {
  ASSERT_EQ(run({"init", "--config", "tiny", "--out", (dir_ / "model").string(), "--seed", "3"}).status, 0);
  base_ = (dir_ / "model").string();
  const LlamaConfig cfg = io::read_hf_config((dir_ / "model" / "config.json").string());
  LoraConfig lc;
  lc.rank = 2;
  lc.alpha = 2;
  lc.targets = parse_lora_targets("q");
  write_run(cfg, LoraState(cfg, lc));
  const fs::path out = dir_ / "merged.gguf";
  const Result r = export_to(out);
  EXPECT_EQ(r.status, 1);
  // One line, ending with where in the source it was raised.
  EXPECT_EQ(r.err.rfind("error: " + out.string() +
                            ": ends in .gguf, but a merged export of a run on an HF directory is an HF "
                            "directory; choose an --out without .gguf (",
                        0),
            0u)
      << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_FALSE(fs::exists(out));
}

}  // namespace
}  // namespace tf::test
