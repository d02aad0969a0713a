// defines: tests of the dataset shapes beyond the basic four (ShareGPT conversations, OpenAI tool
// calls and text parts, per-turn train/weight flags, alpaca system/history), of how the loss
// options (--mask-history, --train-on-eos, --train-on) and the per-turn flags decide what is
// trained, of the built-in templates' tool calls and their refusals, and of bad input for every
// new field
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>

#include "src/core/error.h"
#include "src/data/dataset.h"
#include "tokenizer/tokenizer.h"

namespace tf::data {
namespace {

namespace fs = std::filesystem;

#define EXPECT_CONTAINS(hay, needle) EXPECT_NE(std::string(hay).find(needle), std::string::npos) << (hay)

std::string expect_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no error";
  return {};
}

// The rendered text with BOS / EOS written <s> / </s>, and the trained text alone: the trainable
// segments in order, each followed by </s> where its EOS id closes it.
std::string full_text(const std::vector<Segment>& segs) {
  return segments_to_text(segs, "<s>", "</s>");
}
std::string trained_text(const std::vector<Segment>& segs) {
  std::string out;
  for (const Segment& s : segs)
    if (s.trainable) out += s.text + (s.eos ? "</s>" : "");
  return out;
}

std::vector<Segment> render(const std::string& tmpl, const std::string& line, const LossOptions& loss = {}) {
  return render_example(template_by_name(tmpl), parse_record(line), false, loss);
}

const char* kShareGpt =
    R"({"system": "Be brief.", "tools": "[{\"name\": \"add\", \"parameters\": {\"type\": \"object\"}}]",)"
    R"( "conversations": [{"from": "human", "value": "2+3?"},)"
    R"( {"from": "function_call", "value": "{\"name\": \"add\", \"arguments\": {\"b\": 3, \"a\": 2}}"},)"
    R"( {"from": "observation", "value": "5"}, {"from": "gpt", "value": "5."}]})";

TEST(DataShapes, ShareGptParsesToRolesCallsAndTools) {
  const Example ex = parse_record(kShareGpt);
  ASSERT_EQ(ex.shape, Example::Shape::Messages);
  ASSERT_EQ(ex.messages.size(), 5u);
  const std::vector<std::string> roles = {"system", "user", "assistant", "tool", "assistant"};
  for (size_t i = 0; i < roles.size(); ++i) EXPECT_EQ(ex.messages[i].role, roles[i]) << i;
  EXPECT_EQ(ex.messages[0].content, "Be brief.");
  ASSERT_EQ(ex.messages[2].tool_calls.size(), 1u);
  EXPECT_EQ(ex.messages[2].tool_calls[0].name, "add");
  // Compact, in the record's key order (the template prints them so).
  EXPECT_EQ(ex.messages[2].tool_calls[0].arguments, R"({"b":3,"a":2})");
  EXPECT_EQ(ex.messages[3].content, "5");
  EXPECT_EQ(ex.tools, R"([{"name":"add","parameters":{"type":"object"}}])");
  // "user" / "assistant" spellings and a list of calls.
  const Example alt =
      parse_record(R"({"conversations": [{"from": "user", "value": "a"}, {"from": "function_call", "value": )"
                   R"("[{\"name\": \"f\", \"arguments\": \"{}\"}, {\"name\": \"g\", \"arguments\": {}}]"},)"
                   R"( {"from": "tool", "value": "r"}, {"from": "assistant", "value": "b"}]})");
  EXPECT_EQ(alt.messages[0].role, "user");
  ASSERT_EQ(alt.messages[1].tool_calls.size(), 2u);
  EXPECT_EQ(alt.messages[1].tool_calls[0].arguments, "{}");
  EXPECT_EQ(alt.messages[2].role, "tool");
  EXPECT_EQ(alt.messages[3].role, "assistant");
}

// The expected strings are what Python's jinja2 renders from Qwen2.5-7B-Instruct's template
// (llama.cpp's models/templates copy) with transformers' tojson; arguments there are objects.
TEST(DataShapes, ChatMlWritesToolsAsQwen25) {
  const std::string line =
      R"({"tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",)"
      R"( "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],)"
      R"( "messages": [{"role": "system", "content": "You help."}, {"role": "user", "content": "Weather in Paris?"},)"
      R"( {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function":)"
      R"( {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 2}"}}]},)"
      R"( {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "{\"temp\": 18}"},)"
      R"( {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "18 and sunny."}]})";
  const std::vector<Segment> segs = render("chatml", line);
  EXPECT_EQ(
      full_text(segs),
      "<|im_start|>system\nYou help.\n\n# Tools\n\nYou may call one or more functions to assist with the "
      "user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
      "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Weather in a "
      "city\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, "
      "\"required\": [\"city\"]}}}\n</tools>\n\nFor each function call, return a json object with function "
      "name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": "
      "<function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\n"
      "Weather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", "
      "\"arguments\": {\"city\": \"Paris\", \"days\": 2}}\n</tool_call><|im_end|>\n<|im_start|>user\n"
      "<tool_response>\n{\"temp\": 18}\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"
      "<|im_end|>\n<|im_start|>assistant\n18 and sunny.<|im_end|>\n");
  // The call is trained from after the assistant header, as an answer is; tool results are not.
  EXPECT_EQ(trained_text(segs),
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 2}}\n"
            "</tool_call><|im_end|>18 and sunny.<|im_end|>");
  // Content beside calls, and two calls in one turn.
  EXPECT_EQ(
      full_text(render(
          "chatml", R"({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content":)"
                    R"( "Let me look.", "tool_calls": [{"function": {"name": "a", "arguments": {"x": 1}}},)"
                    R"( {"id": "2", "type": "function", "function": {"name": "b", "arguments": {}}}]}]})")),
      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nLet me look.\n<tool_call>\n{\"name\": \"a\", "
      "\"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n"
      "</tool_call><|im_end|>\n");
}

