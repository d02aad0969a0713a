// defines: the Jinja engine behind tf::data::jinja::Template: a lexer that applies jinja2's whitespace
// rules (trim_blocks, lstrip_blocks, '-' and '+'), a recursive-descent parser to a small tree, and an
// evaluator over Python-like values, each step bounded by jinja::Limits.
#include "src/data/jinja.h"

#include <utf8proc.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <unordered_map>

#include "src/core/error.h"
#include "tokenizer/utf8.h"

namespace tf::data::jinja {
namespace {

// ---------------------------------------------------------------------------------------------
// Values: Python's, as far as chat templates see them. Lists and dicts are shared and never
// modified once built (transformers renders in jinja2's immutable sandbox); namespaces are the
// one mutable kind.

struct Value;
using Array = std::vector<Value>;
struct Dict {
  std::vector<std::pair<std::string, Value>> items;
  const Value* find(std::string_view key) const;
  void set(const std::string& key, Value v);
};
struct Interp;
struct Pos {
  int line = 1, col = 1;
};
struct CallArgs;
using Function = std::function<Value(Interp&, CallArgs&, Pos)>;

struct Value {
  enum class Kind { Undefined, None, Bool, Int, Float, Str, List, Dict, Namespace, Func };
  Kind kind = Kind::Undefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;  // Str; Undefined: the name that was not defined; Func: the function's name
  std::shared_ptr<const Array> list;
  std::shared_ptr<Dict> dict;  // Dict (never modified once built) and Namespace
  std::shared_ptr<const Function> fn;
  // Str: a markupsafe.Markup (from |safe), which escapes a plain string added to it. List: a Python
  // generator (what select, map, items, reverse and their kind return), which has no len(), no
  // index and no JSON form, and is true even when empty.
  bool flag = false;
  bool tuple = false;  // List: a Python tuple, which only prints differently

  static Value undefined(std::string what) {
    Value v;
    v.s = std::move(what);
    return v;
  }
  static Value none() { return make(Kind::None); }
  static Value boolean(bool x) {
    Value v = make(Kind::Bool);
    v.b = x;
    return v;
  }
  static Value integer(int64_t x) {
    Value v = make(Kind::Int);
    v.i = x;
    return v;
  }
  static Value real(double x) {
    Value v = make(Kind::Float);
    v.f = x;
    return v;
  }
  static Value str(std::string x) {
    Value v = make(Kind::Str);
    v.s = std::move(x);
    return v;
  }
  static Value of_list(Array l) {
    Value v = make(Kind::List);
    v.list = std::make_shared<const Array>(std::move(l));
    return v;
  }
  static Value of_dict(Dict d, Kind k = Kind::Dict) {
    Value v = make(k);
    v.dict = std::make_shared<Dict>(std::move(d));
    return v;
  }
  static Value func(std::string name, Function f) {
    Value v = make(Kind::Func);
    v.s = std::move(name);
    v.fn = std::make_shared<const Function>(std::move(f));
    return v;
  }
  bool is(Kind k) const { return kind == k; }
  bool is_undefined() const { return kind == Kind::Undefined; }
  bool is_number() const { return kind == Kind::Int || kind == Kind::Float || kind == Kind::Bool; }
  bool is_str() const { return kind == Kind::Str; }
  bool is_list() const { return kind == Kind::List; }
  bool is_mapping() const { return kind == Kind::Dict || kind == Kind::Namespace; }
  double as_double() const { return kind == Kind::Float ? f : double(kind == Kind::Bool ? int64_t(b) : i); }

 private:
  static Value make(Kind k) {
    Value v;
    v.kind = k;
    return v;
  }
};

const Value* Dict::find(std::string_view key) const {
  for (const auto& [k, v] : items)
    if (k == key) return &v;
  return nullptr;
}

void Dict::set(const std::string& key, Value v) {
  for (auto& [k, old] : items)
    if (k == key) {
      old = std::move(v);
      return;
    }
  items.emplace_back(key, std::move(v));
}

struct CallArgs {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
};

// An error inside the engine; the statement or expression it happened in adds its position, and the
// Template turns it into a tf::Error naming the template.
struct EvalError {
  std::string msg;
  size_t at = 0;
  bool located = false;
};

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  throw EvalError{tf::detail::concat(args...)};
}

[[noreturn]] void fail_at(size_t at, const std::string& msg) {
  throw EvalError{msg, at, true};
}

[[noreturn]] void fail_undefined(const Value& v) {
  fail(v.s.empty() ? std::string("a value is undefined") : "'" + v.s + "' is undefined");
}

const char* type_name(const Value& v) {
  switch (v.kind) {
    case Value::Kind::Undefined: return "undefined";
    case Value::Kind::None: return "NoneType";
    case Value::Kind::Bool: return "bool";
    case Value::Kind::Int: return "int";
    case Value::Kind::Float: return "float";
    case Value::Kind::Str: return "str";
    case Value::Kind::List: return "list";
    case Value::Kind::Dict: return "dict";
    case Value::Kind::Namespace: return "Namespace";
    case Value::Kind::Func: return "function";
  }
  return "?";
}

bool truthy(const Value& v) {
  switch (v.kind) {
    case Value::Kind::Undefined:
    case Value::Kind::None: return false;
    case Value::Kind::Bool: return v.b;
    case Value::Kind::Int: return v.i != 0;
    case Value::Kind::Float: return v.f != 0;
    case Value::Kind::Str: return !v.s.empty();
    case Value::Kind::List: return v.flag || !v.list->empty();
    case Value::Kind::Dict: return !v.dict->items.empty();
    case Value::Kind::Namespace:
    case Value::Kind::Func: return true;
  }
  return false;
}

// ---- UTF-8: Python indexes, slices and measures strings in code points.

bool is_ascii(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return (unsigned char)c < 0x80; });
}

// Byte offsets of each code point's start, plus the end.
std::vector<size_t> code_point_starts(std::string_view s) {
  std::vector<size_t> at;
  for (size_t i = 0; i < s.size(); ++i)
    if (((unsigned char)s[i] & 0xC0) != 0x80) at.push_back(i);
  at.push_back(s.size());
  return at;
}

size_t code_points(std::string_view s) {
  if (is_ascii(s)) return s.size();
  return code_point_starts(s).size() - 1;
}

// Python's str.isspace() for the characters templates meet: ASCII whitespace and the separators
// \x1c-\x1f; other Unicode spaces are left alone (no template strips them).
bool is_space(char c) {
  return c == ' ' || (c >= '\t' && c <= '\r') || (c >= '\x1c' && c <= '\x1f');
}

std::string strip_chars(std::string_view s, bool left, bool right, const Value* chars) {
  const auto drop = [&](char c) {
    if (chars == nullptr || chars->is(Value::Kind::None)) return is_space(c);
    return chars->s.find(c) != std::string::npos;
  };
  size_t b = 0, e = s.size();
  if (left)
    while (b < e && drop(s[b])) ++b;
  if (right)
    while (e > b && drop(s[e - 1])) --e;
  return std::string(s.substr(b, e - b));
}

char ascii_lower(char c) {
  return c >= 'A' && c <= 'Z' ? char(c - 'A' + 'a') : c;
}

// Python's str casing, code point by code point with Unicode's simple (one-to-one) case mappings
// from utf8proc: 'é'.upper() is 'É' as in Python; the few one-to-many mappings Python applies as well
// ('ß'.upper() is 'SS') keep their one-to-one result ('ß'). Bytes that are not UTF-8 pass through.
enum class Case { Lower, Upper, Title };
utf8proc_int32_t to_case(utf8proc_int32_t cp, Case c) {
  switch (c) {
    case Case::Lower: return utf8proc_tolower(cp);
    case Case::Upper: return utf8proc_toupper(cp);
    case Case::Title: return utf8proc_totitle(cp);
  }
  return cp;
}
bool is_cased(utf8proc_int32_t cp) {
  const utf8proc_category_t cat = utf8proc_category(cp);
  return cat == UTF8PROC_CATEGORY_LU || cat == UTF8PROC_CATEGORY_LL || cat == UTF8PROC_CATEGORY_LT;
}
// The code point starting at s[i] and its length in bytes; a length <= 0 where s[i] starts no
// valid UTF-8 sequence.
utf8proc_ssize_t code_point_at(std::string_view s, size_t i, utf8proc_int32_t& cp) {
  return utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i),
                          utf8proc_ssize_t(s.size() - i), &cp);
}
// Maps each code point of s by `pick(index, previous code point cased)`.
template <typename Pick>
std::string map_case(std::string_view s, Pick pick) {
  std::string out;
  out.reserve(s.size());
  bool prev_cased = false;
  for (size_t i = 0, n = 0; i < s.size(); ++n) {
    utf8proc_int32_t cp = 0;
    const utf8proc_ssize_t len = code_point_at(s, i, cp);
    if (len <= 0) {
      out += s[i++];
      prev_cased = false;
      continue;
    }
    utf8proc_uint8_t buf[4];
    const utf8proc_ssize_t w = utf8proc_encode_char(to_case(cp, pick(n, prev_cased)), buf);
    out.append(reinterpret_cast<const char*>(buf), size_t(w));
    prev_cased = is_cased(cp);
    i += size_t(len);
  }
  return out;
}

std::string lower(std::string_view s) {
  return map_case(s, [](size_t, bool) { return Case::Lower; });
}
std::string upper(std::string_view s) {
  return map_case(s, [](size_t, bool) { return Case::Upper; });
}
// Python's str.title(): a cased character after an uncased one starts a word.
std::string title(std::string_view s) {
  return map_case(s, [](size_t, bool prev_cased) { return prev_cased ? Case::Lower : Case::Title; });
}
// Python's str.capitalize() (3.8 on): the first character in title case, the rest lower.
std::string capitalize(std::string_view s) {
  return map_case(s, [](size_t n, bool) { return n == 0 ? Case::Title : Case::Lower; });
}

std::string replace_all(std::string_view s, std::string_view from, std::string_view to, int64_t count) {
  std::string out;
  if (from.empty()) {
    // Python inserts `to` between every code point and at both ends.
    const std::vector<size_t> at = code_point_starts(s);
    int64_t n = 0;
    for (size_t k = 0; k + 1 < at.size(); ++k) {
      if (count < 0 || n < count) out += to, ++n;
      out += s.substr(at[k], at[k + 1] - at[k]);
    }
    if (count < 0 || n < count) out += to;
    return out;
  }
  size_t pos = 0;
  int64_t n = 0;
  while (count < 0 || n < count) {
    const size_t hit = s.find(from, pos);
    if (hit == std::string_view::npos) break;
    out += s.substr(pos, hit - pos);
    out += to;
    pos = hit + from.size();
    ++n;
  }
  out += s.substr(pos);
  return out;
}

// Dict keys are strings, or integers (a dict literal's) kept as \x01 and their digits.
std::string dict_key(const Value& k) {
  if (k.is_str()) return k.s;
  if (k.is(Value::Kind::Int)) return "\x01" + std::to_string(k.i);
  if (k.is_undefined()) fail_undefined(k);
  fail("dict keys must be strings or integers here, not '", type_name(k), "'");
}

Value key_value(const std::string& k) {
  if (!k.empty() && k[0] == '\x01') return Value::integer(std::stoll(k.substr(1)));
  return Value::str(k);
}

// ---- Python's str() and repr().

std::string float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  char buf[64];
  // Python writes the shortest digits that read back, positional for exponents in [-4, 16).
  const int exp10 = d == 0 ? 0 : int(std::floor(std::log10(std::fabs(d))));
  std::to_chars_result r = exp10 < -4 || exp10 >= 16
                               ? std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific)
                               : std::to_chars(buf, buf + sizeof buf, d, std::chars_format::fixed);
  std::string s(buf, r.ptr);
  const size_t e = s.find('e');
  if (e == std::string::npos) {
    if (s.find('.') == std::string::npos) s += ".0";
    return s;
  }
  // C++ writes e+16 / e-05; Python e+16 / e-05 as well, but drops a lone ".0" mantissa.
  std::string mant = s.substr(0, e), ex = s.substr(e + 1);
  const char sign = ex[0] == '-' ? '-' : '+';
  if (ex[0] == '+' || ex[0] == '-') ex = ex.substr(1);
  while (ex.size() > 2 && ex[0] == '0') ex = ex.substr(1);
  if (ex.size() < 2) ex = "0" + ex;
  return mant + "e" + sign + ex;
}

std::string py_repr(const Value& v);

