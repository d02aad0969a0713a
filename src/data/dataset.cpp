// JSONL records and their tokenisation. Every line is treated as hostile: its length is bounded
// while it is read, its bytes are checked as UTF-8 before JSON parsing (so the error can give the
// byte offset), nesting depth is bounded, and every field is checked for presence and type.
#include "src/data/dataset.h"

#include <sys/stat.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/utf8.h"

namespace tf::data {
namespace {

// Ordered: tool arguments and tools lists keep their key order, as the models' templates print them.
using json = nlohmann::ordered_json;

// Records are at most a few levels deep (object > messages > message); the bound keeps a line of
// nested brackets from costing more than it is worth.
constexpr int kMaxJsonDepth = 16;
constexpr size_t kKeptProblems = 5;
constexpr size_t kReadChunk = size_t(1) << 20;

// Reads lines in fixed-size chunks, so a line never grows past the bound before it is refused.
class LineReader {
 public:
  LineReader(const std::string& path, size_t max_line) : path_(path), max_line_(max_line), buf_(kReadChunk) {
    file_.reset(std::fopen(path.c_str(), "rb"));
    TF_CHECK(file_, path, ": cannot open: ", std::strerror(errno));
    // fopen accepts a directory on Linux; reading it would fail as if the file were empty.
    struct stat st {};
    TF_CHECK(::fstat(::fileno(file_.get()), &st) == 0, path, ": cannot stat: ", std::strerror(errno));
    TF_CHECK(!S_ISDIR(st.st_mode), path, ": is a directory, expected a JSONL file");
  }

  // The next line without its terminator. `too_long` when it exceeds the bound: reading stops
  // there, since a line without an end (a device, a binary file) would otherwise never be left.
  // False at the end of the file.
  bool next(std::string& line, bool& too_long) {
    line.clear();
    too_long = false;
    bool any = false;
    for (;;) {
      if (pos_ == len_) {
        len_ = std::fread(buf_.data(), 1, buf_.size(), file_.get());
        pos_ = 0;
        if (len_ == 0) {
          TF_CHECK(!std::ferror(file_.get()), path_, ": read error: ", std::strerror(errno));
          return any;
        }
      }
      any = true;
      const char* start = buf_.data() + pos_;
      const void* nl = std::memchr(start, '\n', len_ - pos_);
      const size_t n = nl ? size_t(static_cast<const char*>(nl) - start) : len_ - pos_;
      if (line.size() + n > max_line_) {
        too_long = true;
        line.clear();
        return true;
      }
      line.append(start, n);
      pos_ += n;
      if (nl) {
        ++pos_;
        return true;
      }
    }
  }

