#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "tokenizer/tokenizer.h"

using namespace tf;
using namespace tf::tok;
using nlohmann::json;

namespace {

const std::string kDir = std::string(TIGHTFIT_FIXTURES) + "/tokenizer/";

json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}

const json& corpus() {
  static const json c = read_json(kDir + "corpus.json");
  return c;
}
const json& expected() {
  static const json e = read_json(kDir + "expected.json");
  return e;
}

// Every corpus text, in the three modes the fixture script records, must give the reference ids;
// and decoding (keeping special tokens) must give the text back.
void expect_matches_reference(const Tokenizer& tok, const std::string& name) {
  const json& exp = expected()[name];
  ASSERT_EQ(exp["add_special"].size(), corpus().size());
  for (size_t i = 0; i < corpus().size(); ++i) {
    const std::string text = corpus()[i].get<std::string>();
    const auto ids = exp["add_special"][i].get<std::vector<int32_t>>();
    EXPECT_EQ(tok.encode(text), ids) << name << " text #" << i << ": '" << text << "'";
    const auto plain = tok.encode(text, {.add_special = false});
    EXPECT_EQ(plain, exp["no_special"][i].get<std::vector<int32_t>>()) << name << " text #" << i;
    const auto raw = tok.encode(text, {.add_special = false, .parse_special = false});
    EXPECT_EQ(raw, exp["no_parse_special"][i].get<std::vector<int32_t>>()) << name << " text #" << i;
    EXPECT_EQ(tok.decode(plain), text) << name << " text #" << i;
  }
}

GgufVocab spm_gguf_vocab() {
  const json j = read_json(kDir + "spm_vocab.json");
  GgufVocab v;
  v.model = "llama";
  v.tokens = j["tokens"].get<std::vector<std::string>>();
  v.scores = j["scores"].get<std::vector<float>>();
  v.token_types = j["token_types"].get<std::vector<int32_t>>();
  v.bos_id = j["bos_id"];
  v.eos_id = j["eos_id"];
  v.unk_id = j["unk_id"];
  return v;
}

// What convert_hf_to_gguf.py stores for a byte-level BPE tokenizer.json: tokens by id, merges as
// "a b" strings, special added tokens as Control and the others as UserDefined.
GgufVocab gpt2_gguf_vocab(const std::string& tokenizer_json, const std::string& pre) {
  const json j = read_json(tokenizer_json);
  GgufVocab v;
  v.model = "gpt2";
  v.pre = pre;
  size_t n = j["model"]["vocab"].size();
  for (const auto& a : j["added_tokens"]) n = std::max(n, a["id"].get<size_t>() + 1);
  v.tokens.resize(n);
  v.token_types.assign(n, int32_t(TokenType::Normal));
  for (const auto& [piece, id] : j["model"]["vocab"].items()) v.tokens[id.get<size_t>()] = piece;
  for (const auto& a : j["added_tokens"]) {
    v.tokens[a["id"].get<size_t>()] = a["content"];
    v.token_types[a["id"].get<size_t>()] =
        int32_t(a["special"].get<bool>() ? TokenType::Control : TokenType::UserDefined);
  }
  for (const auto& m : j["model"]["merges"])
    v.merges.push_back(m.is_string() ? m.get<std::string>()
                                     : m[0].get<std::string>() + " " + m[1].get<std::string>());
  return v;
}

std::string write_temp(const std::string& name, const std::string& content) {
  const auto path =
      std::filesystem::temp_directory_path() / ("tf_tok_" + std::to_string(::getpid()) + "_" + name);
  std::ofstream(path, std::ios::binary) << content;
  return path.string();
}

// Loading `content` as tokenizer.json must fail with a message naming the file and containing `what`.
void expect_json_refused(const std::string& name, const std::string& content, const std::string& what) {
  const std::string path = write_temp(name, content);
  try {
    Tokenizer::from_tokenizer_json(path);
    ADD_FAILURE() << name << ": loaded, expected an error containing '" << what << "'";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find(what), std::string::npos) << msg;
    EXPECT_LT(msg.size(), 1000u) << "error messages quote pieces cut short";
  }
  std::filesystem::remove(path);
}

