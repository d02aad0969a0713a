// JSONL records and tokenisation: valid shapes load; every kind of bad line is an error naming
// file:line and the problem (or is skipped and counted); hostile lines cost bounded time; loss
// masks cover exactly the assistant / completion tokens; truncation keeps the start.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>

#include "src/core/error.h"
#include "src/data/dataset.h"
#include "tokenizer/tokenizer.h"

namespace tf::data {
namespace {

namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir() : path_(fs::temp_directory_path() / ("tf_test_data_" + std::to_string(::getpid()))) {
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string write(const std::string& name, const std::string& body) const {
    const std::string p = (path_ / name).string();
    std::ofstream(p, std::ios::binary) << body;
    return p;
  }

 private:
  fs::path path_;
};

// A byte-level BPE vocabulary: one token per byte, the chat templates' control tokens, and one merge
// ("b" + "c") to exercise a token that straddles a segment boundary.
tok::Tokenizer test_tokenizer() {
  tok::GgufVocab v;
  v.model = "gpt2";
  v.pre = "gpt2";
  for (int b = 0; b < 256; ++b) v.tokens.push_back(tok::byte_level_piece(uint8_t(b)));
  v.tokens.push_back("bc");
  v.merges = {"b c"};
  v.token_types.assign(v.tokens.size(), 1);
  for (const char* special : {"<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
                              "<|end_header_id|>", "<|eot_id|>"}) {
    v.tokens.push_back(special);
    v.token_types.push_back(3);
  }
  v.bos_id = 257;
  v.eos_id = 258;
  v.pad_id = 259;
  v.add_bos = true;
  return tok::Tokenizer::from_gguf_vocab(v, "test-vocab");
}

std::string expect_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no error";
  return {};
}

#define EXPECT_CONTAINS(hay, needle) EXPECT_NE(std::string(hay).find(needle), std::string::npos) << (hay)

TEST(DataJsonl, LoadsAllFourShapes) {
  TempDir dir;
  const std::string path = dir.write(
      "ok.jsonl",
      "\xEF\xBB\xBF{\"text\": \"plain text\"}\n"
      "\n"
      "   \r\n"
      "{\"prompt\": \"Q\", \"completion\": \"A\", \"id\": 7}\r\n"
      "{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", \"content\": \"u\"},"
      " {\"role\": \"assistant\", \"content\": \"a\"}]}\n"
      "{\"instruction\": \"do\", \"output\": \"done\"}\n"
      "{\"instruction\": \"do\", \"input\": \"this\", \"output\": \"done\"}");  // no final newline
  const Dataset ds = load_jsonl(path);
  ASSERT_EQ(ds.examples.size(), 5u);
  EXPECT_EQ(ds.examples[0].shape, Example::Shape::Text);
  EXPECT_EQ(ds.examples[0].text, "plain text");
  EXPECT_EQ(ds.examples[1].shape, Example::Shape::PromptCompletion);
  EXPECT_EQ(ds.examples[1].line, 4u);
  EXPECT_EQ(ds.examples[1].completion, "A");
  EXPECT_EQ(ds.examples[2].messages.size(), 3u);
  EXPECT_EQ(ds.examples[2].messages[2].role, "assistant");
  EXPECT_EQ(ds.examples[3].input, "");
  EXPECT_EQ(ds.examples[4].input, "this");
  EXPECT_EQ(ds.examples[4].line, 7u);
}

TEST(DataJsonl, BadLinesNameFileLineAndProblem) {
  struct Case {
    std::string line, problem;
  };
  const std::vector<Case> cases = {
      {"{\"text\": \"unterminated", "malformed JSON"},
      {"[1, 2]", "expected a JSON object, got array"},
      {"\"just a string\"", "expected a JSON object, got string"},
      {"{\"prompt\": \"Q\"}", "missing field \"completion\""},
      {"{\"text\": 5}", "field \"text\" must be a string, not number"},
      {"{\"messages\": \"hi\"}", "field \"messages\" must be an array, not string"},
      {"{\"messages\": []}", "field \"messages\" is empty"},
      {"{\"messages\": [7]}", "messages[0] must be an object, not number"},
      {"{\"messages\": [{\"role\": \"user\"}]}", "missing field \"content\" in messages[0]"},
      {"{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}", "messages[0] has role 'bot'"},
      {"{\"messages\": [{\"role\": \"user\", \"content\": null}]}",
       "\"content\" in messages[0] must be a string"},
      {"{\"instruction\": \"x\", \"input\": 3, \"output\": \"y\"}", "field \"input\" must be a string"},
      {"{\"id\": 1}", "no known fields"},
      {"{\"text\": \"a\", \"prompt\": \"b\", \"completion\": \"c\"}", "more than one record shape"},
      {"{\"text\": \"caf\xC3\"}", "invalid UTF-8 at byte 13"},
      {"{\"text\": \"\xED\xA0\x80\"}", "invalid UTF-8 at byte 10"},  // an encoded surrogate
      {"{\"text\": \"\\ud800\"}", "malformed JSON"},                 // an unpaired escaped surrogate
      {std::string(40, '[') + std::string(40, ']'), "nested deeper than 16"},
  };
  TempDir dir;
  for (const Case& c : cases) {
    const std::string path = dir.write("bad.jsonl", "{\"text\": \"fine\"}\n\n" + c.line + "\n");
    const std::string msg = expect_error([&] { load_jsonl(path); });
    EXPECT_EQ(msg.rfind(path + ":3: ", 0), 0u) << msg;
    EXPECT_CONTAINS(msg, c.problem);
  }
}

TEST(DataJsonl, SkipModeCountsBadLines) {
  TempDir dir;
  const std::string path =
      dir.write("mixed.jsonl", "{\"text\": \"one\"}\nnot json\n{\"text\": 1}\n{\"text\": \"two\"}\n");
  const Dataset ds = load_jsonl(path, {.skip_bad_lines = true});
  EXPECT_EQ(ds.examples.size(), 2u);
  EXPECT_EQ(ds.skipped_lines, 2u);
  ASSERT_EQ(ds.first_problems.size(), 2u);
  EXPECT_EQ(ds.first_problems[1].rfind(path + ":3: ", 0), 0u) << ds.first_problems[1];

  const std::string all_bad = dir.write("bad.jsonl", "nope\n{}\n");
  EXPECT_CONTAINS(expect_error([&] { load_jsonl(all_bad, {.skip_bad_lines = true}); }),
                  "no valid examples: all 2 non-blank lines were bad");
}

TEST(DataJsonl, EmptyAndMissingFiles) {
  TempDir dir;
  for (const char* body : {"", "\n\n  \n"}) {
    const std::string path = dir.write("empty.jsonl", body);
    EXPECT_CONTAINS(expect_error([&] { load_jsonl(path); }), path + ": no examples");
  }
  EXPECT_CONTAINS(expect_error([&] { load_jsonl("/nonexistent/x.jsonl"); }),
                  "/nonexistent/x.jsonl: cannot open");
}

// Each file is read and parsed once, linearly; a quadratic path (minutes at 1 MiB) would run into
// CTest's per-test timeout. Speed itself belongs in benchmarks, not here.
TEST(DataJsonl, HostileLinesAreRefusedOrReadWhole) {
  TempDir dir;
  const size_t mb = size_t(1) << 20;
  // One character repeated for 1 MiB: not JSON, a nest of brackets, and a valid record.
  const std::string junk = dir.write("a.jsonl", std::string(mb, 'a') + "\n");
  EXPECT_CONTAINS(expect_error([&] { load_jsonl(junk); }), ":1: malformed JSON");
  const std::string nest = dir.write("nest.jsonl", std::string(mb, '[') + "\n");
  EXPECT_CONTAINS(expect_error([&] { load_jsonl(nest); }), ":1: JSON nested deeper than 16");
  const std::string big = dir.write("big.jsonl", "{\"text\": \"" + std::string(mb, 'x') + "\"}\n");
  EXPECT_EQ(load_jsonl(big).examples.at(0).text.size(), mb);
  // A line past the bound is refused as it is read, even when bad lines are skipped: where it ends
  // is not known.
  const std::string longer =
      dir.write("long.jsonl", "{\"text\": \"ok\"}\n" + std::string(3 * mb, ' ') + "\n");
  for (const bool skip : {false, true})
    EXPECT_CONTAINS(expect_error([&] { load_jsonl(longer, {.skip_bad_lines = skip, .max_line_bytes = mb}); }),
                    longer + ":2: line is longer than 1048576 bytes");
}

TEST(DataJsonl, LineWithoutAnEndStopsAtTheBound) {
  // /dev/zero never ends a line: reading must stop at the bound rather than wait for a newline.
  for (const bool skip : {false, true})
    EXPECT_CONTAINS(
        expect_error([&] { load_jsonl("/dev/zero", {.skip_bad_lines = skip, .max_line_bytes = 4096}); }),
        "/dev/zero:1: line is longer than 4096 bytes");
}

TEST(DataJsonl, DirectoryIsNotReadAsAnEmptyFile) {
  TempDir dir;
  const std::string path = fs::path(dir.write("x.jsonl", "")).parent_path().string();
  EXPECT_CONTAINS(expect_error([&] { load_jsonl(path); }), path + ": is a directory, expected a JSONL file");
}

Dataset in_memory(std::string path, std::vector<Example> examples) {
  Dataset ds;
  ds.path = std::move(path);
  ds.examples = std::move(examples);
  return ds;
}

Example messages_example() {
  Example ex;
  ex.shape = Example::Shape::Messages;
  ex.messages = {
      {"system", "S"}, {"user", "Hi"}, {"assistant", "Yo"}, {"user", "Again"}, {"assistant", "Ok"}};
  return ex;
}

std::string decode_where(const tok::Tokenizer& tk, std::span<const int32_t> ids,
                         std::span<const uint8_t> mask, bool want) {
  std::vector<int32_t> picked;
  for (size_t i = 0; i < ids.size(); ++i)
    if (bool(mask[i]) == want) picked.push_back(ids[i]);
  return tk.decode(picked);
}

TEST(DataTokenize, LossMasksCoverExactlyTheResponses) {
  const tok::Tokenizer tk = test_tokenizer();
  Dataset ds = in_memory("mem.jsonl", {messages_example()});
  struct Case {
    const char* tmpl;
    std::string trained, full;
  };
  const std::vector<Case> cases = {
      {"chatml", "Yo<|im_end|>Ok<|im_end|>",
       "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>"
       "\n"
       "<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\nOk<|im_end|>\n"},
      {"llama3", "Yo<|eot_id|>Ok<|eot_id|>", ""},
      {"llama2", " Yo </s> Ok </s>", ""},
      {"mistral", "Yo</s>Ok</s>", ""},
  };
  for (const Case& c : cases) {
    const TokenizedDataset td = tokenize_dataset(ds, template_by_name(c.tmpl), tk, {.seq_len = 4096});
    ASSERT_EQ(td.size(), 1u);
    EXPECT_EQ(decode_where(tk, td.example_ids(0), td.example_trainable(0), true), c.trained) << c.tmpl;
    if (!c.full.empty()) {
      // Stretch-wise encoding gives the ids of the whole rendered text.
      const auto ids = td.example_ids(0);
      EXPECT_EQ(std::vector<int32_t>(ids.begin(), ids.end()), tk.encode(c.full, {.add_special = false}));
    }
    const TokenizedDataset all =
        tokenize_dataset(ds, template_by_name(c.tmpl), tk, {.seq_len = 4096, .train_on_all = true});
    EXPECT_EQ(all.trainable_tokens(), all.ids.size()) << c.tmpl;
  }
  // BOS and EOS are ids at the template's places.
  const TokenizedDataset l2 = tokenize_dataset(ds, template_by_name("llama2"), tk, {.seq_len = 4096});
  const auto ids = l2.example_ids(0);
  EXPECT_EQ(ids.front(), tk.bos_id());
  EXPECT_EQ(ids.back(), tk.eos_id());
  EXPECT_EQ(std::count(ids.begin(), ids.end(), tk.bos_id()), 2);
}

// Whatever seq_len truncates to, the kept tokens carry the same ids and mask as without truncation:
// the limit only decides where the example ends.
TEST(DataTokenize, MaskDoesNotDependOnSeqLen) {
  const tok::Tokenizer tk = test_tokenizer();
  Dataset ds = in_memory("mem.jsonl", {messages_example()});
  for (const char* name : {"chatml", "llama3", "llama2", "mistral"}) {
    const TokenizedDataset whole = tokenize_dataset(ds, template_by_name(name), tk, {.seq_len = 4096});
    const auto ids = whole.example_ids(0);
    const auto mask = whole.example_trainable(0);
    for (size_t len = ids.size() + 2; len >= 2; --len) {
      bool trainable_left = false;  // within the first len tokens (a token predicted by another)
      for (size_t i = 1; i < std::min(len, ids.size()); ++i) trainable_left |= mask[i] != 0;
      if (!trainable_left) continue;
      const TokenizedDataset cut = tokenize_dataset(ds, template_by_name(name), tk, {.seq_len = len});
      const size_t n = std::min(len, ids.size());
      ASSERT_EQ(cut.length(0), n) << name << " seq_len " << len;
      for (size_t i = 0; i < n; ++i) {
        ASSERT_EQ(cut.example_ids(0)[i], ids[i]) << name << " seq_len " << len << " token " << i;
        ASSERT_EQ(cut.example_trainable(0)[i], mask[i]) << name << " seq_len " << len << " token " << i;
      }
    }
  }
}

TEST(DataTokenize, PromptCompletionAndTextMasks) {
  const tok::Tokenizer tk = test_tokenizer();
  Example pc;
  pc.shape = Example::Shape::PromptCompletion;
  pc.prompt = "xyz";
  pc.completion = "pq";
  Example text;
  text.shape = Example::Shape::Text;
  text.text = "tuv";
  const Dataset ds = in_memory("mem.jsonl", {pc, text});
  const TokenizedDataset td = tokenize_dataset(ds, template_by_name("plain"), tk, {.seq_len = 64});
  ASSERT_EQ(td.size(), 2u);
  // <s> x y z | p q </s>: the completion and its EOS are trained, the prompt and BOS are not.
  EXPECT_EQ(std::vector<uint8_t>(td.example_trainable(0).begin(), td.example_trainable(0).end()),
            (std::vector<uint8_t>{0, 0, 0, 0, 1, 1, 1}));
  EXPECT_EQ(std::vector<uint8_t>(td.example_trainable(1).begin(), td.example_trainable(1).end()),
            (std::vector<uint8_t>{0, 1, 1, 1, 1}));
}

TEST(DataTokenize, StraddlingTokenBelongsToTheLaterSegment) {
  const tok::Tokenizer tk = test_tokenizer();
  Example pc;
  pc.shape = Example::Shape::PromptCompletion;
  pc.prompt = "ab";
  pc.completion = "cd";  // "b" + "c" merge across the boundary
  const TokenizedDataset td =
      tokenize_dataset(in_memory("m", {pc}), template_by_name("plain"), tk, {.seq_len = 64});
  const auto ids = td.example_ids(0);
  ASSERT_EQ(ids.size(), 5u);  // <s> a bc d </s>
  EXPECT_EQ(tk.token_to_piece(ids[2]), "bc");
  EXPECT_EQ(std::vector<uint8_t>(td.example_trainable(0).begin(), td.example_trainable(0).end()),
            (std::vector<uint8_t>{0, 0, 1, 1, 1}));
}

TEST(DataTokenize, TruncationKeepsTheStartAndCountsWhatItDrops) {
  const tok::Tokenizer tk = test_tokenizer();
  Example keep;  // <s> + 3 prompt + 4 completion + </s> = 9 tokens
  keep.shape = Example::Shape::PromptCompletion;
  keep.prompt = "xyz";
  keep.completion = "pqrs";
  Example lost = keep;  // its completion starts past seq_len
  lost.prompt = "xyzxyzxyz";
  Example fits = keep;  // 6 tokens: exactly seq_len, not truncated
  fits.completion = "p";
  const TokenizedDataset td =
      tokenize_dataset(in_memory("m", {keep, lost, fits}), template_by_name("plain"), tk, {.seq_len = 6});
  ASSERT_EQ(td.size(), 2u);
  EXPECT_EQ(td.truncated, 1u);
  EXPECT_EQ(td.dropped_too_long, 1u);
  EXPECT_EQ(td.dropped_no_target, 0u);
  EXPECT_EQ(tk.decode(td.example_ids(0)), "<s>xyzpq");
  EXPECT_EQ(td.length(1), 6u);
  EXPECT_EQ(td.trainable_tokens(), 2u + 2u);

  // A short example with nothing to train on is dropped too, but not for its length.
  Example no_reply;
  no_reply.shape = Example::Shape::Messages;
  no_reply.messages = {{"user", "u"}};
  const TokenizedDataset chat = tokenize_dataset(in_memory("m", {no_reply, messages_example()}),
                                                 template_by_name("chatml"), tk, {.seq_len = 256});
  EXPECT_EQ(chat.size(), 1u);
  EXPECT_EQ(chat.dropped_no_target, 1u);
  EXPECT_EQ(chat.dropped_too_long + chat.truncated, 0u);

  EXPECT_CONTAINS(expect_error([&] {
                    tokenize_dataset(in_memory("d.jsonl", {lost}), template_by_name("plain"), tk,
                                     {.seq_len = 6});
                  }),
                  "d.jsonl: no example is left to train on (1 longer than seq_len 6 had no trainable token "
                  "within it, 0 had none at all");
}

TEST(DataTokenize, TemplateRefusalNamesTheLine) {
  const tok::Tokenizer tk = test_tokenizer();
  Example ex = messages_example();
  ex.line = 12;
  ex.messages[2].role = "user";
  Example good = messages_example();
  const Dataset ds = in_memory("chat.jsonl", {ex, good});
  EXPECT_CONTAINS(expect_error([&] { tokenize_dataset(ds, template_by_name("llama2"), tk, {}); }),
                  "chat.jsonl:12: the llama2 template needs");
  const TokenizedDataset td = tokenize_dataset(ds, template_by_name("llama2"), tk, {.skip_bad_lines = true});
  EXPECT_EQ(td.size(), 1u);
  EXPECT_EQ(td.skipped_bad, 1u);
}

}  // namespace
}  // namespace tf::data
