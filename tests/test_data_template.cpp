// Prompt formats: every template's rendering of one multi-turn conversation equals the string the
// model's own Jinja template produces (written out by hand from those templates), the trainable
// segments are exactly the assistant replies with their end-of-turn markers, and detection
// recognises the real template texts.
#include <gtest/gtest.h>

#include <fstream>
#include <iterator>
#include <string>

#include "src/core/error.h"
#include "src/data/chat_template.h"
#include "src/data/model_template.h"

namespace tf::data {
namespace {

Example conversation(bool with_system) {
  Example ex;
  ex.shape = Example::Shape::Messages;
  if (with_system) ex.messages.push_back({"system", "Be brief."});
  ex.messages.push_back({"user", "Hi"});
  ex.messages.push_back({"assistant", "Hello!"});
  ex.messages.push_back({"user", "2+2?"});
  ex.messages.push_back({"assistant", "4"});
  return ex;
}

std::string trainable_text(const std::vector<Segment>& segs, std::string_view eos) {
  std::string out;
  for (const Segment& s : segs) {
    if (!s.trainable) continue;
    out += s.text;
    if (s.eos) out += eos;
    out += "|";
  }
  return out;
}

std::string render(std::string_view name, const Example& ex, std::string_view bos, std::string_view eos,
                   bool adds_bos = false) {
  return segments_to_text(render_example(template_by_name(name), ex, adds_bos), bos, eos);
}

TEST(DataTemplate, ChatML) {
  const auto segs = render_example(template_by_name("chatml"), conversation(true), false);
  EXPECT_EQ(segments_to_text(segs, "", ""),
            "<|im_start|>system\nBe brief.<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello!<|im_end|>\n"
            "<|im_start|>user\n2+2?<|im_end|>\n"
            "<|im_start|>assistant\n4<|im_end|>\n");
  EXPECT_EQ(trainable_text(segs, ""), "Hello!<|im_end|>|4<|im_end|>|");
  for (const Segment& s : segs) EXPECT_FALSE(s.bos || s.eos) << "ChatML uses no BOS/EOS tokens";
}

TEST(DataTemplate, Llama3) {
  Example ex = conversation(true);
  ex.messages[2].content = "  Hello!\n";  // the template trims every message
  const auto segs = render_example(template_by_name("llama3"), ex, false);
  EXPECT_EQ(segments_to_text(segs, "<|begin_of_text|>", ""),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>");
  EXPECT_EQ(trainable_text(segs, ""), "Hello!<|eot_id|>|4<|eot_id|>|");
}

TEST(DataTemplate, Llama2) {
  const auto segs = render_example(template_by_name("llama2"), conversation(true), false);
  EXPECT_EQ(segments_to_text(segs, "<s>", "</s>"),
            "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s>"
            "<s>[INST] 2+2? [/INST] 4 </s>");
  EXPECT_EQ(trainable_text(segs, "</s>"), " Hello! </s>| 4 </s>|");
  EXPECT_EQ(render("llama2", conversation(false), "<s>", "</s>"),
            "<s>[INST] Hi [/INST] Hello! </s><s>[INST] 2+2? [/INST] 4 </s>");
}

TEST(DataTemplate, Mistral) {
  const auto segs = render_example(template_by_name("mistral"), conversation(false), false);
  EXPECT_EQ(segments_to_text(segs, "<s>", "</s>"), "<s>[INST] Hi [/INST]Hello!</s>[INST] 2+2? [/INST]4</s>");
  EXPECT_EQ(trainable_text(segs, "</s>"), "Hello!</s>|4</s>|");
  // No system role in the template: the system prompt leads the first user message.
  EXPECT_EQ(render("mistral", conversation(true), "<s>", "</s>"),
            "<s>[INST] Be brief.\n\nHi [/INST]Hello!</s>[INST] 2+2? [/INST]4</s>");
}

// Gemma's turns end with <end_of_turn> and a newline, the assistant's role is "model", the system
// prompt leads the first user turn; without a system turn the rendering is what Gemma 2's own
// template (llama.cpp's copy) renders through the Jinja engine, segment texts and loss alike.
TEST(DataTemplate, Gemma) {
  Example ex = conversation(true);
  ex.messages[2].content = " Hello!\n";  // the template trims every message
  const auto segs = render_example(template_by_name("gemma"), ex, false);
  EXPECT_EQ(segments_to_text(segs, "<bos>", "<eos>"),
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
            "<start_of_turn>model\nHello!<end_of_turn>\n"
            "<start_of_turn>user\n2+2?<end_of_turn>\n"
            "<start_of_turn>model\n4<end_of_turn>\n");
  EXPECT_EQ(trainable_text(segs, ""), "Hello!<end_of_turn>|4<end_of_turn>|");
  EXPECT_TRUE(segs.front().bos);

  std::ifstream in(std::string(TIGHTFIT_FIXTURES) + "/templates/google-gemma-2-2b-it.jinja");
  const std::string jinja{std::istreambuf_iterator<char>(in), {}};
  ASSERT_FALSE(jinja.empty());
  const ChatTemplate own = model_chat_template(jinja, "gemma-2", "<bos>", "<eos>", ThinkMode::Keep, 0);
  const auto theirs = render_example(own, conversation(false), false);
  const auto ours = render_example(template_by_name("gemma"), conversation(false), false);
  EXPECT_EQ(segments_to_text(ours, "<bos>", "<eos>"), segments_to_text(theirs, "<bos>", "<eos>"));
  EXPECT_EQ(trainable_text(ours, "<eos>"), trainable_text(theirs, "<eos>"));
  EXPECT_EQ(detect_template(jinja, "gemma-2").kind, TemplateKind::Gemma);

  Example odd = conversation(false);
  odd.messages.pop_back();
  odd.messages.push_back({"user", "again"});
  EXPECT_THROW(render_example(template_by_name("gemma"), odd, false), Error);
}

TEST(DataTemplate, Alpaca) {
  Example ex;
  ex.shape = Example::Shape::Instruction;
  ex.instruction = "Add the numbers.";
  ex.input = "2 and 3";
  ex.output = "5";
  const auto segs = render_example(template_by_name("alpaca"), ex, true);
  EXPECT_EQ(segments_to_text(segs, "<s>", "</s>"),
            "<s>Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5</s>");
  EXPECT_EQ(trainable_text(segs, "</s>"), "5</s>|");
  ex.input.clear();
  EXPECT_EQ(render("alpaca", ex, "<s>", "</s>", false),
            "Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request.\n\n### Instruction:\nAdd the numbers.\n\n### Response:\n5</s>");
}

TEST(DataTemplate, PlainAndOtherShapes) {
  Example pc;
  pc.shape = Example::Shape::PromptCompletion;
  pc.prompt = "Q: 2+2\nA:";
  pc.completion = " 4";
  auto segs = render_example(template_by_name("plain"), pc, true);
  EXPECT_EQ(segments_to_text(segs, "<s>", "</s>"), "<s>Q: 2+2\nA: 4</s>");
  EXPECT_EQ(trainable_text(segs, "</s>"), " 4</s>|");
  // Under a chat template a prompt/completion pair is one user turn and one assistant turn.
  segs = render_example(template_by_name("chatml"), pc, false);
  EXPECT_EQ(segments_to_text(segs, "", ""),
            "<|im_start|>user\nQ: 2+2\nA:<|im_end|>\n<|im_start|>assistant\n 4<|im_end|>\n");

  Example text;
  text.shape = Example::Shape::Text;
  text.text = "All of it.";
  for (const char* name : {"plain", "chatml", "llama3"}) {
    segs = render_example(template_by_name(name), text, true);
    ASSERT_EQ(segs.size(), 1u);
    EXPECT_TRUE(segs[0].trainable && segs[0].bos && segs[0].eos) << name;
    EXPECT_EQ(segs[0].text, "All of it.");
  }
}

TEST(DataTemplate, RefusesWhatTheTemplatesRefuse) {
  Example ex = conversation(false);
  ex.messages[1].role = "user";  // two user turns in a row
  for (const char* name : {"llama2", "mistral"}) {
    try {
      render_example(template_by_name(name), ex, false);
      ADD_FAILURE() << name << " accepted a non-alternating conversation";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("message 2 has role 'user' where 'assistant' belongs"),
                std::string::npos)
          << e.what();
    }
  }
  EXPECT_NO_THROW(render_example(template_by_name("chatml"), ex, false));
  EXPECT_THROW(render_example(template_by_name("plain"), conversation(false), false), Error);
  try {
    template_by_name("vicuna");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("known: plain, alpaca, chatml, llama3, llama2, mistral, gemma"),
              std::string::npos);
  }
}

// Template texts as they stand in the models' tokenizer_config.json after JSON decoding: Jinja
// string literals keep their backslash escapes ("\\n" here is the two characters \ and n).
constexpr const char* kSmolLM2 =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
constexpr const char* kQwen2 =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}";
constexpr const char* kChatMLNoDefault =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}";
constexpr const char* kLlama3 =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% "
    "endif %}";
