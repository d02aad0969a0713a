// defines: tf::tok::make_decoder, tf::tok::prepend_scheme_of (HF tokenizers' decoders as steps over
// the list of token strings: ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip and Sequence,
// each as the library defines it, its oddities included: Metaspace drops every replacement
// character of the first token, Strip cuts each token)
#include <cctype>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "tokenizer/hf_pipeline.h"
#include "tokenizer/json_reader.h"
#include "tokenizer/utf8.h"

namespace tf::tok {
namespace {

using nlohmann::json;
using Tokens = std::vector<std::string>;

constexpr const char* kKnownDecoders = "ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, Sequence";
constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// The UTF-8 characters of a one-character string, as HF's `char` fields require.
std::string one_char(const JsonReader& rd, const json& j, const std::string& what) {
  const std::string s = rd.str(j, what);
  if (s.empty() || utf8_char_len(s, 0) != s.size())
    rd.fail(what + " '" + shown(s) + "' is not one character");
  return s;
}

struct Step {
  enum Kind { ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip } kind;
  explicit Step(Kind k) : kind(k) {}
  std::string content;  // Metaspace's replacement, Replace's content, Strip's character
  PrependScheme prepend = PrependScheme::Always;
  size_t start = 0, stop = 0;
  std::optional<ReplacePattern> pattern;
};

class Chain final : public Decoder {
 public:
  explicit Chain(std::vector<Step> steps) : steps_(std::move(steps)) {
    for (uint32_t b = 0; b < 256; ++b) byte_of_[byte_level_piece(uint8_t(b))] = uint8_t(b);
  }

  std::string decode(Tokens tokens, bool at_start) const override {
    for (const Step& st : steps_) {
      switch (st.kind) {
        case Step::ByteLevel: tokens = {byte_level(tokens)}; break;
        case Step::Metaspace: metaspace(st, at_start, tokens); break;
        case Step::Replace:
          for (std::string& t : tokens) t = st.pattern->replace_all(t, st.content);
          break;
        case Step::ByteFallback: tokens = byte_fallback(tokens); break;
        case Step::Fuse: tokens = {join(tokens, "")}; break;
        case Step::Strip:
          for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = strip(st, tokens[i], at_start || i > 0);
          break;
      }
    }
    return join(tokens, "");
  }

  static std::string join(const Tokens& tokens, std::string_view sep) {
    std::string out;
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (i > 0) out += sep;
      out += tokens[i];
    }
    return out;
  }

 private:
  // A token whose characters are all byte-level ones becomes those bytes; any other token keeps its
  // own text. Bytes that do not form UTF-8 stay as they are (HF would put U+FFFD in their place),
  // so that byte-level tokenizers give back any input, UTF-8 or not.
  std::string byte_level(const Tokens& tokens) const {
    std::string out;
    for (const std::string& t : tokens) {
      std::string bytes;
      bool all = true;
      for (size_t i = 0; i < t.size() && all;) {
        const size_t n = utf8_char_len(t, i);
        const auto it = n == 0 ? byte_of_.end() : byte_of_.find(t.substr(i, n));
        all = it != byte_of_.end();
        if (all) bytes += char(it->second);
        i += n == 0 ? 1 : n;
      }
      out += all ? bytes : t;
    }
    return out;
  }

  static void metaspace(const Step& st, bool at_start, Tokens& tokens) {
    for (size_t i = 0; i < tokens.size(); ++i) {
      const bool drop = i == 0 && at_start && st.prepend != PrependScheme::Never;
      std::string out;
      const std::string& t = tokens[i];
      for (size_t k = 0; k < t.size();) {
        if (t.compare(k, st.content.size(), st.content) == 0) {
          if (!drop) out += ' ';
          k += st.content.size();
        } else {
          out += t[k++];
        }
      }
      tokens[i] = std::move(out);
    }
  }

  // Runs of <0xNN> tokens become their bytes when those are UTF-8, else one U+FFFD per byte.
  static Tokens byte_fallback(const Tokens& tokens) {
    Tokens out;
    std::string run;
    size_t run_len = 0;
    const auto flush = [&] {
      if (run_len == 0) return;
      if (utf8_invalid_at(run) == std::string_view::npos) {
        out.push_back(run);
      } else {
        for (size_t k = 0; k < run_len; ++k) out.emplace_back(kReplacementChar);
      }
      run.clear();
      run_len = 0;
    };
    for (const std::string& t : tokens) {
      const bool byte = t.size() == 6 && t.starts_with("<0x") && t.ends_with('>') &&
                        std::isxdigit(uint8_t(t[3])) && std::isxdigit(uint8_t(t[4]));
      if (byte) {
        run += char(std::stoi(t.substr(3, 2), nullptr, 16));
        ++run_len;
        continue;
      }
      flush();
      out.push_back(t);
    }
    flush();
    return out;
  }

