// Prompt formats. The strings follow the models' own Jinja templates as published with them:
// SmolLM2 / Qwen2 (ChatML), Meta-Llama-3-Instruct, Llama-2-chat, Mistral-7B-Instruct, Gemma 3 (-it),
// and the Stanford Alpaca prompt. Where a template strips content (Llama-3 `| trim`, Llama-2 `.strip()`),
// so do we, so that training sees exactly what inference will.
#include "src/data/chat_template.h"

#include <algorithm>
#include <array>
#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "src/data/model_template.h"

namespace tf::data {
namespace {

constexpr std::string_view kAlpacaWithInput =
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n";
constexpr std::string_view kAlpacaNoInput =
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n";

constexpr std::array<std::pair<std::string_view, TemplateKind>, 7> kNames = {{
    {"plain", TemplateKind::Plain},
    {"alpaca", TemplateKind::Alpaca},
    {"chatml", TemplateKind::ChatML},
    {"llama3", TemplateKind::Llama3},
    {"llama2", TemplateKind::Llama2},
    {"mistral", TemplateKind::Mistral},
    {"gemma", TemplateKind::Gemma},
}};

constexpr std::string_view kNameList = "plain, alpaca, chatml, llama3, llama2, mistral, gemma";

// Python's str.strip() / Jinja's trim: ASCII whitespace at both ends.
std::string strip(std::string_view s) {
  constexpr std::string_view ws = " \t\n\r\f\v";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string_view::npos) return {};
  return std::string(s.substr(b, s.find_last_not_of(ws) - b + 1));
}

// Appends text, merging it into the previous segment when nothing (trainability, BOS, EOS) separates
// them: fewer segments means fewer boundaries for the tokenizer to respect.
class SegmentWriter {
 public:
  void add(std::string_view text, bool trainable, bool bos = false, bool eos = false) {
    if (!bos && !segs_.empty() && !segs_.back().eos && segs_.back().trainable == trainable) {
      segs_.back().text += text;
      segs_.back().eos = eos;
      return;
    }
    segs_.push_back({std::string(text), trainable, bos, eos});
  }
  std::vector<Segment> take() { return std::move(segs_); }

 private:
  std::vector<Segment> segs_;
};

// A SegmentWriter for conversations: each piece's place in the loss comes from the turn it belongs
// to, by the rules of turn_trained, end_trained and frame_trained.
class TurnWriter {
 public:
  TurnWriter(const std::vector<Message>& msgs, const LossOptions& loss) : msgs_(msgs), loss_(loss) {}
  // Template text around turn `i` (a role header, a separator); `i` may be msgs.size() for none.
  void frame(std::string_view text, size_t i, bool bos = false) {
    w_.add(text, frame_trained(msgs_, i, loss_), bos);
  }
  void body(std::string_view text, size_t i, bool bos = false) {
    w_.add(text, turn_trained(msgs_, i, loss_), bos);
  }
  // Turn `i`'s end-of-turn marker: text, or (eos_token) the tokenizer's EOS id.
  void end(std::string_view marker, size_t i) { w_.add(marker, end_trained(msgs_, i, loss_)); }
  void end_eos(size_t i) { w_.add("", end_trained(msgs_, i, loss_), false, true); }
  std::vector<Segment> take() { return w_.take(); }

