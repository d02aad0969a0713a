// defines: tf::io::llama_config_from_gguf (llama / qwen2 GGUF metadata -> tf::LlamaConfig),
//          tf::io::GgufLlamaTensor and the GGUF tensor-name mapping (blk.N.attn_q.weight, ...)
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "src/io/gguf.h"
#include "src/model/config.h"

namespace tf::io {

// Reads the `<arch>.*` hyper-parameters (general.architecture "llama", which Mistral, SmolLM and
// TinyLlama files use too, or "qwen2", with q/k/v biases) and checks them against the token
// embedding's shape. llama files store q/k rows permuted for the interleaved rotation, so their
// rope_layout is Interleaved; qwen2 files keep HF's rows (SplitHalf). rope_freqs.weight (Llama 3.1+)
// becomes rope.freq_factors; a file without output.weight ties the lm_head to the embedding. Throws
// tf::Error naming the file and key.
LlamaConfig llama_config_from_gguf(const GgufFile& f);

// What a Llama-architecture GGUF tensor is.
enum class GgufLlamaRole : uint8_t {
  TokenEmbd,     // token_embd.weight            [vocab, hidden]
  AttnNorm,      // blk.N.attn_norm.weight       [hidden]
  AttnQ,         // blk.N.attn_q.weight          [q_dim, hidden]  (rows permuted for interleaved rope)
  AttnK,         // blk.N.attn_k.weight          [kv_dim, hidden] (rows permuted for interleaved rope)
  AttnV,         // blk.N.attn_v.weight          [kv_dim, hidden]
  AttnQBias,     // blk.N.attn_q.bias            [q_dim]  (qwen2)
  AttnKBias,     // blk.N.attn_k.bias            [kv_dim]
  AttnVBias,     // blk.N.attn_v.bias            [kv_dim]
  AttnOutput,    // blk.N.attn_output.weight     [hidden, q_dim]
  FfnNorm,       // blk.N.ffn_norm.weight        [hidden]
  FfnGate,       // blk.N.ffn_gate.weight        [intermediate, hidden]
  FfnUp,         // blk.N.ffn_up.weight          [intermediate, hidden]
  FfnDown,       // blk.N.ffn_down.weight        [hidden, intermediate]
  AttnQNorm,     // blk.N.attn_q_norm.weight         [head_dim]  (qwen3, gemma3)
  AttnKNorm,     // blk.N.attn_k_norm.weight         [head_dim]
  AttnPostNorm,  // blk.N.post_attention_norm.weight [hidden]    (gemma3)
  FfnPostNorm,   // blk.N.post_ffw_norm.weight       [hidden]
  OutputNorm,    // output_norm.weight           [hidden]
  Output,        // output.weight                [vocab, hidden]
  // phi3's fused q, k, v rows (its ffn_up holds gate's rows, then up's): a matrix no WeightSlot
  // holds whole, so it comes after the roles that map one-to-one onto slots.
  AttnQkv,  // blk.N.attn_qkv.weight  [q_dim + 2 kv_dim, hidden]
};

struct GgufLlamaTensor {
  GgufLlamaRole role = GgufLlamaRole::TokenEmbd;
  int layer = -1;  // block index for the per-block roles, -1 otherwise

  bool operator==(const GgufLlamaTensor&) const = default;
};

// "blk.3.attn_q.weight" -> {AttnQ, 3}; nullopt for names outside the mapping.
std::optional<GgufLlamaTensor> parse_gguf_llama_tensor_name(std::string_view name);
// The inverse: {AttnQ, 3} -> "blk.3.attn_q.weight".
std::string gguf_llama_tensor_name(GgufLlamaTensor t);

}  // namespace tf::io
