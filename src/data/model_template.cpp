// defines: the model's own chat template rendered into loss segments (src/data/model_template.h)
#include "src/data/model_template.h"

#include <algorithm>
#include <ctime>

#include "src/core/error.h"

namespace tf::data {
namespace {

// Removes each <think>...</think> block and the whitespace after it.
std::string strip_think(std::string_view s) {
  std::string out;
  size_t pos = 0;
  for (;;) {
    const size_t open = s.find("<think>", pos);
    if (open == std::string_view::npos) break;
    const size_t close = s.find("</think>", open);
    if (close == std::string_view::npos) break;
    out += s.substr(pos, open - pos);
    pos = close + 8;
    while (pos < s.size() && (s[pos] == ' ' || s[pos] == '\n' || s[pos] == '\t' || s[pos] == '\r')) ++pos;
  }
  out += s.substr(pos);
  return out;
}

size_t common_prefix(std::string_view a, std::string_view b) {
  const size_t n = std::min(a.size(), b.size());
  size_t k = 0;
  while (k < n && a[k] == b[k]) ++k;
  return k;
}

class Writer {
 public:
  void add(std::string_view text, bool trainable) {
    if (text.empty()) return;
    if (!segs_.empty() && segs_.back().trainable == trainable) {
      segs_.back().text += text;
      return;
    }
    segs_.push_back({std::string(text), trainable, false, false});
  }
  std::vector<Segment> take() { return std::move(segs_); }