 private:
  const std::vector<Message>& msgs_;
  const LossOptions& loss_;
  SegmentWriter w_;
};

// Python's json.dumps(v, ensure_ascii=False), which HF chat templates' tojson filter is: ", " and
// ": " between items, keys in their given order.
std::string python_json(const nlohmann::ordered_json& v) {
  if (v.is_object() || v.is_array()) {
    std::string out(1, v.is_object() ? '{' : '[');
    bool first = true;
    for (const auto& [key, item] : v.items()) {
      if (!first) out += ", ";
      first = false;
      if (v.is_object()) out += nlohmann::ordered_json(key).dump() + ": ";
      out += python_json(item);
    }
    return out + (v.is_object() ? '}' : ']');
  }
  return v.dump();
}

std::string python_json_text(std::string_view json_text) {
  return python_json(nlohmann::ordered_json::parse(json_text));
}

// The conversation a chat template renders: prompt/completion and instruction records become a
// user turn and an assistant turn (an instruction's earlier turns before them); the template's
// default system prompt is added when none is given.
std::vector<Message> as_conversation(const ChatTemplate& tmpl, const Example& ex) {
  std::vector<Message> msgs;
  switch (ex.shape) {
    case Example::Shape::Messages: msgs = ex.messages; break;
    case Example::Shape::PromptCompletion: msgs = {{"user", ex.prompt}, {"assistant", ex.completion}}; break;
    case Example::Shape::Instruction:
      msgs = ex.messages;
      msgs.emplace_back("user", ex.input.empty() ? ex.instruction : ex.instruction + "\n\n" + ex.input);
      msgs.emplace_back("assistant", ex.output);
      break;
    case Example::Shape::Text: TF_FAIL("internal: text records are not conversations");
  }
  if (!tmpl.default_system.empty() && (msgs.empty() || msgs.front().role != "system"))
    msgs.insert(msgs.begin(), {"system", tmpl.default_system});
  return msgs;
}

// Templates without a way to write tools refuse them rather than drop them: a conversation that
// lost its calls teaches the model answers that come from nowhere.
void refuse_tools(const std::vector<Message>& msgs, const Example& ex, std::string_view name) {
  constexpr std::string_view fix = "; use --template auto to render it with the model's own chat template";
  TF_CHECK(ex.tools.empty(), "the ", name, " template has no place for a tools list", fix);
  for (size_t i = 0; i < msgs.size(); ++i) {
    TF_CHECK(msgs[i].tool_calls.empty(), "message ", i + 1, " calls a tool, which the ", name,
             " template cannot write", fix);
    TF_CHECK(msgs[i].role != "tool", "message ", i + 1, " is a tool turn, which the ", name,
             " template cannot write", fix);
  }
}

// Llama-2 and Mistral templates raise an exception unless turns alternate user/assistant after an
// optional leading system message; we refuse the same conversations.
void check_alternating(const std::vector<Message>& msgs, size_t first, std::string_view name) {
  for (size_t i = first; i < msgs.size(); ++i) {
    const char* want = (i - first) % 2 == 0 ? "user" : "assistant";
    TF_CHECK(msgs[i].role == want, "the ", name,
             " template needs a conversation of alternating user/assistant "
             "turns after an optional first system message, but message ",
             i + 1, " has role '", msgs[i].role, "' where '", want, "' belongs");
  }
}

constexpr std::string_view kQwenToolsIntro =
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>";
constexpr std::string_view kQwenToolsOutro =
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call>";

// ChatML as Qwen2.5 writes it: a tools list in the system turn after the system prompt, each call
// as <tool_call> JSON </tool_call> in its assistant turn, and a run of tool turns as
// <tool_response> blocks in one user turn. The assistant header ends with its newline, as the
// generation prompt does, so a call's turn is trained from the same place as an answer's.
std::vector<Segment> render_chatml(const std::vector<Message>& msgs, const std::string& tools,
                                   const LossOptions& loss) {
  TurnWriter w(msgs, loss);
  size_t i = 0;
  if (!tools.empty()) {
    // Without a system prompt the tools block opens the system turn, as Qwen3's template does.
    const bool sys = !msgs.empty() && msgs[0].role == "system";
    const size_t turn = sys ? 0 : msgs.size();
    std::string text = sys ? msgs[0].content + "\n\n" : std::string();
    text += kQwenToolsIntro;
    for (const auto& tool : nlohmann::ordered_json::parse(tools)) text += "\n" + python_json(tool);
    text += kQwenToolsOutro;
    w.frame("<|im_start|>system\n", turn);
    if (sys) {
      w.body(text, 0);
    } else {
      w.frame(text, turn);
    }
    w.end("<|im_end|>", turn);
    w.frame("\n", turn);
    i = sys ? 1 : 0;
  }
  for (; i < msgs.size(); ++i) {
    const Message& m = msgs[i];
    if (m.role == "tool") {
      if (i == 0 || msgs[i - 1].role != "tool") w.frame("<|im_start|>user", i);
      w.body("\n<tool_response>\n" + m.content + "\n</tool_response>", i);
      if (i + 1 == msgs.size() || msgs[i + 1].role != "tool") {
        w.end("<|im_end|>", i);
        w.frame("\n", i);
      }
      continue;
    }
    w.frame("<|im_start|>" + m.role + "\n", i);
    std::string content = m.content;
    for (const ToolCall& c : m.tool_calls) {
      content += (content.empty() ? "" : "\n") + std::string("<tool_call>\n{\"name\": \"") + c.name +
                 "\", \"arguments\": " + python_json_text(c.arguments) + "}\n</tool_call>";
    }
    w.body(content, i);
    w.end("<|im_end|>", i);
    w.frame("\n", i);
  }
  return w.take();
}

// Llama 3 as Meta-Llama-3-Instruct writes it; tool calls and tool turns as Llama 3.1's template
// writes them: one call per assistant turn as {"name", "parameters"} JSON, a tool result in an
// ipython turn. The result is written through tojson, as a JSON string: 3.1's template tests
// `content is iterable`, which a string is.
std::vector<Segment> render_llama3(const std::vector<Message>& msgs, const Example& ex,
                                   const LossOptions& loss) {
  TF_CHECK(ex.tools.empty(),
           "the llama3 template has no place for a tools list (Llama 3.1's own template puts it in the first "
           "user turn); use --template auto to render it with the model's own chat template");
  TurnWriter w(msgs, loss);
  for (size_t i = 0; i < msgs.size(); ++i) {
    const Message& m = msgs[i];
    const std::string role = m.role == "tool" ? "ipython" : m.role;
    w.frame("<|start_header_id|>" + role + "<|end_header_id|>\n\n", i, i == 0);
    if (!m.tool_calls.empty()) {
      TF_CHECK(m.tool_calls.size() == 1, "message ", i + 1, " makes ", m.tool_calls.size(),
               " tool calls; the llama3 template writes one call per turn (Llama 3.1 supports single tool "
               "calls only)");
      TF_CHECK(m.content.empty(), "message ", i + 1,
               " has content beside its tool call; the llama3 template writes only the call");
      const ToolCall& c = m.tool_calls[0];
      w.body("{\"name\": \"" + c.name + "\", \"parameters\": " + python_json_text(c.arguments) + "}", i);
    } else if (m.role == "tool") {
      w.body(nlohmann::ordered_json(m.content).dump(), i);
    } else {
      w.body(strip(m.content), i);
    }
    w.end("<|eot_id|>", i);
  }
  return w.take();
}

std::vector<Segment> render_llama2(const std::vector<Message>& msgs, const LossOptions& loss) {
  const bool has_system = !msgs.empty() && msgs.front().role == "system";
  const size_t first = has_system ? 1 : 0;
  check_alternating(msgs, first, "llama2");
  TurnWriter w(msgs, loss);
  for (size_t i = first; i < msgs.size(); ++i) {
    std::string content = msgs[i].content;
    if (i == first && has_system) content = "<<SYS>>\n" + msgs.front().content + "\n<</SYS>>\n\n" + content;
    if (msgs[i].role == "user") {
      w.frame("[INST] ", i, true);
      w.body(strip(content), i);
      w.frame(" [/INST]", i);
    } else {
      w.body(" " + strip(content) + " ", i);
      w.end_eos(i);
    }
  }
  return w.take();
}

// Mistral's template has no system role; like mistral-common, the system prompt is put in front of
// the first user message.
std::vector<Segment> render_mistral(const std::vector<Message>& msgs, const LossOptions& loss) {
  const bool has_system = !msgs.empty() && msgs.front().role == "system";
  const size_t first = has_system ? 1 : 0;
  check_alternating(msgs, first, "mistral");
  TurnWriter w(msgs, loss);
  for (size_t i = first; i < msgs.size(); ++i) {
    if (msgs[i].role == "user") {
      const std::string content =
          i == first && has_system ? msgs.front().content + "\n\n" + msgs[i].content : msgs[i].content;
      w.frame("[INST] ", i, i == first);
      w.body(content, i);
      w.frame(" [/INST]", i);
    } else {
      w.body(msgs[i].content, i);
      w.end_eos(i);
    }
  }
  return w.take();
}

// Gemma 3's template (Gemma 2's without a system turn): BOS, then <start_of_turn>user or model, the
// trimmed content and <end_of_turn> with a newline per turn; a system prompt, untrimmed, leads the
// first user turn followed by a blank line; turns alternate user/model after it.
std::vector<Segment> render_gemma(const std::vector<Message>& msgs, const LossOptions& loss) {
  const bool has_system = !msgs.empty() && msgs.front().role == "system";
  const size_t first = has_system ? 1 : 0;
  check_alternating(msgs, first, "gemma");
  TurnWriter w(msgs, loss);
  for (size_t i = first; i < msgs.size(); ++i) {
    const bool user = msgs[i].role == "user";
    w.frame(user ? "<start_of_turn>user\n" : "<start_of_turn>model\n", i, i == first);
    const std::string prefix = i == first && has_system ? msgs.front().content + "\n\n" : std::string();
    w.body(prefix + strip(msgs[i].content), i);
    w.end("<end_of_turn>", i);
    w.frame("\n", i);
  }
  return w.take();
}

// A prompt and its response without a chat template: plain, or in the Stanford Alpaca prompt.
std::vector<Segment> render_prompt_response(std::string_view instruction, std::string_view input,
                                            std::string_view output, bool alpaca, bool bos,
                                            const LossOptions& loss) {
  const std::vector<Message> msgs = {{"user", std::string(instruction)}, {"assistant", std::string(output)}};
  std::string prompt(instruction);
  if (alpaca) {
    prompt = std::string(input.empty() ? kAlpacaNoInput : kAlpacaWithInput);
    prompt.append("### Instruction:\n").append(instruction).append("\n\n");
    if (!input.empty()) prompt.append("### Input:\n").append(input).append("\n\n");
    prompt.append("### Response:\n");
  }
  TurnWriter w(msgs, loss);
  w.body(prompt, 0, bos);
  w.body(output, 1);
  w.end_eos(1);
  return w.take();
}

// The body of a fixed default system prompt in a ChatML template: the text of a Jinja string literal
// '<|im_start|>system\n...<|im_end|>' that holds no quote or expression (so it is a constant, not
// messages[0]['content'] spliced in). Empty when the template has none.
std::string chatml_default_system(std::string_view t) {
  constexpr std::string_view open = "<|im_start|>system";
  for (size_t at = t.find(open); at != std::string_view::npos; at = t.find(open, at + 1)) {
    size_t body = at + open.size();
    if (t.substr(body, 2) == "\\n") {
      body += 2;
    } else if (t.substr(body, 1) == "\n") {
      body += 1;
    } else {
      continue;
    }
    const size_t end = t.find("<|im_end|>", body);
    if (end == std::string_view::npos) continue;
    const std::string_view raw = t.substr(body, end - body);
    if (raw.empty() || raw.find_first_of("'\"{}+") != std::string_view::npos) continue;
    std::string out;
    for (size_t i = 0; i < raw.size(); ++i) {
      if (raw[i] == '\\' && i + 1 < raw.size() && raw[i + 1] == 'n') {
        out += '\n';
        ++i;
      } else {
        out += raw[i];
      }
    }
    return out;
  }
  return {};
}

}  // namespace

