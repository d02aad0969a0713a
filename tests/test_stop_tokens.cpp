// defines: tests of the tokens that end a generation (io::LoadedModel::stop_ids): the tokenizer's
// EOS with a GGUF's eot / eom ids or an HF directory's generation_config.json eos_token_id (one id or
// a list), deduplicated, and the refusal of ids outside the vocabulary, naming the file and key
#include <gtest/gtest.h>

#include <fstream>
#include <string>
#include <vector>

#include "cli_test_util.h"
#include "gguf_test_util.h"
#include "model_test_util.h"
#include "src/core/error.h"
#include "src/io/model_loader.h"

namespace tf::test {
namespace {

class StopTokens : public Cli {};

std::string error_of(const std::string& path) {
  try {
    io::load_model(path, false);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST_F(StopTokens, GgufEndOfTurnIds) {
  const std::string path = (dir_ / "eot.gguf").string();
  const GgufBase base(tiny_config(), path, false, [](io::GgufWriter& w) {
    w.add_u32("tokenizer.ggml.eot_token_id", 7);
    w.add_u32("tokenizer.ggml.eom_token_id", 7);
  });
  EXPECT_EQ(io::load_model(path, false).stop_ids, std::vector<int32_t>{7});
  const std::string bad = (dir_ / "bad.gguf").string();
  const GgufBase outside(tiny_config(), bad, false,
                         [](io::GgufWriter& w) { w.add_u32("tokenizer.ggml.eot_token_id", 64); });
  const std::string err = error_of(bad);
  EXPECT_NE(err.find("bad.gguf: tokenizer.ggml.eot_token_id is 64, not a token id of the vocabulary of 64"),
            std::string::npos)
      << err;
}

TEST_F(StopTokens, GenerationConfigEosIdsJoinTheTokenizersEos) {
  ASSERT_EQ(run({"init", "--config", "tiny", "--out", (dir_ / "m").string()}).status, 0);
  const std::string model = (dir_ / "m").string();
  const int32_t eos = io::load_model(model).tokenizer->eos_id();
  ASSERT_GE(eos, 0);
  ASSERT_NE(eos, 256);
  ASSERT_NE(eos, 257);
  EXPECT_EQ(io::load_model(model).stop_ids, std::vector<int32_t>{eos});
  std::ofstream(dir_ / "m" / "generation_config.json") << R"({"eos_token_id": [257, )" << eos << "]}";
  std::vector<int32_t> want = {eos, 257};
  std::sort(want.begin(), want.end());
  EXPECT_EQ(io::load_model(model).stop_ids, want);
  std::ofstream(dir_ / "m" / "generation_config.json") << R"({"eos_token_id": 256})";
  want = {eos, 256};
  std::sort(want.begin(), want.end());
  EXPECT_EQ(io::load_model(model).stop_ids, want);
  for (const char* bad :
       {R"({"eos_token_id": 320})", R"({"eos_token_id": "x"})", R"({"eos_token_id": [1, -2]})"}) {
    std::ofstream(dir_ / "m" / "generation_config.json") << bad;
    const std::string err = error_of(model);
    EXPECT_NE(err.find("generation_config.json: eos_token_id holds"), std::string::npos)
        << bad << ": " << err;
  }
}

}  // namespace
}  // namespace tf::test
