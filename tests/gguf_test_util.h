// defines: tf::test::GgufBase, a tiny GGUF llama file written from random f32 weights with q/k rows
// permuted as the HF->GGUF converter permutes them, for tests that compare a GGUF base with the HF
// model it was converted from
#pragma once

#include <cstring>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "kernels/quant_blocks.h"
#include "src/core/dtype.h"
#include "src/core/rng.h"
#include "src/io/gguf.h"
#include "src/io/gguf_lora.h"
#include "src/io/gguf_model.h"
#include "src/model/weights.h"

namespace tf::test {

// `hf` holds the weights in HF order (init_random_weights(cfg, F32, kSeed)); the file at `path`
// holds the same weights in GGUF order, all f32 except, with `quantize_down`, ffn_down, which is
// replaced by random Q8_0 blocks (then the file is no longer the HF model converted). `metadata`
// adds keys of its own.
struct GgufBase {
  static constexpr uint64_t kSeed = 8;
  LlamaWeights hf;
  std::vector<std::vector<float>> qk;
  std::vector<std::vector<uint8_t>> q8;
  std::string path;

  GgufBase(const LlamaConfig& cfg, const std::string& file, bool quantize_down = true,
           const std::function<void(io::GgufWriter&)>& metadata = {})
      : hf(init_random_weights(cfg, DType::F32, kSeed)), path(file) {
    io::GgufWriter w;
    if (metadata) metadata(w);
    w.add_string("general.architecture", "llama");
    w.add_string("general.name", "tiny");
    w.add_u32("llama.embedding_length", uint32_t(cfg.hidden));
    w.add_u32("llama.feed_forward_length", uint32_t(cfg.intermediate));
    w.add_u32("llama.block_count", uint32_t(cfg.n_layers));
    w.add_u32("llama.attention.head_count", uint32_t(cfg.n_heads));
    w.add_u32("llama.attention.head_count_kv", uint32_t(cfg.n_kv_heads));
    w.add_f32("llama.attention.layer_norm_rms_epsilon", cfg.rms_eps);
    w.add_string_array("tokenizer.ggml.tokens", std::vector<std::string>(size_t(cfg.vocab), "t"));
    const auto add = [&](const std::string& name, const WeightRef& r) {
      const std::vector<int64_t> ne =
          r.rows == 1 ? std::vector<int64_t>{r.cols} : std::vector<int64_t>{r.cols, r.rows};
      w.add_tensor(name, GgmlType::F32, ne, r.data, size_t(r.rows * r.cols) * 4);
    };
    add("token_embd.weight", hf.embed);
    add("output_norm.weight", hf.final_norm);
    add("output.weight", hf.lm_head);
    const Philox rng(5, 5);
    for (int l = 0; l < cfg.n_layers; ++l) {
      const BlockWeights& b = hf.blocks[size_t(l)];
      const auto name = [&](io::GgufLlamaRole role) { return io::gguf_llama_tensor_name({role, l}); };
      add(name(io::GgufLlamaRole::AttnNorm), b.attn_norm);
      for (auto [role, r] : {std::pair{io::GgufLlamaRole::AttnQ, b.q}, {io::GgufLlamaRole::AttnK, b.k}}) {
        qk.emplace_back(size_t(r.rows * r.cols));
        io::permute_qk_rows(qk.back().data(), static_cast<const float*>(r.data), r.rows, r.cols, cfg.head_dim,
                            true);
        w.add_tensor(name(role), GgmlType::F32, {r.cols, r.rows}, qk.back().data(), qk.back().size() * 4);
      }
      add(name(io::GgufLlamaRole::AttnV), b.v);
      add(name(io::GgufLlamaRole::AttnOutput), b.o);
      add(name(io::GgufLlamaRole::FfnNorm), b.mlp_norm);
      add(name(io::GgufLlamaRole::FfnGate), b.gate);
      add(name(io::GgufLlamaRole::FfnUp), b.up);
      if (!quantize_down) {
        add(name(io::GgufLlamaRole::FfnDown), b.down);
        continue;
      }
      // Q8_0 blocks: an f16 scale and 32 int8 values, here random.
      const int64_t n_blocks = b.down.rows * b.down.cols / 32;
      q8.emplace_back(size_t(n_blocks) * sizeof(BlockQ8_0));
      for (int64_t k = 0; k < n_blocks; ++k) {
        BlockQ8_0 blk;
        blk.d = f32_to_f16(0.001f * float(1 + k % 3));
        for (int j = 0; j < 32; ++j) blk.qs[j] = int8_t(int(rng.u32(uint64_t(k * 32 + j)) % 255) - 127);
        std::memcpy(q8.back().data() + k * int64_t(sizeof(BlockQ8_0)), &blk, sizeof blk);
      }
      w.add_tensor(name(io::GgufLlamaRole::FfnDown), GgmlType::Q8_0, {b.down.cols, b.down.rows},
                   q8.back().data(), q8.back().size());
    }
    w.write(path);
  }
};

}  // namespace tf::test