ChatTemplate template_by_name(std::string_view name) {
  for (const auto& [n, kind] : kNames)
    if (n == name) return {kind, {}, {}};
  TF_FAIL("unknown prompt template '", name, "' (known: ", kNameList, ")");
}

std::string_view template_name(TemplateKind kind) {
  if (kind == TemplateKind::Model) return "model";
  for (const auto& [n, k] : kNames)
    if (k == kind) return n;
  TF_FAIL("internal: template kind ", int(kind), " has no name");
}

ChatTemplate detect_template(std::string_view jinja, std::string_view source) {
  const auto has = [&](std::string_view marker) { return jinja.find(marker) != std::string_view::npos; };
  if (has("<|im_start|>")) return {TemplateKind::ChatML, chatml_default_system(jinja), {}};
  if (has("<|start_header_id|>")) return {TemplateKind::Llama3, {}, {}};
  if (has("[INST]")) return {has("<<SYS>>") ? TemplateKind::Llama2 : TemplateKind::Mistral, {}, {}};
  if (has("### Instruction:")) return {TemplateKind::Alpaca, {}, {}};
  if (has("<start_of_turn>")) return {TemplateKind::Gemma, {}, {}};
  TF_FAIL(
      source,
      ": the model's chat template is not one tightfit recognises (it looks for <|im_start|>, "
      "<|start_header_id|>, [INST], ### Instruction:, <start_of_turn>); choose a format with --template (",
      kNameList, ")");
}