std::string str_repr(std::string_view s) {
  const bool dq = s.find('\'') != std::string_view::npos && s.find('"') == std::string_view::npos;
  const char q = dq ? '"' : '\'';
  std::string out(1, q);
  for (char c : s) {
    switch (c) {
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c == q) {
          out += '\\';
          out += c;
        } else if ((unsigned char)c < 0x20 || c == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\x%02x", (unsigned char)c);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  out += q;
  return out;
}

std::string py_str(const Value& v) {
  switch (v.kind) {
    case Value::Kind::Undefined: return "";
    case Value::Kind::None: return "None";
    case Value::Kind::Bool: return v.b ? "True" : "False";
    case Value::Kind::Int: return std::to_string(v.i);
    case Value::Kind::Float: return float_repr(v.f);
    case Value::Kind::Str: return v.s;
    default: return py_repr(v);
  }
}

std::string py_repr(const Value& v) {
  switch (v.kind) {
    case Value::Kind::Str: return str_repr(v.s);
    case Value::Kind::List: {
      if (v.flag) return "<generator object>";
      std::string out = v.tuple ? "(" : "[";
      for (size_t k = 0; k < v.list->size(); ++k) out += (k ? ", " : "") + py_repr((*v.list)[k]);
      if (v.tuple && v.list->size() == 1) out += ",";
      return out + (v.tuple ? ")" : "]");
    }
    case Value::Kind::Dict: {
      std::string out = "{";
      for (size_t k = 0; k < v.dict->items.size(); ++k)
        out += (k ? ", " : "") + py_repr(key_value(v.dict->items[k].first)) + ": " +
               py_repr(v.dict->items[k].second);
      return out + "}";
    }
    case Value::Kind::Namespace: return "<Namespace>";
    case Value::Kind::Func: return "<function " + v.s + ">";
    default: return py_str(v);
  }
}

// markupsafe.escape.
std::string html_escape(std::string_view s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&#34;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

// ---- JSON in and out.

Value from_json(const nlohmann::ordered_json& j) {
  switch (j.type()) {
    case nlohmann::ordered_json::value_t::null: return Value::none();
    case nlohmann::ordered_json::value_t::boolean: return Value::boolean(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer: return Value::integer(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_unsigned:
      TF_CHECK(j.get<uint64_t>() <= uint64_t(INT64_MAX), "integer ", j.get<uint64_t>(), " is too large");
      return Value::integer(int64_t(j.get<uint64_t>()));
    case nlohmann::ordered_json::value_t::number_float: return Value::real(j.get<double>());
    case nlohmann::ordered_json::value_t::string: return Value::str(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      Array l;
      for (const auto& e : j) l.push_back(from_json(e));
      return Value::of_list(std::move(l));
    }
    case nlohmann::ordered_json::value_t::object: {
      Dict d;
      for (const auto& [k, e] : j.items()) d.items.emplace_back(k, from_json(e));
      return Value::of_dict(std::move(d));
    }
    default: TF_FAIL("a binary JSON value cannot be a template variable");
  }
}

// json.dumps(ensure_ascii=False): escapes quotes, backslashes and control characters only.
void json_string(std::string& out, std::string_view s) {
  out += '"';
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if ((unsigned char)c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", (unsigned char)c);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  out += '"';
}

// ---------------------------------------------------------------------------------------------
// Lexer. Whitespace control happens here, as in jinja2: '-' strips all whitespace on its side,
// lstrip_blocks removes the indentation before a block or comment tag on its own line, trim_blocks
// the newline after one, '+' keeps both.

enum class TK { Text, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, Str, Int, Float, Op, Eof };

struct Token {
  TK type;
  std::string text;  // Text, Name, Str (unescaped), Op, numbers as written
  size_t at;
};

class Lexer {
 public:
  explicit Lexer(const std::string& src) : s_(src) {}

  std::vector<Token> run() {
    bool line_starting = true;
    while (pos_ < s_.size()) {
      size_t tag = pos_;
      char kind = 0;
      while ((tag = s_.find('{', tag)) != std::string::npos) {
        if (tag + 1 < s_.size() && (s_[tag + 1] == '{' || s_[tag + 1] == '%' || s_[tag + 1] == '#')) {
          kind = s_[tag + 1];
          break;
        }
        ++tag;
      }
      if (kind == 0) {
        push(TK::Text, s_.substr(pos_), pos_);
        break;
      }
      std::string text = s_.substr(pos_, tag - pos_);
      const char sign = tag + 2 < s_.size() ? s_[tag + 2] : 0;
      if (sign == '-') {
        size_t e = text.size();
        while (e > 0 && is_space(text[e - 1])) --e;
        text.resize(e);
      } else if (sign != '+' && kind != '{') {
        const size_t l_pos = text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1;
        if ((l_pos > 0 || line_starting) && l_pos < text.size() &&
            std::all_of(text.begin() + long(l_pos), text.end(), is_space))
          text.resize(l_pos);
      }
      if (!text.empty()) push(TK::Text, std::move(text), pos_);
      pos_ = tag + 2 + (sign == '-' || sign == '+' ? 1 : 0);
      if (kind == '#') {
        comment(tag);
      } else {
        push(kind == '{' ? TK::VarBegin : TK::BlockBegin, {}, tag);
        inside(kind == '{', tag);
      }
      line_starting = pos_ > 0 && s_[pos_ - 1] == '\n';
    }
    push(TK::Eof, {}, s_.size());
    return std::move(toks_);
  }

 private:
  void push(TK t, std::string text, size_t at) { toks_.push_back({t, std::move(text), at}); }

  void skip_ws() {
    while (pos_ < s_.size() && is_space(s_[pos_])) ++pos_;
  }

  bool at(std::string_view lit) const { return s_.compare(pos_, lit.size(), lit) == 0; }

  void comment(size_t begin) {
    const size_t end = s_.find("#}", pos_);
    if (end == std::string::npos) fail_at(begin, "a comment {# is never closed with #}");
    const char before = end > pos_ ? s_[end - 1] : 0;
    pos_ = end + 2;
    if (before == '-') {
      skip_ws();
    } else if (before != '+' && pos_ < s_.size() && s_[pos_] == '\n') {
      ++pos_;
    }
  }

  // The tokens of one {{ }} or {% %} tag, and its end with the whitespace it removes.
  void inside(bool var, size_t begin) {
    const std::string_view close = var ? "}}" : "%}";
    std::string open;  // the closing brackets owed, innermost last
    for (;;) {
      skip_ws();
      if (pos_ >= s_.size())
        fail_at(begin, var ? "a {{ is never closed with }}" : "a {% is never closed with %}");
      if (open.empty()) {
        if ((s_[pos_] == '-' || s_[pos_] == '+') && s_.compare(pos_ + 1, 2, close) == 0) {
          const char sign = s_[pos_];
          pos_ += 3;
          push(var ? TK::VarEnd : TK::BlockEnd, {}, pos_);
          if (sign == '-') skip_ws();
          return;
        }
        if (at(close)) {
          pos_ += 2;
          push(var ? TK::VarEnd : TK::BlockEnd, {}, pos_);
          if (!var && pos_ < s_.size() && s_[pos_] == '\n') ++pos_;
          return;
        }
      }
      const size_t start = pos_;
      const char c = s_[pos_];
      if (std::isdigit((unsigned char)c)) {
        number(start);
      } else if (std::isalpha((unsigned char)c) || c == '_') {
        while (pos_ < s_.size() && (std::isalnum((unsigned char)s_[pos_]) || s_[pos_] == '_')) ++pos_;
        push(TK::Name, s_.substr(start, pos_ - start), start);
      } else if (c == '\'' || c == '"') {
        string_literal(start);
      } else {
        static constexpr std::string_view two[] = {"//", "**", "==", "!=", ">=", "<="};
        std::string op;
        for (std::string_view t : two)
          if (at(t)) op = t;
        if (op.empty()) {
          if (std::string_view("+-/*%~[](){}><=.:|,").find(c) == std::string_view::npos)
            fail_at(start, std::string("unexpected character '") + c + "' in a tag");
          op = std::string(1, c);
        }
        if (op == "(" || op == "[" || op == "{") open += op == "(" ? ')' : op == "[" ? ']' : '}';
        if (op == ")" || op == "]" || op == "}") {
          if (open.empty() || open.back() != op[0])
            fail_at(start, "unexpected '" + op + "'" +
                               (open.empty() ? "" : ", expected '" + open.substr(open.size() - 1) + "'"));
          open.pop_back();
        }
        pos_ += op.size();
        push(TK::Op, op, start);
      }
    }
  }

  void number(size_t start) {
    const auto digits = [&] {
      while (pos_ < s_.size() && (std::isdigit((unsigned char)s_[pos_]) || s_[pos_] == '_')) ++pos_;
    };
    digits();
    bool is_float = false;
    if (pos_ + 1 < s_.size() && s_[pos_] == '.' && std::isdigit((unsigned char)s_[pos_ + 1])) {
      ++pos_;
      digits();
      is_float = true;
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      size_t p = pos_ + 1;
      if (p < s_.size() && (s_[p] == '+' || s_[p] == '-')) ++p;
      if (p < s_.size() && std::isdigit((unsigned char)s_[p])) {
        pos_ = p;
        digits();
        is_float = true;
      }
    }
    std::string text = s_.substr(start, pos_ - start);
    text.erase(std::remove(text.begin(), text.end(), '_'), text.end());
    push(is_float ? TK::Float : TK::Int, std::move(text), start);
  }

  // Python's unicode-escape decoding of a literal's body; an unknown escape stays as written.
  void string_literal(size_t start) {
    const char q = s_[pos_++];
    std::string out;
    for (;;) {
      if (pos_ >= s_.size()) fail_at(start, "a string literal is never closed");
      const char c = s_[pos_++];
      if (c == q) break;
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= s_.size()) fail_at(start, "a string literal is never closed");
      const char e = s_[pos_++];
      const auto hex = [&](int n) {
        uint32_t cp = 0;
        for (int k = 0; k < n; ++k) {
          if (pos_ >= s_.size() || !std::isxdigit((unsigned char)s_[pos_]))
            fail_at(start, "a \\x, \\u or \\U escape needs hex digits");
          const char h = s_[pos_++];
          cp = cp * 16 + uint32_t(std::isdigit((unsigned char)h) ? h - '0' : ascii_lower(h) - 'a' + 10);
        }
        if (cp > 0x10FFFF) fail_at(start, "an escape names a code point past U+10FFFF");
        tok::append_utf8(out, cp);
      };
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case '\\': out += '\\'; break;
        case '\'': out += '\''; break;
        case '"': out += '"'; break;
        case 'a': out += '\a'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'v': out += '\v'; break;
        case '\n': break;
        case 'x': hex(2); break;
        case 'u': hex(4); break;
        case 'U': hex(8); break;
        default:
          if (e >= '0' && e <= '7') {
            uint32_t cp = uint32_t(e - '0');
            for (int k = 0; k < 2 && pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '7'; ++k)
              cp = cp * 8 + uint32_t(s_[pos_++] - '0');
            tok::append_utf8(out, cp);
          } else {
            out += '\\';
            out += e;
          }
      }
    }
    push(TK::Str, std::move(out), start);
  }

  const std::string& s_;
  size_t pos_ = 0;
  std::vector<Token> toks_;
};

// ---------------------------------------------------------------------------------------------
// Syntax tree.

enum class EK {
  Lit,
  Name,
  ListLit,
  DictLit,
  Attr,
  Item,
  Slice,
  Call,
  Filter,
  Test,
  Neg,
  Plus,
  Not,
  And,
  Or,
  Bin,
  Concat,
  Cmp,
  Cond
};

struct Expr;
using ExprP = std::unique_ptr<Expr>;
struct Expr {
  EK k;
  size_t at;
  Value lit;
  std::string name;              // Name, Attr, Filter, Test, Bin (the operator)
  std::vector<ExprP> kids;       // see the parser for each kind's layout; a null kid is an omitted part
  std::vector<std::string> kw;   // Call / Filter / Test: a keyword per argument ("" positional)
  std::vector<std::string> ops;  // Cmp
  bool negate = false;           // Test: `is not`; ListLit: a tuple
};

enum class SK {
  Text,
  Out,
  If,
  For,
  Set,
  SetBlock,
  Macro,
  CallBlock,
  Generation,
  Break,
  Continue,
  FilterBlock
};

struct Stmt;
using Body = std::vector<Stmt>;
struct Stmt {
  SK k;
  size_t at;
  std::string text;                // Text; Set / SetBlock / Macro: the name
  std::string attr;                // Set: ns.attr's attribute
  std::vector<std::string> names;  // For / Set: unpacked targets; Macro / CallBlock: parameters
  std::vector<ExprP> exprs;        // If: conditions; For: iterable, filter; Out / Set: the value;
                                   // Macro / CallBlock: parameter defaults; CallBlock: the call last
  std::vector<Body> bodies;        // If: one per condition plus else; For: body, else
};

// ---------------------------------------------------------------------------------------------
// Parser: jinja2's grammar for the statements and expressions chat templates use.

class Parser {
 public:
  Parser(std::vector<Token> toks, int max_depth) : t_(std::move(toks)), max_depth_(max_depth) {}

  Body parse_template(bool& has_generation) {
    Body body = parse_body({}, nullptr);
    has_generation = has_generation_;
    return body;
  }

 private:
  struct Depth {
    Parser& p;
    explicit Depth(Parser& parser, size_t at) : p(parser) {
      if (++p.depth_ > p.max_depth_) fail_at(at, "blocks or expressions nest deeper than the limit");
    }
    ~Depth() { --p.depth_; }
  };

  const Token& cur() const { return t_[i_]; }
  const Token& peek(size_t n = 1) const { return t_[std::min(i_ + n, t_.size() - 1)]; }
  bool is_op(std::string_view op) const { return cur().type == TK::Op && cur().text == op; }
  bool is_name(std::string_view n) const { return cur().type == TK::Name && cur().text == n; }
  void next() {
    if (i_ + 1 < t_.size()) ++i_;
  }
  [[noreturn]] void unexpected(std::string_view wanted) const {
    const Token& t = cur();
    std::string got;
    switch (t.type) {
      case TK::Eof: got = "the end of the template"; break;
      case TK::BlockEnd: got = "the end of the tag"; break;
      case TK::VarEnd: got = "'}}'"; break;
      case TK::Text: got = "text"; break;
      default: got = "'" + t.text + "'";
    }
    fail_at(t.at, "expected " + std::string(wanted) + ", found " + got);
  }
  void expect_op(std::string_view op) {
    if (!is_op(op)) unexpected("'" + std::string(op) + "'");
    next();
  }
  std::string expect_name() {
    if (cur().type != TK::Name) unexpected("a name");
    std::string n = cur().text;
    next();
    return n;
  }
  void expect_block_end() {
    if (cur().type != TK::BlockEnd) unexpected("'%}'");
    next();
  }

  // Statements until one of `ends` opens a tag; `*end` receives which one (the tag is left open).
  Body parse_body(std::initializer_list<std::string_view> ends, std::string* end) {
    Body body;
    for (;;) {
      const Token& t = cur();
      if (t.type == TK::Eof) {
        if (ends.size() != 0)
          fail_at(t.at,
                  "the template ends inside a block: expected {% " + std::string(*ends.begin()) + " %}");
        return body;
      }
      if (t.type == TK::Text) {
        body.push_back({SK::Text, t.at, t.text, {}, {}, {}, {}});
        next();
      } else if (t.type == TK::VarBegin) {
        const size_t at = t.at;
        next();
        Stmt s{SK::Out, at, {}, {}, {}, {}, {}};
        s.exprs.push_back(parse_expr());
        if (cur().type != TK::VarEnd) unexpected("'}}'");
        next();
        body.push_back(std::move(s));
      } else if (t.type == TK::BlockBegin) {
        const size_t at = t.at;
        next();
        if (cur().type != TK::Name) unexpected("a statement name");
        const std::string kw = cur().text;
        for (std::string_view e : ends)
          if (kw == e) {
            *end = kw;
            next();
            return body;
          }
        Depth d(*this, at);
        body.push_back(parse_statement(kw, at));
      } else {
        unexpected("text or a tag");
      }
    }
  }

  Stmt parse_statement(const std::string& kw, size_t at) {
    next();
    Stmt s{SK::Text, at, {}, {}, {}, {}, {}};
    if (kw == "if") {
      s.k = SK::If;
      s.exprs.push_back(parse_expr());
      expect_block_end();
      for (;;) {
        std::string end;
        s.bodies.push_back(parse_body({"elif", "else", "endif"}, &end));
        if (end == "elif") {
          s.exprs.push_back(parse_expr());
          expect_block_end();
        } else if (end == "else") {
          expect_block_end();
          std::string end2;
          s.bodies.push_back(parse_body({"endif"}, &end2));
          expect_block_end();
          return s;
        } else {
          expect_block_end();
          return s;
        }
      }
    }
    if (kw == "for") {
      s.k = SK::For;
      s.names.push_back(expect_name());
      while (is_op(",")) {
        next();
        s.names.push_back(expect_name());
      }
      if (!is_name("in")) unexpected("'in'");
      next();
      s.exprs.push_back(parse_expr(false));
      if (is_name("if")) {
        next();
        s.exprs.push_back(parse_expr(false));
      } else {
        s.exprs.push_back(nullptr);
      }
      if (is_name("recursive")) fail_at(cur().at, "unsupported construct: recursive for loops");
      expect_block_end();
      std::string end;
      s.bodies.push_back(parse_body({"else", "endfor"}, &end));
      if (end == "else") {
        expect_block_end();
        std::string end2;
        s.bodies.push_back(parse_body({"endfor"}, &end2));
      } else {
        s.bodies.emplace_back();
      }
      expect_block_end();
      return s;
    }
    if (kw == "set") {
      s.text = expect_name();
      if (is_op(".")) {
        next();
        s.attr = expect_name();
      }
      s.names.push_back(s.text);
      while (is_op(",")) {
        next();
        s.names.push_back(expect_name());
      }
      if (cur().type == TK::BlockEnd && s.attr.empty() && s.names.size() == 1) {
        s.k = SK::SetBlock;
        next();
        std::string end;
        s.bodies.push_back(parse_body({"endset"}, &end));
        expect_block_end();
        return s;
      }
      s.k = SK::Set;
      expect_op("=");
      s.exprs.push_back(parse_tuple_or_expr());
      expect_block_end();
      return s;
    }
    if (kw == "macro" || kw == "call") {
      s.k = kw == "macro" ? SK::Macro : SK::CallBlock;
      if (kw == "macro") s.text = expect_name();
      if (is_op("(")) parse_params(s);
      if (kw == "call") s.exprs.push_back(parse_expr());
      expect_block_end();
      std::string end;
      s.bodies.push_back(parse_body({kw == "macro" ? "endmacro" : "endcall"}, &end));
      if (kw == "macro" && cur().type == TK::Name) next();  // {% endmacro name %}
      expect_block_end();
      return s;
    }
    if (kw == "generation") {
      s.k = SK::Generation;
      has_generation_ = true;
      expect_block_end();
      std::string end;
      s.bodies.push_back(parse_body({"endgeneration"}, &end));
      expect_block_end();
      return s;
    }
    if (kw == "break" || kw == "continue") {
      s.k = kw == "break" ? SK::Break : SK::Continue;
      expect_block_end();
      return s;
    }
    if (kw == "filter") {
      s.k = SK::FilterBlock;
      s.exprs.push_back(parse_filter(nullptr));
      while (is_op("|")) s.exprs.back() = parse_filter(std::move(s.exprs.back()));
      expect_block_end();
      std::string end;
      s.bodies.push_back(parse_body({"endfilter"}, &end));
      expect_block_end();
      return s;
    }
    fail_at(at, "unsupported construct: {% " + kw + " %}");
  }

  void parse_params(Stmt& s) {
    expect_op("(");
    while (!is_op(")")) {
      s.names.push_back(expect_name());
      if (is_op("=")) {
        next();
        s.exprs.push_back(parse_expr());
      } else {
        s.exprs.push_back(nullptr);
      }
      if (!is_op(",")) break;
      next();
    }
    expect_op(")");
  }

  ExprP node(EK k, size_t at) {
    auto e = std::make_unique<Expr>();
    e->k = k;
    e->at = at;
    return e;
  }

  // `a, b` without brackets is a tuple where jinja2 accepts one (set's value, a parenthesised
  // expression); elsewhere a comma ends the expression.
  ExprP parse_tuple_or_expr() {
    const size_t at = cur().at;
    ExprP first = parse_expr();
    if (!is_op(",")) return first;
    ExprP t = node(EK::ListLit, at);
    t->negate = true;
    t->kids.push_back(std::move(first));
    while (is_op(",")) {
      next();
      if (is_op(")") || cur().type == TK::BlockEnd) break;
      t->kids.push_back(parse_expr());
    }
    return t;
  }

  ExprP parse_expr(bool with_cond = true) {
    Depth d(*this, cur().at);
    ExprP e = parse_or();
    while (with_cond && is_name("if")) {
      const size_t at = cur().at;
      next();
      ExprP c = node(EK::Cond, at);
      c->kids.push_back(std::move(e));
      c->kids.push_back(parse_or());
      if (is_name("else")) {
        next();
        c->kids.push_back(parse_expr());
      } else {
        c->kids.push_back(nullptr);
      }
      e = std::move(c);
    }
    return e;
  }

  ExprP parse_or() {
    ExprP l = parse_and();
    while (is_name("or")) {
      ExprP n = node(EK::Or, cur().at);
      next();
      n->kids.push_back(std::move(l));
      n->kids.push_back(parse_and());
      l = std::move(n);
    }
    return l;
  }

  ExprP parse_and() {
    ExprP l = parse_not();
    while (is_name("and")) {
      ExprP n = node(EK::And, cur().at);
      next();
      n->kids.push_back(std::move(l));
      n->kids.push_back(parse_not());
      l = std::move(n);
    }
    return l;
  }

  ExprP parse_not() {
    if (is_name("not")) {
      Depth d(*this, cur().at);
      ExprP n = node(EK::Not, cur().at);
      next();
      n->kids.push_back(parse_not());
      return n;
    }
    return parse_compare();
  }

  ExprP parse_compare() {
    const size_t at = cur().at;
    ExprP first = parse_math1();
    ExprP cmp;
    for (;;) {
      std::string op;
      if (cur().type == TK::Op && (cur().text == "==" || cur().text == "!=" || cur().text == "<" ||
                                   cur().text == "<=" || cur().text == ">" || cur().text == ">=")) {
        op = cur().text;
        next();
      } else if (is_name("in")) {
        op = "in";
        next();
      } else if (is_name("not") && peek().type == TK::Name && peek().text == "in") {
        op = "not in";
        next();
        next();
      } else {
        break;
      }
      if (!cmp) {
        cmp = node(EK::Cmp, at);
        cmp->kids.push_back(std::move(first));
      }
      cmp->ops.push_back(op);
      cmp->kids.push_back(parse_math1());
    }
    return cmp ? std::move(cmp) : std::move(first);
  }

  ExprP binary(std::string op, ExprP l, ExprP r, size_t at) {
    ExprP n = node(EK::Bin, at);
    n->name = std::move(op);
    n->kids.push_back(std::move(l));
    n->kids.push_back(std::move(r));
    return n;
  }

  ExprP parse_math1() {
    ExprP l = parse_concat();
    while (is_op("+") || is_op("-")) {
      const std::string op = cur().text;
      const size_t at = cur().at;
      next();
      l = binary(op, std::move(l), parse_concat(), at);
    }
    return l;
  }

  ExprP parse_concat() {
    const size_t at = cur().at;
    ExprP first = parse_math2();
    if (!is_op("~")) return first;
    ExprP n = node(EK::Concat, at);
    n->kids.push_back(std::move(first));
    while (is_op("~")) {
      next();
      n->kids.push_back(parse_math2());
    }
    return n;
  }

  ExprP parse_math2() {
    ExprP l = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const std::string op = cur().text;
      const size_t at = cur().at;
      next();
      l = binary(op, std::move(l), parse_pow(), at);
    }
    return l;
  }

  ExprP parse_pow() {
    ExprP l = parse_unary(true);
    while (is_op("**")) {
      const size_t at = cur().at;
      next();
      l = binary("**", std::move(l), parse_unary(true), at);
    }
    return l;
  }

  ExprP parse_unary(bool with_filter) {
    Depth d(*this, cur().at);
    ExprP n;
    if (is_op("-") || is_op("+")) {
      n = node(is_op("-") ? EK::Neg : EK::Plus, cur().at);
      next();
      n->kids.push_back(parse_unary(false));
    } else {
      n = parse_primary();
    }
    n = parse_postfix(std::move(n));
    if (with_filter) n = parse_filter_expr(std::move(n));
    return n;
  }

  ExprP parse_primary() {
    const Token& t = cur();
    const size_t at = t.at;
    if (t.type == TK::Name) {
      const std::string n = t.text;
      next();
      ExprP e = node(EK::Lit, at);
      if (n == "true" || n == "True") {
        e->lit = Value::boolean(true);
      } else if (n == "false" || n == "False") {
        e->lit = Value::boolean(false);
      } else if (n == "none" || n == "None") {
        e->lit = Value::none();
      } else {
        e->k = EK::Name;
        e->name = n;
      }
      return e;
    }
    if (t.type == TK::Str) {
      std::string s;
      while (cur().type == TK::Str) {
        s += cur().text;
        next();
      }
      ExprP e = node(EK::Lit, at);
      e->lit = Value::str(std::move(s));
      return e;
    }
    if (t.type == TK::Int || t.type == TK::Float) {
      ExprP e = node(EK::Lit, at);
      if (t.type == TK::Int) {
        int64_t v = 0;
        const auto r = std::from_chars(t.text.data(), t.text.data() + t.text.size(), v);
        if (r.ec != std::errc()) fail_at(at, "integer literal " + t.text + " is out of range");
        e->lit = Value::integer(v);
      } else {
        e->lit = Value::real(std::strtod(t.text.c_str(), nullptr));
      }
      next();
      return e;
    }
    if (is_op("(")) {
      next();
      if (is_op(")")) {
        next();
        ExprP e = node(EK::ListLit, at);
        e->negate = true;
        return e;
      }
      ExprP e = parse_tuple_or_expr();
      expect_op(")");
      return e;
    }
    if (is_op("[")) {
      next();
      ExprP e = node(EK::ListLit, at);
      while (!is_op("]")) {
        e->kids.push_back(parse_expr());
        if (!is_op(",")) break;
        next();
      }
      expect_op("]");
      return e;
    }
    if (is_op("{")) {
      next();
      ExprP e = node(EK::DictLit, at);
      while (!is_op("}")) {
        e->kids.push_back(parse_expr());
        expect_op(":");
        e->kids.push_back(parse_expr());
        if (!is_op(",")) break;
        next();
      }
      expect_op("}");
      return e;
    }
    unexpected("an expression");
  }

  void parse_call_args(Expr& e) {
    expect_op("(");
    while (!is_op(")")) {
      if (is_op("*") || is_op("**")) fail_at(cur().at, "unsupported construct: *args / **kwargs in a call");
      if (cur().type == TK::Name && peek().type == TK::Op && peek().text == "=") {
        e.kw.push_back(cur().text);
        next();
        next();
      } else {
        e.kw.emplace_back();
      }
      e.kids.push_back(parse_expr());
      if (!is_op(",")) break;
      next();
    }
    expect_op(")");
  }

  ExprP parse_postfix(ExprP n) {
    for (;;) {
      const size_t at = cur().at;
      if (is_op(".")) {
        next();
        ExprP a = node(EK::Attr, at);
        if (cur().type == TK::Int) {
          a->k = EK::Item;
          a->kids.push_back(std::move(n));
          ExprP idx = node(EK::Lit, cur().at);
          idx->lit = Value::integer(std::stoll(cur().text));
          a->kids.push_back(std::move(idx));
          next();
        } else {
          a->name = expect_name();
          a->kids.push_back(std::move(n));
        }
        n = std::move(a);
      } else if (is_op("[")) {
        next();
        ExprP parts[3];
        int k = 0;
        bool slice = false;
        for (;;) {
          if (!is_op(":") && !is_op("]")) parts[k] = parse_expr();
          if (is_op(":") && k < 2) {
            slice = true;
            ++k;
            next();
            continue;
          }
          break;
        }
        expect_op("]");
        ExprP s = node(slice ? EK::Slice : EK::Item, at);
        s->kids.push_back(std::move(n));
        if (!slice && !parts[0]) fail_at(at, "an empty subscript []");
        s->kids.push_back(std::move(parts[0]));
        if (slice) {
          s->kids.push_back(std::move(parts[1]));
          s->kids.push_back(std::move(parts[2]));
        }
        n = std::move(s);
      } else if (is_op("(")) {
        ExprP c = node(EK::Call, n->at);  // errors point at what is called
        c->kids.push_back(std::move(n));
        c->kw.emplace_back();
        parse_call_args(*c);
        n = std::move(c);
      } else {
        return n;
      }
    }
  }

  ExprP parse_filter(ExprP value) {
    if (value) next();  // the '|'
    const size_t at = cur().at;
    ExprP f = node(EK::Filter, at);
    f->name = expect_name();
    f->kids.push_back(std::move(value));
    f->kw.emplace_back();
    if (is_op("(")) parse_call_args(*f);
    return f;
  }

  ExprP parse_filter_expr(ExprP n) {
    for (;;) {
      if (is_op("|")) {
        n = parse_filter(std::move(n));
      } else if (is_name("is")) {
        const size_t at = cur().at;
        next();
        ExprP t = node(EK::Test, at);
        if (is_name("not")) {
          t->negate = true;
          next();
        }
        t->name = expect_name();
        t->kids.push_back(std::move(n));
        t->kw.emplace_back();
        if (is_op("(")) {
          parse_call_args(*t);
        } else if ((cur().type == TK::Name || cur().type == TK::Str || cur().type == TK::Int ||
                    cur().type == TK::Float || is_op("[") || is_op("{")) &&
                   !is_name("else") && !is_name("or") && !is_name("and") && !is_name("if")) {
          if (is_name("is")) unexpected("a test argument");
          t->kids.push_back(parse_postfix(parse_primary()));
          t->kw.emplace_back();
        }
        n = std::move(t);
      } else {
        return n;
      }
    }
  }

  std::vector<Token> t_;
  size_t i_ = 0;
  int depth_ = 0;
  int max_depth_;
  bool has_generation_ = false;
};

// ---------------------------------------------------------------------------------------------
// Evaluation.

bool py_eq(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.is(Value::Kind::Float) || b.is(Value::Kind::Float)) return a.as_double() == b.as_double();
    return (a.is(Value::Kind::Bool) ? int64_t(a.b) : a.i) == (b.is(Value::Kind::Bool) ? int64_t(b.b) : b.i);
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::Kind::Undefined:
    case Value::Kind::None: return true;
    case Value::Kind::Str: return a.s == b.s;
    case Value::Kind::List:
      return a.list->size() == b.list->size() &&
             std::equal(a.list->begin(), a.list->end(), b.list->begin(), py_eq);
    case Value::Kind::Dict: {
      if (a.dict->items.size() != b.dict->items.size()) return false;
      for (const auto& [k, v] : a.dict->items) {
        const Value* o = b.dict->find(k);
        if (o == nullptr || !py_eq(v, *o)) return false;
      }
      return true;
    }
    case Value::Kind::Namespace: return a.dict == b.dict;
    case Value::Kind::Func: return a.fn == b.fn;
    default: return false;
  }
}

// Python's <, for the kinds that order.
bool py_lt(const Value& a, const Value& b) {
  if (a.is_undefined()) fail_undefined(a);
  if (b.is_undefined()) fail_undefined(b);
  if (a.is_number() && b.is_number()) {
    if (a.is(Value::Kind::Float) || b.is(Value::Kind::Float)) return a.as_double() < b.as_double();
    return (a.is(Value::Kind::Bool) ? int64_t(a.b) : a.i) < (b.is(Value::Kind::Bool) ? int64_t(b.b) : b.i);
  }
  if (a.is_str() && b.is_str()) return a.s < b.s;  // UTF-8 byte order is code point order
  if (a.is_list() && b.is_list()) {
    const Array &x = *a.list, &y = *b.list;
    for (size_t k = 0; k < x.size() && k < y.size(); ++k) {
      if (py_lt(x[k], y[k])) return true;
      if (py_lt(y[k], x[k])) return false;
    }
    return x.size() < y.size();
  }
  fail("'<' is not supported between '", type_name(a), "' and '", type_name(b), "'");
}

size_t py_len(const Value& v) {
  switch (v.kind) {
    case Value::Kind::Undefined: return 0;
    case Value::Kind::Str: return code_points(v.s);
    case Value::Kind::List:
      if (v.flag) fail("object of type 'generator' has no len()");
      return v.list->size();
    case Value::Kind::Dict: return v.dict->items.size();
    default: fail("object of type '", type_name(v), "' has no len()");
  }
}

// The items `for` walks: a list's elements, a dict's keys, a string's characters.
Array iterate(const Value& v) {
  switch (v.kind) {
    case Value::Kind::Undefined: return {};
    case Value::Kind::List: return *v.list;
    case Value::Kind::Dict: {
      Array keys;
      for (const auto& kv : v.dict->items) keys.push_back(key_value(kv.first));
      return keys;
    }
    case Value::Kind::Str: {
      Array chars;
      const std::vector<size_t> at = code_point_starts(v.s);
      for (size_t k = 0; k + 1 < at.size(); ++k)
        chars.push_back(Value::str(v.s.substr(at[k], at[k + 1] - at[k])));
      return chars;
    }
    default: fail("'", type_name(v), "' object is not iterable");
  }
}

bool contains(const Value& container, const Value& item) {
  switch (container.kind) {
    case Value::Kind::Undefined: return false;
    case Value::Kind::Str:
      if (!item.is_str())
        fail("'in <string>' requires a string as left operand, not '", type_name(item), "'");
      return container.s.find(item.s) != std::string::npos;
    case Value::Kind::List:
      return std::any_of(container.list->begin(), container.list->end(),
                         [&](const Value& v) { return py_eq(v, item); });
    case Value::Kind::Dict:
      return (item.is_str() || item.is(Value::Kind::Int)) && container.dict->find(dict_key(item)) != nullptr;
    default: fail("argument of type '", type_name(container), "' is not iterable");
  }
}

int64_t as_int(const Value& v, std::string_view what) {
  if (v.is(Value::Kind::Int)) return v.i;
  if (v.is(Value::Kind::Bool)) return v.b;
  if (v.is_undefined()) fail_undefined(v);
  fail(what, " must be an integer, not '", type_name(v), "'");
}

const std::string& as_str(const Value& v, std::string_view what) {
  if (v.is_undefined()) fail_undefined(v);
  if (!v.is_str()) fail(what, " must be a string, not '", type_name(v), "'");
  return v.s;
}

// Python's slice of a sequence of n items: the indices taken, in order.
std::vector<size_t> slice_indices(int64_t n, const Value& start, const Value& stop, const Value& step) {
  const int64_t st = step.is_undefined() || step.is(Value::Kind::None) ? 1 : as_int(step, "a slice step");
  if (st == 0) fail("a slice step cannot be zero");
  const auto bound = [&](const Value& v, int64_t dflt) {
    if (v.is_undefined() || v.is(Value::Kind::None)) return dflt;
    int64_t x = as_int(v, "a slice index");
    if (x < 0) x += n;
    return st > 0 ? std::clamp<int64_t>(x, 0, n) : std::clamp<int64_t>(x, -1, n - 1);
  };
  const int64_t b = bound(start, st > 0 ? 0 : n - 1), e = bound(stop, st > 0 ? n : -1);
  std::vector<size_t> idx;
  for (int64_t k = b; st > 0 ? k < e : k > e; k += st) idx.push_back(size_t(k));
  return idx;
}

std::string json_dumps(const Value& v, const Value& indent, bool sort_keys, bool ensure_ascii, int level,
                       int depth);

void json_indent(std::string& out, const std::string& unit, int level) {
  out += '\n';
  for (int k = 0; k < level; ++k) out += unit;
}

void json_string_ascii(std::string& out, std::string_view s) {
  std::string plain;
  json_string(plain, s);
  for (size_t k = 0; k < plain.size();) {
    const unsigned char c = (unsigned char)plain[k];
    if (c < 0x80) {
      out += char(c);
      ++k;
      continue;
    }
    const int n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
    uint32_t cp = c & (n == 4 ? 0x07 : n == 3 ? 0x0F : 0x1F);
    for (int j = 1; j < n && k + j < plain.size(); ++j) cp = (cp << 6) | ((unsigned char)plain[k + j] & 0x3F);
    k += n;
    char buf[16];
    if (cp >= 0x10000) {
      cp -= 0x10000;
      std::snprintf(buf, sizeof buf, "\\u%04x\\u%04x", 0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF));
    } else {
      std::snprintf(buf, sizeof buf, "\\u%04x", cp);
    }
    out += buf;
  }
}

