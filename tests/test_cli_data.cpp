// defines: end-to-end tests of `tightfit data` through the binary on a tiny model: the rendered
// examples with their loss tokens marked, the counts of kept, truncated and dropped examples by
// reason, packing efficiency, the all-labels-masked line, and the loss options in data and finetune
#include <cmath>
#include <nlohmann/json.hpp>

#include "tests/cli_test_util.h"

namespace tf::test {
namespace {

#define EXPECT_CONTAINS(hay, needle) EXPECT_NE(std::string(hay).find(needle), std::string::npos) << (hay)

class CliData : public Cli {
 protected:
  void SetUp() override {
    Cli::SetUp();
    ASSERT_EQ(run({"init", "--config", "tiny", "--out", (dir_ / "model").string(), "--seed", "3"}).status, 0);
  }

  std::string write(const std::string& name, const std::string& body) {
    std::ofstream(dir_ / name) << body;
    return (dir_ / name).string();
  }

  std::vector<std::string> args(const std::string& data) {
    return {"data",      "--model", (dir_ / "model").string(), "--data", data, "--template", "chatml",
            "--seq-len", "48"};
  }
};

// One record of each fate at --seq-len 48 (the tiny tokenizer spends about a token a character).
const std::string kMixed =
    std::string(
        R"({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]})") +
    "\n" +
    R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "train": false}]})" +
    "\n" + "not json\n" + R"({"text": ")" + std::string(80, 'x') + "\"}\n" +
    R"({"messages": [{"role": "user", "content": ")" + std::string(80, 'y') +
    R"("}, {"role": "assistant", "content": "z"}]})" + "\n";

TEST_F(CliData, MarksTheLossTokensAndCountsEveryFate) {
  const std::string data = write("mixed.jsonl", kMixed);
  std::vector<std::string> a = args(data);
  a.insert(a.end(), {"-n", "2"});
  const Result r = run(a);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_CONTAINS(r.out, "--- line 1:");
  EXPECT_CONTAINS(r.out, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello!<|im_end|>]]\n");
  EXPECT_CONTAINS(r.out, "--- line 2:");
  EXPECT_CONTAINS(r.out, "0 in the loss; dropped: no trained token\n");
  EXPECT_EQ(r.out.find("--- line 4"), std::string::npos) << "-n 2 shows two examples";
  EXPECT_CONTAINS(r.out, "examples: 5 read, 2 kept (1 of them truncated), 3 dropped");
  EXPECT_CONTAINS(
      r.out,
      "dropped: 1 too long with no trained token within --seq-len, 1 with no trained token at all, "
      "1 bad lines");
  EXPECT_CONTAINS(r.out, "mixed.jsonl:3: malformed JSON");
  EXPECT_CONTAINS(r.out, "packing efficiency");
  EXPECT_EQ(r.out.find("all labels are -100"), std::string::npos);

  a.push_back("--json");
  const Result j = run(a);
  ASSERT_EQ(j.status, 0) << j.err;
  const nlohmann::json out = nlohmann::json::parse(j.out);
  EXPECT_EQ(out["read"], 5);
  EXPECT_EQ(out["kept"], 2);
  EXPECT_EQ(out["truncated"], 1);
  EXPECT_EQ(out["dropped"]["too_long"], 1);
  EXPECT_EQ(out["dropped"]["no_trained_token"], 1);
  EXPECT_EQ(out["dropped"]["bad_lines"], 1);
  EXPECT_EQ(out["no_trained_token"], false);
  const nlohmann::json& first = out["examples"][0];
  EXPECT_EQ(first["status"], "kept");
  EXPECT_EQ(first["marked"], "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello!<|im_end|>]]\n");
  // Kept: the conversation's trained tokens and the truncated text's 47 (all but its first).
  EXPECT_EQ(out["trained_tokens"], first["trained"].get<int>() + 47);
  EXPECT_EQ(out["tokens"], first["tokens"].get<int>() + 48);
  // Two examples: packed they share one of the four rows of a micro-batch, unpacked they take two.
  const double tokens = out["tokens"].get<double>();
  EXPECT_DOUBLE_EQ(out["packing"]["pack"].get<double>(), tokens / (4 * 48));
  EXPECT_DOUBLE_EQ(out["packing"]["no_pack"].get<double>(), tokens / (4 * 48));
}

