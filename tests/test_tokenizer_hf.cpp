// defines: the tests of tokenizer.json's normalizers, Metaspace, byte fallback and decoder chains:
// agreement with HF `tokenizers` on tools/make_tokenizer_fixtures.py's pipelines (hf_*.json and
// hf_expected.json), the refusals of what is not implemented or malformed, and the HF directory's
// choice between tokenizer.json and tokenizer.model.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "src/io/model_loader.h"
#include "tokenizer/tokenizer.h"

using namespace tf;
using namespace tf::tok;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

const std::string kDir = std::string(TIGHTFIT_FIXTURES) + "/tokenizer/";

json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}

const json& hf_expected() {
  static const json e = read_json(kDir + "hf_expected.json");
  return e;
}

std::string write_temp(const std::string& name, const std::string& content) {
  const auto path = fs::temp_directory_path() / ("tf_tokhf_" + std::to_string(::getpid()) + "_" + name);
  std::ofstream(path, std::ios::binary) << content;
  return path.string();
}

Tokenizer load_json(const std::string& name, const json& j) {
  const std::string path = write_temp(name, j.dump());
  Tokenizer t = Tokenizer::from_tokenizer_json(path);
  fs::remove(path);
  return t;
}

// Every corpus text must give HF's ids with BOS added, the same ids after the BOS without it, HF's
// ids with special tokens left as text, and HF's decode of the first ids, with and without the
// special tokens.
void expect_matches_hf(const Tokenizer& tok, const std::string& name) {
  const json& corpus = hf_expected()["corpus"];
  const json& exp = hf_expected()["tokenizers"][name];
  ASSERT_EQ(exp["add_special"].size(), corpus.size()) << name;
  for (size_t i = 0; i < corpus.size(); ++i) {
    const std::string text = corpus[i].get<std::string>();
    const auto ids = exp["add_special"][i].get<std::vector<int32_t>>();
    EXPECT_EQ(tok.encode(text), ids) << name << " text #" << i << ": '" << text << "'";
    const std::vector<int32_t> after_bos(ids.begin() + (tok.adds_bos() ? 1 : 0), ids.end());
    EXPECT_EQ(tok.encode(text, {.add_special = false}), after_bos) << name << " text #" << i;
    EXPECT_EQ(tok.encode(text, {.add_special = false, .parse_special = false}),
              exp["no_parse_special"][i].get<std::vector<int32_t>>())
        << name << " text #" << i << ": '" << text << "'";
    EXPECT_EQ(tok.decode(ids), exp["decoded"][i].get<std::string>()) << name << " text #" << i;
    EXPECT_EQ(tok.decode(ids, /*skip_special=*/true), exp["decoded_skip_special"][i].get<std::string>())
        << name << " text #" << i;
  }
}

Tokenizer load_fixture(const std::string& name) {
  return Tokenizer::from_tokenizer_json(kDir + "hf_" + name + ".json");
}

// Loading `j` as tokenizer.json must fail with a message naming the file and containing `what`.
void expect_refused(const std::string& name, const json& j, const std::string& what) {
  const std::string path = write_temp(name, j.dump());
  try {
    Tokenizer::from_tokenizer_json(path);
    ADD_FAILURE() << name << ": loaded, expected an error containing '" << what << "'";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find(what), std::string::npos) << msg;
    EXPECT_LT(msg.size(), 1000u) << "error messages quote their input cut short";
  }
  fs::remove(path);
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

json llama2() {
  return read_json(kDir + "hf_llama2_legacy.json");
}

}  // namespace

TEST(HfTokenizerJson, Qwen2NfcMatchesHfTokenizers) {
  const Tokenizer tok = load_fixture("qwen2_nfc");
  expect_matches_hf(tok, "qwen2_nfc");
  // NFC composes before the split and the merges: the decomposed spelling encodes as the composed.
  EXPECT_EQ(tok.encode("cafe\xCC\x81"), tok.encode("caf\xC3\xA9"));
  EXPECT_FALSE(tok.adds_bos());
}

