// defines: tf::tok::JsonReader (typed field access to a tokenizer.json with errors naming the file),
// tf::tok::json_type_name, tf::tok::ReplacePattern (the String / Regex patterns of Replace steps)
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>

#include "src/core/error.h"
#include "tokenizer/regex.h"
#include "tokenizer/token_model.h"

namespace tf::tok {

inline std::string json_type_name(const nlohmann::json& j) {
  return j.is_object() && j.contains("type") && j["type"].is_string() ? j["type"].get<std::string>() : "?";
}

// Nested Sequence steps deeper than this are refused: real files nest at most one level, and the
// bound keeps a hostile file from recursing without limit.
constexpr int kMaxSequenceDepth = 8;

struct JsonReader {
  const std::string& path;

  [[noreturn]] void fail(const std::string& what) const { TF_FAIL(path, ": ", what); }

  const nlohmann::json& field(const nlohmann::json& obj, const char* key, const std::string& where) const {
    if (!obj.is_object() || !obj.contains(key)) fail(where + " has no \"" + key + "\"");
    return obj[key];
  }
  bool flag(const nlohmann::json& obj, const char* key, bool dflt) const {
    if (!obj.contains(key) || obj[key].is_null()) return dflt;
    if (!obj[key].is_boolean()) fail(std::string("\"") + key + "\" is not a boolean");
    return obj[key].get<bool>();
  }
  bool required_flag(const nlohmann::json& obj, const char* key, const std::string& where) const {
    const nlohmann::json& v = field(obj, key, where);
    if (!v.is_boolean()) fail(where + " \"" + key + "\" is not a boolean");
    return v.get<bool>();
  }
  std::string str(const nlohmann::json& j, const std::string& what) const {
    if (!j.is_string()) fail(what + " is not a string");
    std::string s = j.get<std::string>();
    if (s.size() > kMaxPieceBytes)
      fail(what + " is " + std::to_string(s.size()) + " bytes long; pieces over " +
           std::to_string(kMaxPieceBytes) + " bytes are refused");
    return s;
  }
  const nlohmann::json& array(const nlohmann::json& obj, const char* key, const std::string& where) const {
    const nlohmann::json& v = field(obj, key, where);
    if (!v.is_array()) fail(where + "'s \"" + key + "\" is not an array");
    return v;
  }
  void require_unset(const nlohmann::json& obj, const char* key, const char* where) const {
    if (!obj.contains(key) || obj[key].is_null()) return;
    const nlohmann::json& v = obj[key];
    const bool unset = (v.is_string() && v.get<std::string>().empty()) ||
                       (v.is_boolean() && !v.get<bool>()) || (v.is_number() && v.get<double>() == 0.0);
    if (!unset) fail(std::string(where) + " \"" + key + "\" = " + shown(v.dump()) + " is not supported");
  }
};

// A Replace step's {"String": ...} (matched literally) or {"Regex": ...} pattern.
class ReplacePattern {
 public:
  ReplacePattern(const JsonReader& rd, const nlohmann::json& pattern, const std::string& where) {
    if (pattern.is_object() && pattern.contains("Regex")) {
      regex_.emplace(rd.str(pattern["Regex"], where + " pattern"), rd.path, where + " pattern");
    } else if (pattern.is_object() && pattern.contains("String")) {
      literal_ = rd.str(pattern["String"], where + " pattern");
      if (literal_.empty()) rd.fail(where + " pattern is an empty string");
    } else {
      rd.fail(where + " pattern " + shown(pattern.dump()) + " is neither {\"String\"} nor {\"Regex\"}");
    }
  }

  std::string replace_all(std::string_view text, std::string_view content) const {
    if (regex_) return regex_->replace_all(text, content);
    std::string out;
    size_t gap = 0;
    for (size_t at = text.find(literal_); at != std::string_view::npos; at = text.find(literal_, gap)) {
      out.append(text, gap, at - gap);
      out += content;
      gap = at + literal_.size();
    }
    out.append(text, gap);
    return out;
  }

 private:
  std::string literal_;
  std::optional<Regex> regex_;
};

}  // namespace tf::tok