json base_json() {
  return read_json(kDir + "bpe_llama3.json");
}

template <typename F>
void expect_error_containing(F&& f, const std::string& what) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing '" << what << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(TokenizerJson, Llama3StyleMatchesHfTokenizers) {
  const Tokenizer tok = Tokenizer::from_tokenizer_json(kDir + "bpe_llama3.json");
  expect_matches_reference(tok, "bpe_llama3");
  EXPECT_EQ(tok.bos_id(), 0);  // from the TemplateProcessing prefix
  EXPECT_EQ(tok.eos_id(), 1);  // <|end_of_text|> by name
  EXPECT_TRUE(tok.adds_bos());
  EXPECT_FALSE(tok.adds_eos());
  EXPECT_EQ(tok.vocab_size(), 606u);
  EXPECT_EQ(tok.token_to_piece(0), "<|begin_of_text|>");
  EXPECT_EQ(tok.token_to_id("<|im_end|>"), 603);
  EXPECT_EQ(tok.token_to_id("Ġt").has_value(), true);
  EXPECT_EQ(tok.token_to_piece(*tok.token_to_id("Ġt")), " t");
  const std::vector<int32_t> ids = tok.encode("<|im_start|>hi<|im_end|>");
  EXPECT_EQ(tok.decode(ids, /*skip_special=*/true), "hi");
}

TEST(TokenizerJson, SmolLmStyleWithLegacyMergesMatchesHfTokenizers) {
  const Tokenizer tok = Tokenizer::from_tokenizer_json(kDir + "bpe_smollm.json");
  expect_matches_reference(tok, "bpe_smollm");
  EXPECT_FALSE(tok.adds_bos());  // no post-processor: nothing is added
  EXPECT_EQ(tok.eos_id(), 0);    // <|endoftext|>
}

TEST(SentencePiece, MatchesSentencepieceLibrary) {
  const Tokenizer tok = Tokenizer::from_sentencepiece(kDir + "spm_bpe.model");
  expect_matches_reference(tok, "spm");
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_EQ(tok.token_to_piece(*tok.token_to_id("<0x0A>")), "\n");
}

TEST(GgufVocab, LlamaScoresMatchSentencepiece) {
  const Tokenizer tok = Tokenizer::from_gguf_vocab(spm_gguf_vocab(), "spm_vocab.json");
  expect_matches_reference(tok, "spm");
  EXPECT_TRUE(tok.adds_bos());
  EXPECT_EQ(tok.token_to_piece(*tok.token_to_id("<0x0A>")), "\n");
}

TEST(GgufVocab, Gpt2SmolLmMatchesHfTokenizers) {
  const Tokenizer tok =
      Tokenizer::from_gguf_vocab(gpt2_gguf_vocab(kDir + "bpe_smollm.json", "smollm"), "smollm");
  expect_matches_reference(tok, "bpe_smollm");
}

TEST(GgufVocab, Gpt2Llama3PreMatchesHfTokenizers) {
  GgufVocab v = gpt2_gguf_vocab(kDir + "bpe_llama3.json", "llama-bpe");
  v.bos_id = 0;
  const Tokenizer tok = Tokenizer::from_gguf_vocab(v, "llama3");
  // llama.cpp adds BOS for llama-bpe by default, as the template does.
  expect_matches_reference(tok, "bpe_llama3");
}