TEST(HfTokenizerJson, Llama2LegacyMatchesHfTokenizers) {
  const Tokenizer tok = load_fixture("llama2_legacy");
  expect_matches_hf(tok, "llama2_legacy");
  EXPECT_TRUE(tok.adds_bos());  // TemplateProcessing "<s> $A"
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  // Characters outside the vocab are their UTF-8 bytes as <0xNN> tokens.
  EXPECT_EQ(tok.encode("\xED\x95\x9C", {.add_special = false}),
            (std::vector<int32_t>{*tok.token_to_id("\xE2\x96\x81"), *tok.token_to_id("<0xED>"),
                                  *tok.token_to_id("<0x95>"), *tok.token_to_id("<0x9C>")}));
  // A piece on its own reads as it does inside a text: its space kept.
  EXPECT_EQ(tok.token_to_piece(*tok.token_to_id("\xE2\x96\x81the")), " the");
}

TEST(HfTokenizerJson, Llama2SpecialsMatchedAfterNormalizationMatchHfTokenizers) {
  expect_matches_hf(load_fixture("llama2_normalized_specials"), "llama2_normalized_specials");
}

TEST(HfTokenizerJson, FusedUnknownsWithoutByteFallbackMatchHfTokenizers) {
  json j = llama2();
  j["model"]["byte_fallback"] = false;
  const Tokenizer tok = load_json("unk_fused.json", j);
  expect_matches_hf(tok, "llama2_unk_fused");
  EXPECT_EQ(tok.encode("\xED\x95\x9C\xEA\xB5\xAD\xEC\x96\xB4", {.add_special = false}),
            (std::vector<int32_t>{*tok.token_to_id("\xE2\x96\x81"), 0}));
}

TEST(HfTokenizerJson, MetaspaceSchemesMatchHfTokenizers) {
  for (const char* name : {"metaspace_first", "metaspace_always_split", "metaspace_never_nfd"})
    expect_matches_hf(load_fixture(name), name);
  // "first" puts the replacement in front of the input's first stretch only; "always" in front of
  // every stretch between added tokens.
  const Tokenizer first = load_fixture("metaspace_first"), always = load_fixture("metaspace_always_split");
  const auto the = [](const Tokenizer& t) { return *t.token_to_id("\xE2\x96\x81the"); };
  EXPECT_NE(first.encode("<s>the", {.add_special = false}).at(1), the(first));
  EXPECT_EQ(always.encode("<s>the", {.add_special = false}).at(1), the(always));
  EXPECT_EQ(first.encode("the", {.add_special = false}).at(0), the(first));
}

// Files written before prepend_scheme existed say add_prefix_space; true is the scheme "always".
TEST(HfTokenizerJson, MetaspaceLegacyAddPrefixSpaceMatchesHfTokenizers) {
  json j = read_json(kDir + "hf_metaspace_always_split.json");
  for (const char* part : {"pre_tokenizer", "decoder"}) {
    j[part].erase("prepend_scheme");
    j[part]["add_prefix_space"] = true;
  }
  expect_matches_hf(load_json("legacy.json", j), "metaspace_always_split");
  j["pre_tokenizer"]["add_prefix_space"] = false;
  j["pre_tokenizer"]["prepend_scheme"] = "first";
  expect_refused("contradict.json", j, "add_prefix_space = false contradicts its prepend_scheme 'first'");
}

TEST(HfTokenizerJson, CompatibilityFormsCaseAndWhiteSpaceMatchHfTokenizers) {
  const Tokenizer nfkc = load_fixture("nfkc_lower_strip");
  expect_matches_hf(nfkc, "nfkc_lower_strip");
  expect_matches_hf(load_fixture("nfkd_replace_regex"), "nfkd_replace_regex");
  // NFKC folds full-width letters and ligatures; Lowercase and Strip follow.
  EXPECT_EQ(nfkc.encode("  \xEF\xBC\xA6ine \xEF\xAC\x81ne\t"), nfkc.encode("fine fine"));
}