EosLoss eos_loss_by_name(std::string_view name) {
  constexpr std::array<std::pair<std::string_view, EosLoss>, 4> names = {{
      {"turn", EosLoss::Turn},
      {"last", EosLoss::Last},
      {"all", EosLoss::All},
      {"none", EosLoss::None},
  }};
  for (const auto& [n, e] : names)
    if (n == name) return e;
  TF_FAIL("--train-on-eos must be turn, last, all or none, got '", name, "'");
}

bool turn_trained(const std::vector<Message>& msgs, size_t i, const LossOptions& loss) {
  if (i >= msgs.size()) return false;
  const Message& m = msgs[i];
  if (m.train >= 0) return m.train == 1;
  if (loss.mask_history) {
    for (size_t j = msgs.size(); j-- > 0;)
      if (msgs[j].role == "assistant") return j == i;
    return false;
  }
  return loss.all || m.role == "assistant";
}

bool end_trained(const std::vector<Message>& msgs, size_t i, const LossOptions& loss) {
  switch (loss.eos) {
    case EosLoss::Turn: return turn_trained(msgs, i, loss);
    case EosLoss::Last:
      for (size_t j = msgs.size(); j-- > 0;)
        if (turn_trained(msgs, j, loss)) return j == i;
      return false;
    case EosLoss::All: return i < msgs.size() && msgs[i].train != 0;
    case EosLoss::None: return false;
  }
  TF_FAIL("internal: EosLoss ", int(loss.eos), " not handled");
}

