// defines: tests of `tightfit export --format merged` onto a GGUF base through the binary: --out
// ending in .gguf gives a GGUF file (untouched tensors as they were, quantized adapted ones as F16,
// BF16 ones kept, the summary line), any other --out an HF directory in f16 or bf16; --quant
// re-quantizes a GGUF's merged tensors (q8_0, q4_0, keep) or writes a bitsandbytes NF4 directory
// (nf4), and the probe grows with the format's error; every merged export reports its logits
// against base + adapter; a .gguf --out for an HF base and a --quant that does not fit the export
// are refused
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

TEST_F(CliMerge, QuantWritesTheAskedTypesAndTheProbeGrowsWithTheirError) {
  make_gguf_run(false);
  const auto export_as = [&](const std::string& quant) {
    const Result r = run({"export", "--run", (dir_ / "run").string(), "--format", "merged", "--out",
                          (dir_ / (quant + ".gguf")).string(), "--quant", quant});
    EXPECT_EQ(r.status, 0) << r.err;
    return r;
  };
  const std::string copied = "; " + std::to_string(n_tensors_ - 14) + " tensors copied as they are\n";
  const Result f16 = export_as("f16"), q8 = export_as("q8_0"), q4 = export_as("q4_0"),
               keep = export_as("keep");
  EXPECT_NE(
      f16.out.find("\n12 adapted tensors written as F32 (were F32); 2 adapted tensors written as F16 (were "
                   "Q8_0)" +
                   copied),
      std::string::npos)
      << f16.out;
  EXPECT_NE(q8.out.find("\n14 adapted tensors written as Q8_0 (were 12 F32, 2 Q8_0)" + copied),
            std::string::npos)
      << q8.out;
  EXPECT_NE(q4.out.find("\n14 adapted tensors written as Q4_0 (were 12 F32, 2 Q8_0)" + copied),
            std::string::npos)
      << q4.out;
  EXPECT_NE(
      keep.out.find("\n12 adapted tensors written as F32 (were F32); 2 adapted tensors written as Q8_0 (were "
                    "Q8_0)" +
                    copied),
      std::string::npos)
      << keep.out;
  EXPECT_EQ(io::GgufFile::open((dir_ / "q4_0.gguf").string()).tensor("blk.1.attn_k.weight").type,
            GgmlType::Q4_0);
  // The probe measures the re-quantization: f16 rounding (2^-11 of a weight, on ffn_down only)
  // below Q8_0's step (up to 1/254 of a block's largest weight, on every projection) below
  // Q4_0's (1/16 of it, 8 times Q8_0's). Each is a factor of several apart.
  const Probe pf = probe_of(f16.out), p8 = probe_of(q8.out), p4 = probe_of(q4.out);
  EXPECT_GT(pf.rel, 0) << f16.out;
  EXPECT_LT(pf.rel * 3, p8.rel) << f16.out << q8.out;
  EXPECT_LT(p8.rel * 3, p4.rel) << q8.out << q4.out;
  EXPECT_LT(p4.max_dlogit, 1.0) << q4.out;
  // keep re-quantizes only ffn_down to Q8_0: between f16 and an all-Q8_0 file.
  EXPECT_LT(probe_of(keep.out).rel, p8.rel) << keep.out;
}

TEST_F(CliMerge, Nf4WritesABitsandbytesDirectoryThatLoadsAsNf4) {
  make_gguf_run(false);
  const Result plain = export_to(dir_ / "plain");
  ASSERT_EQ(plain.status, 0) << plain.err;
  const Result r = run({"export", "--run", (dir_ / "run").string(), "--format", "merged", "--out",
                        (dir_ / "nf4").string(), "--quant", "nf4"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find(
                "\n14 decoder-layer matrices written as NF4 (bitsandbytes 4-bit, double-quantized absmax)\n"),
            std::string::npos)
      << r.out;
  const nlohmann::json config = nlohmann::json::parse(slurp(dir_ / "nf4" / "config.json"));
  EXPECT_EQ(config["quantization_config"]["quant_method"], "bitsandbytes");
  EXPECT_EQ(config["torch_dtype"], "float16");
  const LlamaWeights w = io::load_hf_model((dir_ / "nf4").string(), io::QuantMode::Keep);
  EXPECT_EQ(w.blocks[0].q.dtype, DType::NF4);
  EXPECT_EQ(w.blocks[1].down.dtype, DType::NF4);
  EXPECT_EQ(w.embed.dtype, DType::F16);
  // 4-bit codes step by up to a third of a block's largest weight: far above f16 rounding.
  const Probe p = probe_of(r.out);
  EXPECT_GT(p.rel, 5 * probe_of(plain.out).rel) << r.out << plain.out;
  EXPECT_LT(p.max_dlogit, 1.0) << r.out;
}

TEST_F(CliMerge, QuantThatDoesNotFitTheExportIsRefused) {
  make_gguf_run(false);
  const std::string run_dir = (dir_ / "run").string();
  struct Case {
    std::vector<std::string> args;
    std::string error;  // the start of the one line on stderr
  };
  const std::string gguf_out = (dir_ / "m.gguf").string(), dir_out = (dir_ / "m").string();
  const std::vector<Case> cases = {
      {{"--format", "merged", "--out", gguf_out, "--quant", "nf4"},
       "error: " + gguf_out +
           ": ends in .gguf, but --quant nf4 writes a bitsandbytes 4-bit HF directory; choose an --out "
           "without "
           ".gguf, or a GGUF --quant (f16, q8_0, q4_0, q4_1, q5_0, q5_1 or keep) ("},
      {{"--format", "merged", "--out", dir_out, "--quant", "q8_0"},
       "error: --quant q8_0 is for GGUF files, but --out " + dir_out +
           " is an HF directory (it does not end in .gguf); an HF directory takes --quant nf4, or no --quant "
           "for "
           "f16/bf16 ("},
      {{"--format", "merged", "--out", dir_out, "--quant", "keep"}, "error: --quant keep is for GGUF files"},
      {{"--format", "merged", "--out", gguf_out, "--quant", "q4_k"},
       "error: --quant must be nf4 (for an HF directory --out) or f16, q8_0, q4_0, q4_1, q5_0, q5_1 or keep "
       "(for a "
       ".gguf --out), got 'q4_k' ("},
      {{"--format", "peft", "--out", dir_out, "--quant", "nf4"},
       "error: --quant applies to --format merged only, not peft ("},
      {{"--format", "gguf", "--out", gguf_out, "--quant", "q8_0"},
       "error: --quant applies to --format merged only, not gguf ("},
  };
  for (const Case& c : cases) {
    std::vector<std::string> args = {"export", "--run", run_dir};
    args.insert(args.end(), c.args.begin(), c.args.end());
    const Result r = run(args);
    EXPECT_EQ(r.status, 1) << c.error;
    EXPECT_EQ(r.err.rfind(c.error, 0), 0u) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_FALSE(fs::exists(gguf_out)) << c.error;
    EXPECT_FALSE(fs::exists(dir_out)) << c.error;
  }
}

}  // namespace
}  // namespace tf::test