TEST(HfTokenizerJson, NormalizerNeedsUtf8) {
  const Tokenizer tok = load_fixture("qwen2_nfc");
  expect_error_containing([&] { tok.encode("ok \xff bad"); }, "text is not valid UTF-8 at byte 3");
}

TEST(HfTokenizerJson, RefusesUnknownAndMalformedPipelines) {
  const auto with = [](const char* key, const json& v) {
    json j = llama2();
    j[key] = v;
    return j;
  };
  expect_refused("n_type.json", with("normalizer", {{"type", "BertNormalizer"}}),
                 "normalizer type 'BertNormalizer' is not supported (known: NFC, NFD, NFKC, NFKD, Lowercase, "
                 "Strip, Prepend, Replace, Sequence)");
  expect_refused("n_notobj.json", with("normalizer", 5), "normalizer type '?' is not supported");
  expect_refused("n_prepend.json", with("normalizer", {{"type", "Prepend"}}),
                 "Prepend normalizer has no \"prepend\"");
  expect_refused("n_strip.json",
                 with("normalizer", {{"type", "Strip"}, {"strip_left", 1}, {"strip_right", true}}),
                 "Strip normalizer \"strip_left\" is not a boolean");
  expect_refused("n_seq.json", with("normalizer", {{"type", "Sequence"}, {"normalizers", "NFC"}}),
                 "Sequence normalizer's \"normalizers\" is not an array");
  expect_refused("n_pattern.json",
                 with("normalizer", {{"type", "Replace"}, {"pattern", {{"Glob", "*"}}}, {"content", ""}}),
                 "Replace normalizer pattern {\"Glob\":\"*\"} is neither {\"String\"} nor {\"Regex\"}");
  expect_refused(
      "n_regex.json",
      with("normalizer", {{"type", "Replace"}, {"pattern", {{"Regex", "(unclosed"}}}, {"content", ""}}),
      "Replace normalizer pattern /(unclosed/ does not compile");
  expect_refused(
      "n_repeat.json",
      with("normalizer", {{"type", "Replace"}, {"pattern", {{"Regex", "a{99999999999}"}}}, {"content", ""}}),
      "does not compile");
  json deep = {{"type", "NFC"}};
  for (int i = 0; i < 20; ++i) deep = {{"type", "Sequence"}, {"normalizers", {deep}}};
  expect_refused("n_deep.json", with("normalizer", deep), "normalizer Sequences nest deeper than 8 levels");

  expect_refused(
      "d_type.json", with("decoder", {{"type", "WordPiece"}}),
      "decoder type 'WordPiece' is not supported (known: ByteLevel, Metaspace, Replace, ByteFallback, "
      "Fuse, Strip, Sequence)");
  expect_refused("d_strip.json",
                 with("decoder", {{"type", "Strip"}, {"content", " "}, {"start", -1}, {"stop", 0}}),
                 "Strip decoder \"start\" = -1 is not a count");
  expect_refused("d_stripf.json",
                 with("decoder", {{"type", "Strip"}, {"content", " "}, {"start", 1e30}, {"stop", 0}}),
                 "is not a count");
  expect_refused("d_stripc.json",
                 with("decoder", {{"type", "Strip"}, {"content", "ab"}, {"start", 1}, {"stop", 0}}),
                 "Strip decoder content 'ab' is not one character");
  expect_refused("d_regex.json",
                 with("decoder", {{"type", "Replace"}, {"pattern", {{"Regex", "[z-a]"}}}, {"content", " "}}),
                 "Replace decoder pattern /[z-a]/ does not compile");
  expect_refused(
      "d_meta.json",
      with("decoder", {{"type", "Metaspace"}, {"replacement", "_"}, {"prepend_scheme", "sometimes"}}),
      "Metaspace prepend_scheme 'sometimes' is not one of always, first, never");

  expect_refused(
      "p_type.json", with("pre_tokenizer", {{"type", "Whitespace"}}),
      "pre-tokenizer type 'Whitespace' is not supported (known: ByteLevel, Split, Digits, Metaspace, "
      "Sequence)");
  expect_refused(
      "p_meta.json",
      with("pre_tokenizer",
           {{"type", "Sequence"},
            {"pretokenizers", {{{"type", "Digits"}}, {{"type", "Metaspace"}, {"replacement", "_"}}}}}),
      "pre-tokenizer steps before Metaspace are not supported");
  expect_refused("p_rep.json", with("pre_tokenizer", {{"type", "Metaspace"}, {"replacement", "__"}}),
                 "Metaspace replacement '__' is not one character");

  json j = llama2();
  j["model"]["dropout"] = 0.1;
  expect_refused("dropout.json", j, "BPE model \"dropout\" = 0.1 is not supported");
  j = llama2();
  j["model"]["continuing_subword_prefix"] = "##";
  expect_refused("prefix.json", j, "BPE model \"continuing_subword_prefix\" = \"##\" is not supported");
  j = llama2();
  j["model"]["end_of_word_suffix"] = "</w>";
  expect_refused("suffix.json", j, "BPE model \"end_of_word_suffix\" = \"</w>\" is not supported");
}