TEST_F(CliData, PackingEfficiencyWithAndWithoutPack) {
  std::string lines;
  for (int i = 0; i < 8; ++i)
    lines += R"({"text": "abcdefghi"})"
             "\n";
  std::vector<std::string> a = args(write("short.jsonl", lines));
  a.insert(a.end(), {"--micro-batch", "1", "--json"});
  const Result r = run(a);
  ASSERT_EQ(r.status, 0) << r.err;
  const nlohmann::json out = nlohmann::json::parse(r.out);
  const double tokens = out["tokens"].get<double>();
  const double per = tokens / 8;
  ASSERT_GT(per, 1);
  // Unpacked, one example per 48-token row; packed, as many whole examples as fit in a row.
  EXPECT_DOUBLE_EQ(out["packing"]["no_pack"].get<double>(), tokens / (8 * 48));
  const double rows = std::ceil(8 / std::floor(48 / per));
  EXPECT_DOUBLE_EQ(out["packing"]["pack"].get<double>(), tokens / (rows * 48));
}

TEST_F(CliData, SaysSoWhenNoLabelIsTrained) {
  const std::string data = write(
      "masked.jsonl",
      R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]})"
      "\n");
  const Result r = run(args(data));
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_CONTAINS(r.out, "examples: 1 read, 0 kept (0 of them truncated), 1 dropped");
  EXPECT_CONTAINS(r.out, "no example has a token in the loss: all labels are -100");
}

TEST_F(CliData, LossOptionsChangeTheMarking) {
  const std::string data =
      write("two.jsonl",
            R"({"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, )"
            R"({"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]})"
            "\n");
  std::vector<std::string> a = args(data);
  a.insert(a.end(), {"--seq-len", "128", "--json"});
  const auto marked = [&](std::vector<std::string> extra) {
    std::vector<std::string> all = a;
    all.insert(all.end(), extra.begin(), extra.end());
    const Result r = run(all);
    EXPECT_EQ(r.status, 0) << r.err;
    return nlohmann::json::parse(r.out)["examples"][0]["marked"].get<std::string>();
  };
  const std::string base = marked({});
  EXPECT_CONTAINS(base, "[[a1<|im_end|>]]");
  EXPECT_CONTAINS(base, "[[a2<|im_end|>]]");
  const std::string last = marked({"--mask-history"});
  EXPECT_EQ(last.find("[[a1"), std::string::npos) << last;
  EXPECT_CONTAINS(last, "[[a2<|im_end|>]]");
  EXPECT_CONTAINS(marked({"--train-on-eos", "none"}), "[[a2]]<|im_end|>");
  EXPECT_EQ(marked({"--train-on", "all"}).rfind("<|im_start|>", 0), 0u)
      << "the first token is never predicted";

  const Result bad =
      run({"data", "--model", (dir_ / "model").string(), "--data", data, "--train-on-eos", "eos"});
  EXPECT_EQ(bad.status, 1);
  EXPECT_CONTAINS(bad.err, "--train-on-eos must be turn, last, all or none, got 'eos'");
  const Result both = run(
      {"data", "--model", (dir_ / "model").string(), "--data", data, "--train-on", "all", "--mask-history"});
  EXPECT_EQ(both.status, 1);
  EXPECT_CONTAINS(both.err,
                  "--mask-history trains only the last assistant turn and --train-on all every token");
}

TEST_F(CliData, FinetuneTakesTheLossOptions) {
  std::string lines;
  for (int i = 0; i < 4; ++i)
    lines += R"({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, )"
             R"({"role": "user", "content": "r"}, {"role": "assistant", "content": "b"}]})"
             "\n";
  write("train.jsonl", lines);
  std::vector<std::string> a = finetune_args("run", 1);
  a.insert(a.end(), {"--mask-history", "--train-on-eos", "last"});
  const Result r = run(a);
  ASSERT_EQ(r.status, 0) << r.err;
  const nlohmann::json config = nlohmann::json::parse(slurp(dir_ / "run" / "config.json"));
  EXPECT_EQ(config["mask_history"], true);
  EXPECT_EQ(config["train_on_eos"], "last");
  std::vector<std::string> b = finetune_args("bad", 1);
  b.insert(b.end(), {"--train-on-eos", "sometimes"});
  const Result bad = run(b);
  EXPECT_EQ(bad.status, 1);
  EXPECT_CONTAINS(bad.err, "--train-on-eos must be turn, last, all or none");
}

}  // namespace
}  // namespace tf::test