// json.dumps as transformers' tojson calls it: ", " and ": " between items without an indent, ","
// and newlines with one.
std::string json_dumps(const Value& v, const Value& indent, bool sort_keys, bool ensure_ascii, int level,
                       int depth) {
  if (depth > 256) fail("tojson: the value nests too deeply");
  std::string unit;
  const bool indented = !indent.is_undefined() && !indent.is(Value::Kind::None);
  if (indented)
    unit = indent.is_str()
               ? indent.s
               : std::string(size_t(std::max<int64_t>(0, as_int(indent, "tojson's indent"))), ' ');
  std::string out;
  switch (v.kind) {
    case Value::Kind::None: return "null";
    case Value::Kind::Bool: return v.b ? "true" : "false";
    case Value::Kind::Int: return std::to_string(v.i);
    case Value::Kind::Float:
      if (std::isnan(v.f)) return "NaN";
      if (std::isinf(v.f)) return v.f > 0 ? "Infinity" : "-Infinity";
      return float_repr(v.f);
    case Value::Kind::Str:
      if (ensure_ascii) {
        json_string_ascii(out, v.s);
      } else {
        json_string(out, v.s);
      }
      return out;
    case Value::Kind::List: {
      if (v.flag) fail("tojson: object of type 'generator' is not JSON serializable");
      if (v.list->empty()) return "[]";
      out += '[';
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) out += indented ? "," : ", ";
        if (indented) json_indent(out, unit, level + 1);
        out += json_dumps((*v.list)[k], indent, sort_keys, ensure_ascii, level + 1, depth + 1);
      }
      if (indented) json_indent(out, unit, level);
      return out + ']';
    }
    case Value::Kind::Dict: {
      if (v.dict->items.empty()) return "{}";
      std::vector<const std::pair<std::string, Value>*> items;
      for (const auto& kv : v.dict->items) items.push_back(&kv);
      if (sort_keys)
        std::stable_sort(items.begin(), items.end(), [](auto* a, auto* b) { return a->first < b->first; });
      out += '{';
      for (size_t k = 0; k < items.size(); ++k) {
        if (k) out += indented ? "," : ", ";
        if (indented) json_indent(out, unit, level + 1);
        if (ensure_ascii) {
          json_string_ascii(out, py_str(key_value(items[k]->first)));
        } else {
          json_string(out, py_str(key_value(items[k]->first)));
        }
        out += ": ";
        out += json_dumps(items[k]->second, indent, sort_keys, ensure_ascii, level + 1, depth + 1);
      }
      if (indented) json_indent(out, unit, level);
      return out + '}';
    }
    default: fail("tojson: object of type '", type_name(v), "' is not JSON serializable");
  }
}