TEST(GgufVocab, RefusesBadVocabularies) {
  const auto with = [](auto edit) {
    GgufVocab v = spm_gguf_vocab();
    edit(v);
    return v;
  };
  expect_error_containing(
      [&] { Tokenizer::from_gguf_vocab(with([](GgufVocab& v) { v.model = "rwkv"; }), "f.gguf"); },
      "tokenizer.ggml.model 'rwkv' is not supported");
  expect_error_containing(
      [&] { Tokenizer::from_gguf_vocab(with([](GgufVocab& v) { v.scores.pop_back(); }), "f.gguf"); },
      "scores");
  expect_error_containing(
      [&] { Tokenizer::from_gguf_vocab(with([](GgufVocab& v) { v.token_types[5] = 9; }), "f.gguf"); },
      "unknown token type 9");
  expect_error_containing(
      [&] { Tokenizer::from_gguf_vocab(with([](GgufVocab& v) { v.tokens[7] = v.tokens[8]; }), "f.gguf"); },
      "appears twice");
  expect_error_containing(
      [&] {
        Tokenizer::from_gguf_vocab(
            with([](GgufVocab& v) { v.tokens[300] = std::string(100 * 1024 + 1, 'a'); }), "f.gguf");
      },
      "bytes are refused");
  expect_error_containing(
      [&] { Tokenizer::from_gguf_vocab(with([](GgufVocab& v) { v.bos_id = 100000; }), "f.gguf"); },
      "token id 100000 is not in the vocabulary");
  // The first byte piece (<0x00>) comes right after the three control/unknown pieces.
  expect_error_containing(
      [&] { Tokenizer::from_gguf_vocab(with([](GgufVocab& v) { v.tokens[3] = "<0xZZ>"; }), "f.gguf"); },
      "not <0xNN>");
  expect_error_containing(
      [&] { Tokenizer::from_gguf_vocab(with([](GgufVocab& v) { v.scores[9] = NAN; }), "f.gguf"); },
      "non-finite score");

  GgufVocab g = gpt2_gguf_vocab(kDir + "bpe_smollm.json", "smollm");
  g.pre = "mystery";
  expect_error_containing([&] { Tokenizer::from_gguf_vocab(g, "f.gguf"); }, "tokenizer.ggml.pre 'mystery'");
  g.pre = "smollm";
  g.merges[4] = "Ġ nosuchtoken";
  expect_error_containing([&] { Tokenizer::from_gguf_vocab(g, "f.gguf"); },
                          "'nosuchtoken', which is not in the vocab");
  g.merges[4] = "nospace";
  expect_error_containing([&] { Tokenizer::from_gguf_vocab(g, "f.gguf"); }, "not two tokens");
}

TEST(TokenizerJson, RefusesBadFiles) {
  const std::string good = base_json().dump();
  expect_json_refused("truncated.json", good.substr(0, good.size() / 2), "malformed JSON");
  expect_json_refused("array.json", "[1,2,3]", "not a JSON object");
  {
    json j = base_json();
    j.erase("model");
    expect_json_refused("nomodel.json", j.dump(), "has no \"model\"");
  }
  {
    json j = base_json();
    j["model"]["type"] = "WordPiece";
    expect_json_refused("wordpiece.json", j.dump(), "model type 'WordPiece' is not supported");
  }
  {
    json j = base_json();
    j["model"]["merges"][3] = {"Ġ", "nosuchpiece"};
    expect_json_refused("badmerge.json", j.dump(), "'nosuchpiece', which is not in the vocab");
  }
  {
    json j = base_json();
    j["model"]["merges"][3] = "a b c";
    expect_json_refused("badmerge3.json", j.dump(), "not two tokens separated by one space");
  }
  {
    json j = base_json();
    j["model"]["vocab"][std::string(100 * 1024 + 1, 'x')] = 5000;
    expect_json_refused("hugepiece.json", j.dump(), "bytes are refused");
  }
  {
    json j = base_json();
    j["model"]["vocab"]["zzz"] = 2000000000;
    expect_json_refused("idrange.json", j.dump(), "vocab id 2000000000 of 'zzz' is out of range");
  }
  {
    json j = base_json();
    j["model"]["vocab"]["zzz"] = -1;
    expect_json_refused("idneg.json", j.dump(), "vocab id -1 of 'zzz' is out of range");
  }
  {
    json j = base_json();
    j["model"]["vocab"]["zzz"] = 17;
    expect_json_refused("iddup.json", j.dump(), "vocab id 17 is given to two pieces");
  }
  {
    json j = base_json();
    j["added_tokens"][3]["id"] = 50;
    expect_json_refused("addedclash.json", j.dump(), "which the vocab gives to");
  }
  {
    json j = base_json();
    j["normalizer"] = {{"type", "BertNormalizer"}};
    expect_json_refused("bert.json", j.dump(), "normalizer type 'BertNormalizer' is not supported");
  }
  {
    json j = base_json();
    j["pre_tokenizer"] = {{"type", "Metaspace"}};
    expect_json_refused("metaspace.json", j.dump(), "Metaspace pre-tokenizer has no \"replacement\"");
  }
  {
    json j = base_json();
    j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
    expect_json_refused("badregex.json", j.dump(), "does not compile");
  }
  {
    json j = base_json();
    j["added_tokens"][2]["content"] = "<" + std::string(1024, 'x') + ">";
    expect_json_refused("longadded.json", j.dump(), "added tokens over 1024 bytes are refused");
  }
  {
    json j = base_json();
    j["added_tokens"][2]["lstrip"] = true;
    expect_json_refused("lstrip.json", j.dump(), "lstrip = true is not supported");
  }
  expect_error_containing([] { Tokenizer::from_tokenizer_json(kDir + "does_not_exist.json"); },
                          "does_not_exist.json");
}

