// defines: tf::tok::TokenModel (what each vocabulary kind implements), the factories for each kind
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace tf::tok {

// Encodes and decodes text that holds no added token. The tokenizer hands the model each stretch of
// text between added tokens; sentencepiece-style models put their dummy space prefix in front of each
// (as llama.cpp does after every special token), and decode takes it away again where
// `after_special` says a run of ids begins the output or follows an added token, so that
// decode(encode(x)) == x. `at_start` says the stretch begins the input (no added token before it),
// which HF's Metaspace prepend scheme "first" asks about.
class TokenModel {
 public:
  virtual ~TokenModel() = default;
  virtual void encode(std::string_view text, bool at_start, std::vector<int32_t>& out) const = 0;
  virtual void decode(std::span<const int32_t> ids, bool after_special, std::string& out) const = 0;
  // The vocabulary's own spelling of a token ("Ġthe", "▁the", "<0x0A>"); empty for an unused id.
  virtual const std::string& piece(int32_t id) const = 0;
  virtual std::optional<int32_t> find(std::string_view piece) const = 0;
  virtual size_t size() const = 0;
};

// Where HF's Metaspace pre-tokenizer (and decoder) put the replacement character in front of text.
enum class PrependScheme : uint8_t { Always, First, Never };

struct MetaspaceSpec {
  std::string replacement = "\xE2\x96\x81";  // one character; U+2581 in every real file
  PrependScheme prepend = PrependScheme::Always;
  bool split = true;  // each replacement character starts a new piece
};

// BPE. Byte-level (GPT-2 family): split patterns are PCRE2 regexes applied one after another, each
// keeping both its matches and the gaps between them as pieces (HF's "Isolated" behaviour), and the
// symbols are the bytes as GPT-2's printable characters. Otherwise (sentencepiece-style
// tokenizer.json) the symbols are UTF-8 characters, pieces come from the Metaspace split when one
// is given, and characters the vocab lacks fall back to <0xNN> byte tokens under byte_fallback.
struct BpeSpec {
  std::string source;                                       // file name for error messages
  std::vector<std::string> vocab;                           // id -> piece; "" marks an unused id
  std::vector<std::pair<std::string, std::string>> merges;  // in rank order
  std::vector<std::string> split_patterns;
  bool add_prefix_space = false;
  bool ignore_merges = false;  // a piece that is a whole vocab entry is emitted without merging
  bool byte_level = true;
  bool byte_fallback = false;
  bool fuse_unk = false;  // a run of unknown symbols becomes one unknown token
  std::optional<MetaspaceSpec> metaspace;
  int32_t unk_id = -1;
};
std::unique_ptr<TokenModel> make_bpe(const BpeSpec& spec);

// The split patterns of the tokenizers we know (the GPT-2, Llama-3 and Qwen2 pre-tokenizer regexes).
extern const char* const kGpt2SplitPattern;
extern const char* const kLlama3SplitPattern;
extern const char* const kQwen2SplitPattern;

// Sentencepiece-style vocabulary with scores (llama.cpp's "llama" GGUF vocab): greedy merges of the
// adjacent pair whose merged piece scores highest, byte fallback to <0xNN> pieces, spaces as "▁".
struct SpmSpec {
  std::string source;
  std::vector<std::string> pieces;
  std::vector<float> scores;
  std::vector<TokenType> types;
  int32_t unk_id = -1;
  bool add_space_prefix = true;
};
std::unique_ptr<TokenModel> make_score_spm(const SpmSpec& spec);

// A sentencepiece .model through libsentencepiece. Also reports the model's special ids and its
// control pieces (which the tokenizer recognises inside text).
struct SentencePieceInfo {
  int32_t bos_id = -1, eos_id = -1, pad_id = -1, unk_id = -1;
  std::vector<AddedToken> control_tokens;
};
std::unique_ptr<TokenModel> make_sentencepiece(const std::string& path, SentencePieceInfo& info);

// The largest token piece any loader accepts: real vocabularies stay under a few hundred bytes, and
// the bound keeps a hostile file from making each lookup and copy arbitrarily expensive.
constexpr size_t kMaxPieceBytes = 100 * 1024;

// The longest added (special) token accepted. Matching added tokens in text costs, at worst, the
// text length times this; real added tokens stay under 32 bytes (llama.cpp's test vocabularies,
// SmolLM2), so 1 KiB refuses nothing real and keeps a hostile vocabulary from making encoding slow.
constexpr size_t kMaxAddedTokenBytes = 1024;

// A piece as error messages show it: cut to 64 bytes, so a hostile piece cannot flood the log.
inline std::string shown(std::string_view s) {
  return s.size() <= 64 ? std::string(s) : std::string(s.substr(0, 64)) + "...";
}

}  // namespace tf::tok
