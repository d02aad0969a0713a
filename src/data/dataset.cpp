// JSONL records and their tokenisation. Every line is treated as hostile: its length is bounded
// while it is read, its bytes are checked as UTF-8 before JSON parsing (so the error can give the
// byte offset), nesting depth is bounded, and every field is checked for presence and type.
#include "src/data/dataset.h"

#include <sys/stat.h>

#include <algorithm>
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

using nlohmann::json;

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

std::vector<Message> parse_messages(const json& arr) {
  TF_CHECK(arr.is_array(), "field \"messages\" must be an array, not ", type_name(arr));
  TF_CHECK(!arr.empty(), "field \"messages\" is empty");
  std::vector<Message> out;
  out.reserve(arr.size());
  for (size_t i = 0; i < arr.size(); ++i) {
    const json& m = arr[i];
    const std::string where = " in messages[" + std::to_string(i) + "]";
    TF_CHECK(m.is_object(), "messages[", i, "] must be an object, not ", type_name(m));
    const std::string& role = string_field(m, "role", where);
    TF_CHECK(role == "system" || role == "user" || role == "assistant", "messages[", i, "] has role '", role,
             "' (known: system, user, assistant)");
    out.push_back({role, string_field(m, "content", where)});
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
  const bool has_pc = j.contains("prompt") || j.contains("completion");
  const bool has_inst = j.contains("instruction") || j.contains("output");
  const int shapes = int(has_text) + int(has_messages) + int(has_pc) + int(has_inst);
  TF_CHECK(shapes > 0,
           "no known fields: expected \"text\", \"prompt\"+\"completion\", \"messages\" or "
           "\"instruction\"+\"output\"");
  TF_CHECK(shapes == 1,
           "fields of more than one record shape (text, prompt/completion, messages, "
           "instruction/output) in one record");

  Example ex;
  if (has_text) {
    ex.shape = Example::Shape::Text;
    ex.text = string_field(j, "text", "");
  } else if (has_messages) {
    ex.shape = Example::Shape::Messages;
    ex.messages = parse_messages(j["messages"]);
  } else if (has_pc) {
    ex.shape = Example::Shape::PromptCompletion;
    ex.prompt = string_field(j, "prompt", "");
    ex.completion = string_field(j, "completion", "");
  } else {
    ex.shape = Example::Shape::Instruction;
    ex.instruction = string_field(j, "instruction", "");
    ex.output = string_field(j, "output", "");
    if (j.contains("input")) ex.input = string_field(j, "input", "");
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

void tokenize_segments(const std::vector<Segment>& segs, const tok::Tokenizer& tok, bool train_on_all,
                       size_t max_tokens, std::vector<int32_t>& ids, std::vector<uint8_t>& trainable) {
  const tok::EncodeOptions plain{.add_special = false, .parse_special = true};
  const auto push = [&](int32_t id, bool train) {
    ids.push_back(id);
    trainable.push_back(uint8_t(train || train_on_all));
  };
  for (size_t s = 0; s < segs.size() && ids.size() < max_tokens;) {
    if (segs[s].bos && tok.bos_id() >= 0) push(tok.bos_id(), false);
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
  TokenizedDataset out;
  std::vector<int32_t> ids;
  std::vector<uint8_t> train;
  for (const Example& ex : data.examples) {
    std::vector<Segment> segs;
    try {
      segs = render_example(tmpl, ex, tok.adds_bos());
    } catch (const Error& e) {
      if (!opt.skip_bad_lines) TF_FAIL(data.path, ":", ex.line, ": ", e.what());
      ++out.skipped_bad;
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
  TF_CHECK(out.size() > 0, data.path, ": no example is left to train on (", out.dropped_too_long,
           " longer than seq_len ", opt.seq_len, " had no trainable token within it, ", out.dropped_no_target,
           " had none at all, ", out.skipped_bad, " did not fit the '", template_name(tmpl.kind),
           "' template)");
  return out;
}

}  // namespace tf::data