  // Up to `start` leading and `stop` trailing copies of the character, in characters.
  static std::string strip(const Step& st, const std::string& t, bool cut_start) {
    const std::string& c = st.content;
    size_t begin = 0, end = t.size();
    for (size_t k = 0; cut_start && k < st.start && t.compare(begin, c.size(), c) == 0; ++k)
      begin += c.size();
    for (size_t k = 0; k < st.stop && end >= begin + c.size() && t.compare(end - c.size(), c.size(), c) == 0;
         ++k)
      end -= c.size();
    return t.substr(begin, end - begin);
  }

  std::vector<Step> steps_;
  std::unordered_map<std::string, uint8_t> byte_of_;
};

// HF's decoder when the file has none: the token strings joined by single spaces.
class SpaceJoin final : public Decoder {
 public:
  std::string decode(Tokens tokens, bool) const override { return Chain::join(tokens, " "); }
};

size_t count(const JsonReader& rd, const json& j, const char* key) {
  const json& v = rd.field(j, key, "Strip decoder");
  if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<int64_t>() >= 0))
    rd.fail("Strip decoder \"" + std::string(key) + "\" = " + shown(v.dump()) +
            " is not a count (0 or more)");
  return size_t(v.get<uint64_t>());
}

void add_steps(const JsonReader& rd, const json& j, int depth, std::vector<Step>& out) {
  const std::string type = json_type_name(j);
  if (type == "ByteLevel") {
    out.emplace_back(Step::ByteLevel);
  } else if (type == "Metaspace") {
    Step st(Step::Metaspace);
    st.content =
        one_char(rd, rd.field(j, "replacement", "Metaspace decoder"), "Metaspace decoder replacement");
    st.prepend = prepend_scheme_of(j, rd.path);
    out.push_back(std::move(st));
  } else if (type == "Replace") {
    Step st(Step::Replace);
    st.pattern.emplace(rd, rd.field(j, "pattern", "Replace decoder"), "Replace decoder");
    st.content = rd.str(rd.field(j, "content", "Replace decoder"), "Replace decoder \"content\"");
    out.push_back(std::move(st));
  } else if (type == "ByteFallback") {
    out.emplace_back(Step::ByteFallback);
  } else if (type == "Fuse") {
    out.emplace_back(Step::Fuse);
  } else if (type == "Strip") {
    Step st(Step::Strip);
    st.content = one_char(rd, rd.field(j, "content", "Strip decoder"), "Strip decoder content");
    st.start = count(rd, j, "start");
    st.stop = count(rd, j, "stop");
    out.push_back(std::move(st));
  } else if (type == "Sequence") {
    if (depth >= kMaxSequenceDepth)
      rd.fail("decoder Sequences nest deeper than " + std::to_string(kMaxSequenceDepth) + " levels");
    for (const json& s : rd.array(j, "decoders", "Sequence decoder")) add_steps(rd, s, depth + 1, out);
  } else {
    rd.fail("decoder type '" + shown(type) + "' is not supported (known: " + kKnownDecoders + ")");
  }
}

}  // namespace

std::unique_ptr<const Decoder> make_decoder(const json& j, const std::string& source) {
  if (j.is_null()) return std::make_unique<SpaceJoin>();
  const JsonReader rd{source};
  std::vector<Step> steps;
  add_steps(rd, j, 0, steps);
  return std::make_unique<Chain>(std::move(steps));
}

PrependScheme prepend_scheme_of(const json& j, const std::string& source) {
  const JsonReader rd{source};
  std::optional<PrependScheme> scheme;
  if (j.contains("prepend_scheme") && !j["prepend_scheme"].is_null()) {
    const std::string s = rd.str(j["prepend_scheme"], "Metaspace prepend_scheme");
    if (s == "always")
      scheme = PrependScheme::Always;
    else if (s == "first")
      scheme = PrependScheme::First;
    else if (s == "never")
      scheme = PrependScheme::Never;
    else
      rd.fail("Metaspace prepend_scheme '" + shown(s) + "' is not one of always, first, never");
  }
  if (j.contains("add_prefix_space") && !j["add_prefix_space"].is_null()) {
    const bool add = rd.flag(j, "add_prefix_space", true);
    if (scheme && add != (*scheme != PrependScheme::Never))
      rd.fail("Metaspace add_prefix_space = " + std::string(add ? "true" : "false") +
              " contradicts its prepend_scheme '" + j["prepend_scheme"].get<std::string>() + "'");
    if (!scheme) scheme = add ? PrependScheme::Always : PrependScheme::Never;
  }
  return scheme.value_or(PrependScheme::Always);
}

}  // namespace tf::tok
