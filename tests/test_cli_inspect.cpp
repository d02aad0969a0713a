// defines: tests of a GGUF model holding tensor types tightfit cannot dequantize (IQ, MXFP4):
// loading it for training is refused naming the tensor and type, and `tightfit inspect` still
// describes the whole file and names the tensors that cannot be used
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "cli_test_util.h"
#include "gguf_test_util.h"
#include "model_test_util.h"
#include "src/core/error.h"
#include "src/io/model_loader.h"

namespace tf::test {
namespace {

// GgufBase's all-f32 file rewritten with two tensors of types tightfit has no dequantizer for. Their
// bytes are zeros: only the types matter, since nothing may try to decode them.
std::string write_model_with_unsupported_types(const fs::path& dir) {
  const GgufBase base(tiny_config(), (dir / "f32.gguf").string(), false);
  const io::GgufFile f = io::GgufFile::open(base.path);
  io::GgufWriter w;
  for (const auto& [key, value] : f.metadata())
    if (key != "general.alignment") w.add_value(key, value);
  std::vector<std::vector<uint8_t>> zeros;
  for (const io::GgufTensorInfo& t : f.tensors()) {
    const std::vector<int64_t> ne(t.ne.begin(), t.ne.begin() + t.n_dims);
    const GgmlType type = t.name == "blk.0.attn_q.weight"   ? GgmlType::IQ4_NL
                          : t.name == "blk.1.ffn_up.weight" ? GgmlType::MXFP4
                                                            : t.type;
    if (type == t.type) {
      w.add_tensor(t.name, t.type, ne, t.data, size_t(t.n_bytes));
      continue;
    }
    const GgmlTypeInfo info = ggml_type_info(uint32_t(type));
    zeros.emplace_back(size_t(t.n_elements / info.block_elems * info.block_bytes));
    w.add_tensor(t.name, type, ne, zeros.back().data(), zeros.back().size());
  }
  const std::string path = (dir / "iq.gguf").string();
  w.write(path);
  return path;
}

TEST_F(Cli, LoadingRefusesUnsupportedTensorTypesNamingTensorAndType) {
  const std::string path = write_model_with_unsupported_types(dir_);
  try {
    io::load_model(path);
    FAIL() << "a model with an IQ4_NL tensor loaded";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find(path + ": tensor blk.0.attn_q.weight has ggml type IQ4_NL, which tightfit cannot "
                            "dequantize (it reads F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, "
                            "Q4_K, Q5_K, Q6_K, BF16)"),
              std::string::npos)
        << m;
  }
  const Result r = run({"eval", "--model", path, "--data", path});
  EXPECT_EQ(r.status, 1) << r.err;
  EXPECT_NE(r.err.find("error: " + path + ": tensor blk.0.attn_q.weight has ggml type IQ4_NL"),
            std::string::npos)
      << r.err;
}

TEST_F(Cli, InspectDescribesAFileWithUnsupportedTypesAndNamesThem) {
  const std::string path = write_model_with_unsupported_types(dir_);
  const Result r = run({"inspect", path});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("arch        llama: 2 layers, hidden 32"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(" 1 IQ4_NL ("), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(" 1 MXFP4 ("), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("unusable    tensors of these types cannot be used for training"), std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("  IQ4_NL   1 tensor: blk.0.attn_q.weight\n"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("  MXFP4    1 tensor: blk.1.ffn_up.weight\n"), std::string::npos) << r.out;
  // A file tightfit can train on has no such section.
  const Result ok = run({"inspect", (dir_ / "f32.gguf").string()});
  ASSERT_EQ(ok.status, 0) << ok.err;
  EXPECT_EQ(ok.out.find("unusable"), std::string::npos) << ok.out;
}

TEST_F(Cli, InspectNamesGemma3sAndQwen3sBlockFeatures) {
  const std::string fixtures = std::string(TIGHTFIT_FIXTURES) + "/arch_golden/";
  const Result g = run({"inspect", fixtures + "gemma3.gguf"});
  ASSERT_EQ(g.status, 0) << g.err;
  EXPECT_NE(g.out.find("arch        gemma3: 6 layers, hidden 32"), std::string::npos) << g.out;
  EXPECT_NE(g.out.find("            q/k norms per head, norms on the attention and MLP outputs, GeGLU (gelu, "
                       "tanh approximation), embeddings scaled by 5.65685, scores scaled by 16^-0.5, sliding "
                       "window 4 in 5 of 6 layers, sliding layers' rope theta 100\n"),
            std::string::npos)
      << g.out;
  const Result q = run({"inspect", fixtures + "qwen3"});
  ASSERT_EQ(q.status, 0) << q.err;
  EXPECT_NE(q.out.find("arch        qwen3: 2 layers"), std::string::npos) << q.out;
  EXPECT_NE(q.out.find("            q/k norms per head\n"), std::string::npos) << q.out;
}

}  // namespace
}  // namespace tf::test
