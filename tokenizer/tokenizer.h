// defines: tf::tok::Tokenizer (one interface over byte-level BPE, sentencepiece and GGUF vocabularies),
// tf::tok::GgufVocab (the plain data a GGUF file's tokenizer.ggml.* keys hold), tf::tok::EncodeOptions
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace tf::tok {

// GGUF's tokenizer.ggml.token_type values (the same numbering as sentencepiece's piece types).
enum class TokenType : int32_t {
  Normal = 1,
  Unknown = 2,
  Control = 3,
  UserDefined = 4,
  Unused = 5,
  Byte = 6
};

// Everything a GGUF file says about its vocabulary, as plain data, so that the GGUF reader and the
// tokenizer stay independent: the reader fills this from the tokenizer.ggml.* keys.
struct GgufVocab {
  std::string model;                 // tokenizer.ggml.model: "gpt2" or "llama"
  std::string pre;                   // tokenizer.ggml.pre (gpt2 only): "smollm", "llama-bpe", "qwen2", ...
  std::vector<std::string> tokens;   // tokenizer.ggml.tokens
  std::vector<float> scores;         // tokenizer.ggml.scores (llama; may be empty for gpt2)
  std::vector<int32_t> token_types;  // tokenizer.ggml.token_type (may be empty: all Normal)
  std::vector<std::string> merges;   // tokenizer.ggml.merges (gpt2), "left right"
  int32_t bos_id = -1, eos_id = -1, unk_id = -1, pad_id = -1;
  std::optional<bool> add_bos, add_eos, add_space_prefix;  // absent: the model's convention
};

struct EncodeOptions {
  // Add BOS/EOS as the tokenizer's post-processor (or GGUF add_bos/add_eos) says.
  bool add_special = true;
  // Special tokens written in the text become their ids; false encodes their text as plain text
  // (for user content that must not inject control tokens). Non-special added tokens always split.
  bool parse_special = true;
};

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false;
  // Matched in the normalized text rather than the raw input (HF's "normalized": true).
  bool normalized = false;
};

class TokenModel;  // the vocabulary-specific encoder of text that holds no added token
class Normalizer;  // tokenizer.json's normalizer (tokenizer/hf_pipeline.h)
class Decoder;     // tokenizer.json's decoder chain

// Text <-> token ids. Added (special) tokens are split out of the text first, as HF tokenizers and
// llama.cpp do; the pieces between them are normalized (tokenizer.json), the added tokens marked
// normalized are split out of the result, and the rest goes to the model. Loading refuses anything
// it does not implement with an error that names the file and the feature.
class Tokenizer {
 public:
  // HF tokenizer.json with a BPE model: byte-level (GPT-2, Llama-3, Qwen2, SmolLM) or
  // sentencepiece-style (Llama-2, Mistral, TinyLlama: Metaspace or a Prepend/Replace normalizer,
  // byte fallback), with HF's normalizers and decoders.
  static Tokenizer from_tokenizer_json(const std::string& path);
  // sentencepiece .model. Control pieces (<s>, </s>, ...) written in the text are recognised.
  static Tokenizer from_sentencepiece(const std::string& path);
  // A GGUF-embedded vocabulary; `source` names the file in error messages.
  static Tokenizer from_gguf_vocab(const GgufVocab& vocab, const std::string& source);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Byte-level BPE encodes any bytes (text that is not UTF-8 decodes back to the same bytes);
  // sentencepiece-style vocabularies refuse it with an error giving the offset of the bad byte.
  std::vector<int32_t> encode(std::string_view text, const EncodeOptions& opt = {}) const;
  // Added tokens decode to their text (special ones are dropped when skip_special is set); a
  // tokenizer.json's decoder chain sees them among the other tokens, as HF's decode does.
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;
  // The token's text as it appears in decoded output (bytes for byte tokens).
  std::string token_to_piece(int32_t id) const;
  std::optional<int32_t> token_to_id(std::string_view piece) const;

  int32_t bos_id() const { return bos_id_; }  // -1 when the tokenizer has none
  int32_t eos_id() const { return eos_id_; }
  int32_t pad_id() const { return pad_id_; }
  bool adds_bos() const { return add_bos_; }
  bool adds_eos() const { return add_eos_; }
  // For glue that reads tokenizer_config.json: override the special ids and BOS/EOS policy.
  void set_special_ids(int32_t bos, int32_t eos, int32_t pad);
  void set_add_bos_eos(bool add_bos, bool add_eos);

  size_t vocab_size() const { return vocab_size_; }
  const std::vector<AddedToken>& added_tokens() const { return added_; }
  const std::string& source() const { return source_; }

 private:
  // Byte trie over added-token contents: edges keyed by (node << 8 | byte); terminal node -> added_.
  struct Trie {
    std::unordered_map<uint64_t, uint32_t> edges;
    std::unordered_map<uint32_t, size_t> terminal;
    uint32_t nodes = 1;  // node 0 is the root
  };

  Tokenizer();
  void set_added_tokens(std::vector<AddedToken> added);
  void check_id(int32_t id, const char* what) const;
  // Splits `text` on the trie's tokens (longest match first) and hands each stretch between them
  // to `stretch` (with whether it begins the input).
  template <typename F>
  void split_added(const Trie& trie, std::string_view text, bool at_start, const EncodeOptions& opt,
                   std::vector<int32_t>& out, F&& stretch) const;
  void encode_stretch(std::string_view text, bool at_start, const EncodeOptions& opt,
                      std::vector<int32_t>& out) const;

  std::string source_;
  std::unique_ptr<TokenModel> model_;
  std::unique_ptr<const Normalizer> normalizer_;  // tokenizer.json only; null: the text as it is
  std::unique_ptr<const Decoder> decoder_;        // tokenizer.json only; null: the model decodes
  std::vector<AddedToken> added_;
  std::unordered_map<int32_t, size_t> added_index_;  // id -> index in added_
  std::vector<std::string> spelling_;                // by index in added_: the text matched and decoded
  Trie raw_trie_;                                    // added tokens matched in the input
  Trie normalized_trie_;  // added tokens matched in the normalized stretches between those
  size_t vocab_size_ = 0;
  int32_t bos_id_ = -1, eos_id_ = -1, pad_id_ = -1;
  bool add_bos_ = false, add_eos_ = false;
};

// The printable string byte-level BPE vocabularies use for byte `b` (GPT-2's byte -> code point
// mapping, UTF-8 encoded), for writing byte-level tokenizer files.
std::string byte_level_piece(uint8_t b);

}  // namespace tf::tok