constexpr const char* kLlama2 =
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
    "{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}"
    "{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";
constexpr const char* kMistral =
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% endif %}{% endfor %}";
// Qwen2.5's tool-aware template splices the user's system message into the same literal; only the
// fixed default prompt counts.
constexpr const char* kQwen25Tools =
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are "
    "a "
    "helpful assistant.<|im_end|>\\n' }}{%- endif %}";

TEST(DataTemplate, DetectsRealTemplates) {
  ChatTemplate t = detect_template(kSmolLM2, "smollm2");
  EXPECT_EQ(t.kind, TemplateKind::ChatML);
  EXPECT_EQ(t.default_system, "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  t = detect_template(kQwen2, "qwen2");
  EXPECT_EQ(t.kind, TemplateKind::ChatML);
  EXPECT_EQ(t.default_system, "You are a helpful assistant.");
  t = detect_template(kQwen25Tools, "qwen2.5");
  EXPECT_EQ(t.default_system, "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.");
  t = detect_template(kChatMLNoDefault, "chatml");
  EXPECT_EQ(t.kind, TemplateKind::ChatML);
  EXPECT_EQ(t.default_system, "");
  EXPECT_EQ(detect_template(kLlama3, "l3").kind, TemplateKind::Llama3);
  EXPECT_EQ(detect_template(kLlama2, "l2").kind, TemplateKind::Llama2);
  EXPECT_EQ(detect_template(kMistral, "m").kind, TemplateKind::Mistral);
  try {
    detect_template("{{ messages }}", "model.gguf");
    ADD_FAILURE() << "an unknown template was accepted";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind("model.gguf: ", 0), 0u) << msg;
    EXPECT_NE(msg.find("--template"), std::string::npos) << msg;
  }
}