// Python's str % args for the conversions templates use: %s %r %d %i %f %x %%, with flags, width
// and precision.
std::string percent_format(const std::string& fmt, const Value& args) {
  const Array one{args};
  const Array& list = args.is_list() ? *args.list : one;
  size_t next = 0;
  std::string out;
  for (size_t k = 0; k < fmt.size(); ++k) {
    if (fmt[k] != '%') {
      out += fmt[k];
      continue;
    }
    size_t j = k + 1;
    std::string spec = "%";
    while (j < fmt.size() && std::string_view("-+ 0#").find(fmt[j]) != std::string_view::npos)
      spec += fmt[j++];
    while (j < fmt.size() && (std::isdigit((unsigned char)fmt[j]) || fmt[j] == '.')) spec += fmt[j++];
    if (j >= fmt.size()) fail("incomplete format in '%'");
    const char conv = fmt[j];
    k = j;
    if (conv == '%') {
      out += '%';
      continue;
    }
    if (next >= list.size()) fail("not enough arguments for format string");
    const Value& a = list[next++];
    char buf[512];
    switch (conv) {
      case 's':
      case 'r': {
        const std::string s = conv == 's' ? py_str(a) : py_repr(a);
        std::snprintf(buf, sizeof buf, (spec + "s").c_str(), s.c_str());
        out += spec == "%" ? s : std::string(buf);
        break;
      }
      case 'd':
      case 'i':
      case 'x':
        if (!a.is_number()) fail("%", conv, " format: a number is required, not '", type_name(a), "'");
        std::snprintf(buf, sizeof buf, (spec + "ll" + (conv == 'x' ? 'x' : 'd')).c_str(),
                      (long long)(a.is(Value::Kind::Float)  ? int64_t(a.f)
                                  : a.is(Value::Kind::Bool) ? a.b
                                                            : a.i));
        out += buf;
        break;
      case 'f':
      case 'e':
      case 'g':
        if (!a.is_number()) fail("%", conv, " format: a number is required, not '", type_name(a), "'");
        std::snprintf(buf, sizeof buf, (spec + conv).c_str(), a.as_double());
        out += buf;
        break;
      default: fail("unsupported format character '", std::string(1, conv), "' in '%'");
    }
  }
  if (next < list.size() && args.is_list()) fail("not all arguments converted during string formatting");
  return out;
}

// Python's format-spec mini-language, [[fill]align][sign][#][0][width][,|_][.precision][type], for
// strings (type s), integers and booleans (d, n, x, X, o, b, c, or a float type) and floats (e, E,
// f, F, g, G, n, %, or none: 'g' keeping a digit past the point, str() without a precision), as
// format(value, spec) gives it; what Python refuses is refused with its reason. The fill is one
// byte (a multi-byte fill character is refused as an invalid spec).
std::string format_spec(const Value& v, const std::string& spec) {
  const auto bad = [&](const auto&... why) { fail("format spec '", spec, "': ", why...); };
  size_t k = 0;
  char fill = ' ', align = 0, sign = 0, grouping = 0, type = 0;
  bool alternate = false, zero = false;
  int64_t width = -1, precision = -1;
  const auto is_align = [](char c) { return c == '<' || c == '>' || c == '^' || c == '='; };
  if (spec.size() >= 2 && is_align(spec[1])) {
    fill = spec[0];
    align = spec[1];
    k = 2;
  } else if (!spec.empty() && is_align(spec[0])) {
    align = spec[0];
    k = 1;
  }
  if (k < spec.size() && (spec[k] == '+' || spec[k] == '-' || spec[k] == ' ')) sign = spec[k++];
  if (k < spec.size() && spec[k] == '#') alternate = (++k, true);
  if (k < spec.size() && spec[k] == '0') zero = (++k, true);
  const auto number = [&]() {
    int64_t n = 0;
    size_t digits = 0;
    for (; k < spec.size() && std::isdigit(static_cast<unsigned char>(spec[k])); ++k, ++digits) {
      n = n * 10 + (spec[k] - '0');
      if (n > 4096) bad("a width or precision above 4096");
    }
    return digits ? n : -1;
  };
  width = number();
  if (k < spec.size() && (spec[k] == ',' || spec[k] == '_')) grouping = spec[k++];
  if (k < spec.size() && spec[k] == '.') {
    ++k;
    precision = number();
    if (precision < 0) bad("a '.' without a precision");
  }
  if (k < spec.size()) type = spec[k++];
  if (k < spec.size()) bad("invalid format specifier");
  if (zero && align == 0) {
    fill = '0';
    align = '=';
  }

  const bool is_int = v.is(Value::Kind::Int) || v.is(Value::Kind::Bool);
  std::string body, prefix;  // the digits or text, and the sign (and 0x) that '=' pads after
  // A bool formats as int does, but for an empty spec ('{:}'), which gives True or False.
  if (v.is_str() || (v.is(Value::Kind::Bool) && spec.empty()) || !v.is_number()) {
    if (!v.is_str() && !v.is(Value::Kind::Bool)) {
      if (!spec.empty()) bad("a ", type_name(v), " takes no format spec");
      return py_str(v);
    }
    if (type != 0 && type != 's') bad("unknown format code '", std::string(1, type), "' for a string");
    if (sign) bad("sign not allowed in string format specifier");
    if (align == '=') bad("'=' alignment not allowed in string format specifier");
    if (grouping) bad("cannot specify '", std::string(1, grouping), "' with 's'");
    body = py_str(v);
    if (precision >= 0 && int64_t(code_points(body)) > precision)
      body.resize(code_point_starts(body)[size_t(precision)]);
    if (align == 0) align = '<';
  } else {
    const bool float_type = std::strchr("eEfFgGn%", type) != nullptr && type != 0 && !(is_int && type == 'n');
    if (is_int && !float_type) {
      if (precision >= 0) bad("precision not allowed in integer format specifier");
      if (type != 0 && !std::strchr("dxXobcn", type))
        bad("unknown format code '", std::string(1, type), "' for an integer");
      const int64_t n = v.is(Value::Kind::Bool) ? int64_t(v.b) : v.i;
      const uint64_t mag = n < 0 ? uint64_t(0) - uint64_t(n) : uint64_t(n);
      if (type == 'c') {
        if (sign) bad("sign not allowed with integer format specifier 'c'");
        if (n < 0 || n > 0x10FFFF) bad("%c arg not in range(0x110000)");
        tok::append_utf8(body, uint32_t(n));
      } else {
        const int base = type == 'x' || type == 'X' ? 16 : type == 'o' ? 8 : type == 'b' ? 2 : 10;
        const char* digits = type == 'X' ? "0123456789ABCDEF" : "0123456789abcdef";
        for (uint64_t m = mag; m > 0 || body.empty(); m /= uint64_t(base))
          body.insert(body.begin(), digits[m % uint64_t(base)]);
        if (grouping) {
          if (grouping == ',' && base != 10) bad("cannot specify ',' with '", std::string(1, type), "'");
          const size_t group = base == 10 ? 3 : 4;
          for (size_t at = body.size(); at > group; at -= group) body.insert(at - group, 1, grouping);
        }
        prefix = n < 0 ? "-" : sign == '+' ? "+" : sign == ' ' ? " " : "";
        if (alternate && base != 10)
          prefix += type == 'X' ? "0X" : type == 'x' ? "0x" : type == 'o' ? "0o" : "0b";
      }
    } else {
      double x = v.as_double();
      prefix = std::signbit(x) && !std::isnan(x) ? "-" : sign == '+' ? "+" : sign == ' ' ? " " : "";
      x = std::fabs(x);
      char buf[4200];
      const int p = int(precision < 0 ? 6 : precision);
      if (type == 0 && precision < 0) {
        body = float_repr(x);
      } else if (type == '%') {
        std::snprintf(buf, sizeof buf, alternate ? "%#.*f" : "%.*f", p, x * 100);
        body = std::string(buf) + "%";
      } else {
        const char conv = type == 0 || type == 'n' ? 'g' : type;
        const std::string f = std::string(alternate ? "%#.*" : "%.*") + conv;
        // With no type, precision 0 writes one digit and switches to the exponent at once.
        if (type == 0 && precision == 0)
          std::snprintf(buf, sizeof buf, alternate ? "%#.0e" : "%.0e", x);
        else
          std::snprintf(buf, sizeof buf, f.c_str(), p, x);
        body = buf;
        // No type: 'g' that keeps a digit past the point where it writes the number in full.
        if (type == 0 && std::isfinite(x) && body.find_first_of(".e") == std::string::npos) body += ".0";
      }
      if (!std::isfinite(x)) {
        const bool upper = type == 'E' || type == 'F' || type == 'G';
        body = std::isnan(x) ? (upper ? "NAN" : "nan") : (upper ? "INF" : "inf");
      }
      if (grouping && std::isfinite(x)) {
        const size_t end = std::min(body.find_first_of(".e%"), body.size());
        for (size_t at = end; at > 3; at -= 3) body.insert(at - 3, 1, grouping);
      }
    }
    if (align == 0) align = '>';
  }
  const int64_t length = int64_t(prefix.size() + code_points(body));
  const size_t pad = width > length ? size_t(width - length) : 0;
  if (align == '=') return prefix + std::string(pad, fill) + body;
  const std::string all = prefix + body;
  if (align == '<') return all + std::string(pad, fill);
  if (align == '>') return std::string(pad, fill) + all;
  return std::string(pad / 2, fill) + all + std::string(pad - pad / 2, fill);
}