TEST(SentencePiece, GarbageFileNamesTheFile) {
  const std::string path =
      write_temp("garbage.model", std::string("\x0a\xff\xff\xff\xff\x0f this is not a model", 27));
  expect_error_containing([&] { Tokenizer::from_sentencepiece(path); },
                          path + ": not a loadable sentencepiece model");
  std::filesystem::remove(path);
  expect_error_containing([] { Tokenizer::from_sentencepiece(kDir + "missing.model"); }, "missing.model");
}

// Byte-level BPE works on bytes, so text that is not UTF-8 still encodes, and decodes to the same
// bytes. Sentencepiece-style vocabularies only encode UTF-8 and say where the text is broken.
TEST(Tokenizer, InvalidUtf8) {
  const std::string bad = std::string("ok \xff\xfe bytes \xc3(") + " \xe2\x82 end\xf0\x9f";
  const Tokenizer bpe = Tokenizer::from_tokenizer_json(kDir + "bpe_llama3.json");
  const auto ids = bpe.encode(bad, {.add_special = false});
  EXPECT_FALSE(ids.empty());
  EXPECT_EQ(bpe.decode(ids), bad);

  const Tokenizer sp = Tokenizer::from_sentencepiece(kDir + "spm_bpe.model");
  expect_error_containing([&] { sp.encode(bad); }, "not valid UTF-8 at byte 3");
  const Tokenizer llama = Tokenizer::from_gguf_vocab(spm_gguf_vocab(), "vocab.gguf");
  expect_error_containing([&] { llama.encode(bad); }, "vocab.gguf: text is not valid UTF-8 at byte 3");
}

TEST(Tokenizer, DecodeRefusesUnknownIds) {
  const Tokenizer tok = Tokenizer::from_tokenizer_json(kDir + "bpe_llama3.json");
  expect_error_containing(
      [&] {
        tok.decode(std::vector<int32_t>{5, 606});
      },
      "token id 606 is not in the vocabulary");
  expect_error_containing([&] { tok.decode(std::vector<int32_t>{-1}); }, "token id -1");
  expect_error_containing([&] { tok.token_to_piece(1 << 30); }, "is not in the vocabulary");
}