TEST(DataShapes, ShareGptRoundTripsThroughChatMlAndLlama3) {
  // ChatML without a system prompt: the tools block opens the system turn (as Qwen3 writes it).
  const std::vector<Segment> chatml = render("chatml", kShareGpt);
  EXPECT_EQ(full_text(chatml).substr(0, 40), "<|im_start|>system\nBe brief.\n\n# Tools\n\nY");
  EXPECT_EQ(trained_text(chatml),
            "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"b\": 3, \"a\": 2}}\n</tool_call><|im_end|>5."
            "<|im_end|>");
  // Llama 3 has no place for the tools list; the same conversation without it renders as Llama 3.1's
  // template writes calls and results (checked against jinja2 with that template).
  EXPECT_CONTAINS(expect_error([] { render("llama3", kShareGpt); }), "--template auto");
  const std::string no_tools =
      R"({"conversations": [{"from": "human", "value": "2+3?"},)"
      R"( {"from": "function_call", "value": "{\"name\": \"add\", \"arguments\": {\"b\": 3, \"a\": 2}}"},)"
      R"( {"from": "observation", "value": "{\"sum\": 5}"}, {"from": "gpt", "value": " 5. "}]})";
  const std::vector<Segment> l3 = render("llama3", no_tools);
  EXPECT_EQ(full_text(l3),
            "<s><|start_header_id|>user<|end_header_id|>\n\n2+3?<|eot_id|><|start_header_id|>assistant"
            "<|end_header_id|>\n\n{\"name\": \"add\", \"parameters\": {\"b\": 3, \"a\": 2}}<|eot_id|>"
            "<|start_header_id|>ipython<|end_header_id|>\n\n\"{\\\"sum\\\": 5}\"<|eot_id|><|start_header_id|>"
            "assistant<|end_header_id|>\n\n5.<|eot_id|>");
  EXPECT_EQ(trained_text(l3),
            "{\"name\": \"add\", \"parameters\": {\"b\": 3, \"a\": 2}}<|eot_id|>5.<|eot_id|>");
}