// str.format with {}, {0}, {name}, !s / !r and a format spec after ':'.
std::string brace_format(const std::string& fmt, const CallArgs& a) {
  std::string out;
  size_t auto_idx = 0;
  for (size_t k = 0; k < fmt.size(); ++k) {
    const char c = fmt[k];
    if (c == '{' && k + 1 < fmt.size() && fmt[k + 1] == '{') {
      out += '{';
      ++k;
    } else if (c == '}' && k + 1 < fmt.size() && fmt[k + 1] == '}') {
      out += '}';
      ++k;
    } else if (c == '{') {
      const size_t end = fmt.find('}', k);
      if (end == std::string::npos) fail("str.format: a '{' is never closed");
      std::string field = fmt.substr(k + 1, end - k - 1);
      k = end;
      std::optional<std::string> spec;
      if (const size_t colon = field.find(':'); colon != std::string::npos) {
        spec = field.substr(colon + 1);
        field.resize(colon);
      }
      char conv = 0;
      if (const size_t bang = field.find('!'); bang != std::string::npos) {
        if (bang + 2 != field.size() || (field[bang + 1] != 's' && field[bang + 1] != 'r'))
          fail("str.format: a conversion is !s or !r, not '", field.substr(bang), "'");
        conv = field[bang + 1];
        field.resize(bang);
      }
      const Value* v = nullptr;
      if (field.empty() ||
          std::all_of(field.begin(), field.end(), [](char d) { return std::isdigit((unsigned char)d); })) {
        const size_t idx = field.empty() ? auto_idx++ : size_t(std::stoul(field));
        if (idx >= a.pos.size()) fail("str.format: replacement index ", idx, " out of range");
        v = &a.pos[idx];
      } else {
        for (const auto& [n, val] : a.kw)
          if (n == field) v = &val;
        if (v == nullptr) fail("str.format: no argument named '", field, "'");
      }
      if (conv)
        out += format_spec(Value::str(conv == 'r' ? py_repr(*v) : py_str(*v)), spec.value_or(""));
      else
        out += spec ? format_spec(*v, *spec) : py_str(*v);
    } else if (c == '}') {
      fail("str.format: a single '}' in the format string");
    } else {
      out += c;
    }
  }
  return out;
}

std::vector<std::string> py_split(const std::string& s, const Value& sep, int64_t maxsplit, bool from_right) {
  std::vector<std::string> parts;
  if (sep.is_undefined() || sep.is(Value::Kind::None)) {
    // Runs of whitespace separate; none at the ends.
    std::vector<std::pair<size_t, size_t>> words;
    size_t k = 0;
    while (k < s.size()) {
      while (k < s.size() && is_space(s[k])) ++k;
      if (k >= s.size()) break;
      size_t e = k;
      while (e < s.size() && !is_space(s[e])) ++e;
      words.emplace_back(k, e);
      k = e;
    }
    if (maxsplit < 0 || size_t(maxsplit) >= words.size()) {
      for (auto [b, e] : words) parts.push_back(s.substr(b, e - b));
      return parts;
    }
    if (!from_right) {
      for (size_t w = 0; w < size_t(maxsplit); ++w)
        parts.push_back(s.substr(words[w].first, words[w].second - words[w].first));
      parts.push_back(
          strip_chars(std::string_view(s).substr(words[size_t(maxsplit)].first), false, true, nullptr));
    } else {
      const size_t keep = words.size() - size_t(maxsplit);
      parts.push_back(
          strip_chars(std::string_view(s).substr(0, words[keep - 1].second), true, false, nullptr));
      for (size_t w = keep; w < words.size(); ++w)
        parts.push_back(s.substr(words[w].first, words[w].second - words[w].first));
    }
    return parts;
  }
  const std::string& d = as_str(sep, "split's separator");
  if (d.empty()) fail("split: empty separator");
  std::vector<size_t> hits;
  for (size_t p = s.find(d); p != std::string::npos; p = s.find(d, p + d.size())) hits.push_back(p);
  if (maxsplit >= 0 && size_t(maxsplit) < hits.size()) {
    if (from_right) {
      hits.erase(hits.begin(), hits.end() - maxsplit);
    } else {
      hits.resize(size_t(maxsplit));
    }
  }
  size_t b = 0;
  for (size_t h : hits) {
    parts.push_back(s.substr(b, h - b));
    b = h + d.size();
  }
  parts.push_back(s.substr(b));
  return parts;
}

Array str_list(const std::vector<std::string>& parts) {
  Array l;
  for (const std::string& p : parts) l.push_back(Value::str(p));
  return l;
}

// Python's str.splitlines().
std::vector<std::string> splitlines(const std::string& s) {
  std::vector<std::string> lines;
  size_t b = 0;
  for (size_t k = 0; k < s.size(); ++k) {
    const char c = s[k];
    if (c == '\n' || c == '\r' || c == '\v' || c == '\f' || (c >= '\x1c' && c <= '\x1e')) {
      lines.push_back(s.substr(b, k - b));
      if (c == '\r' && k + 1 < s.size() && s[k + 1] == '\n') ++k;
      b = k + 1;
    }
  }
  if (b < s.size()) lines.push_back(s.substr(b));
  return lines;
}

Value arg(const CallArgs& a, size_t idx, std::string_view name, const Value& dflt) {
  for (const auto& [n, v] : a.kw)
    if (n == name) return v;
  return idx < a.pos.size() ? a.pos[idx] : dflt;
}

void check_arity(const CallArgs& a, size_t max_pos, std::string_view what) {
  if (a.pos.size() > max_pos)
    fail(what, " takes at most ", max_pos, " positional arguments, got ", a.pos.size());
}

const Value kUndef;
const Value kNone = Value::none();
const Value kFalse = Value::boolean(false);
const Value kEmpty = Value::str("");

Value pair(Value a, Value b) {
  Value v = Value::of_list({std::move(a), std::move(b)});
  v.tuple = true;
  return v;
}

Value generator(Array items) {
  Value v = Value::of_list(std::move(items));
  v.flag = true;
  return v;
}

constexpr std::string_view kFilters[] = {
    "abs",        "capitalize", "count",  "d",          "default", "dictsort", "first", "float",  "format",
    "indent",     "int",        "items",  "join",       "last",    "length",   "list",  "lower",  "map",
    "max",        "min",        "reject", "rejectattr", "replace", "reverse",  "round", "safe",   "select",
    "selectattr", "sort",       "string", "sum",        "title",   "tojson",   "trim",  "unique", "upper"};
constexpr std::string_view kTests[] = {
    "boolean", "callable", "defined",  "divisibleby", "eq",   "equalto",   "even",
    "false",   "float",    "ge",       "gt",          "in",   "integer",   "iterable",
    "le",      "lower",    "lt",       "mapping",     "ne",   "none",      "number",
    "odd",     "sameas",   "sequence", "string",      "true", "undefined", "upper"};

bool known(std::span<const std::string_view> names, std::string_view n) {
  return std::find(names.begin(), names.end(), n) != names.end();
}

// Unknown filters and tests are refused when the template is parsed, as jinja2 refuses them when it
// compiles one, except inside an if (statement or inline), where jinja2 raises only if one runs.
void check_names(const Expr* e, bool soft) {
  if (e == nullptr) return;
  if (!soft && e->k == EK::Filter && !known(kFilters, e->name))
    fail_at(e->at, "unsupported filter '" + e->name + "'");
  if (!soft && e->k == EK::Test && !known(kTests, e->name))
    fail_at(e->at, "unsupported test '" + e->name + "'");
  for (const ExprP& k : e->kids) check_names(k.get(), soft || e->k == EK::Cond);
}

void check_names(const Body& body, bool soft) {
  for (const Stmt& s : body) {
    const bool in_if = soft || s.k == SK::If;
    for (const ExprP& e : s.exprs) check_names(e.get(), in_if);
    // A loop's or a macro's body is a frame of its own, where jinja2 checks again.
    const bool inner = s.k == SK::For || s.k == SK::Macro || s.k == SK::CallBlock;
    for (const Body& b : s.bodies) check_names(b, in_if && !inner);
  }
}

enum class Flow { Normal, Break, Continue };

using Vars = std::unordered_map<std::string, Value>;

// A scope's variables, shared so that a macro or call block defined in the scope can read it while
// the scope lives: jinja2's macros close over the scopes they are defined in, late-bound (a later
// `set` there is seen).
struct Frame {
  std::shared_ptr<Vars> vars = std::make_shared<Vars>();
  Frame() = default;
  explicit Frame(std::shared_ptr<Vars> v) : vars(std::move(v)) {}
  explicit Frame(Vars v) : vars(std::make_shared<Vars>(std::move(v))) {}
  Value& operator[](const std::string& k) { return (*vars)[k]; }
  Vars::iterator find(const std::string& k) { return vars->find(k); }
  Vars::iterator end() { return vars->end(); }
  void erase(const std::string& k) { vars->erase(k); }
};

// The scopes a macro was defined in, past the template's top level (which every macro sees live).
// Held weakly: a macro is itself a variable of the innermost of them, and the scopes of a loop end
// with it; a macro called after its scope ended (kept in a namespace) sees that scope's variables as
// undefined.
using Closure = std::vector<std::weak_ptr<Vars>>;

struct Interp {
  const Limits& limits;
  std::time_t now;
  std::vector<Frame> frames;
  std::vector<std::string> outs{1};
  std::vector<Span> generation;
  uint64_t iterations = 0;
  int depth = 0;

  Interp(const Limits& l, std::time_t t) : limits(l), now(t) {}

  void grow_check(size_t size) const {
    if (size > limits.max_output_bytes)
      fail("the output or a value grows past the limit of ", limits.max_output_bytes, " bytes");
  }

  void write(std::string_view s) {
    outs.back() += s;
    grow_check(outs.back().size());
  }

  Value lookup(const std::string& name) {
    for (auto f = frames.rbegin(); f != frames.rend(); ++f)
      if (auto it = f->find(name); it != f->end()) return it->second;
    if (Value g = global(name); !g.is_undefined()) return g;
    return Value::undefined(name);
  }

  static Value global(const std::string& name);

  // ---- statements

  Flow exec(const Body& body) {
    for (const Stmt& s : body) {
      const Flow f = exec_located(s);
      if (f != Flow::Normal) return f;
    }
    return Flow::Normal;
  }

  Flow exec_located(const Stmt& s) {
    try {
      return exec_one(s);
    } catch (EvalError& e) {
      if (!e.located) {
        e.at = s.at;
        e.located = true;
      }
      throw;
    }
  }

  std::string capture(const Body& body) {
    outs.emplace_back();
    exec(body);
    std::string text = std::move(outs.back());
    outs.pop_back();
    return text;
  }

  void assign(const std::vector<std::string>& names, const Value& v) {
    if (names.size() == 1) {
      frames.back()[names[0]] = v;
      return;
    }
    const Array items = iterate(v);
    if (items.size() != names.size())
      fail("cannot unpack ", items.size(), " values into ", names.size(), " names");
    for (size_t k = 0; k < names.size(); ++k) frames.back()[names[k]] = items[k];
  }

  Flow exec_one(const Stmt& s) {
    switch (s.k) {
      case SK::Text: write(s.text); return Flow::Normal;
      case SK::Out: write(py_str(eval(*s.exprs[0]))); return Flow::Normal;
      case SK::If:
        for (size_t k = 0; k < s.exprs.size(); ++k)
          if (truthy(eval(*s.exprs[k]))) return exec(s.bodies[k]);
        if (s.bodies.size() > s.exprs.size()) return exec(s.bodies.back());
        return Flow::Normal;
      case SK::For: return exec_for(s);
      case SK::Set: {
        const Value v = eval(*s.exprs[0]);
        if (!s.attr.empty()) {
          const Value ns = lookup(s.text);
          if (!ns.is(Value::Kind::Namespace))
            fail("cannot assign attribute '", s.attr, "' on '", s.text, "': not a namespace");
          if (s.attr[0] == '_') fail("namespace attributes starting with '_' are refused");
          ns.dict->set(s.attr, v);
        } else {
          assign(s.names, v);
        }
        return Flow::Normal;
      }
      case SK::SetBlock: frames.back()[s.text] = Value::str(capture(s.bodies[0])); return Flow::Normal;
      case SK::Macro: {
        const Stmt* m = &s;
        frames.back()[s.text] = Value::func(s.text, [m, scope = closure()](Interp& in, CallArgs& a, Pos) {
          return in.call_macro(*m, a, scope);
        });
        return Flow::Normal;
      }
      case SK::CallBlock: {
        const Expr& call = *s.exprs.back();
        if (call.k != EK::Call) fail("{% call %} needs a macro call");
        const Stmt* blk = &s;
        const Value caller = Value::func("caller", [blk, scope = closure()](Interp& in, CallArgs& a, Pos) {
          return in.call_macro(*blk, a, scope);
        });
        const Value callee = eval(*call.kids[0]);
        CallArgs a = eval_args(call, 1);
        if (!callee.is(Value::Kind::Func) || callee.fn == nullptr) fail("{% call %} needs a macro");
        frames.back()["caller"] = caller;
        write(py_str((*callee.fn)(*this, a, {})));
        frames.back().erase("caller");
        return Flow::Normal;
      }
      case SK::Generation: {
        if (outs.size() != 1)
          fail("a {% generation %} block inside a macro, call or set block is not supported");
        const size_t begin = outs[0].size();
        const Flow f = exec(s.bodies[0]);
        generation.push_back({begin, outs[0].size()});
        return f;
      }
      case SK::Break: return Flow::Break;
      case SK::Continue: return Flow::Continue;
      case SK::FilterBlock: {
        const Value text = Value::str(capture(s.bodies[0]));
        write(py_str(apply_filters(*s.exprs[0], text)));
        return Flow::Normal;
      }
    }
    return Flow::Normal;
  }

