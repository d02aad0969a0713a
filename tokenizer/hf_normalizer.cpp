// defines: tf::tok::make_normalizer (HF tokenizers' normalizers: the Unicode forms through utf8proc,
// its tables, not ours; Lowercase as Rust's char::to_lowercase; Strip of Unicode white space;
// Prepend, Replace and Sequence)
#include <utf8proc.h>

#include <nlohmann/json.hpp>

#include "tokenizer/hf_pipeline.h"
#include "tokenizer/json_reader.h"
#include "tokenizer/utf8.h"

namespace tf::tok {
namespace {

using nlohmann::json;

constexpr const char* kKnownNormalizers =
    "NFC, NFD, NFKC, NFKD, Lowercase, Strip, Prepend, Replace, Sequence";

// Decodes the code point at text[i] (which the caller checked is well-formed UTF-8).
uint32_t code_point_at(std::string_view text, size_t i, size_t& len) {
  utf8proc_int32_t cp = 0;
  len = size_t(utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(text.data() + i),
                                utf8proc_ssize_t(text.size() - i), &cp));
  return uint32_t(cp);
}

// Rust's char::is_whitespace: the Unicode White_Space property, which is the separators (Zs, Zl,
// Zp) and the controls tab, line feed, vertical tab, form feed, carriage return and NEL.
bool is_white_space(uint32_t cp) {
  if ((cp >= 0x09 && cp <= 0x0D) || cp == 0x85) return true;
  const utf8proc_category_t c = utf8proc_category(utf8proc_int32_t(cp));
  return c == UTF8PROC_CATEGORY_ZS || c == UTF8PROC_CATEGORY_ZL || c == UTF8PROC_CATEGORY_ZP;
}

class Steps final : public Normalizer {
 public:
  struct Step {
    enum Kind { Unicode, Lowercase, Strip, Prepend, Replace } kind;
    explicit Step(Kind k, int options = 0) : kind(k), unicode_options(options) {}
    int unicode_options;
    bool left = false, right = false;
    std::string content;
    std::optional<ReplacePattern> pattern;
  };

  Steps(std::string source, std::vector<Step> steps) : source_(std::move(source)), steps_(std::move(steps)) {}

  std::string apply(std::string_view text) const override {
    std::string s(text);
    for (const Step& st : steps_) {
      switch (st.kind) {
        case Step::Unicode: s = unicode(s, st.unicode_options); break;
        case Step::Lowercase: s = lowercase(s); break;
        case Step::Strip: s = strip(s, st.left, st.right); break;
        case Step::Prepend:
          if (!s.empty()) s.insert(0, st.content);
          break;
        case Step::Replace: s = st.pattern->replace_all(s, st.content); break;
      }
    }
    return s;
  }

 private:
  void require_utf8(std::string_view s) const {
    const size_t bad = utf8_invalid_at(s);
    TF_CHECK(bad == std::string_view::npos, source_, ": text is not valid UTF-8 at byte ", bad,
             "; the tokenizer's normalizer works on UTF-8 text only");
  }

  std::string unicode(const std::string& s, int options) const {
    if (s.empty()) return s;
    require_utf8(s);
    utf8proc_uint8_t* out = nullptr;
    const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                            utf8proc_ssize_t(s.size()), &out, utf8proc_option_t(options));
    TF_CHECK(n >= 0, source_, ": Unicode normalization failed: ", utf8proc_errmsg(n));
    std::string r(reinterpret_cast<const char*>(out), size_t(n));
    std::free(out);
    return r;
  }

  // Per character, as HF's NormalizedString::lowercase does (so no final-sigma rule). utf8proc has
  // the simple (one code point) mappings; the one unconditional mapping of Unicode's
  // SpecialCasing.txt that lowercases to more than one code point, U+0130, is spelled out.
  std::string lowercase(const std::string& s) const {
    require_utf8(s);
    std::string r;
    r.reserve(s.size());
    for (size_t i = 0, n = 0; i < s.size(); i += n) {
      const uint32_t cp = code_point_at(s, i, n);
      if (cp == 0x130) {
        r += "i\xCC\x87";
        continue;
      }
      append_utf8(r, uint32_t(utf8proc_tolower(utf8proc_int32_t(cp))));
    }
    return r;
  }

  std::string strip(const std::string& s, bool left, bool right) const {
    require_utf8(s);
    size_t begin = 0, end = s.size();
    while (left && begin < end) {
      size_t n = 0;
      if (!is_white_space(code_point_at(s, begin, n))) break;
      begin += n;
    }
    while (right && end > begin) {
      size_t k = end - 1;
      while (k > begin && (uint8_t(s[k]) & 0xC0) == 0x80) --k;  // back to the lead byte
      size_t n = 0;
      if (!is_white_space(code_point_at(s, k, n))) break;
      end = k;
    }
    return s.substr(begin, end - begin);
  }

  std::string source_;
  std::vector<Steps::Step> steps_;
};

void add_steps(const JsonReader& rd, const json& j, int depth, std::vector<Steps::Step>& out) {
  const std::string type = json_type_name(j);
  using Step = Steps::Step;
  const auto unicode = [&](int options) { out.emplace_back(Step::Unicode, options | UTF8PROC_STABLE); };
  if (type == "NFC") {
    unicode(UTF8PROC_COMPOSE);
  } else if (type == "NFD") {
    unicode(UTF8PROC_DECOMPOSE);
  } else if (type == "NFKC") {
    unicode(UTF8PROC_COMPOSE | UTF8PROC_COMPAT);
  } else if (type == "NFKD") {
    unicode(UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT);
  } else if (type == "Lowercase") {
    out.emplace_back(Step::Lowercase);
  } else if (type == "Strip") {
    Step st(Step::Strip);
    st.left = rd.required_flag(j, "strip_left", "Strip normalizer");
    st.right = rd.required_flag(j, "strip_right", "Strip normalizer");
    out.push_back(std::move(st));
  } else if (type == "Prepend") {
    Step st(Step::Prepend);
    st.content = rd.str(rd.field(j, "prepend", "Prepend normalizer"), "Prepend normalizer \"prepend\"");
    out.push_back(std::move(st));
  } else if (type == "Replace") {
    Step st(Step::Replace);
    st.pattern.emplace(rd, rd.field(j, "pattern", "Replace normalizer"), "Replace normalizer");
    st.content = rd.str(rd.field(j, "content", "Replace normalizer"), "Replace normalizer \"content\"");
    out.push_back(std::move(st));
  } else if (type == "Sequence") {
    if (depth >= kMaxSequenceDepth)
      rd.fail("normalizer Sequences nest deeper than " + std::to_string(kMaxSequenceDepth) + " levels");
    for (const json& s : rd.array(j, "normalizers", "Sequence normalizer")) add_steps(rd, s, depth + 1, out);
  } else {
    rd.fail("normalizer type '" + shown(type) + "' is not supported (known: " + kKnownNormalizers + ")");
  }
}

}  // namespace

std::unique_ptr<const Normalizer> make_normalizer(const json& j, const std::string& source) {
  if (j.is_null()) return nullptr;
  const JsonReader rd{source};
  std::vector<Steps::Step> steps;
  add_steps(rd, j, 0, steps);
  if (steps.empty()) return nullptr;
  return std::make_unique<Steps>(source, std::move(steps));
}

}  // namespace tf::tok