TEST(DataShapes, OpenAiTextPartsAndNullContent) {
  const Example ex = parse_record(
      R"({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text",)"
      R"( "text": "world"}]}, {"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f",)"
      R"( "arguments": {"deep": {"list": [1, 2.5, "x"]}}}}]}, {"role": "tool", "content": "ok"}]})");
  EXPECT_EQ(ex.messages[0].content, "Hello, world");
  EXPECT_EQ(ex.messages[1].content, "");
  EXPECT_EQ(ex.messages[1].tool_calls[0].arguments, R"({"deep":{"list":[1,2.5,"x"]}})");
  EXPECT_TRUE(ex.tools.empty());
  // An explicitly empty tools list is no tools list.
  EXPECT_TRUE(parse_record(R"({"tools": [], "messages": [{"role": "user", "content": "a"}]})").tools.empty());
}

TEST(DataShapes, AlpacaSystemAndHistoryBecomeEarlierTurns) {
  const std::string line =
      R"({"system": "S", "history": [["q1", "a1"], ["q2", "a2"]], "instruction": "q3", "input": "in",)"
      R"( "output": "a3"})";
  const Example ex = parse_record(line);
  EXPECT_EQ(ex.shape, Example::Shape::Instruction);
  ASSERT_EQ(ex.messages.size(), 5u);
  EXPECT_EQ(ex.messages[0].role, "system");
  EXPECT_EQ(ex.messages[3].content, "q2");
  EXPECT_EQ(ex.messages[4].role, "assistant");
  const std::vector<Segment> segs = render("chatml", line);
  EXPECT_EQ(
      full_text(segs),
      "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>"
      "\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\na2<|im_end|>\n<|im_start|>user\nq3\n\nin"
      "<|im_end|>\n<|im_start|>assistant\na3<|im_end|>\n");
  EXPECT_EQ(trained_text(segs), "a1<|im_end|>a2<|im_end|>a3<|im_end|>");
  EXPECT_EQ(trained_text(render("chatml", line, {.mask_history = true})), "a3<|im_end|>");
  EXPECT_EQ(trained_text(render("llama3", line, {.mask_history = true})), "a3<|eot_id|>");
  // The Alpaca prompt has no place for them.
  EXPECT_CONTAINS(expect_error([&] { render("alpaca", line); }), "no place for an instruction's \"system\"");
  // Without them the record is the plain alpaca shape it always was.
  EXPECT_EQ(trained_text(render("alpaca", R"({"instruction": "q", "output": "a"})")), "a</s>");
}

const char* kFourTurns =
    R"({"messages": [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},)"
    R"( {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]})";

// The same conversation with message `i`'s object given an extra field.
std::string with_field(int i, const std::string& field) {
  Example ex = parse_record(kFourTurns);
  std::string out = R"({"messages": [)";
  for (int k = 0; k < 4; ++k) {
    out += std::string(k ? ", " : "") + R"({"role": ")" + ex.messages[k].role + R"(", "content": ")" +
           ex.messages[k].content + "\"" + (k == i ? ", " + field : "") + "}";
  }
  return out + "]}";
}

TEST(DataLoss, MaskHistoryTrainsOnlyTheLastAssistantTurn) {
  for (const char* tmpl : {"chatml", "llama3"}) {
    const std::string end = std::string(tmpl) == "chatml" ? "<|im_end|>" : "<|eot_id|>";
    EXPECT_EQ(trained_text(render(tmpl, kFourTurns)), "a1" + end + "a2" + end) << tmpl;
    EXPECT_EQ(trained_text(render(tmpl, kFourTurns, {.mask_history = true})), "a2" + end) << tmpl;
  }
  EXPECT_EQ(trained_text(render("llama2", kFourTurns, {.mask_history = true})), " a2 </s>");
  EXPECT_EQ(trained_text(render("mistral", kFourTurns, {.mask_history = true})), "a2</s>");
}