  Value apply_filters(const Expr& f, const Value& input) {
    const Value v = f.kids[0] ? apply_filters(*f.kids[0], input) : input;
    CallArgs a = eval_args(f, 1);
    return filter(f.name, v, a);
  }

  Flow exec_for(const Stmt& s) {
    const Value seq = eval(*s.exprs[0]);
    Array items = iterate(seq);
    frames.emplace_back();
    if (s.exprs[1]) {
      Array kept;
      for (const Value& v : items) {
        assign(s.names, v);
        if (truthy(eval(*s.exprs[1]))) kept.push_back(v);
      }
      items = std::move(kept);
    }
    const int64_t n = int64_t(items.size());
    for (int64_t k = 0; k < n; ++k) {
      if (++iterations > limits.max_iterations)
        fail("loops run more than the limit of ", limits.max_iterations, " iterations");
      assign(s.names, items[size_t(k)]);
      Dict loop;
      loop.items.reserve(12);
      loop.items.emplace_back("index", Value::integer(k + 1));
      loop.items.emplace_back("index0", Value::integer(k));
      loop.items.emplace_back("revindex", Value::integer(n - k));
      loop.items.emplace_back("revindex0", Value::integer(n - k - 1));
      loop.items.emplace_back("first", Value::boolean(k == 0));
      loop.items.emplace_back("last", Value::boolean(k == n - 1));
      loop.items.emplace_back("length", Value::integer(n));
      loop.items.emplace_back("depth", Value::integer(1));
      loop.items.emplace_back("depth0", Value::integer(0));
      loop.items.emplace_back("previtem", k > 0 ? items[size_t(k - 1)] : Value::undefined("loop.previtem"));
      loop.items.emplace_back("nextitem",
                              k + 1 < n ? items[size_t(k + 1)] : Value::undefined("loop.nextitem"));
      loop.items.emplace_back("cycle", Value::func("loop.cycle", [k](Interp&, CallArgs& a, Pos) {
                                if (a.pos.empty()) fail("loop.cycle needs at least one value");
                                return a.pos[size_t(k) % a.pos.size()];
                              }));
      frames.back()["loop"] = Value::of_dict(std::move(loop));
      if (exec(s.bodies[0]) == Flow::Break) break;
    }
    frames.pop_back();
    if (n == 0) return exec(s.bodies[1]);
    return Flow::Normal;
  }

  Closure closure() const {
    Closure c;
    for (size_t k = 1; k < frames.size(); ++k) c.push_back(frames[k].vars);
    return c;
  }

  Value call_macro(const Stmt& m, CallArgs& a, const Closure& scope) {
    if (++depth > limits.max_depth) fail("macro calls nest deeper than the limit of ", limits.max_depth);
    if (a.pos.size() > m.names.size())
      fail(m.k == SK::Macro ? "macro '" + m.text + "'" : std::string("caller"), " takes ", m.names.size(),
           " arguments, got ", a.pos.size());
    Vars frame;
    std::vector<bool> given(m.names.size(), false);
    for (size_t k = 0; k < a.pos.size(); ++k) {
      frame[m.names[k]] = a.pos[k];
      given[k] = true;
    }
    for (const auto& [n, v] : a.kw) {
      const auto it = std::find(m.names.begin(), m.names.end(), n);
      if (it == m.names.end()) fail("macro '", m.text, "' has no parameter '", n, "'");
      frame[n] = v;
      given[size_t(it - m.names.begin())] = true;
    }
    // A macro sees the template's top-level variables, the scopes it was defined in and its own;
    // jinja2 evaluates defaults in that scope too.
    const std::vector<Frame> outer(frames.begin() + 1, frames.end());
    const Value caller = [&] {
      for (auto f = frames.rbegin(); f != frames.rend(); ++f)
        if (auto it = f->find("caller"); it != f->end()) return it->second;
      return kUndef;
    }();
    frames.resize(1);
    for (const std::weak_ptr<Vars>& w : scope)
      if (std::shared_ptr<Vars> vars = w.lock()) frames.emplace_back(std::move(vars));
    frames.emplace_back(std::move(frame));
    if (m.k == SK::Macro && !caller.is_undefined()) frames.back()["caller"] = caller;
    std::string text;
    try {
      for (size_t k = 0; k < m.names.size(); ++k)
        if (!given[k])
          frames.back()[m.names[k]] = m.exprs[k] ? eval(*m.exprs[k]) : Value::undefined(m.names[k]);
      text = capture(m.bodies[0]);
    } catch (...) {
      frames.resize(1);
      frames.insert(frames.end(), outer.begin(), outer.end());
      --depth;
      throw;
    }
    frames.resize(1);
    frames.insert(frames.end(), outer.begin(), outer.end());
    --depth;
    return Value::str(std::move(text));
  }

  // ---- expressions

  Value eval(const Expr& e) {
    try {
      return eval_one(e);
    } catch (EvalError& err) {
      if (!err.located) {
        err.at = e.at;
        err.located = true;
      }
      throw;
    }
  }

  CallArgs eval_args(const Expr& e, size_t first) {
    CallArgs a;
    for (size_t k = first; k < e.kids.size(); ++k) {
      Value v = eval(*e.kids[k]);
      if (e.kw[k].empty()) {
        if (!a.kw.empty()) fail("a positional argument follows a keyword argument");
        a.pos.push_back(std::move(v));
      } else {
        a.kw.emplace_back(e.kw[k], std::move(v));
      }
    }
    return a;
  }

  Value eval_one(const Expr& e) {
    switch (e.k) {
      case EK::Lit: return e.lit;
      case EK::Name: return lookup(e.name);
      case EK::ListLit: {
        Array l;
        for (const ExprP& k : e.kids) l.push_back(eval(*k));
        Value v = Value::of_list(std::move(l));
        v.tuple = e.negate;
        return v;
      }
      case EK::DictLit: {
        Dict d;
        for (size_t k = 0; k < e.kids.size(); k += 2) {
          const Value key = eval(*e.kids[k]);
          d.set(dict_key(key), eval(*e.kids[k + 1]));
        }
        return Value::of_dict(std::move(d));
      }
      case EK::Attr: return get_attr(eval(*e.kids[0]), e.name);
      case EK::Item: return get_item(eval(*e.kids[0]), eval(*e.kids[1]));
      case EK::Slice: {
        const Value obj = eval(*e.kids[0]);
        const Value b = e.kids[1] ? eval(*e.kids[1]) : kUndef, en = e.kids[2] ? eval(*e.kids[2]) : kUndef,
                    st = e.kids[3] ? eval(*e.kids[3]) : kUndef;
        if (obj.is_list()) {
          Array l;
          for (size_t k : slice_indices(int64_t(obj.list->size()), b, en, st)) l.push_back((*obj.list)[k]);
          return Value::of_list(std::move(l));
        }
        if (obj.is_str()) {
          const std::vector<size_t> at = code_point_starts(obj.s);
          std::string out;
          for (size_t k : slice_indices(int64_t(at.size() - 1), b, en, st))
            out += obj.s.substr(at[k], at[k + 1] - at[k]);
          return Value::str(std::move(out));
        }
        if (obj.is_undefined()) fail_undefined(obj);
        fail("'", type_name(obj), "' object cannot be sliced");
      }
      case EK::Call: {
        const Value callee = eval(*e.kids[0]);
        CallArgs a = eval_args(e, 1);
        if (callee.is_undefined()) fail_undefined(callee);
        if (!callee.is(Value::Kind::Func)) fail("'", type_name(callee), "' object is not callable");
        return (*callee.fn)(*this, a, {});
      }
      case EK::Filter: {
        const Value v = eval(*e.kids[0]);
        CallArgs a = eval_args(e, 1);
        return filter(e.name, v, a);
      }
      case EK::Test: {
        const Value v = eval(*e.kids[0]);
        CallArgs a = eval_args(e, 1);
        return Value::boolean(test(e.name, v, a) != e.negate);
      }
      case EK::Neg:
      case EK::Plus: {
        const Value v = eval(*e.kids[0]);
        if (v.is_undefined()) fail_undefined(v);
        if (!v.is_number())
          fail("bad operand type for unary ", e.k == EK::Neg ? "-" : "+", ": '", type_name(v), "'");
        if (v.is(Value::Kind::Float)) return Value::real(e.k == EK::Neg ? -v.f : v.f);
        const int64_t x = as_int(v, "an operand");
        if (e.k == EK::Neg && x == INT64_MIN) fail("integer overflow");
        return Value::integer(e.k == EK::Neg ? -x : x);
      }
      case EK::Not: return Value::boolean(!truthy(eval(*e.kids[0])));
      case EK::And: {
        Value l = eval(*e.kids[0]);
        return truthy(l) ? eval(*e.kids[1]) : l;
      }
      case EK::Or: {
        Value l = eval(*e.kids[0]);
        return truthy(l) ? l : eval(*e.kids[1]);
      }
      case EK::Bin: return binary(e.name, eval(*e.kids[0]), eval(*e.kids[1]));
      case EK::Concat: {
        std::string out;
        for (const ExprP& k : e.kids) {
          out += py_str(eval(*k));
          grow_check(out.size());
        }
        return Value::str(std::move(out));
      }
      case EK::Cmp: {
        Value l = eval(*e.kids[0]);
        for (size_t k = 0; k < e.ops.size(); ++k) {
          Value r = eval(*e.kids[k + 1]);
          const std::string& op = e.ops[k];
          bool ok;
          if (op == "==") {
            ok = py_eq(l, r);
          } else if (op == "!=") {
            ok = !py_eq(l, r);
          } else if (op == "<") {
            ok = py_lt(l, r);
          } else if (op == ">") {
            ok = py_lt(r, l);
          } else if (op == "<=") {
            ok = !py_lt(r, l);
          } else if (op == ">=") {
            ok = !py_lt(l, r);
          } else if (op == "in") {
            ok = contains(r, l);
          } else {
            ok = !contains(r, l);
          }
          if (!ok) return Value::boolean(false);
          l = std::move(r);
        }
        return Value::boolean(true);
      }
      case EK::Cond:
        if (truthy(eval(*e.kids[1]))) return eval(*e.kids[0]);
        return e.kids[2] ? eval(*e.kids[2]) : Value::undefined("the else branch of an inline if");
    }
    fail("internal: expression kind not handled");
  }

  Value binary(const std::string& op, const Value& l, const Value& r) {
    if (l.is_undefined()) fail_undefined(l);
    if (r.is_undefined()) fail_undefined(r);
    const auto type_error = [&]() -> Value {
      fail("unsupported operand types for ", op, ": '", type_name(l), "' and '", type_name(r), "'");
    };
    if (op == "%" && l.is_str()) return Value::str(percent_format(l.s, r));
    if (l.is_number() && r.is_number()) {
      const bool real = l.is(Value::Kind::Float) || r.is(Value::Kind::Float);
      if (op == "/") {
        if (r.as_double() == 0) fail("division by zero");
        return Value::real(l.as_double() / r.as_double());
      }
      if (real) {
        const double a = l.as_double(), b = r.as_double();
        if (op == "+") return Value::real(a + b);
        if (op == "-") return Value::real(a - b);
        if (op == "*") return Value::real(a * b);
        if (op == "**") return Value::real(std::pow(a, b));
        if (b == 0) fail("float division by zero");
        if (op == "//") return Value::real(std::floor(a / b));
        const double m = std::fmod(a, b);
        return Value::real(m != 0 && ((m < 0) != (b < 0)) ? m + b : m);
      }
      const int64_t a = as_int(l, "an operand"), b = as_int(r, "an operand");
      int64_t out = 0;
      if (op == "+") {
        if (__builtin_add_overflow(a, b, &out)) fail("integer overflow in +");
        return Value::integer(out);
      }
      if (op == "-") {
        if (__builtin_sub_overflow(a, b, &out)) fail("integer overflow in -");
        return Value::integer(out);
      }
      if (op == "*") {
        if (__builtin_mul_overflow(a, b, &out)) fail("integer overflow in *");
        return Value::integer(out);
      }
      if (op == "**") {
        if (b < 0) return Value::real(std::pow(double(a), double(b)));
        out = 1;
        for (int64_t k = 0; k < b; ++k)
          if (__builtin_mul_overflow(out, a, &out)) fail("integer overflow in **");
        return Value::integer(out);
      }
      if (b == 0) fail("integer division or modulo by zero");
      if (a == INT64_MIN && b == -1) fail("integer overflow");
      int64_t q = a / b, m = a % b;
      if (m != 0 && ((m < 0) != (b < 0))) {
        --q;
        m += b;
      }
      return Value::integer(op == "//" ? q : m);
    }
    if (op == "+") {
      if (l.is_str() && r.is_str()) {
        grow_check(l.s.size() + r.s.size());
        if (l.flag == r.flag) {
          Value out = Value::str(l.s + r.s);
          out.flag = l.flag;
          return out;
        }
        // Markup + str escapes the plain side, as markupsafe does.
        Value out = Value::str(l.flag ? l.s + html_escape(r.s) : html_escape(l.s) + r.s);
        out.flag = true;
        return out;
      }
      if (l.is_list() && r.is_list()) {
        grow_check(l.list->size() + r.list->size());
        Array out = *l.list;
        out.insert(out.end(), r.list->begin(), r.list->end());
        return Value::of_list(std::move(out));
      }
      return type_error();
    }
    if (op == "*") {
      const Value& seq = l.is_number() ? r : l;
      const Value& count = l.is_number() ? l : r;
      if (!count.is(Value::Kind::Int) && !count.is(Value::Kind::Bool)) return type_error();
      const int64_t n = std::max<int64_t>(0, as_int(count, "a repeat count"));
      if (seq.is_str()) {
        grow_check(seq.s.size() * size_t(std::min<int64_t>(n, int64_t(limits.max_output_bytes) + 1)));
        std::string out;
        for (int64_t k = 0; k < n; ++k) out += seq.s;
        return Value::str(std::move(out));
      }
      if (seq.is_list()) {
        grow_check(seq.list->size() * size_t(std::min<int64_t>(n, int64_t(limits.max_output_bytes) + 1)));
        Array out;
        for (int64_t k = 0; k < n; ++k) out.insert(out.end(), seq.list->begin(), seq.list->end());
        return Value::of_list(std::move(out));
      }
    }
    return type_error();
  }

