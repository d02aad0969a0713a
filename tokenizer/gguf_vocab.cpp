// defines: tf::tok::Tokenizer::from_gguf_vocab and the GGUF pre-tokenizers it knows by name
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

struct KnownPreTokenizer {
  std::vector<std::string> names;
  PreTokenizer pre;
};

// llama.cpp's pre-tokenizers (src/llama-vocab.cpp), under the names its converter writes, as our
// split-pattern sequences. Where llama.cpp rewrites a model's regex for std::regex (ASCII case
// spelled out for (?i:), "a letter not a-z" for [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]), the pattern here is
// the model's own from its tokenizer.json, which PCRE2 runs as written: the model was trained on
// that split, and llama.cpp's vocab test files (.out) hold the HF tokenizer's ids.
std::vector<KnownPreTokenizer> make_known_pre_tokenizers() {
  const std::string digit = R"(\p{N})", gpt2 = kGpt2SplitPattern, llama3 = kLlama3SplitPattern;
  const std::string contractions = "(?i:'s|'t|'re|'ve|'m|'ll|'d)";
  const std::string upper = R"([\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}])", lower = R"([\p{Ll}\p{Lm}\p{Lo}\p{M}])";
  // Words split at lower -> upper case changes (Tekken, GPT-4o), each with an optional suffix.
  const auto cased_words = [&](const std::string& suffix) {
    return R"([^\r\n\p{L}\p{N}]?)" + upper + "*" + lower + "+" + suffix + R"(|[^\r\n\p{L}\p{N}]?)" + upper +
           "+" + lower + "*" + suffix;
  };
  const std::string deepseek_cjk = R"([\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+)";
  // DeepSeek-LLM's letters: the cased scripts' letter ranges, as its tokenizer.json lists them.
  const std::string deepseek_llm_letters =
      R"(\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+)";
  const std::string bloom_words = R"( ?[^(\s|.,!?\x{2026}\x{3002}\x{FF0C}\x{3001}\x{964}\x{6D4}\x{60C})]+)";
  return {
      {{"gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4"}, {{gpt2}}},
      // StarCoder and its relatives isolate every digit before the GPT-2 split.
      {{"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"},
       {{digit, gpt2}}},
      {{"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"},
       {{llama3}, true, true}},
      {{"dbrx", "smaug-bpe", "chatglm-bpe"}, {{llama3}}},
      {{"qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan", "solar-open", "kormo", "f2llmv2",
        "grok-2"},
       {{kQwen2SplitPattern}}},
      {{"qwen35"},
       {{contractions +
         R"(|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}}},
      {{"deepseek-llm"},
       {{R"([\r\n])", deepseek_llm_letters,
         R"(\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+)", R"(\s+$)",
         deepseek_cjk, R"(\p{N}+)"}}},
      {{"deepseek-coder"}, {{R"([\r\n])", R"(\s?\p{L}+)", R"(\s?\p{P}+)", deepseek_cjk, digit}}},
      {{"deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"},
       {{R"(\p{N}{1,3})", R"([\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+)",
         R"re([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)re"}}},
      {{"falcon"}, {{R"([\p{P}\$\+<=>\^~\|`]+)", gpt2, "[0-9][0-9][0-9]"}}},
      {{"poro-chat"}, {{bloom_words}}},
      {{"viking"}, {{bloom_words, digit}}},
      {{"tekken"},
       {{cased_words("") + R"(|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}, true, true}},
      {{"gpt-4o", "llama4", "kanana2", "minimax-m2"},
       {{cased_words(contractions + "?") +
         R"(|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}}},
      {{"bailingmoe", "bailingmoe2", "llada-moe"},
       {{R"('(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+)"}}},
      {{"seed-coder"},
       {{contractions +
         R"(|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+)"}}},
      {{"minicpm5"},
       {{R"(\p{N}{1,3})",
         contractions +
             R"(|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"},
        true}},
      // llama.cpp's fallback for files without a known pre-tokenizer.
      {{"default", ""}, {{R"([\p{P}\$\+<=>\^~\|]+)", gpt2, R"(\p{N}+)", "[0-9][0-9][0-9]"}}},
  };
}

const std::vector<KnownPreTokenizer>& known_pre_tokenizers() {
  static const std::vector<KnownPreTokenizer> table = make_known_pre_tokenizers();
  return table;
}

PreTokenizer gpt2_pre_tokenizer(const std::string& pre, const std::string& source) {
  std::string known;
  for (const KnownPreTokenizer& k : known_pre_tokenizers())
    for (const std::string& name : k.names) {
      if (name == pre) return k.pre;
      if (!name.empty()) known += (known.empty() ? "" : ", ") + name;
    }
  TF_FAIL(source, ": tokenizer.ggml.pre '", shown(pre), "' is not supported (known: ", known, ")");
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
    t.model_ = make_bpe(spec);
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