bool frame_trained(const std::vector<Message>& msgs, size_t i, const LossOptions& loss) {
  return loss.all && !loss.mask_history && (i >= msgs.size() || msgs[i].train != 0);
}

std::vector<Segment> render_example(const ChatTemplate& tmpl, const Example& ex, bool tokenizer_adds_bos,
                                    const LossOptions& loss) {
  if (ex.shape == Example::Shape::Text) {
    SegmentWriter w;
    w.add(ex.text, true, tokenizer_adds_bos);
    w.add("", loss.eos != EosLoss::None, false, true);
    return w.take();
  }
  const std::string_view name = template_name(tmpl.kind);
  switch (tmpl.kind) {
    case TemplateKind::Plain:
    case TemplateKind::Alpaca: {
      const bool alpaca = tmpl.kind == TemplateKind::Alpaca;
      TF_CHECK(ex.shape != Example::Shape::Messages,
               "a conversation (a \"messages\" or \"conversations\" record) ",
               "needs a chat template, but the format is '", name,
               "'; choose one with --template (auto, chatml, llama3, llama2, mistral, gemma)");
      TF_CHECK(ex.messages.empty(), "the '", name,
               "' format has no place for an instruction's \"system\" or ",
               "\"history\"; choose a chat template with --template (auto, chatml, llama3, llama2, mistral, "
               "gemma)");
      if (ex.shape == Example::Shape::Instruction)
        return render_prompt_response(ex.instruction, ex.input, ex.output, true, tokenizer_adds_bos, loss);
      return render_prompt_response(ex.prompt, {}, ex.completion, alpaca, tokenizer_adds_bos, loss);
    }
    case TemplateKind::ChatML: return render_chatml(as_conversation(tmpl, ex), ex.tools, loss);
    case TemplateKind::Llama3: return render_llama3(as_conversation(tmpl, ex), ex, loss);
    case TemplateKind::Llama2:
    case TemplateKind::Mistral: {
      const std::vector<Message> msgs = as_conversation(tmpl, ex);
      refuse_tools(msgs, ex, name);
      return tmpl.kind == TemplateKind::Llama2 ? render_llama2(msgs, loss) : render_mistral(msgs, loss);
    }
    case TemplateKind::Gemma: {
      const std::vector<Message> msgs = as_conversation(tmpl, ex);
      refuse_tools(msgs, ex, name);
      return render_gemma(msgs, loss);
    }
    case TemplateKind::Model:
      TF_CHECK(tmpl.model != nullptr, "internal: a model template without its text");
      return render_model_template(*tmpl.model, as_conversation(tmpl, ex), ex.tools, loss);
  }
  TF_FAIL("internal: template kind ", int(tmpl.kind), " not handled");
}

std::vector<Segment> render_response_prompt(const ChatTemplate& tmpl, const Example& ex,
                                            bool tokenizer_adds_bos) {
  std::vector<Segment> segs = render_example(tmpl, ex, tokenizer_adds_bos);
  // The response is the last trainable segment; it and whatever closes it go.
  const auto response =
      std::find_if(segs.rbegin(), segs.rend(), [](const Segment& seg) { return seg.trainable; });
  TF_CHECK(response != segs.rend(), "template ", template_name(tmpl.kind), " rendered no response");
  segs.erase(std::prev(response.base()), segs.end());
  return segs;
}

std::string segments_to_text(const std::vector<Segment>& segs, std::string_view bos, std::string_view eos) {
  std::string out;
  for (const Segment& s : segs) {
    if (s.bos) out += bos;
    out += s.text;
    if (s.eos) out += eos;
  }
  return out;
}

}  // namespace tf::data