  Value get_item(const Value& obj, const Value& key) {
    if (obj.is_undefined()) fail_undefined(obj);
    if (obj.is_list() && obj.flag) return Value::undefined("an item of a generator");
    if (obj.is_list() || obj.is_str()) {
      if (key.is(Value::Kind::Int) || key.is(Value::Kind::Bool)) {
        const int64_t n = int64_t(obj.is_list() ? obj.list->size() : code_points(obj.s));
        int64_t k = as_int(key, "an index");
        if (k < 0) k += n;
        if (k < 0 || k >= n) return Value::undefined("index " + std::to_string(as_int(key, "an index")));
        if (obj.is_list()) return (*obj.list)[size_t(k)];
        const std::vector<size_t> at = code_point_starts(obj.s);
        return Value::str(obj.s.substr(at[size_t(k)], at[size_t(k) + 1] - at[size_t(k)]));
      }
    } else if (obj.is_mapping() && (key.is_str() || key.is(Value::Kind::Int))) {
      if (const Value* v = obj.dict->find(dict_key(key))) return *v;
    }
    if (key.is_str()) return get_attr(obj, key.s, false);
    return Value::undefined("item " + py_repr(key));
  }

  // jinja2 tries the attribute first (so a dict's methods win over its keys of the same name) for
  // `x.name`, and the item first for `x['name']`.
  Value get_attr(const Value& obj, const std::string& name, bool try_item = true) {
    if (obj.is_undefined()) fail_undefined(obj);
    if (Value m = method(obj, name); !m.is_undefined()) return m;
    if (try_item && obj.is_mapping())
      if (const Value* v = obj.dict->find(name)) return *v;
    return Value::undefined(name);
  }

  static Value bound(const Value& self, const std::string& name,
                     std::function<Value(const Value&, CallArgs&)> f) {
    return Value::func(name, [self, f = std::move(f)](Interp&, CallArgs& a, Pos) { return f(self, a); });
  }

  Value method(const Value& obj, const std::string& name);
  Value filter(const std::string& name, const Value& v, CallArgs& a);
  bool test(const std::string& name, const Value& v, CallArgs& a);
};

Value Interp::method(const Value& obj, const std::string& name) {
  using CA = CallArgs;
  if (obj.is_str()) {
    if (name == "strip" || name == "lstrip" || name == "rstrip")
      return bound(obj, name, [name](const Value& self, CA& a) {
        check_arity(a, 1, "str." + name);
        const Value* chars = a.pos.empty() ? nullptr : &a.pos[0];
        if (chars && !chars->is_str() && !chars->is(Value::Kind::None))
          fail("str.", name, "'s argument must be a string");
        return Value::str(strip_chars(self.s, name != "rstrip", name != "lstrip", chars));
      });
    if (name == "split" || name == "rsplit")
      return bound(obj, name, [name](const Value& self, CA& a) {
        check_arity(a, 2, "str." + name);
        const Value sep = arg(a, 0, "sep", kNone);
        const int64_t maxsplit = as_int(arg(a, 1, "maxsplit", Value::integer(-1)), "maxsplit");
        return Value::of_list(str_list(py_split(self.s, sep, maxsplit, name == "rsplit")));
      });
    if (name == "startswith" || name == "endswith")
      return bound(obj, name, [name](const Value& self, CA& a) {
        if (a.pos.size() != 1) fail("str.", name, " takes one argument here");
        const Array one{a.pos[0]};
        const Array& options = a.pos[0].is_list() ? *a.pos[0].list : one;
        for (const Value& o : options) {
          const std::string& p = as_str(o, "str." + name + "'s argument");
          const bool hit =
              name == "startswith"
                  ? self.s.compare(0, p.size(), p) == 0
                  : self.s.size() >= p.size() && self.s.compare(self.s.size() - p.size(), p.size(), p) == 0;
          if (hit) return Value::boolean(true);
        }
        return Value::boolean(false);
      });
    if (name == "upper" || name == "lower" || name == "title" || name == "capitalize")
      return bound(obj, name, [name](const Value& self, CA& a) {
        check_arity(a, 0, "str." + name);
        if (name == "upper") return Value::str(upper(self.s));
        if (name == "lower") return Value::str(lower(self.s));
        if (name == "title") return Value::str(title(self.s));
        return Value::str(capitalize(self.s));
      });
    if (name == "replace")
      return bound(obj, name, [](const Value& self, CA& a) {
        if (a.pos.size() < 2 || a.pos.size() > 3) fail("str.replace takes 2 or 3 arguments");
        const int64_t count = a.pos.size() == 3 ? as_int(a.pos[2], "str.replace's count") : -1;
        return Value::str(replace_all(self.s, as_str(a.pos[0], "str.replace's argument"),
                                      as_str(a.pos[1], "str.replace's argument"), count));
      });
    if (name == "format")
      return bound(obj, name, [](const Value& self, CA& a) { return Value::str(brace_format(self.s, a)); });
    if (name == "find" || name == "rfind" || name == "count")
      return bound(obj, name, [name](const Value& self, CA& a) {
        if (a.pos.size() != 1) fail("str.", name, " takes one argument here");
        const std::string& sub = as_str(a.pos[0], "str." + name + "'s argument");
        if (name == "count") {
          if (sub.empty()) return Value::integer(int64_t(code_points(self.s)) + 1);
          int64_t n = 0;
          for (size_t p = self.s.find(sub); p != std::string::npos; p = self.s.find(sub, p + sub.size())) ++n;
          return Value::integer(n);
        }
        const size_t p = name == "find" ? self.s.find(sub) : self.s.rfind(sub);
        return Value::integer(
            p == std::string::npos ? -1 : int64_t(code_points(std::string_view(self.s).substr(0, p))));
      });
    if (name == "join")
      return bound(obj, name, [](const Value& self, CA& a) {
        if (a.pos.size() != 1) fail("str.join takes one argument");
        std::string out;
        const Array items = iterate(a.pos[0]);
        for (size_t k = 0; k < items.size(); ++k) {
          if (k) out += self.s;
          out += as_str(items[k], "an item str.join joins");
        }
        return Value::str(std::move(out));
      });
    if (name == "splitlines")
      return bound(obj, name,
                   [](const Value& self, CA&) { return Value::of_list(str_list(splitlines(self.s))); });
    if (name == "isdigit" || name == "isspace" || name == "isalpha" || name == "isalnum" ||
        name == "isupper" || name == "islower")
      return bound(obj, name, [name](const Value& self, CA&) {
        // Python's predicates over Unicode categories; a byte that starts no UTF-8 sequence is in none.
        const std::string& s = self.s;
        bool ok = !s.empty();
        bool cased = false;
        for (size_t i = 0; i < s.size() && ok;) {
          utf8proc_int32_t cp = 0;
          const utf8proc_ssize_t len = code_point_at(s, i, cp);
          if (len <= 0) {
            ok = false;
            break;
          }
          i += size_t(len);
          const utf8proc_category_t cat = utf8proc_category(cp);
          const bool letter = cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO;
          const bool number = cat >= UTF8PROC_CATEGORY_ND && cat <= UTF8PROC_CATEGORY_NO;
          if (name == "isdigit") ok = cat == UTF8PROC_CATEGORY_ND;
          if (name == "isspace")
            ok = (cp < 0x80 && is_space(char(cp))) || cat == UTF8PROC_CATEGORY_ZS ||
                 cat == UTF8PROC_CATEGORY_ZL || cat == UTF8PROC_CATEGORY_ZP || cp == 0x85;
          if (name == "isalpha") ok = letter;
          if (name == "isalnum") ok = letter || number;
          if (name == "isupper") ok = cat != UTF8PROC_CATEGORY_LL && cat != UTF8PROC_CATEGORY_LT;
          if (name == "islower") ok = cat != UTF8PROC_CATEGORY_LU && cat != UTF8PROC_CATEGORY_LT;
          cased = cased || is_cased(cp);
        }
        return Value::boolean(ok && (name != "isupper" && name != "islower" ? true : cased));
      });
    return kUndef;
  }
  if (obj.is(Value::Kind::Dict)) {
    if (name == "get")
      return bound(obj, name, [](const Value& self, CA& a) {
        if (a.pos.empty() || a.pos.size() > 2) fail("dict.get takes 1 or 2 arguments");
        if (a.pos[0].is_str() || a.pos[0].is(Value::Kind::Int))
          if (const Value* v = self.dict->find(dict_key(a.pos[0]))) return *v;
        return a.pos.size() == 2 ? a.pos[1] : kNone;
      });
    if (name == "items" || name == "keys" || name == "values")
      return bound(obj, name, [name](const Value& self, CA& a) {
        check_arity(a, 0, "dict." + name);
        Array out;
        for (const auto& [k, v] : self.dict->items) {
          if (name == "items") {
            out.push_back(pair(key_value(k), v));
          } else {
            out.push_back(name == "keys" ? key_value(k) : v);
          }
        }
        return Value::of_list(std::move(out));
      });
    if (name == "pop" || name == "update" || name == "setdefault" || name == "clear" || name == "popitem")
      return bound(obj, name, [name](const Value&, CA&) -> Value {
        fail("dict.", name, " is refused: templates render in an immutable sandbox");
      });
    return kUndef;
  }
  if (obj.is_list()) {
    if (name == "append" || name == "pop" || name == "extend" || name == "insert" || name == "remove" ||
        name == "sort" || name == "reverse" || name == "clear")
      return bound(obj, name, [name](const Value&, CA&) -> Value {
        fail("list.", name, " is refused: templates render in an immutable sandbox");
      });
    if (name == "index" || name == "count")
      return bound(obj, name, [name](const Value& self, CA& a) {
        if (a.pos.size() != 1) fail("list.", name, " takes one argument here");
        int64_t n = 0;
        for (size_t k = 0; k < self.list->size(); ++k)
          if (py_eq((*self.list)[k], a.pos[0])) {
            if (name == "index") return Value::integer(int64_t(k));
            ++n;
          }
        if (name == "index") fail(py_repr(a.pos[0]), " is not in list");
        return Value::integer(n);
      });
    return kUndef;
  }
  if (obj.is(Value::Kind::Namespace)) {
    if (const Value* v = obj.dict->find(name)) return *v;
  }
  return kUndef;
}

Value Interp::global(const std::string& name) {
  if (name == "range")
    return Value::func(name, [](Interp& in, CallArgs& a, Pos) {
      if (a.pos.empty() || a.pos.size() > 3) fail("range takes 1 to 3 arguments");
      int64_t b = 0, e = 0, st = 1;
      if (a.pos.size() == 1) {
        e = as_int(a.pos[0], "range's argument");
      } else {
        b = as_int(a.pos[0], "range's argument");
        e = as_int(a.pos[1], "range's argument");
        if (a.pos.size() == 3) st = as_int(a.pos[2], "range's step");
      }
      if (st == 0) fail("range's step cannot be zero");
      // The sandbox's own bound on range().
      constexpr int64_t kMaxRange = 100000;
      Array out;
      for (int64_t k = b; st > 0 ? k < e : k > e; k += st) {
        if (int64_t(out.size()) >= kMaxRange) fail("range() is limited to ", kMaxRange, " items");
        out.push_back(Value::integer(k));
      }
      in.grow_check(out.size());
      return Value::of_list(std::move(out));
    });
  if (name == "namespace" || name == "dict")
    return Value::func(name, [name](Interp&, CallArgs& a, Pos) {
      Dict d;
      for (const Value& p : a.pos) {
        if (!p.is_mapping()) fail(name, "() takes keyword arguments or a dict");
        for (const auto& [k, v] : p.dict->items) d.set(k, v);
      }
      for (const auto& [k, v] : a.kw) {
        if (name == "namespace" && k[0] == '_') fail("namespace attributes starting with '_' are refused");
        d.set(k, v);
      }
      return Value::of_dict(std::move(d), name == "namespace" ? Value::Kind::Namespace : Value::Kind::Dict);
    });
  if (name == "raise_exception")
    return Value::func(name, [](Interp&, CallArgs& a, Pos) -> Value {
      fail("the template raised an error: ", a.pos.empty() ? std::string() : py_str(a.pos[0]));
    });
  if (name == "strftime_now")
    return Value::func(name, [](Interp& in, CallArgs& a, Pos) {
      if (a.pos.size() != 1) fail("strftime_now takes one argument");
      std::tm tm{};
      localtime_r(&in.now, &tm);
      char buf[256];
      const size_t n = std::strftime(buf, sizeof buf, as_str(a.pos[0], "strftime_now's format").c_str(), &tm);
      return Value::str(std::string(buf, n));
    });
  return kUndef;
}

bool Interp::test(const std::string& name, const Value& v, CallArgs& a) {
  const auto other = [&]() -> const Value& {
    if (a.pos.size() != 1) fail("test '", name, "' takes one argument");
    return a.pos[0];
  };
  using K = Value::Kind;
  if (name == "defined") return !v.is_undefined();
  if (name == "undefined") return v.is_undefined();
  if (name == "none") return v.is(K::None);
  if (name == "string") return v.is_str();
  if (name == "mapping") return v.is(K::Dict);
  if (name == "iterable") return v.is_undefined() || v.is_str() || v.is_list() || v.is(K::Dict);
  if (name == "sequence") return v.is_undefined() || v.is_str() || v.is_list() || v.is(K::Dict);
  if (name == "number") return v.is_number();
  if (name == "integer") return v.is(K::Int);
  if (name == "float") return v.is(K::Float);
  if (name == "boolean") return v.is(K::Bool);
  if (name == "true") return v.is(K::Bool) && v.b;
  if (name == "false") return v.is(K::Bool) && !v.b;
  if (name == "callable") return v.is(K::Func);
  if (name == "lower") return v.is_str() && lower(v.s) == v.s;
  if (name == "upper") return v.is_str() && upper(v.s) == v.s;
  if (name == "sameas") {
    const Value& o = other();
    if (v.kind != o.kind) return false;
    if (v.is_list()) return v.list == o.list;
    if (v.is_mapping()) return v.dict == o.dict;
    if (v.is_str()) return false;  // two strings are the same object only by accident of interning
    return py_eq(v, o);
  }
  if (name == "eq" || name == "equalto") return py_eq(v, other());
  if (name == "ne") return !py_eq(v, other());
  if (name == "lt") return py_lt(v, other());
  if (name == "gt") return py_lt(other(), v);
  if (name == "le") return !py_lt(other(), v);
  if (name == "ge") return !py_lt(v, other());
  if (name == "in") return contains(other(), v);
  if (name == "odd" || name == "even") return (as_int(v, "the value tested") % 2 != 0) == (name == "odd");
  if (name == "divisibleby") {
    const int64_t d = as_int(other(), "divisibleby's argument");
    if (d == 0) fail("integer division or modulo by zero");
    return as_int(v, "the value tested") % d == 0;
  }
  fail("unsupported test '", name, "'");
}

// The value of attribute (a dotted path; an integer part indexes) of an item, as jinja2's
// attribute filters look it up.
Value attribute_of(Interp& in, const Value& item, const std::string& path) {
  Value v = item;
  size_t b = 0;
  for (;;) {
    const size_t dot = path.find('.', b);
    const std::string part = path.substr(b, dot == std::string::npos ? std::string::npos : dot - b);
    const bool digits = !part.empty() && std::all_of(part.begin(), part.end(),
                                                     [](char c) { return std::isdigit((unsigned char)c); });
    if (v.is_undefined()) return v;
    v = in.get_item(v, digits ? Value::integer(std::stoll(part)) : Value::str(part));
    if (dot == std::string::npos) return v;
    b = dot + 1;
  }
}