// A turn's own flag wins over --mask-history, which wins over --train-on.
TEST(DataLoss, TurnFlagsOverMaskHistoryOverTrainOn) {
  const std::string a1_on = with_field(1, R"("train": true)");
  const std::string a2_off = with_field(3, R"("weight": 0)");
  const std::string u1_on = with_field(0, R"("weight": 1.0)");
  const std::string a1_off = with_field(1, R"("train": false)");
  EXPECT_EQ(parse_record(a1_on).messages[1].train, 1);
  EXPECT_EQ(parse_record(a2_off).messages[3].train, 0);
  EXPECT_EQ(parse_record(u1_on).messages[0].train, 1);
  EXPECT_EQ(parse_record(kFourTurns).messages[0].train, -1);

  EXPECT_EQ(trained_text(render("chatml", a1_on, {.mask_history = true})), "a1<|im_end|>a2<|im_end|>");
  EXPECT_EQ(trained_text(render("chatml", a2_off)), "a1<|im_end|>");
  EXPECT_EQ(trained_text(render("chatml", a2_off, {.mask_history = true})), "");
  EXPECT_EQ(trained_text(render("chatml", u1_on)), "u1<|im_end|>a1<|im_end|>a2<|im_end|>");
  // --train-on all trains the template's text too, but not a turn marked false.
  EXPECT_EQ(trained_text(render("chatml", a1_off, {.all = true})),
            "<|im_start|>user\nu1<|im_end|>\n<|im_start|>user\nu2<|im_end|>\n<|im_start|>assistant\na2<|im_"
            "end|>\n");
  EXPECT_EQ(full_text(render("chatml", kFourTurns, {.all = true})),
            trained_text(render("chatml", kFourTurns, {.all = true})));
}

TEST(DataLoss, TrainOnEosChoosesTheEndMarkers) {
  const std::string u1_on = with_field(0, R"("train": true)");
  EXPECT_EQ(trained_text(render("chatml", u1_on, {.eos = EosLoss::Turn})),
            "u1<|im_end|>a1<|im_end|>a2<|im_end|>");
  EXPECT_EQ(trained_text(render("chatml", u1_on, {.eos = EosLoss::Last})), "u1a1a2<|im_end|>");
  EXPECT_EQ(trained_text(render("chatml", u1_on, {.eos = EosLoss::None})), "u1a1a2");
  // All: every turn's marker, trained turn or not, but a turn marked false.
  EXPECT_EQ(trained_text(render("chatml", kFourTurns, {.eos = EosLoss::All})),
            "<|im_end|>a1<|im_end|><|im_end|>a2<|im_end|>");
  EXPECT_EQ(trained_text(render("chatml", with_field(2, R"("train": false)"), {.eos = EosLoss::All})),
            "<|im_end|>a1<|im_end|>a2<|im_end|>");
  // The EOS id as end marker (Mistral, text and completions) follows the same choice.
  EXPECT_EQ(trained_text(render("mistral", kFourTurns, {.eos = EosLoss::Last})), "a1a2</s>");
  EXPECT_EQ(trained_text(render("plain", R"({"text": "t"})", {.eos = EosLoss::None})), "t");
  EXPECT_EQ(trained_text(render("plain", R"({"prompt": "p", "completion": "c"})", {.eos = EosLoss::None})),
            "c");
  EXPECT_EQ(eos_loss_by_name("last"), EosLoss::Last);
  EXPECT_CONTAINS(expect_error([] { eos_loss_by_name("eos"); }),
                  "--train-on-eos must be turn, last, all or none, got 'eos'");
}

