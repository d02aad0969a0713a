// The model's own template as a training format (src/data/model_template.h): the loss segments that
// rendering message prefixes derives equal the built-in ChatML renderer's for Qwen2.5's published
// template (with and without tools), the {% generation %} spans are the trained text where a
// template has them, a BOS the template writes is the BOS flag (not text), <think> blocks are kept
// or stripped, and the loss options act on the model's template as on the built-in ones.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "src/core/error.h"
#include "src/data/model_template.h"
#include "src/io/model_loader.h"
#include "tests/test_util.h"

namespace tf::data {
namespace {

#define EXPECT_CONTAINS(hay, needle) EXPECT_NE(std::string(hay).find(needle), std::string::npos) << (hay)

std::string fixture(const std::string& name) {
  std::ifstream in(std::string(TIGHTFIT_FIXTURES) + "/templates/" + name, std::ios::binary);
  EXPECT_TRUE(in) << name;
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

ChatTemplate model(const std::string& text, ThinkMode think = ThinkMode::Keep, std::string bos = "<s>") {
  return model_chat_template(text, "t.jinja", std::move(bos), "</s>", think, 1718452800);
}

Example chat(std::vector<Message> msgs) {
  Example ex;
  ex.shape = Example::Shape::Messages;
  ex.messages = std::move(msgs);
  return ex;
}

Example conversation() {
  return chat({{"system", "Be brief."},
               {"user", "Hi"},
               {"assistant", "Hello!"},
               {"user", "2+2?"},
               {"assistant", "4"}});
}

std::string trained(const std::vector<Segment>& segs) {
  std::string out;
  for (const Segment& s : segs)
    if (s.trainable) out += s.text + "|";
  return out;
}

TEST(DataModelTemplate, PrefixMasksEqualTheBuiltInChatMLOnQwen25) {
  const std::string qwen = fixture("Qwen-Qwen2.5-7B-Instruct.jinja");
  const ChatTemplate own = model(qwen), builtin = detect_template(qwen, "qwen2.5");
  Example tools = chat({{"user", "Weather in Paris?"},
                        {"assistant", ""},
                        {"tool", "{\"temp\": 21}"},
                        {"assistant", "21 degrees."}});
  tools.messages[1].tool_calls.push_back({"call1", "get_weather", "{\"city\":\"Paris\"}"});
  tools.tools = R"([{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}])";
  Example no_system = conversation();
  no_system.messages.erase(no_system.messages.begin());
  for (const Example& ex : {conversation(), no_system, tools}) {
    for (const LossOptions& loss :
         {LossOptions{}, LossOptions{.mask_history = true}, LossOptions{.all = true}}) {
      const auto a = render_example(own, ex, false, loss), b = render_example(builtin, ex, false, loss);
      EXPECT_EQ(segments_to_text(a, "<s>", "</s>"), segments_to_text(b, "<s>", "</s>"));
      EXPECT_EQ(trained(a), trained(b));
    }
  }
  EXPECT_EQ(trained(render_example(own, conversation(), false)), "Hello!<|im_end|>|4<|im_end|>|");
  // Generation continues from the assistant header the generation prompt writes.
  const std::string prompt = segments_to_text(render_response_prompt(own, conversation(), false), "", "");
  EXPECT_TRUE(prompt.ends_with("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")) << prompt;
}

TEST(DataModelTemplate, GenerationBlocksAreTheTrainedText) {
  const std::string t =
      "{{ bos_token }}{% for m in messages %}{% if m.role == 'assistant' %}<a>{% generation %}{{ m.content "
      "}}</e>"
      "{% endgeneration %}{{ '\\n' }}{% else %}<{{ m.role }}>{{ m.content }}</e>{{ '\\n' }}{% endif %}{% "
      "endfor %}";
  const auto segs = render_example(model(t), conversation(), true);
  EXPECT_EQ(trained(segs), "Hello!</e>|4</e>|");
  ASSERT_FALSE(segs.empty());
  EXPECT_TRUE(segs.front().bos) << "the template's BOS is the BOS id";
  EXPECT_EQ(segs.front().text.rfind("<s>", 0), std::string::npos) << "and not also its text";
  EXPECT_EQ(segments_to_text(segs, "<s>", ""),
            "<s><system>Be brief.</e>\n<user>Hi</e>\n<a>Hello!</e>\n<user>2+2?</e>\n<a>4</e>\n");
}

TEST(DataModelTemplate, ThinkBlocksKeptOrStripped) {
  const std::string qwen3 = fixture("Qwen-Qwen3-0.6B.jinja");
  const Example ex =
      chat({{"user", "Is 7 prime?"}, {"assistant", "<think>\nDivisors: 1 and 7.\n</think>\n\nYes."}});
  const std::string keep = trained(render_example(model(qwen3, ThinkMode::Keep), ex, false));
  const std::string strip = trained(render_example(model(qwen3, ThinkMode::Strip), ex, false));
  EXPECT_CONTAINS(keep, "Divisors: 1 and 7.");
  EXPECT_CONTAINS(keep, "Yes.<|im_end|>");
  EXPECT_EQ(strip.find("Divisors"), std::string::npos) << strip;
  EXPECT_CONTAINS(strip, "Yes.<|im_end|>");
  EXPECT_CONTAINS(test::error_of([] { think_mode_by_name("drop"); }),
                  "unknown --think mode 'drop' (known: keep, strip)");
}

TEST(DataModelTemplate, PerTurnFlagsAndRefusals) {
  Example ex = conversation();
  ex.messages[2].train = 0;
  const std::string qwen = fixture("Qwen-Qwen2.5-7B-Instruct.jinja");
  EXPECT_EQ(trained(render_example(model(qwen), ex, false)), "4<|im_end|>|");
  // A template that refuses the conversation says so, with its source and line.
  const std::string gemma = fixture("google-gemma-2-2b-it.jinja");
  EXPECT_CONTAINS(test::error_of([&] { render_example(model(gemma), conversation(), false); }),
                  "the template raised an error: System role not supported");
  EXPECT_CONTAINS(test::error_of([] { model("{% include 'x' %}"); }),
                  "t.jinja:1:1: unsupported construct: {% include %}");
}

// Where a model directory's template is read: chat_template.jinja first (transformers 5 saves it
// there), else tokenizer_config.json's chat_template as a string or as the "default" of a list.
TEST(DataModelTemplate, TemplateSourcesOfAModelDirectory) {
  namespace fs = std::filesystem;
  test::TempDir tmp;
  for (const char* f : {"config.json", "model.safetensors"})
    fs::copy_file(std::string(TIGHTFIT_FIXTURES) + "/hf_tiny_llama/" + f, tmp.dir / f);
  const auto write = [&](const char* name, const std::string& text) {
    std::ofstream(tmp.dir / name) << text;
  };
  write(
      "tokenizer_config.json",
      R"({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})");
  io::LoadedModel m = io::load_model(tmp.str());
  EXPECT_EQ(m.chat_template, "D");
  EXPECT_CONTAINS(m.chat_template_source, "tokenizer_config.json: chat_template \"default\"");
  write("tokenizer_config.json", R"({"chat_template": "S"})");
  EXPECT_EQ(io::load_model(tmp.str()).chat_template, "S");
  write("chat_template.jinja", "J");
  m = io::load_model(tmp.str());
  EXPECT_EQ(m.chat_template, "J");
  EXPECT_CONTAINS(m.chat_template_source, "chat_template.jinja");
  fs::remove(tmp.dir / "chat_template.jinja");
  write("tokenizer_config.json", R"({"chat_template": [{"name": "rag", "template": "R"}]})");
  EXPECT_CONTAINS(test::error_of([&] { io::load_model(tmp.str()); }),
                  "the chat_template list has no template named \"default\" (it has rag)");
}

}  // namespace
}  // namespace tf::data