// Sort key comparison for sort / unique / dictsort: strings compared lower-cased unless asked not to.
Value sort_key(const Value& v, bool case_sensitive) {
  return !case_sensitive && v.is_str() ? Value::str(lower(v.s)) : v;
}

Value Interp::filter(const std::string& name, const Value& v, CallArgs& a) {
  using K = Value::Kind;
  if (name == "safe") {
    Value m = Value::str(py_str(v));
    m.flag = true;
    return m;
  }
  if (name == "string") return Value::str(py_str(v));
  if (name == "length" || name == "count") return Value::integer(int64_t(py_len(v)));
  if (name == "default" || name == "d") {
    const Value dflt = arg(a, 0, "default_value", kEmpty);
    const bool boolean = truthy(arg(a, 1, "boolean", kFalse));
    return v.is_undefined() || (boolean && !truthy(v)) ? dflt : v;
  }
  if (name == "tojson") {
    check_arity(a, 1, "tojson");
    const std::string out = json_dumps(v, arg(a, 0, "indent", kNone), truthy(arg(a, 99, "sort_keys", kFalse)),
                                       truthy(arg(a, 99, "ensure_ascii", kFalse)), 0, 0);
    grow_check(out.size());
    return Value::str(out);
  }
  if (name == "trim") {
    const Value chars = arg(a, 0, "chars", kNone);
    return Value::str(strip_chars(py_str(v), true, true, &chars));
  }
  if (name == "lower") return Value::str(lower(py_str(v)));
  if (name == "upper") return Value::str(upper(py_str(v)));
  if (name == "title") return Value::str(title(py_str(v)));
  if (name == "capitalize") return Value::str(capitalize(py_str(v)));
  if (name == "replace") {
    if (a.pos.size() < 2) fail("replace takes the old and the new string");
    const Value count = arg(a, 2, "count", kNone);
    return Value::str(replace_all(py_str(v), py_str(a.pos[0]), py_str(a.pos[1]),
                                  count.is(K::None) ? -1 : as_int(count, "replace's count")));
  }
  if (name == "first" || name == "last") {
    const Array items = iterate(v);
    if (items.empty()) return Value::undefined(std::string("the ") + name + " item of an empty sequence");
    return name == "first" ? items.front() : items.back();
  }
  if (name == "join") {
    const std::string sep = py_str(arg(a, 0, "d", kEmpty));
    const Value attr = arg(a, 1, "attribute", kNone);
    std::string out;
    const Array items = iterate(v);
    for (size_t k = 0; k < items.size(); ++k) {
      if (k) out += sep;
      out += py_str(attr.is(K::None) ? items[k] : attribute_of(*this, items[k], py_str(attr)));
      grow_check(out.size());
    }
    return Value::str(std::move(out));
  }
  if (name == "list") return Value::of_list(iterate(v));
  if (name == "items") {
    if (v.is_undefined()) return Value::of_list({});
    if (!v.is(K::Dict)) fail("items: can only get items from a mapping, not '", type_name(v), "'");
    Array out;
    for (const auto& [k, x] : v.dict->items) out.push_back(pair(key_value(k), x));
    return generator(std::move(out));
  }
  if (name == "dictsort") {
    if (!v.is(K::Dict)) fail("dictsort: a mapping is required, not '", type_name(v), "'");
    const bool cs = truthy(arg(a, 0, "case_sensitive", kFalse));
    const bool by_value = py_str(arg(a, 1, "by", Value::str("key"))) == "value";
    const bool rev = truthy(arg(a, 2, "reverse", kFalse));
    Array out;
    for (const auto& [k, x] : v.dict->items) out.push_back(pair(key_value(k), x));
    std::stable_sort(out.begin(), out.end(), [&](const Value& p, const Value& q) {
      const Value &x = (*p.list)[by_value], &y = (*q.list)[by_value];
      return rev ? py_lt(sort_key(y, cs), sort_key(x, cs)) : py_lt(sort_key(x, cs), sort_key(y, cs));
    });
    return Value::of_list(std::move(out));
  }
  if ((name == "selectattr" || name == "rejectattr" || name == "select" || name == "reject" ||
       name == "map") &&
      !truthy(v))
    return generator({});
  if (name == "selectattr" || name == "rejectattr" || name == "select" || name == "reject") {
    const bool by_attr = name.ends_with("attr");
    const bool keep_if = name.starts_with("select");
    size_t k0 = 0;
    std::string attr;
    if (by_attr) {
      if (a.pos.empty()) fail(name, " needs an attribute name");
      attr = py_str(a.pos[0]);
      k0 = 1;
    }
    std::string test_name;
    CallArgs targs;
    if (a.pos.size() > k0) {
      test_name = as_str(a.pos[k0], name + "'s test name");
      if (!known(kTests, test_name)) fail("unsupported test '", test_name, "'");
      targs.pos.assign(a.pos.begin() + long(k0) + 1, a.pos.end());
    }
    Array out;
    for (const Value& item : iterate(v)) {
      const Value x = by_attr ? attribute_of(*this, item, attr) : item;
      const bool pass = test_name.empty() ? truthy(x) : test(test_name, x, targs);
      if (pass == keep_if) out.push_back(item);
    }
    return generator(std::move(out));
  }
  if (name == "map") {
    Array out;
    const Value attr = arg(a, 99, "attribute", kUndef);
    if (!attr.is_undefined()) {
      const Value dflt = arg(a, 99, "default", kUndef);
      for (const Value& item : iterate(v)) {
        Value x = attribute_of(*this, item, py_str(attr));
        out.push_back(x.is_undefined() && !dflt.is_undefined() ? dflt : x);
      }
      return generator(std::move(out));
    }
    if (a.pos.empty()) fail("map needs a filter name or attribute=");
    const std::string f = as_str(a.pos[0], "map's filter name");
    if (!known(kFilters, f)) fail("unsupported filter '", f, "'");
    CallArgs fargs;
    fargs.pos.assign(a.pos.begin() + 1, a.pos.end());
    fargs.kw = a.kw;
    for (const Value& item : iterate(v)) out.push_back(filter(f, item, fargs));
    return generator(std::move(out));
  }
  if (name == "unique") {
    const bool cs = truthy(arg(a, 0, "case_sensitive", kFalse));
    const Value attr = arg(a, 1, "attribute", kNone);
    Array out, seen;
    for (const Value& item : iterate(v)) {
      const Value key = sort_key(attr.is(K::None) ? item : attribute_of(*this, item, py_str(attr)), cs);
      if (std::any_of(seen.begin(), seen.end(), [&](const Value& s) { return py_eq(s, key); })) continue;
      seen.push_back(key);
      out.push_back(item);
    }
    return generator(std::move(out));
  }
  if (name == "reverse") {
    if (v.is_str()) {
      const std::vector<size_t> at = code_point_starts(v.s);
      std::string out;
      for (size_t k = at.size() - 1; k > 0; --k) out += v.s.substr(at[k - 1], at[k] - at[k - 1]);
      return Value::str(std::move(out));
    }
    Array items = iterate(v);
    std::reverse(items.begin(), items.end());
    return generator(std::move(items));
  }
  if (name == "sort") {
    const bool rev = truthy(arg(a, 0, "reverse", kFalse));
    const bool cs = truthy(arg(a, 1, "case_sensitive", kFalse));
    const Value attr = arg(a, 2, "attribute", kNone);
    Array items = iterate(v);
    std::vector<Value> keys;
    for (const Value& item : items)
      keys.push_back(sort_key(attr.is(K::None) ? item : attribute_of(*this, item, py_str(attr)), cs));
    std::vector<size_t> order(items.size());
    for (size_t k = 0; k < order.size(); ++k) order[k] = k;
    std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) {
      return rev ? py_lt(keys[y], keys[x]) : py_lt(keys[x], keys[y]);
    });
    Array out;
    for (size_t k : order) out.push_back(items[k]);
    return Value::of_list(std::move(out));
  }
  if (name == "min" || name == "max" || name == "sum") {
    const Array items = iterate(v);
    if (name == "sum") {
      Value total = Value::integer(0);
      for (const Value& x : items) total = binary("+", total, x);
      return total;
    }
    if (items.empty()) return Value::undefined("the " + name + " of an empty sequence");
    Value best = items[0];
    for (const Value& x : items)
      if (name == "min" ? py_lt(sort_key(x, false), sort_key(best, false))
                        : py_lt(sort_key(best, false), sort_key(x, false)))
        best = x;
    return best;
  }
  if (name == "abs") {
    if (v.is(K::Float)) return Value::real(std::fabs(v.f));
    const int64_t x = as_int(v, "abs's value");
    if (x == INT64_MIN) fail("integer overflow");
    return Value::integer(x < 0 ? -x : x);
  }
  if (name == "round") {
    const int64_t prec = as_int(arg(a, 0, "precision", Value::integer(0)), "round's precision");
    const std::string method = py_str(arg(a, 1, "method", Value::str("common")));
    if (!v.is_number()) fail("round needs a number, not '", type_name(v), "'");
    const double scale = std::pow(10.0, double(prec)), x = v.as_double() * scale;
    double r;
    if (method == "common") {
      r = std::round(x);
    } else if (method == "ceil") {
      r = std::ceil(x);
    } else if (method == "floor") {
      r = std::floor(x);
    } else {
      fail("round's method must be common, ceil or floor");
    }
    return Value::real(r / scale);
  }
  if (name == "int" || name == "float") {
    const bool is_int = name == "int";
    const Value dflt = arg(a, 0, "default", is_int ? Value::integer(0) : Value::real(0));
    if (v.is(K::Int) || v.is(K::Bool))
      return is_int ? Value::integer(as_int(v, "int's value")) : Value::real(v.as_double());
    if (v.is(K::Float)) {
      if (!is_int) return v;
      if (!std::isfinite(v.f) || std::fabs(v.f) >= 9.2e18) return dflt;
      return Value::integer(int64_t(v.f));
    }
    if (!v.is_str()) return dflt;
    const std::string s = strip_chars(v.s, true, true, nullptr);
    if (s.empty()) return dflt;
    if (is_int) {
      int64_t x = 0;
      const char* b = s.data() + (s[0] == '+' ? 1 : 0);
      const auto r = std::from_chars(b, s.data() + s.size(), x);
      if (r.ec == std::errc() && r.ptr == s.data() + s.size()) return Value::integer(x);
    }
    char* end = nullptr;
    const double d = std::strtod(s.c_str(), &end);
    if (end != s.c_str() + s.size()) return dflt;
    if (!is_int) return Value::real(d);
    if (!std::isfinite(d) || std::fabs(d) >= 9.2e18) return dflt;
    return Value::integer(int64_t(d));
  }
  if (name == "indent") {
    const Value width = arg(a, 0, "width", Value::integer(4));
    const bool first = truthy(arg(a, 1, "first", kFalse)), blank = truthy(arg(a, 2, "blank", kFalse));
    const std::string unit =
        width.is_str() ? width.s
                       : std::string(size_t(std::max<int64_t>(0, as_int(width, "indent's width"))), ' ');
    std::vector<std::string> lines = splitlines(py_str(v) + "\n");
    std::string out;
    for (size_t k = 0; k < lines.size(); ++k) {
      if (k) out += '\n';
      if (k > 0 && (blank || !lines[k].empty())) out += unit;
      out += lines[k];
    }
    if (first) out = unit + out;
    grow_check(out.size());
    return Value::str(std::move(out));
  }
  if (name == "format") {
    if (!v.is_str()) fail("format needs a format string");
    return Value::str(percent_format(v.s, Value::of_list(a.pos)));
  }
  fail("unsupported filter '", name, "'");
}

Value from_json_checked(const nlohmann::ordered_json& j, int depth) {
  if (depth > 256) fail("a template variable nests more than 256 levels deep");
  if (j.is_array()) {
    Array l;
    for (const auto& e : j) l.push_back(from_json_checked(e, depth + 1));
    return Value::of_list(std::move(l));
  }
  if (j.is_object()) {
    Dict d;
    for (const auto& [k, e] : j.items()) d.items.emplace_back(k, from_json_checked(e, depth + 1));
    return Value::of_dict(std::move(d));
  }
  return from_json(j);
}

std::vector<size_t> line_starts(const std::string& s) {
  std::vector<size_t> at{0};
  for (size_t k = 0; k < s.size(); ++k)
    if (s[k] == '\n') at.push_back(k + 1);
  return at;
}

}  // namespace

struct Template::Impl {
  std::string name;
  std::string source;
  std::vector<size_t> lines;
  Body body;
  bool has_generation = false;
  Limits limits;

  [[noreturn]] void raise(const EvalError& e, std::string_view phase) const {
    const size_t at = std::min(e.at, source.size());
    const size_t line = size_t(std::upper_bound(lines.begin(), lines.end(), at) - lines.begin());
    const size_t col = at - lines[line - 1] + 1;
    TF_FAIL(name, ":", line, ":", col, ": ", phase, e.msg);
  }
};

Template::Template(std::string_view source, std::string name, Limits limits) {
  auto impl = std::make_shared<Impl>();
  impl->name = std::move(name);
  impl->limits = limits;
  TF_CHECK(source.size() <= limits.max_source_bytes, impl->name, ": the chat template is ", source.size(),
           " bytes, more than the limit of ", limits.max_source_bytes);
  // jinja2 reads \r\n and \r as \n and drops one trailing newline (keep_trailing_newline is off).
  std::string& s = impl->source;
  s.reserve(source.size());
  for (size_t k = 0; k < source.size(); ++k) {
    if (source[k] == '\r') {
      s += '\n';
      if (k + 1 < source.size() && source[k + 1] == '\n') ++k;
    } else {
      s += source[k];
    }
  }
  if (!s.empty() && s.back() == '\n') s.pop_back();
  impl->lines = line_starts(s);
  try {
    Parser p(Lexer(s).run(), limits.max_depth);
    impl->body = p.parse_template(impl->has_generation);
    check_names(impl->body, false);
  } catch (const EvalError& e) {
    impl->raise(e, "");
  }
  impl_ = std::move(impl);
}

Rendered Template::render(const nlohmann::ordered_json& context, std::time_t now) const {
  TF_CHECK(context.is_object(), impl_->name, ": the template's variables must be a JSON object");
  Interp in(impl_->limits, now);
  try {
    in.frames.emplace_back();
    for (const auto& [k, v] : context.items()) in.frames[0][k] = from_json_checked(v, 0);
    in.exec(impl_->body);
  } catch (const EvalError& e) {
    impl_->raise(e, "while rendering: ");
  }
  return {std::move(in.outs[0]), std::move(in.generation)};
}

bool Template::has_generation_blocks() const {
  return impl_->has_generation;
}
const std::string& Template::name() const {
  return impl_->name;
}

}  // namespace tf::data::jinja