TEST(DataShapes, TemplatesWithoutToolsRefuseThemByName) {
  const std::string call =
      R"({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": null,)"
      R"( "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]})";
  const std::string tool_turn =
      R"({"messages": [{"role": "user", "content": "u"}, {"role": "tool", "content": "r"}]})";
  const std::string tools = R"({"tools": [{"name": "f"}], "messages": [{"role": "user", "content": "u"}]})";
  for (const char* tmpl : {"llama2", "mistral"}) {
    EXPECT_CONTAINS(expect_error([&] { render(tmpl, call); }), "message 2 calls a tool, which the " +
                                                                   std::string(tmpl) +
                                                                   " template cannot write; use "
                                                                   "--template auto");
    EXPECT_CONTAINS(expect_error([&] { render(tmpl, tool_turn); }), "message 2 is a tool turn");
    EXPECT_CONTAINS(expect_error([&] { render(tmpl, tools); }), "has no place for a tools list");
  }
  for (const char* tmpl : {"plain", "alpaca"})
    EXPECT_CONTAINS(expect_error([&] { render(tmpl, call); }), "needs a chat template");
  EXPECT_CONTAINS(
      expect_error([] {
        render("llama3",
               R"({"messages": [{"role": "assistant", "content": null, "tool_calls": [{"function":)"
               R"( {"name": "f", "arguments": {}}}, {"function": {"name": "g", "arguments": {}}}]}]})");
      }),
      "makes 2 tool calls; the llama3 template writes one call per turn");
  EXPECT_CONTAINS(expect_error([] {
                    render("llama3", R"({"messages": [{"role": "assistant", "content": "x", "tool_calls":)"
                                     R"( [{"function": {"name": "f", "arguments": {}}}]}]})");
                  }),
                  "has content beside its tool call");
}

class TempFile {
 public:
  explicit TempFile(const std::string& body)
      : path_(fs::temp_directory_path() / ("tf_test_shapes_" + std::to_string(::getpid()) + ".jsonl")) {
    std::ofstream(path_, std::ios::binary) << body;
  }
  ~TempFile() { fs::remove(path_); }
  std::string path() const { return path_.string(); }

 private:
  fs::path path_;
};