 private:
  std::vector<Segment> segs_;
};

bool is_ws(char c) {
  return c == ' ' || c == '\n' || c == '\t' || c == '\r';
}

}  // namespace

ChatTemplate model_chat_template(std::string_view jinja, std::string source, std::string bos, std::string eos,
                                 ThinkMode think, std::time_t now) {
  auto t = std::make_shared<ModelTemplate>();
  t->jinja = std::make_shared<const jinja::Template>(jinja, std::move(source));
  t->bos_token = std::move(bos);
  t->eos_token = std::move(eos);
  t->think = think;
  t->now = now;
  ChatTemplate c;
  c.kind = TemplateKind::Model;
  c.model = std::move(t);
  return c;
}

ThinkMode think_mode_by_name(std::string_view name) {
  if (name == "keep") return ThinkMode::Keep;
  if (name == "strip") return ThinkMode::Strip;
  TF_FAIL("unknown --think mode '", name, "' (known: keep, strip)");
}

nlohmann::ordered_json template_context(const std::vector<Message>& msgs, std::string_view tools_json,
                                        bool add_generation_prompt, std::string_view bos,
                                        std::string_view eos) {
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  for (const Message& m : msgs) {
    nlohmann::ordered_json d = {{"role", m.role}, {"content", m.content}};
    if (!m.tool_calls.empty()) {
      nlohmann::ordered_json calls = nlohmann::ordered_json::array();
      for (const ToolCall& c : m.tool_calls) {
        nlohmann::ordered_json args;
        try {
          args = nlohmann::ordered_json::parse(c.arguments.empty() ? std::string("{}") : c.arguments);
        } catch (const nlohmann::json::exception& e) {
          TF_FAIL("the arguments of tool call '", c.name, "' are not JSON: ", e.what());
        }
        calls.push_back(
            {{"id", c.id}, {"type", "function"}, {"function", {{"name", c.name}, {"arguments", args}}}});
      }
      d["tool_calls"] = std::move(calls);
    }
    if (!m.tool_call_id.empty()) d["tool_call_id"] = m.tool_call_id;
    if (!m.name.empty()) d["name"] = m.name;
    messages.push_back(std::move(d));
  }
  nlohmann::ordered_json tools = nullptr;
  if (!tools_json.empty()) {
    try {
      tools = nlohmann::ordered_json::parse(tools_json);
    } catch (const nlohmann::json::exception& e) {
      TF_FAIL("the tools list is not JSON: ", e.what());
    }
    TF_CHECK(tools.is_array(), "the tools list must be a JSON array");
  }
  return {{"messages", std::move(messages)},
          {"tools", std::move(tools)},
          {"documents", nullptr},
          {"add_generation_prompt", add_generation_prompt},
          {"bos_token", bos},
          {"eos_token", eos}};
}

std::vector<Segment> render_model_template(const ModelTemplate& t, const std::vector<Message>& input,
                                           const std::string& tools_json, const LossOptions& loss) {
  TF_CHECK(t.jinja != nullptr, "internal: a model template without its Jinja text");
  std::vector<Message> msgs = input;
  if (t.think == ThinkMode::Strip)
    for (Message& m : msgs)
      if (m.role == "assistant") m.content = strip_think(m.content);
  const auto render = [&](size_t n, bool agp) {
    const std::vector<Message> prefix(msgs.begin(), msgs.begin() + long(n));
    return t.jinja->render(template_context(prefix, tools_json, agp, t.bos_token, t.eos_token), t.now);
  };
  // A template may refuse a prefix it would never see (no messages, a conversation ending in a
  // system turn); such a prefix shares nothing with the whole, and its text goes to the next turn.
  const auto prefix_text = [&](size_t n, bool agp) {
    try {
      return render(n, agp).text;
    } catch (const Error&) {
      return std::string();
    }
  };
  const jinja::Rendered full = render(msgs.size(), false);
  const std::string& text = full.text;

  // Who owns each byte: turn i's body, its end-of-turn marker, or the frame around it (header,
  // separators; `msgs.size()` for text before the first turn or after the last).
  enum Part : uint8_t { Frame, Body, End };
  std::vector<std::pair<Part, size_t>> owner(text.size(), {Frame, msgs.size()});
  if (t.jinja->has_generation_blocks()) {
    size_t turn = 0;
    for (const jinja::Span& s : full.generation) {
      while (turn < msgs.size() && msgs[turn].role != "assistant") ++turn;
      for (size_t k = s.begin; k < s.end; ++k) owner[k] = {Body, turn};
      if (turn < msgs.size()) ++turn;
    }
  } else {
    size_t prev_end = 0;
    for (size_t i = 0; i < msgs.size(); ++i) {
      const bool assistant = msgs[i].role == "assistant";
      const size_t begin = std::max(prev_end, common_prefix(text, prefix_text(i, assistant)));
      const size_t end = std::max(begin, common_prefix(text, prefix_text(i + 1, false)));
      for (size_t k = prev_end; k < begin; ++k) owner[k] = {Frame, i};
      // An assistant turn: its content, then the template's end-of-turn marker; whitespace after
      // the marker separates it from the next turn and is never generated, so it is frame.
      size_t marker = end;
      while (assistant && marker > begin && is_ws(text[marker - 1])) --marker;
      size_t body_end = marker;
      if (assistant) {
        const std::string_view content = msgs[i].content;
        const size_t c = content.find_first_not_of(" \n\t\r");
        if (c != std::string_view::npos) {
          const std::string_view core = content.substr(c, content.find_last_not_of(" \n\t\r") - c + 1);
          const size_t hit = std::string_view(text).substr(begin, marker - begin).rfind(core);
          if (hit != std::string_view::npos) body_end = begin + hit + core.size();
        }
      }
      for (size_t k = begin; k < end; ++k) owner[k] = {k < body_end ? Body : k < marker ? End : Frame, i};
      prev_end = end;
    }
  }

  Writer w;
  size_t start = 0;
  bool bos = false;
  if (!t.bos_token.empty() && text.starts_with(t.bos_token)) {
    // The BOS the template writes is the tokenizer's BOS id, which must not come twice.
    bos = true;
    start = t.bos_token.size();
  }
  for (size_t k = start; k < text.size();) {
    size_t e = k;
    while (e < text.size() && owner[e] == owner[k]) ++e;
    const auto [part, turn] = owner[k];
    const bool trained = part == Body  ? turn_trained(msgs, turn, loss)
                         : part == End ? end_trained(msgs, turn, loss)
                                       : frame_trained(msgs, turn, loss);
    w.add(std::string_view(text).substr(k, e - k), trained);
    k = e;
  }
  std::vector<Segment> segs = w.take();
  if (bos) {
    if (segs.empty()) segs.push_back({});
    segs.front().bos = true;
  }
  return segs;
}

}  // namespace tf::data