 private:
  struct Closer {
    void operator()(std::FILE* f) const { std::fclose(f); }
  };
  std::string path_;
  std::unique_ptr<std::FILE, Closer> file_;
  size_t max_line_;
  std::vector<char> buf_;
  size_t pos_ = 0, len_ = 0;
};

const char* type_name(const json& j) {
  return j.type_name();
}

const std::string& string_field(const json& obj, const char* key, const std::string& where) {
  const auto it = obj.find(key);
  TF_CHECK(it != obj.end(), "missing field \"", key, "\"", where);
  TF_CHECK(it->is_string(), "field \"", key, "\"", where, " must be a string, not ", type_name(*it));
  return it->get_ref<const std::string&>();
}

// JSON text of a value that is given either as JSON text in a string or as the JSON itself (tool
// arguments and tools lists come both ways), compact and in the record's key order. `what` names
// the field in errors; `want` is the JSON type the value must have.
std::string json_text(const json& v, const std::string& what, json::value_t want) {
  json parsed;
  if (v.is_string()) {
    parsed = json::parse(v.get_ref<const std::string&>(), nullptr, false);
    TF_CHECK(!parsed.is_discarded(), what, " is a string that is not valid JSON");
  } else {
    parsed = v;
  }
  TF_CHECK(parsed.type() == want, what, " must be ", want == json::value_t::object ? "an object" : "a list",
           " (or its JSON text), not ", type_name(parsed));
  return parsed.dump();
}

// A message's per-turn loss flag: "train": true|false, or "weight": 0|1 (the ShareGPT and
// axolotl spelling). Anything else would mean a weighted loss, which is not what training does.
int train_flag(const json& m, const std::string& where) {
  const auto train = m.find("train"), weight = m.find("weight");
  TF_CHECK(train == m.end() || weight == m.end(), where, " has both \"train\" and \"weight\"; give one");
  if (train != m.end()) {
    TF_CHECK(train->is_boolean(), where, ".train must be true or false, not ", train->dump());
    return train->get<bool>() ? 1 : 0;
  }
  if (weight != m.end()) {
    TF_CHECK(weight->is_number() && (weight->get<double>() == 0 || weight->get<double>() == 1), where,
             ".weight must be 0 or 1, not ", weight->dump(),
             " (a turn is trained or not; weighted turns are not supported)");
    return weight->get<double>() == 1 ? 1 : 0;
  }
  return -1;
}

ToolCall parse_tool_call(const json& c, const std::string& where) {
  TF_CHECK(c.is_object(), where, " must be an object, not ", type_name(c));
  ToolCall call;
  const auto id = c.find("id");
  if (id != c.end()) {
    TF_CHECK(id->is_string(), where, ".id must be a string, not ", type_name(*id));
    call.id = id->get<std::string>();
  }
  const auto type = c.find("type");
  if (type != c.end())
    TF_CHECK(type->is_string() && type->get_ref<const std::string&>() == "function", where,
             ".type must be \"function\", not ", type->dump());
  const auto fn = c.find("function");
  TF_CHECK(fn != c.end(), where, " has no \"function\"");
  TF_CHECK(fn->is_object(), where, ".function must be an object, not ", type_name(*fn));
  const auto name = fn->find("name");
  TF_CHECK(name != fn->end(), where, ".function has no \"name\"");
  TF_CHECK(name->is_string() && !name->get_ref<const std::string&>().empty(), where,
           ".function.name must be a non-empty string, not ", name->dump());
  call.name = name->get<std::string>();
  const auto args = fn->find("arguments");
  TF_CHECK(args != fn->end(), where, ".function has no \"arguments\"");
  call.arguments = json_text(*args, where + ".function.arguments", json::value_t::object);
  return call;
}

// The content of an OpenAI message: a string, or a list of {"type": "text", "text"} parts, joined.
// Null is allowed where `may_be_null` (an assistant turn that only calls tools).
std::string message_content(const json& m, const std::string& where, bool may_be_null) {
  const auto it = m.find("content");
  TF_CHECK(it != m.end(), "missing field \"content\" in ", where);
  if (it->is_string()) return it->get<std::string>();
  if (it->is_null() && may_be_null) return {};
  TF_CHECK(it->is_array(), "field \"content\" in ", where, " must be a string or a list of text parts, not ",
           type_name(*it), may_be_null ? "" : " (null content is for an assistant turn with tool_calls)");
  std::string text;
  for (size_t p = 0; p < it->size(); ++p) {
    const json& part = (*it)[p];
    const std::string at = where + ".content[" + std::to_string(p) + "]";
    TF_CHECK(part.is_object(), at, " must be an object, not ", type_name(part));
    const auto type = part.find("type");
    TF_CHECK(type != part.end() && type->is_string(), at, " has no \"type\" string");
    TF_CHECK(type->get_ref<const std::string&>() == "text", at, ".type '",
             type->get_ref<const std::string&>(),
             "' is not supported (only \"text\" parts: tightfit trains on text)");
    const auto t = part.find("text");
    TF_CHECK(t != part.end() && t->is_string(), at, ".text must be a string");
    text += t->get_ref<const std::string&>();
  }
  return text;
}

std::vector<Message> parse_messages(const json& arr) {
  TF_CHECK(arr.is_array(), "field \"messages\" must be an array, not ", type_name(arr));
  TF_CHECK(!arr.empty(), "field \"messages\" is empty");
  std::vector<Message> out;
  out.reserve(arr.size());
  for (size_t i = 0; i < arr.size(); ++i) {
    const json& m = arr[i];
    const std::string at = "messages[" + std::to_string(i) + "]";
    TF_CHECK(m.is_object(), at, " must be an object, not ", type_name(m));
    const std::string& role = string_field(m, "role", " in " + at);
    TF_CHECK(role == "system" || role == "user" || role == "assistant" || role == "tool", at, " has role '",
             role, "' (known: system, user, assistant, tool)");
    Message msg;
    msg.role = role;
    const auto calls = m.find("tool_calls");
    if (calls != m.end() && !calls->is_null()) {
      TF_CHECK(role == "assistant", at, " has tool_calls but role '", role,
               "' (only assistant turns call tools)");
      TF_CHECK(calls->is_array() && !calls->empty(), at, ".tool_calls must be a non-empty list, not ",
               calls->dump());
      for (size_t c = 0; c < calls->size(); ++c)
        msg.tool_calls.push_back(parse_tool_call((*calls)[c], at + ".tool_calls[" + std::to_string(c) + "]"));
    }
    if (role == "tool") {
      for (const char* key : {"tool_call_id", "name"}) {
        const auto it = m.find(key);
        if (it == m.end()) continue;
        TF_CHECK(it->is_string(), at, ".", key, " must be a string, not ", type_name(*it));
        (key[0] == 'n' ? msg.name : msg.tool_call_id) = it->get<std::string>();
      }
    }
    msg.content = message_content(m, at, !msg.tool_calls.empty());
    msg.train = train_flag(m, at);
    out.push_back(std::move(msg));
  }
  return out;
}

// ShareGPT's speakers, and the role each becomes.
constexpr std::array<std::pair<std::string_view, std::string_view>, 9> kShareGptFrom = {{
    {"human", "user"},
    {"user", "user"},
    {"gpt", "assistant"},
    {"assistant", "assistant"},
    {"system", "system"},
    {"function_call", "assistant"},
    {"observation", "tool"},
    {"tool", "tool"},
    {"function_response", "tool"},
}};

// A ShareGPT function_call turn's value: the JSON text of one call {"name", "arguments"} or of a
// list of them (LLaMA-Factory's format).
std::vector<ToolCall> sharegpt_calls(const std::string& value, const std::string& at) {
  const json v = json::parse(value, nullptr, false);
  TF_CHECK(!v.is_discarded(), at,
           ".value of a function_call turn must be the JSON text of a call "
           "{\"name\", \"arguments\"}, and is not valid JSON");
  TF_CHECK(v.is_object() || (v.is_array() && !v.empty()), at,
           ".value of a function_call turn must be a call {\"name\", \"arguments\"} or a list of them, not ",
           type_name(v));
  std::vector<ToolCall> calls;
  const auto one = [&](const json& c, const std::string& where) {
    TF_CHECK(c.is_object(), where, " must be an object {\"name\", \"arguments\"}, not ", type_name(c));
    const auto name = c.find("name");
    TF_CHECK(name != c.end() && name->is_string() && !name->get_ref<const std::string&>().empty(), where,
             " needs a non-empty string \"name\"");
    const auto args = c.find("arguments");
    TF_CHECK(args != c.end(), where, " has no \"arguments\"");
    calls.push_back(
        {{}, name->get<std::string>(), json_text(*args, where + ".arguments", json::value_t::object)});
  };
  if (v.is_object()) {
    one(v, at + ".value");
  } else {
    for (size_t c = 0; c < v.size(); ++c) one(v[c], at + ".value[" + std::to_string(c) + "]");
  }
  return calls;
}

std::vector<Message> parse_conversations(const json& j) {
  const json& arr = j["conversations"];
  TF_CHECK(arr.is_array(), "field \"conversations\" must be an array, not ", type_name(arr));
  TF_CHECK(!arr.empty(), "field \"conversations\" is empty");
  std::vector<Message> out;
  if (j.contains("system")) {
    const json& sys = j["system"];
    TF_CHECK(sys.is_string(), "field \"system\" must be a string, not ", type_name(sys));
    if (!sys.get_ref<const std::string&>().empty()) out.emplace_back("system", sys.get<std::string>());
  }
  for (size_t i = 0; i < arr.size(); ++i) {
    const json& turn = arr[i];
    const std::string at = "conversations[" + std::to_string(i) + "]";
    TF_CHECK(turn.is_object(), at, " must be an object, not ", type_name(turn));
    const auto from = turn.find("from");
    TF_CHECK(from != turn.end(), at, " has no \"from\"");
    TF_CHECK(from->is_string(), at, ".from must be a string, not ", type_name(*from));
    const std::string& who = from->get_ref<const std::string&>();
    const auto known = std::find_if(kShareGptFrom.begin(), kShareGptFrom.end(),
                                    [&](const auto& p) { return p.first == who; });
    TF_CHECK(known != kShareGptFrom.end(), at, ".from '", who,
             "' is not one of human, user, gpt, assistant, system, function_call, observation, tool, "
             "function_response");
    const auto value = turn.find("value");
    TF_CHECK(value != turn.end(), at, " has no \"value\"");
    TF_CHECK(value->is_string(), at, ".value must be a string, not ", type_name(*value));
    Message msg;
    msg.role = std::string(known->second);
    if (who == "function_call") {
      msg.tool_calls = sharegpt_calls(value->get<std::string>(), at);
    } else {
      msg.content = value->get<std::string>();
    }
    TF_CHECK(msg.role != "system" || out.empty(), at,
             " is a system turn after the start of the conversation (or beside a top-level \"system\")");
    msg.train = train_flag(turn, at);
    out.push_back(std::move(msg));
  }
  return out;
}

// A record's top-level "tools": the list of function definitions the conversation may call, as a
// list or its JSON text (ShareGPT datasets store the text).
std::string parse_tools(const json& j) {
  const auto it = j.find("tools");
  if (it == j.end() || it->is_null()) return {};
  std::string text = json_text(*it, "field \"tools\"", json::value_t::array);
  return text == "[]" ? std::string() : text;
}

// Alpaca's optional "system" and "history" ([[instruction, output], ...]): the turns before the
// record's own instruction.
std::vector<Message> alpaca_context(const json& j) {
  std::vector<Message> out;
  if (j.contains("system")) {
    const json& sys = j["system"];
    TF_CHECK(sys.is_string(), "field \"system\" must be a string, not ", type_name(sys));
    if (!sys.get_ref<const std::string&>().empty()) out.emplace_back("system", sys.get<std::string>());
  }
  if (j.contains("history")) {
    const json& h = j["history"];
    TF_CHECK(h.is_array(), "field \"history\" must be a list of [instruction, output] pairs, not ",
             type_name(h));
    for (size_t i = 0; i < h.size(); ++i) {
      const json& pair = h[i];
      TF_CHECK(pair.is_array() && pair.size() == 2 && pair[0].is_string() && pair[1].is_string(), "history[",
               i, "] must be a pair of strings [instruction, output], not ", pair.dump());
      out.emplace_back("user", pair[0].get<std::string>());
      out.emplace_back("assistant", pair[1].get<std::string>());
    }
  }
  return out;
}

bool is_blank(std::string_view s) {
  return s.find_first_not_of(" \t\r") == std::string_view::npos;
}

// Longest common prefix of two id sequences.
size_t common_prefix(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  size_t n = 0;
  while (n < a.size() && n < b.size() && a[n] == b[n]) ++n;
  return n;
}

}  // namespace

Example parse_record(std::string_view line) {
  const size_t bad = tok::utf8_invalid_at(line);
  TF_CHECK(bad == std::string_view::npos, "invalid UTF-8 at byte ", bad);
  json j;
  try {
    j = json::parse(line, [](int depth, json::parse_event_t, json&) {
      TF_CHECK(depth <= kMaxJsonDepth, "JSON nested deeper than ", kMaxJsonDepth, " levels");
      return true;
    });
  } catch (const json::exception& e) {
    TF_FAIL("malformed JSON: ", e.what());
  }
  TF_CHECK(j.is_object(), "expected a JSON object, got ", type_name(j));

  const bool has_text = j.contains("text"), has_messages = j.contains("messages");
  const bool has_sharegpt = j.contains("conversations");
  const bool has_pc = j.contains("prompt") || j.contains("completion");
  const bool has_inst = j.contains("instruction") || j.contains("output");
  const int shapes = int(has_text) + int(has_messages) + int(has_sharegpt) + int(has_pc) + int(has_inst);
  TF_CHECK(
      shapes > 0,
      "no known fields: expected \"text\", \"prompt\"+\"completion\", \"messages\", \"conversations\" or "
      "\"instruction\"+\"output\"");
  TF_CHECK(shapes == 1,
           "fields of more than one record shape (text, prompt/completion, messages, conversations, "
           "instruction/output) in one record");

  Example ex;
  if (has_text) {
    ex.shape = Example::Shape::Text;
    ex.text = string_field(j, "text", "");
  } else if (has_messages || has_sharegpt) {
    ex.shape = Example::Shape::Messages;
    ex.messages = has_messages ? parse_messages(j["messages"]) : parse_conversations(j);
    ex.tools = parse_tools(j);
  } else if (has_pc) {
    ex.shape = Example::Shape::PromptCompletion;
    ex.prompt = string_field(j, "prompt", "");
    ex.completion = string_field(j, "completion", "");
  } else {
    ex.shape = Example::Shape::Instruction;
    ex.instruction = string_field(j, "instruction", "");
    ex.output = string_field(j, "output", "");
    if (j.contains("input")) ex.input = string_field(j, "input", "");
    ex.messages = alpaca_context(j);
  }
  return ex;
}

Dataset load_jsonl(const std::string& path, const LoadOptions& opt) {
  Dataset ds;
  ds.path = path;
  LineReader reader(path, opt.max_line_bytes);
  std::string line;
  bool too_long = false;
  size_t lineno = 0;
  for (; reader.next(line, too_long);) {
    ++lineno;
    // Fatal even under skip_bad_lines: where such a line ends is unknown, so nothing after it can
    // be read.
    TF_CHECK(!too_long, path, ":", lineno, ": line is longer than ", opt.max_line_bytes,
             " bytes, the limit for one record; stopped reading there");
    std::string_view text(line);
    if (lineno == 1 && text.starts_with("\xEF\xBB\xBF")) text.remove_prefix(3);  // a UTF-8 byte-order mark
    if (!text.empty() && text.back() == '\r') text.remove_suffix(1);
    if (is_blank(text)) continue;
    try {
      Example ex = parse_record(text);
      ex.line = lineno;
      ds.examples.push_back(std::move(ex));
    } catch (const Error& e) {
      const std::string msg = path + ":" + std::to_string(lineno) + ": " + e.what();
      if (!opt.skip_bad_lines) throw Error(msg);
      ++ds.skipped_lines;
      if (ds.first_problems.size() < kKeptProblems) ds.first_problems.push_back(msg);
    }
  }
  if (ds.examples.empty()) {
    TF_CHECK(ds.skipped_lines == 0, path, ": no valid examples: all ", ds.skipped_lines,
             " non-blank lines were bad (first: ", ds.first_problems.front(), ")");
    TF_FAIL(path, ": no examples (the file is empty or holds only blank lines)");
  }
  return ds;
}

size_t TokenizedDataset::trainable_tokens() const {
  size_t n = 0;
  for (const uint8_t t : trainable) n += t;
  return n;
}

void tokenize_segments(const std::vector<Segment>& segs, const tok::Tokenizer& tok, bool bos_in_loss,
                       size_t max_tokens, std::vector<int32_t>& ids, std::vector<uint8_t>& trainable) {
  const tok::EncodeOptions plain{.add_special = false, .parse_special = true};
  const auto push = [&](int32_t id, bool train) {
    ids.push_back(id);
    trainable.push_back(uint8_t(train));
  };
  for (size_t s = 0; s < segs.size() && ids.size() < max_tokens;) {
    if (segs[s].bos && tok.bos_id() >= 0) push(tok.bos_id(), bos_in_loss && segs[s].trainable);
    // A run: segments up to the next EOS or BOS, encoded as one text.
    size_t e = s;
    std::string text = segs[e].text;
    std::vector<size_t> ends{text.size()};
    while (!segs[e].eos && e + 1 < segs.size() && !segs[e + 1].bos) {
      ++e;
      text += segs[e].text;
      ends.push_back(text.size());
    }
    const std::vector<int32_t> full = tok.encode(text, plain);
    const size_t run_start = ids.size();
    size_t from = 0;
    for (size_t k = s; k <= e; ++k) {
      size_t to = full.size();
      // Past max_tokens the boundary no longer matters (the rest is truncated away).
      if (k < e && run_start + from < max_tokens)
        to = std::max(from,
                      common_prefix(tok.encode(std::string_view(text).substr(0, ends[k - s]), plain), full));
      for (size_t i = from; i < to; ++i) push(full[i], segs[k].trainable);
      from = to;
    }
    if (segs[e].eos && tok.eos_id() >= 0) push(tok.eos_id(), segs[e].trainable);
    s = e + 1;
  }
}

TokenizedDataset tokenize_dataset(const Dataset& data, const ChatTemplate& tmpl, const tok::Tokenizer& tok,
                                  const TokenizeOptions& opt) {
  TF_CHECK(opt.seq_len >= 2, "seq_len must be at least 2 (one token and the next to predict), not ",
           opt.seq_len);
  TF_CHECK(!(opt.train_on_all && opt.mask_history),
           "--mask-history trains only the last assistant turn and --train-on all every token; choose one");
  const LossOptions loss{.all = opt.train_on_all, .mask_history = opt.mask_history, .eos = opt.train_on_eos};
  TokenizedDataset out;
  std::vector<int32_t> ids;
  std::vector<uint8_t> train;
  for (const Example& ex : data.examples) {
    std::vector<Segment> segs;
    try {
      segs = render_example(tmpl, ex, tok.adds_bos(), loss);
    } catch (const Error& e) {
      std::string msg = data.path + ":" + std::to_string(ex.line) + ": " + e.what();
      if (!opt.skip_bad_lines) throw Error(std::move(msg));
      ++out.skipped_bad;
      if (out.first_problems.size() < kKeptProblems) out.first_problems.push_back(std::move(msg));
      continue;
    }
    ids.clear();
    train.clear();
    tokenize_segments(segs, tok, opt.train_on_all, opt.seq_len + 1, ids, train);
    const bool too_long = ids.size() > opt.seq_len;
    if (too_long) {
      ids.resize(opt.seq_len);
      train.resize(opt.seq_len);
    }
    // The first token is never predicted, so it alone does not make an example trainable.
    bool any = false;
    for (size_t i = 1; i < train.size() && !any; ++i) any = train[i] != 0;
    if (!any) {
      ++(too_long ? out.dropped_too_long : out.dropped_no_target);
      continue;
    }
    if (too_long) ++out.truncated;
    out.ids.insert(out.ids.end(), ids.begin(), ids.end());
    out.trainable.insert(out.trainable.end(), train.begin(), train.end());
    out.offsets.push_back(out.ids.size());
  }
  TF_CHECK(out.size() > 0 || opt.allow_empty, data.path, ": no example is left to train on (",
           out.dropped_too_long, " longer than seq_len ", opt.seq_len, " had no trainable token within it, ",
           out.dropped_no_target, " had none at all, ", out.skipped_bad, " did not fit the '",
           template_name(tmpl.kind), "' template)");
  return out;
}

}  // namespace tf::data