TEST(DataShapes, BadNewFieldsNameFileLineAndField) {
  struct Case {
    std::string line, problem;
  };
  const std::string user = R"({"role": "user", "content": "u"})";
  const std::vector<Case> cases = {
      {R"({"conversations": {}})", "field \"conversations\" must be an array, not object"},
      {R"({"conversations": []})", "field \"conversations\" is empty"},
      {R"({"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]})",
       "conversations[1].from 'bot' is not one of human, user, gpt, assistant, system, function_call"},
      {R"({"conversations": [{"value": "a"}]})", "conversations[0] has no \"from\""},
      {R"({"conversations": [{"from": 1, "value": "a"}]})",
       "conversations[0].from must be a string, not number"},
      {R"({"conversations": [{"from": "gpt"}]})", "conversations[0] has no \"value\""},
      {R"({"conversations": [{"from": "gpt", "value": ["a"]}]})", "conversations[0].value must be a string"},
      {R"({"conversations": ["hi"]})", "conversations[0] must be an object, not string"},
      {R"({"system": 3, "conversations": [{"from": "gpt", "value": "a"}]})",
       "field \"system\" must be a string"},
      {R"({"system": "s", "conversations": [{"from": "system", "value": "a"}]})",
       "conversations[0] is a system turn after the start"},
      {R"({"conversations": [{"from": "function_call", "value": "not json"}]})",
       "conversations[0].value of a function_call turn must be the JSON text of a call"},
      {R"({"conversations": [{"from": "function_call", "value": "{\"arguments\": {}}"}]})",
       "conversations[0].value needs a non-empty string \"name\""},
      {R"({"conversations": [{"from": "function_call", "value": "{\"name\": \"f\"}"}]})",
       "conversations[0].value has no \"arguments\""},
      {R"({"conversations": [{"from": "function_call", "value": "{\"name\": \"f\", \"arguments\": [1]}"}]})",
       "conversations[0].value.arguments must be an object (or its JSON text), not array"},
      {R"({"conversations": [{"from": "function_call", "value": "[3]"}]})",
       "conversations[0].value[0] must be an object"},
      {R"({"conversations": [{"from": "gpt", "value": "a"}], "tools": "[oops"})",
       "field \"tools\" is a string that is not valid JSON"},
      {R"({"conversations": [{"from": "gpt", "value": "a"}], "tools": {"name": "f"}})",
       "field \"tools\" must be a list (or its JSON text), not object"},
      {R"({"messages": [{"role": "user", "content": "a", "weight": 0.5}]})",
       "messages[0].weight must be 0 or 1, not 0.5"},
      {R"({"messages": [{"role": "user", "content": "a", "weight": true}]})",
       "messages[0].weight must be 0 or 1"},
      {R"({"messages": [{"role": "user", "content": "a", "train": "yes"}]})",
       "messages[0].train must be true or false, not \"yes\""},
      {R"({"messages": [{"role": "user", "content": "a", "train": true, "weight": 1}]})",
       "messages[0] has both \"train\" and \"weight\""},
      {R"({"conversations": [{"from": "gpt", "value": "a", "weight": 2}]})",
       "conversations[0].weight must be 0 or 1, not 2"},
      {R"({"messages": [{"role": "bot", "content": "a"}]})",
       "messages[0] has role 'bot' (known: system, user"},
      {R"({"messages": [{"role": "user", "content": null, "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]})",
       "messages[0] has tool_calls but role 'user'"},
      {R"({"messages": [{"role": "assistant", "content": null}]})", "(null content is for an assistant turn"},
      {R"({"messages": [{"role": "assistant", "content": "", "tool_calls": []}]})",
       "messages[0].tool_calls must be a non-empty list"},
      {R"({"messages": [{"role": "assistant", "content": "", "tool_calls": [5]}]})",
       "messages[0].tool_calls[0] must be an object, not number"},
      {R"({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"type": "code", "function": {}}]}]})",
       "messages[0].tool_calls[0].type must be \"function\", not \"code\""},
      {R"({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": 1}]}]})",
       "messages[0].tool_calls[0].id must be a string, not number"},
      {R"({"messages": [{"role": "assistant", "content": "", "tool_calls": [{}]}]})",
       "messages[0].tool_calls[0] has no \"function\""},
      {R"({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}]})",
       "messages[0].tool_calls[0].function has no \"name\""},
      {R"({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}]})",
       "messages[0].tool_calls[0].function has no \"arguments\""},
      {R"({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", )"
       R"("arguments": "{bad"}}]}]})",
       "messages[0].tool_calls[0].function.arguments is a string that is not valid JSON"},
      {R"({"messages": [{"role": "tool", "content": "r", "tool_call_id": 7}]})",
       "messages[0].tool_call_id must be a string, not number"},
      {R"({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]})",
       "messages[0].content[0].type 'image_url' is not supported (only \"text\" parts"},
      {R"({"messages": [{"role": "user", "content": [{"type": "text"}]}]})",
       "messages[0].content[0].text must be a string"},
      {R"({"messages": [{"role": "user", "content": 3}]})",
       "field \"content\" in messages[0] must be a string or a list of text parts, not number"},
      {R"({"instruction": "i", "output": "o", "history": [["q"]]})",
       "history[0] must be a pair of strings [instruction, output], not [\"q\"]"},
      {R"({"instruction": "i", "output": "o", "history": "q"})", "field \"history\" must be a list"},
      {R"({"conversations": [{"from": "gpt", "value": "a"}], "messages": [)" + user + "]}",
       "more than one record shape"},
      {R"({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", )"
       R"("arguments": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": {"j": {"k": {"l": {}}}}}}}}}}}}}}]}]})",
       "JSON nested deeper than 16 levels"},
  };
  for (const Case& c : cases) {
    const TempFile f(R"({"text": "fine"})"
                     "\n" +
                     c.line + "\n");
    const std::string msg = expect_error([&] { load_jsonl(f.path()); });
    EXPECT_EQ(msg.rfind(f.path() + ":2: ", 0), 0u) << msg;
    EXPECT_CONTAINS(msg, c.problem);
  }
}