TEST(DataTemplate, DefaultSystemPromptIsInsertedOnlyWhenMissing) {
  const ChatTemplate smol = detect_template(kSmolLM2, "smollm2");
  const std::string with_default = segments_to_text(render_example(smol, conversation(false), false), "", "");
  const std::string with_own = segments_to_text(render_example(smol, conversation(true), false), "", "");
  const std::string rest = "<|im_start|>user\nHi<|im_end|>\n";
  EXPECT_EQ(
      with_default.substr(0, 98 + rest.size()),
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n" +
          rest);
  EXPECT_EQ(with_own.substr(0, 39 + rest.size()), "<|im_start|>system\nBe brief.<|im_end|>\n" + rest);
}

}  // namespace
}  // namespace tf::data

namespace tf::data {
namespace {

// The response prompt is the record up to where its final response begins: for a conversation,
// exactly what add_generation_prompt=True produces in each model's Jinja template; for plain and
// Alpaca, the text training puts before the completion.
TEST(DataTemplate, ResponsePromptEndsWhereTheResponseBegins) {
  Example chat;
  chat.shape = Example::Shape::Messages;
  chat.messages = {{"user", "Hi"}, {"assistant", "Hello there"}};
  Example pc;
  pc.shape = Example::Shape::PromptCompletion;
  pc.prompt = "Hi";
  pc.completion = "Hello there";
  auto prompt = [&](std::string_view name, const Example& ex) {
    const auto segs = render_response_prompt(template_by_name(name), ex, false);
    for (const Segment& s : segs) EXPECT_FALSE(s.trainable) << name;
    const std::string text = segments_to_text(segs, "<s>", "</s>");
    EXPECT_EQ(text.find("Hello there"), std::string::npos) << name << ": " << text;
    return text;
  };
  for (const Example* ex : {&chat, &pc}) {
    EXPECT_EQ(prompt("chatml", *ex), "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    EXPECT_EQ(prompt("llama3", *ex),
              "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n");
    EXPECT_EQ(prompt("llama2", *ex), "<s>[INST] Hi [/INST]");
    EXPECT_EQ(prompt("mistral", *ex), "<s>[INST] Hi [/INST]");
  }
  const std::string full_plain =
      segments_to_text(render_example(template_by_name("plain"), pc, false), "", "");
  const std::string plain = prompt("plain", pc);
  EXPECT_EQ(full_plain.substr(0, plain.size()), plain);
  EXPECT_EQ(full_plain.substr(plain.size()).find("Hello there"), 0u) << full_plain;
  const std::string full_alpaca =
      segments_to_text(render_example(template_by_name("alpaca"), pc, false), "", "");
  const std::string alpaca = prompt("alpaca", pc);
  EXPECT_NE(alpaca.find("Hi"), std::string::npos);
  EXPECT_EQ(full_alpaca.substr(0, alpaca.size()), alpaca);
  EXPECT_EQ(full_alpaca.substr(alpaca.size()).find("Hello there"), 0u) << full_alpaca;
  const ChatTemplate smol = detect_template(
      "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
      "'<|im_start|>system\n"
      "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
      "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
      "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
      "smollm2");
  EXPECT_EQ(
      segments_to_text(render_response_prompt(smol, chat, false), "", ""),
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
}

}  // namespace
}  // namespace tf::data
