// GGUF-embedded vocabularies, built from plain data (the GGUF reader fills GgufVocab). Follows
// llama.cpp's conventions: control and unknown tokens are special added tokens, user-defined ones
// non-special added tokens; "gpt2" vocabularies pick their split patterns from tokenizer.ggml.pre.
#include "src/core/error.h"
#include "tokenizer/token_model.h"
#include "tokenizer/tokenizer.h"

namespace tf::tok {
namespace {

struct PreTokenizer {
  std::vector<std::string> patterns;
  bool ignore_merges = false;
  bool add_bos = false;
};

// The pre-tokenizers llama.cpp knows by these names, expressed as our split-pattern sequences.
PreTokenizer gpt2_pre_tokenizer(const std::string& pre, const std::string& source) {
  if (pre == "gpt2" || pre == "gpt-2" || pre == "phi-2") return {{kGpt2SplitPattern}};
  // SmolLM and StarCoder isolate every digit before the GPT-2 split.
  if (pre == "smollm" || pre == "starcoder" || pre == "refact") return {{R"(\p{N})", kGpt2SplitPattern}};
  if (pre == "llama3" || pre == "llama-v3" || pre == "llama-bpe") return {{kLlama3SplitPattern}, true, true};
  if (pre == "qwen2") return {{kQwen2SplitPattern}};
  // llama.cpp's fallback for files without a known pre-tokenizer.
  if (pre == "default" || pre.empty())
    return {{R"([\p{P}\$\+<=>\^~\|]+)", kGpt2SplitPattern, R"(\p{N}+)", "[0-9][0-9][0-9]"}};
  TF_FAIL(source, ": tokenizer.ggml.pre '", shown(pre),
          "' is not supported (known: gpt2, gpt-2, phi-2, smollm, starcoder, refact, llama3, llama-bpe, "
          "qwen2, default)");
}

TokenType type_of(const GgufVocab& v, size_t i) {
  return v.token_types.empty() ? TokenType::Normal : TokenType(v.token_types[i]);
}

}  // namespace

Tokenizer Tokenizer::from_gguf_vocab(const GgufVocab& v, const std::string& source) {
  Tokenizer t;
  t.source_ = source;
  const size_t n = v.tokens.size();
  TF_CHECK(n > 0, source, ": tokenizer.ggml.tokens is empty");
  TF_CHECK(v.token_types.empty() || v.token_types.size() == n, source, ": ", n, " tokens but ",
           v.token_types.size(), " token types");
  for (size_t i = 0; i < v.token_types.size(); ++i)
    TF_CHECK(v.token_types[i] >= 1 && v.token_types[i] <= 6, source, ": token ", i,
             " has unknown token type ", v.token_types[i]);

  std::vector<AddedToken> added;
  for (size_t i = 0; i < n; ++i) {
    const TokenType ty = type_of(v, i);
    if (ty == TokenType::Control || ty == TokenType::Unknown || ty == TokenType::UserDefined)
      added.push_back({v.tokens[i], int32_t(i), ty != TokenType::UserDefined});
  }

  bool add_bos = false;
  if (v.model == "gpt2") {
    const PreTokenizer pre = gpt2_pre_tokenizer(v.pre, source);
    BpeSpec spec;
    spec.source = source;
    spec.vocab = v.tokens;
    spec.split_patterns = pre.patterns;
    spec.ignore_merges = pre.ignore_merges;
    spec.merges.reserve(v.merges.size());
    for (size_t r = 0; r < v.merges.size(); ++r) {
      const std::string& m = v.merges[r];
      const size_t sp = m.find(' ', 1);
      TF_CHECK(sp != std::string::npos && sp + 1 < m.size(), source, ": merge #", r, " '", shown(m),
               "' is not two tokens separated by a space");
      spec.merges.emplace_back(m.substr(0, sp), m.substr(sp + 1));
    }
    t.model_ = make_byte_level_bpe(spec);
    add_bos = pre.add_bos;
  } else if (v.model == "llama") {
    SpmSpec spec;
    spec.source = source;
    spec.pieces = v.tokens;
    spec.scores = v.scores;
    spec.types.reserve(n);
    for (size_t i = 0; i < n; ++i) spec.types.push_back(type_of(v, i));
    spec.unk_id = v.unk_id;
    spec.add_space_prefix = v.add_space_prefix.value_or(true);
    t.model_ = make_score_spm(spec);
    add_bos = true;
  } else {
    TF_FAIL(source, ": tokenizer.ggml.model '", shown(v.model), "' is not supported (known: gpt2, llama)");
  }
  t.vocab_size_ = n;
  t.set_added_tokens(std::move(added));
  t.set_special_ids(v.bos_id, v.eos_id, v.pad_id);
  t.set_add_bos_eos(v.add_bos.value_or(add_bos), v.add_eos.value_or(false));
  return t;
}

}  // namespace tf::tok