// Huge counts strip what there is; a pattern that backtracks without end stops at PCRE2's match
// limit with an error instead of hanging.
TEST(HfTokenizerJson, HostileValuesEndCleanly) {
  json j = llama2();
  j["decoder"] = {{"type", "Strip"},
                  {"content", "\xE2\x96\x81"},
                  {"start", uint64_t(1) << 62},
                  {"stop", uint64_t(1) << 62}};
  const Tokenizer strip = load_json("hugestrip.json", j);
  EXPECT_EQ(strip.decode(strip.encode("hi", {.add_special = false})), "hi");

  j = llama2();
  j["normalizer"] = {{"type", "Replace"}, {"pattern", {{"Regex", "(a|a?)+$"}}}, {"content", "b"}};
  const Tokenizer backtrack = load_json("backtrack.json", j);
  expect_error_containing([&] { backtrack.encode(std::string(40, 'a') + "!"); },
                          "Replace normalizer pattern");
}

TEST(HfTokenizerJson, DirectoryPrefersJsonAndFallsBackToSentencepiece) {
  const fs::path dir = fs::temp_directory_path() / ("tf_tokhf_" + std::to_string(::getpid()) + "_dir");
  fs::remove_all(dir);
  fs::create_directories(dir);
  fs::copy_file(kDir + "spm_bpe.model", dir / "tokenizer.model");
  fs::copy_file(kDir + "hf_llama2_legacy.json", dir / "tokenizer.json");
  testing::internal::CaptureStderr();
  const auto good = io::read_hf_tokenizer(dir.string());
  EXPECT_EQ(testing::internal::GetCapturedStderr(), "");
  EXPECT_EQ(good->source(), (dir / "tokenizer.json").string());

  json j = llama2();
  j["model"]["dropout"] = 0.1;
  std::ofstream(dir / "tokenizer.json") << j.dump();
  testing::internal::CaptureStderr();
  const auto fallback = io::read_hf_tokenizer(dir.string());
  const std::string note = testing::internal::GetCapturedStderr();
  EXPECT_TRUE(note.starts_with("note: " + (dir / "tokenizer.json").string() +
                               ": BPE model \"dropout\" = 0.1 is not supported"))
      << note;
  EXPECT_TRUE(note.ends_with("; using the tokenizer.model beside it instead\n")) << note;
  EXPECT_EQ(std::count(note.begin(), note.end(), '\n'), 1) << note;
  EXPECT_EQ(fallback->source(), (dir / "tokenizer.model").string());

  fs::remove(dir / "tokenizer.model");
  expect_error_containing([&] { io::read_hf_tokenizer(dir.string()); }, "\"dropout\" = 0.1 is not supported");
  fs::remove(dir / "tokenizer.json");
  EXPECT_EQ(io::read_hf_tokenizer(dir.string()), nullptr);
  fs::remove_all(dir);
}
