// Prompt formats. The strings follow the models' own Jinja templates as published with them:
// SmolLM2 / Qwen2 (ChatML), Meta-Llama-3-Instruct, Llama-2-chat, Mistral-7B-Instruct, and the
// Stanford Alpaca prompt. Where a template strips content (Llama-3 `| trim`, Llama-2 `.strip()`),
// so do we, so that training sees exactly what inference will.
#include "src/data/chat_template.h"

#include <algorithm>
#include <array>

#include "src/core/error.h"

namespace tf::data {
namespace {

constexpr std::string_view kAlpacaWithInput =
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n";
constexpr std::string_view kAlpacaNoInput =
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n";

constexpr std::array<std::pair<std::string_view, TemplateKind>, 6> kNames = {{
    {"plain", TemplateKind::Plain},
    {"alpaca", TemplateKind::Alpaca},
    {"chatml", TemplateKind::ChatML},
    {"llama3", TemplateKind::Llama3},
    {"llama2", TemplateKind::Llama2},
    {"mistral", TemplateKind::Mistral},
}};

constexpr std::string_view kNameList = "plain, alpaca, chatml, llama3, llama2, mistral";

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

// The conversation a chat template renders: prompt/completion and instruction records become one
// user turn and one assistant turn; the template's default system prompt is added when none is given.
std::vector<Message> as_conversation(const ChatTemplate& tmpl, const Example& ex) {
  std::vector<Message> msgs;
  switch (ex.shape) {
    case Example::Shape::Messages: msgs = ex.messages; break;
    case Example::Shape::PromptCompletion: msgs = {{"user", ex.prompt}, {"assistant", ex.completion}}; break;
    case Example::Shape::Instruction:
      msgs = {{"user", ex.input.empty() ? ex.instruction : ex.instruction + "\n\n" + ex.input},
              {"assistant", ex.output}};
      break;
    case Example::Shape::Text: TF_FAIL("internal: text records are not conversations");
  }
  if (!tmpl.default_system.empty() && (msgs.empty() || msgs.front().role != "system"))
    msgs.insert(msgs.begin(), {"system", tmpl.default_system});
  return msgs;
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

std::vector<Segment> render_chatml(const std::vector<Message>& msgs) {
  SegmentWriter w;
  for (const Message& m : msgs) {
    if (m.role == "assistant") {
      w.add("<|im_start|>assistant\n", false);
      w.add(m.content + "<|im_end|>", true);
      w.add("\n", false);
    } else {
      w.add("<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n", false);
    }
  }
  return w.take();
}

std::vector<Segment> render_llama3(const std::vector<Message>& msgs) {
  SegmentWriter w;
  for (size_t i = 0; i < msgs.size(); ++i) {
    const Message& m = msgs[i];
    const std::string header = "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n";
    const bool bos = i == 0;
    if (m.role == "assistant") {
      w.add(header, false, bos);
      w.add(strip(m.content) + "<|eot_id|>", true);
    } else {
      w.add(header + strip(m.content) + "<|eot_id|>", false, bos);
    }
  }
  return w.take();
}

std::vector<Segment> render_llama2(const std::vector<Message>& msgs) {
  const bool has_system = !msgs.empty() && msgs.front().role == "system";
  const size_t first = has_system ? 1 : 0;
  check_alternating(msgs, first, "llama2");
  SegmentWriter w;
  for (size_t i = first; i < msgs.size(); ++i) {
    std::string content = msgs[i].content;
    if (i == first && has_system) content = "<<SYS>>\n" + msgs.front().content + "\n<</SYS>>\n\n" + content;
    if (msgs[i].role == "user")
      w.add("[INST] " + strip(content) + " [/INST]", false, true);
    else
      w.add(" " + strip(content) + " ", true, false, true);
  }
  return w.take();
}

// Mistral's template has no system role; like mistral-common, the system prompt is put in front of
// the first user message.
std::vector<Segment> render_mistral(const std::vector<Message>& msgs) {
  const bool has_system = !msgs.empty() && msgs.front().role == "system";
  const size_t first = has_system ? 1 : 0;
  check_alternating(msgs, first, "mistral");
  SegmentWriter w;
  for (size_t i = first; i < msgs.size(); ++i) {
    if (msgs[i].role == "user") {
      const std::string content =
          i == first && has_system ? msgs.front().content + "\n\n" + msgs[i].content : msgs[i].content;
      w.add("[INST] " + content + " [/INST]", false, i == first);
    } else {
      w.add(msgs[i].content, true, false, true);
    }
  }
  return w.take();
}

std::vector<Segment> render_alpaca(std::string_view instruction, std::string_view input,
                                   std::string_view output, bool bos) {
  std::string prompt(input.empty() ? kAlpacaNoInput : kAlpacaWithInput);
  prompt.append("### Instruction:\n").append(instruction).append("\n\n");
  if (!input.empty()) prompt.append("### Input:\n").append(input).append("\n\n");
  prompt.append("### Response:\n");
  SegmentWriter w;
  w.add(prompt, false, bos);
  w.add(output, true, false, true);
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
    if (n == name) return {kind, {}};
  TF_FAIL("unknown prompt template '", name, "' (known: ", kNameList, ")");
}

std::string_view template_name(TemplateKind kind) {
  for (const auto& [n, k] : kNames)
    if (k == kind) return n;
  TF_FAIL("internal: template kind ", int(kind), " has no name");
}

ChatTemplate detect_template(std::string_view jinja, std::string_view source) {
  const auto has = [&](std::string_view marker) { return jinja.find(marker) != std::string_view::npos; };
  if (has("<|im_start|>")) return {TemplateKind::ChatML, chatml_default_system(jinja)};
  if (has("<|start_header_id|>")) return {TemplateKind::Llama3, {}};
  if (has("[INST]")) return {has("<<SYS>>") ? TemplateKind::Llama2 : TemplateKind::Mistral, {}};
  if (has("### Instruction:")) return {TemplateKind::Alpaca, {}};
  TF_FAIL(source,
          ": the model's chat template is not one tightfit recognises (it looks for <|im_start|>, "
          "<|start_header_id|>, [INST], ### Instruction:); choose a format with --template (",
          kNameList, ")");
}

std::vector<Segment> render_example(const ChatTemplate& tmpl, const Example& ex, bool tokenizer_adds_bos) {
  if (ex.shape == Example::Shape::Text) {
    SegmentWriter w;
    w.add(ex.text, true, tokenizer_adds_bos, true);
    return w.take();
  }
  switch (tmpl.kind) {
    case TemplateKind::Plain:
    case TemplateKind::Alpaca:
      if (ex.shape == Example::Shape::Instruction)
        return render_alpaca(ex.instruction, ex.input, ex.output, tokenizer_adds_bos);
      if (ex.shape == Example::Shape::PromptCompletion) {
        if (tmpl.kind == TemplateKind::Alpaca)
          return render_alpaca(ex.prompt, {}, ex.completion, tokenizer_adds_bos);
        SegmentWriter w;
        w.add(ex.prompt, false, tokenizer_adds_bos);
        w.add(ex.completion, true, false, true);
        return w.take();
      }
      TF_FAIL("a {\"messages\"} record needs a chat template, but the format is '", template_name(tmpl.kind),
              "'; choose one with --template (chatml, llama3, llama2, mistral)");
    case TemplateKind::ChatML: return render_chatml(as_conversation(tmpl, ex));
    case TemplateKind::Llama3: return render_llama3(as_conversation(tmpl, ex));
    case TemplateKind::Llama2: return render_llama2(as_conversation(tmpl, ex));
    case TemplateKind::Mistral: return render_mistral(as_conversation(tmpl, ex));
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