// A megabyte-long line of one character (or one repeated word) is one pre-token for most split
// patterns. A quadratic merge loop would need ~10^12 steps there and run into CTest's per-test
// timeout (tests/CMakeLists.txt); the heap-based loop needs ~2 * 10^7. Speed itself is not asserted
// here: the machine is shared, and timings belong in benchmarks.
TEST(Tokenizer, MegabyteLinesEncodeAndRoundTrip) {
  const Tokenizer smollm = Tokenizer::from_tokenizer_json(kDir + "bpe_smollm.json");
  const Tokenizer llama3 = Tokenizer::from_tokenizer_json(kDir + "bpe_llama3.json");
  const Tokenizer sp = Tokenizer::from_sentencepiece(kDir + "spm_bpe.model");
  const Tokenizer llama = Tokenizer::from_gguf_vocab(spm_gguf_vocab(), "vocab.gguf");
  const size_t n = 1 << 20;
  std::string words;
  while (words.size() < n) words += "the";  // the small vocabularies merge it to about 2 ids per 3 bytes
  const auto check = [](const Tokenizer& tok, const std::string& line, size_t max_ids) {
    const auto ids = tok.encode(line, {.add_special = false});
    EXPECT_LE(ids.size(), max_ids) << tok.source() << ": merges should shorten '" << line.substr(0, 3)
                                   << "...'";
    EXPECT_EQ(tok.decode(ids), line) << tok.source();
  };
  for (const Tokenizer* tok : {&smollm, &llama3, &llama}) {
    check(*tok, words, words.size() * 3 / 4);
    check(*tok, std::string(n, ' '), n + 1);
    check(*tok, std::string(n, '<'), n + 1);  // every position starts a possible added token
  }
  check(sp, words, words.size() * 3 / 4);
}

TEST(Tokenizer, ByteLevelPiecesAreGpt2sMapping) {
  EXPECT_EQ(byte_level_piece(' '), "\xC4\xA0");   // U+0120 'Ġ'
  EXPECT_EQ(byte_level_piece('\n'), "\xC4\x8A");  // U+010A 'Ċ'
  EXPECT_EQ(byte_level_piece('a'), "a");
  EXPECT_EQ(byte_level_piece(0xAD), "\xC5\x83");  // the soft hyphen is the last remapped byte: U+0143
  const Tokenizer tok = Tokenizer::from_tokenizer_json(kDir + "bpe_llama3.json");
  for (int b = 0; b < 256; ++b) {
    const auto id = tok.token_to_id(byte_level_piece(uint8_t(b)));
    ASSERT_TRUE(id.has_value()) << "byte " << b;
    EXPECT_EQ(tok.token_to_piece(*id), std::string(1, char(b)));
  }
}

// Cut short anywhere, a tokenizer file either still parses into a valid tokenizer (a protobuf cut
// at a field boundary is a smaller valid message) or fails with an error naming the file; it never
// crashes. 97 offsets spread over each file, plus the first few bytes.
TEST(Tokenizer, TruncatedFilesFailCleanly) {
  for (const char* name : {"bpe_llama3.json", "spm_bpe.model"}) {
    std::ifstream in(kDir + name, std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    ASSERT_GT(bytes.size(), 1000u);
    const bool is_json = std::string(name).ends_with(".json");
    int refused = 0;
    std::vector<size_t> cuts = {0, 1, 2, 3};
    for (size_t k = 1; k <= 97; ++k) cuts.push_back(bytes.size() * k / 98);
    for (const size_t cut : cuts) {
      const std::string path = write_temp(std::string("cut_") + name, bytes.substr(0, cut));
      try {
        const Tokenizer tok =
            is_json ? Tokenizer::from_tokenizer_json(path) : Tokenizer::from_sentencepiece(path);
        tok.encode("Hello world, café 123!");
      } catch (const Error& e) {
        ++refused;
        EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
      }
      std::filesystem::remove(path);
    }
    // JSON cut anywhere is malformed; most cuts of the protobuf lose required pieces.
    if (is_json)
      EXPECT_EQ(refused, int(cuts.size()));
    else
      EXPECT_GT(refused, int(cuts.size()) / 2);
  }
}
