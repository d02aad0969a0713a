// defines: tf::test::write_bf16_model_dir, a small HF model directory (bf16 safetensors and
// config.json) whose tensors a --quant keep load computes with in place, for the weight store's tests
#pragma once

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "src/io/merge.h"
#include "src/io/safetensors.h"
#include "src/model/weights.h"

namespace tf::test {

// Writes init_random_weights(cfg, BF16, seed, 0.25) into `dir` and returns its path.
inline std::string write_bf16_model_dir(const LlamaConfig& cfg, const std::filesystem::path& dir,
                                        uint64_t seed = 11) {
  std::filesystem::create_directories(dir);
  const LlamaWeights src = init_random_weights(cfg, DType::BF16, seed, 0.25f);
  std::vector<io::SafetensorsWriteTensor> tensors;
  LlamaWeights::for_each_slot(cfg, [&](WeightSlot s, int layer) {
    const WeightRef& t = src.slot(s, layer);
    tensors.push_back({hf_weight_name(s, layer),
                       io::StDType::BF16,
                       t.rows == 1 ? std::vector<int64_t>{t.cols} : std::vector<int64_t>{t.rows, t.cols},
                       {static_cast<const std::byte*>(t.data), size_t(t.rows * t.cols) * 2}});
  });
  io::write_safetensors((dir / "model.safetensors").string(), tensors);
  std::ofstream(dir / "config.json") << io::hf_config_json(cfg, DType::BF16).dump(2);
  return dir.string();
}

}  // namespace tf::test
