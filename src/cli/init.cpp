#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "src/cli/commands.h"
#include "src/cli/outputs.h"
#include "src/core/error.h"
#include "src/io/durable.h"
#include "src/io/hf_model.h"
#include "src/io/merge.h"
#include "src/io/safetensors.h"
#include "tokenizer/tokenizer.h"

namespace tf::cli {

namespace fs = std::filesystem;

namespace {

// The random models' vocabulary: the 256 bytes, then these added tokens (ChatML markers so that
// chat-formatted data works out of the box).
const char* const kSpecialTokens[] = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
constexpr int kByteTokens = 256;

// A byte-level BPE tokenizer.json with no merges: every byte is a token.
nlohmann::ordered_json byte_tokenizer_json() {
  nlohmann::ordered_json vocab = nlohmann::ordered_json::object();
  for (int b = 0; b < kByteTokens; ++b) vocab[tok::byte_level_piece(uint8_t(b))] = b;
  nlohmann::ordered_json added = nlohmann::ordered_json::array();
  int id = kByteTokens;
  for (const char* s : kSpecialTokens) {
    vocab[s] = id;
    added.push_back({{"id", id++},
                     {"content", s},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  }
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", added},
          {"normalizer", nullptr},
          {"pre_tokenizer",
           {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}}},
          {"post_processor", nullptr},
          {"decoder",
           {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
          {"model",
           {{"type", "BPE"},
            {"dropout", nullptr},
            {"unk_token", nullptr},
            {"continuing_subword_prefix", nullptr},
            {"end_of_word_suffix", nullptr},
            {"fuse_unk", false},
            {"byte_fallback", false},
            {"ignore_merges", false},
            {"vocab", vocab},
            {"merges", nlohmann::ordered_json::array()}}}};
}

// The model's files, written into `dir` (which is published whole afterwards).
void write_model(const fs::path& dir, const LlamaConfig& cfg, const LlamaWeights& w) {
  std::vector<io::SafetensorsWriteTensor> tensors;
  LlamaWeights::for_each_slot(cfg, [&](WeightSlot slot, int layer) {
    const WeightRef& ref = w.slot(slot, layer);
    io::SafetensorsWriteTensor t;
    t.name = hf_weight_name(slot, layer);
    t.dtype = io::StDType::F32;
    t.shape = ref.rows == 1 ? std::vector<int64_t>{ref.cols} : std::vector<int64_t>{ref.rows, ref.cols};
    t.bytes = {static_cast<const std::byte*>(ref.data), size_t(ref.rows * ref.cols) * sizeof(float)};
    tensors.push_back(std::move(t));
  });
  io::write_safetensors((dir / "model.safetensors").string(), tensors, {{"format", "pt"}});
  io::write_file_synced((dir / "config.json").string(), io::hf_config_json(cfg, DType::F32).dump(2) + "\n");
  io::write_file_synced((dir / "tokenizer.json").string(), byte_tokenizer_json().dump(2) + "\n");
  const nlohmann::ordered_json tok_cfg = {
      {"bos_token", nullptr},
      {"eos_token", "<|im_end|>"},
      {"pad_token", "<|endoftext|>"},
      {"add_bos_token", false},
      {"chat_template",
       "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
       "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% "
       "endif %}"}};
  io::write_file_synced((dir / "tokenizer_config.json").string(), tok_cfg.dump(2) + "\n");
}

}  // namespace

LlamaConfig named_config(const std::string& name) {
  LlamaConfig c;
  if (name == "tiny") {
    c.hidden = 64;
    c.intermediate = 176;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
  } else if (name == "small") {
    c.hidden = 256;
    c.intermediate = 704;
    c.n_layers = 4;
    c.n_heads = 8;
    c.n_kv_heads = 4;
  } else {
    return io::read_hf_config(name);
  }
  c.head_dim = c.hidden / c.n_heads;
  c.vocab = 320;  // 256 bytes + specials, rounded up to a multiple of 64
  c.rope.head_dim = c.head_dim;
  c.max_positions = 2048;
  c.tie_embeddings = true;
  return c;
}

int run_init(const InitOptions& o) {
  TF_CHECK(!o.out.empty(), "--out is required");
  const LlamaConfig cfg = named_config(o.config);
  TF_CHECK(cfg.vocab >= kByteTokens + int(std::size(kSpecialTokens)), o.config,
           ": a random model needs a vocabulary ", "of at least ", kByteTokens + std::size(kSpecialTokens),
           " tokens for its byte-level tokenizer");
  std::error_code ec;
  const fs::file_status st = fs::symlink_status(o.out, ec);
  TF_CHECK(!fs::exists(st) || fs::is_directory(st), o.out,
           ": exists and is not a directory (a file or a symbolic link); choose another --out");
  TF_CHECK(!fs::exists(st) || o.force || is_empty_dir(o.out), o.out, ": is not empty (",
           describe_entries(o.out),
           "); choose an empty or new --out, or pass --force to replace the directory and everything in it");
  const LlamaWeights w = init_random_weights(cfg, DType::F32, o.seed);
  io::publish_dir(o.out, [&](const std::string& staged) { write_model(staged, cfg, w); });
  std::printf("wrote a random %s model (%.2fM parameters) to %s\n", o.config.c_str(),
              double(cfg.n_params()) / 1e6, o.out.c_str());
  return 0;
}

}  // namespace tf::cli
