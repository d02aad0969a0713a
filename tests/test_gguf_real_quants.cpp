// A GGUF file written by llama.cpp's own quantizer decodes in tightfit exactly as gguf-py decodes it:
// every tensor, bit for bit against gguf.quants.dequantize, three ways: the f32 weight load_model
// makes under QuantMode::None, and the blocks it keeps under QuantMode::Keep through
// tf::cpu::dequantize_weight_tile (the decoder the quantized kernels use), on its AVX-512 path where
// the CPU has one and on its portable path.
// CI has no such file: tools/make_smollm2_quants.sh makes SmolLM2-135M-Instruct in Q2_K ... Q8_0
// with llama-quantize, and tools/check_gguf_decode.py writes gguf-py's decoding of a file (every
// tensor as f32, in the file's tensor order) and runs this test with
//   TIGHTFIT_GGUF_DECODE_MODEL=FILE.gguf TIGHTFIT_GGUF_DECODE_REFERENCE=DECODED.f32
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "kernels/cpu/isa.h"
#include "kernels/ops.h"
#include "src/io/gguf_model.h"
#include "src/io/model_loader.h"

namespace tf::io {
namespace {

constexpr int kDecodings = 3;
const char* const kDecodingNames[kDecodings] = {"none", "keep + tf::cpu", "keep + tf::cpu portable"};

struct TypeTally {
  int tensors = 0;
  int64_t values = 0;
  int64_t differing[kDecodings] = {};
  double max_diff[kDecodings] = {};
};

TEST(GgufRealQuants, EveryTensorDecodesLikeGgufPy) {
  const char* model = std::getenv("TIGHTFIT_GGUF_DECODE_MODEL");
  const char* reference = std::getenv("TIGHTFIT_GGUF_DECODE_REFERENCE");
  if (!model || !*model || !reference || !*reference)
    GTEST_SKIP()
        << "TIGHTFIT_GGUF_DECODE_MODEL and TIGHTFIT_GGUF_DECODE_REFERENCE are not set (a GGUF file "
           "written by llama.cpp and gguf-py's decoding of it): make the files with "
           "tools/make_smollm2_quants.sh, then run tools/check_gguf_decode.py FILE.gguf, which sets both";

  const LoadedModel m = load_model(model, true, QuantMode::None);
  const LoadedModel kept = load_model(model, true, QuantMode::Keep);
  ASSERT_TRUE(m.gguf);
  std::ifstream want_in(reference, std::ios::binary);
  ASSERT_TRUE(want_in) << "cannot open " << reference;

  std::map<std::string, TypeTally> by_type;
  std::vector<float> want, got;
  for (const GgufTensorInfo& t : m.gguf->tensors()) {
    SCOPED_TRACE(t.name);
    const auto id = parse_gguf_llama_tensor_name(t.name);
    ASSERT_TRUE(id.has_value()) << "not a llama tensor";
    const WeightRef& w = m.weights.slot(weight_slot_of(id->role), id->layer);
    const WeightRef& k = kept.weights.slot(weight_slot_of(id->role), id->layer);
    ASSERT_EQ(w.rows, t.n_rows());
    ASSERT_EQ(w.cols, t.row_length());
    ASSERT_EQ(k.rows, t.n_rows());
    ASSERT_EQ(k.cols, t.row_length());
    ASSERT_FALSE(is_quantized(w.dtype)) << "QuantMode::None kept " << dtype_name(w.dtype);
    // Keep computes with the file's own blocks, never a re-quantization.
    const auto file_dtype = dtype_of_ggml(t.type);
    ASSERT_TRUE(file_dtype.has_value());
    ASSERT_EQ(dtype_name(k.dtype), dtype_name(*file_dtype));
    const size_t n = size_t(t.n_elements);
    want.resize(n);
    got.resize(n);
    want_in.read(reinterpret_cast<char*>(want.data()), std::streamsize(n * sizeof(float)));
    ASSERT_TRUE(want_in) << reference << " ends before this tensor";
    TypeTally& tally = by_type[ggml_type_info(uint32_t(t.type)).name];
    for (int d = 0; d < kDecodings; ++d) {
      if (d == 0) {
        ref::dequantize_weight_tile(got.data(), w.cols, w, 0, w.rows, 0, w.cols);
      } else if (d == 1) {
        cpu::dequantize_weight_tile(got.data(), k.cols, k, 0, k.rows, 0, k.cols);
      } else {
        const cpu::ScopedPortableKernels portable;
        cpu::dequantize_weight_tile(got.data(), k.cols, k, 0, k.rows, 0, k.cols);
      }
      int64_t differing = 0;
      for (size_t i = 0; i < n; ++i) {
        if (std::bit_cast<uint32_t>(got[i]) == std::bit_cast<uint32_t>(want[i])) continue;
        ++differing;
        tally.max_diff[d] = std::fmax(tally.max_diff[d], std::fabs(double(got[i]) - double(want[i])));
      }
      EXPECT_EQ(differing, 0) << "of " << n << " values differ from gguf-py's in " << kDecodingNames[d];
      tally.differing[d] += differing;
    }
    ++tally.tensors;
    tally.values += int64_t(n);
  }
  EXPECT_EQ(want_in.peek(), std::ifstream::traits_type::eof())
      << reference << " holds more values than the file's tensors";
  // Every weight the model computes with came from a tensor checked above.
  size_t slots = 0;
  LlamaWeights::for_each_slot(m.weights.config, [&](WeightSlot, int) { ++slots; });
  EXPECT_EQ(slots, m.gguf->tensors().size());

  std::printf("%s: %zu tensors; tf::cpu decodes the kept blocks %s\n", model, m.gguf->tensors().size(),
              cpu::cpu_has_avx512() ? "on AVX-512" : "portable (no AVX-512 on this CPU)");
  for (const auto& [type, tally] : by_type) {
    std::printf("  %-5s %4d tensors %11lld values; differing from gguf-py (max |difference|):", type.c_str(),
                tally.tensors, static_cast<long long>(tally.values));
    for (int d = 0; d < kDecodings; ++d)
      std::printf("%s %s %lld (%g)", d ? "," : "", kDecodingNames[d],
                  static_cast<long long>(tally.differing[d]), tally.max_diff[d]);
    std::printf("\n");
  }
}

}  // namespace
}  // namespace tf::io