// A byte-level vocabulary with ChatML's control tokens, enough to tokenise the loss options' effect.
tok::Tokenizer chatml_tokenizer() {
  tok::GgufVocab v;
  v.model = "gpt2";
  v.pre = "gpt2";
  for (int b = 0; b < 256; ++b) v.tokens.push_back(tok::byte_level_piece(uint8_t(b)));
  v.token_types.assign(v.tokens.size(), 1);
  for (const char* special : {"<s>", "</s>", "<|im_start|>", "<|im_end|>"}) {
    v.tokens.push_back(special);
    v.token_types.push_back(3);
  }
  v.bos_id = 256;
  v.eos_id = 257;
  return tok::Tokenizer::from_gguf_vocab(v, "test-vocab");
}

TEST(DataLoss, TokenizeOptionsReachTheMask) {
  const tok::Tokenizer tk = chatml_tokenizer();
  Dataset ds;
  ds.path = "mem.jsonl";
  ds.examples = {parse_record(kFourTurns), parse_record(with_field(1, R"("train": false)"))};
  ds.examples[0].line = 1;
  ds.examples[1].line = 2;
  const auto trained = [&](const TokenizedDataset& td, size_t i) {
    std::vector<int32_t> ids;
    const auto id = td.example_ids(i);
    const auto tr = td.example_trainable(i);
    for (size_t k = 0; k < id.size(); ++k)
      if (tr[k]) ids.push_back(id[k]);
    return tk.decode(ids);
  };
  const TokenizedDataset base = tokenize_dataset(ds, template_by_name("chatml"), tk, {});
  EXPECT_EQ(trained(base, 0), "a1<|im_end|>a2<|im_end|>");
  EXPECT_EQ(trained(base, 1), "a2<|im_end|>");
  const TokenizedDataset masked =
      tokenize_dataset(ds, template_by_name("chatml"), tk, {.mask_history = true});
  EXPECT_EQ(trained(masked, 0), "a2<|im_end|>");
  const TokenizedDataset no_eos =
      tokenize_dataset(ds, template_by_name("chatml"), tk, {.train_on_eos = EosLoss::None});
  EXPECT_EQ(trained(no_eos, 0), "a1a2");
  // --train-on all keeps BOS-free ChatML whole, but the turn marked false.
  const TokenizedDataset all = tokenize_dataset(ds, template_by_name("chatml"), tk, {.train_on_all = true});
  EXPECT_EQ(all.length(0), std::count(all.trainable.begin(), all.trainable.begin() + all.offsets[1], 1));
  EXPECT_EQ(trained(all, 1).find("a1"), std::string::npos);
  EXPECT_CONTAINS(
      expect_error([&] {
        tokenize_dataset(ds, template_by_name("chatml"), tk, {.train_on_all = true, .mask_history = true});
      }),
      "--mask-history trains only the last assistant turn and --train-on all every token; choose one");
  // Every turn marked false: nothing to train, and the error says so.
  Dataset none;
  none.path = "none.jsonl";
  none.examples = {parse_record(with_field(3, R"("train": false)"))};
  none.examples[0].line = 1;
  EXPECT_CONTAINS(
      expect_error([&] { tokenize_dataset(none, template_by_name("chatml"), tk, {.mask_history = true}); }),
      "no example is left to train on");
}

}  // namespace
}  // namespace tf::data
