// Tests, through the binary: `generate` and `eval`'s exact match never choose ids of padded
// vocabulary rows, and exact match renders each prompt as training renders the record under the
// chosen template (plain, alpaca, the model's ChatML), so that a reference completion produced
// from that prompt matches.
#include <cstring>
#include <string>
#include <vector>

#include "src/io/safetensors.h"
#include "tests/cli_test_util.h"

namespace tf::test {
namespace {

// `init --config tiny` has 320 vocabulary rows and a tokenizer of 259 ids (256 bytes, 3 specials).
constexpr int kRows = 320;
constexpr int kTokens = 259;
constexpr int kHidden = 64;

const std::vector<std::string> kPrompts = {"count the apples", "name a colour", "what is 2 + 2?"};

class CliEval : public Cli {
 protected:
  // The random tiny model with its (tied) embedding rows edited: padded rows +-100 along hidden
  // unit 0, so that half of them outscore every token whatever the hidden state; byte rows other
  // than printable ASCII zero, so that a greedy completion is plain text a JSONL reference can
  // hold. A zero row also makes a newline's own embedding vanish: the tied model would otherwise
  // mostly repeat the prompt's last token, and every prompt here but plain's ends in a newline, so
  // what follows it now comes from attention over the whole prompt.
  void make_model() {
    ASSERT_EQ(run({"init", "--config", "tiny", "--out", model().string(), "--seed", "3"}).status, 0);
    const fs::path file = model() / "model.safetensors";
    std::vector<std::vector<std::byte>> storage;
    std::vector<io::SafetensorsWriteTensor> tensors;
    {
      const io::SafetensorsFile f = io::SafetensorsFile::open(file.string());
      for (const auto& t : f.tensors()) {
        storage.emplace_back(t.bytes.begin(), t.bytes.end());
        if (t.name == "model.embed_tokens.weight") {
          ASSERT_EQ(t.shape, (std::vector<int64_t>{kRows, kHidden}));
          float* rows = reinterpret_cast<float*>(storage.back().data());
          for (int id = 0; id < kRows; ++id) {
            if (id >= 0x20 && id < 0x7f) continue;
            if (id >= 256 && id < kTokens) continue;  // the special tokens
            std::memset(rows + id * kHidden, 0, kHidden * sizeof(float));
            if (id >= kTokens) rows[id * kHidden] = id % 2 ? 100.0f : -100.0f;
          }
        }
        tensors.push_back({t.name, t.dtype, t.shape, std::span<const std::byte>(storage.back())});
      }
    }
    io::write_safetensors((dir_ / "edited.safetensors").string(), tensors, {{"format", "pt"}});
    fs::rename(dir_ / "edited.safetensors", file);
  }

  fs::path model() const { return dir_ / "model"; }

  // The greedy continuation `generate` prints for the raw text `prompt` (its trailing newline
  // removed).
  std::string continuation(const std::string& prompt) {
    const Result r = run({"generate", "--model", model().string(), "--prompt", prompt, "--max-new-tokens",
                          "6", "--threads", "1"});
    EXPECT_EQ(r.status, 0) << r.err;
    EXPECT_FALSE(r.out.empty());
    return r.out.substr(0, r.out.size() - 1);
  }

  Result eval(const fs::path& data, const std::string& tmpl) {
    return run({"eval", "--model", model().string(), "--data", data.string(), "--template", tmpl, "--seq-len",
                "256", "--max-new-tokens", "6", "--threads", "1"});
  }
};

TEST_F(CliEval, GenerateNeverChoosesPaddedRows) {
  make_model();
  for (const std::vector<std::string>& extra :
       {std::vector<std::string>{}, {"--temperature", "1", "--seed", "4"}, {"--chat"}}) {
    std::vector<std::string> args = {"generate",         "--model", model().string(), "--prompt", "hello",
                                     "--max-new-tokens", "8",       "--threads",      "1"};
    args.insert(args.end(), extra.begin(), extra.end());
    const Result r = run(args);
    EXPECT_EQ(r.status, 0) << extra.size() << " extra arguments: " << r.err;
    EXPECT_EQ(r.err, "");
  }
}

// For each template the reference completions are what `generate` continues the prompt text with
// when it is written out by hand in that template's format; exact match finds all of them only if
// it renders the same text (and, with padded rows that outscore every token, only if it never
// picks them).
TEST_F(CliEval, ExactMatchRendersPromptsAsTrainingDoes) {
  make_model();
  const std::string alpaca_head =
      "Below is an instruction that describes a task. Write a response that appropriately completes the "
      "request.\n\n### Instruction:\n";
  struct Case {
    std::string tmpl;
    std::string (*text)(const std::string& head, const std::string& prompt);
  };
  const Case cases[] = {
      {"plain", [](const std::string&, const std::string& p) { return p; }},
      {"alpaca",
       [](const std::string& head, const std::string& p) { return head + p + "\n\n### Response:\n"; }},
      {"auto",
       [](const std::string&, const std::string& p) {
         return "<|im_start|>user\n" + p + "<|im_end|>\n<|im_start|>assistant\n";
       }},
  };
  for (const Case& c : cases) {
    const fs::path data = dir_ / (c.tmpl + ".jsonl");
    std::ofstream out(data);
    std::vector<std::string> references;
    for (const std::string& p : kPrompts) {
      references.push_back(continuation(c.text(alpaca_head, p)));
      out << nlohmann::json{{"prompt", p}, {"completion", references.back()}}.dump() << "\n";
    }
    // An instruction record is an Alpaca prompt under plain too; a chat template makes its
    // instruction the user turn.
    const std::string output =
        c.tmpl == "plain" ? continuation(alpaca_head + kPrompts[0] + "\n\n### Response:\n") : references[0];
    out << nlohmann::json{{"instruction", kPrompts[0]}, {"input", ""}, {"output", output}}.dump() << "\n";
    out.close();
    const Result r = eval(data, c.tmpl);
    EXPECT_EQ(r.status, 0) << c.tmpl << ": " << r.err;
    EXPECT_NE(r.out.find("exact match 100.0% (4 of 4 greedy completions)"), std::string::npos)
        << c.tmpl << ": " << r.out << r.err;
  }
}

}  // namespace
}  // namespace tf::test
