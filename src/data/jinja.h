// defines: tf::data::jinja::Template (a Jinja chat template, parsed once and rendered as Python's jinja2
// renders it under transformers' settings), jinja::Limits, jinja::Rendered, jinja::Span
#pragma once

#include <cstddef>
#include <cstdint>
#include <ctime>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace tf::data::jinja {

// A template is untrusted input (it comes with a downloaded model), so everything it can make grow
// is bounded; going past a bound is an error that names the bound.
struct Limits {
  size_t max_source_bytes = size_t(1) << 20;
  size_t max_output_bytes = size_t(16) << 20;  // also bounds any one string or list it builds
  int max_depth = 64;                          // nested blocks and expressions, and macro calls
  uint64_t max_iterations = 1'000'000;         // loop iterations in one render, all loops together
};

// [begin, end) byte offsets into the rendered text.
struct Span {
  size_t begin = 0, end = 0;
  bool operator==(const Span&) const = default;
};

struct Rendered {
  std::string text;
  std::vector<Span> generation;  // the output of each {% generation %} block, in order
};

// The dialect is jinja2's with trim_blocks and lstrip_blocks on and loop controls enabled, the way
// transformers compiles chat templates, plus its globals (raise_exception, strftime_now, namespace,
// dict), its tojson (json.dumps with ensure_ascii off) and its {% generation %} block. Values are
// Python's: undefined names render as nothing, and so on. A construct outside the subset chat
// templates use is refused by name when the template is parsed.
class Template {
 public:
  // `name` says where the text came from (a file, a GGUF key) in every error message, followed by
  // line:column.
  Template(std::string_view source, std::string name, Limits limits = {});

  // Renders with the members of `context` (a JSON object: messages, tools, bos_token, ...) as the
  // template's variables. `now` is what strftime_now formats (local time). Throws a tf::Error for a
  // raise_exception, a bound passed, or an operation Python would refuse.
  Rendered render(const nlohmann::ordered_json& context, std::time_t now) const;

  bool has_generation_blocks() const;
  const std::string& name() const;

  struct Impl;

 private:
  std::shared_ptr<const Impl> impl_;
};

}  // namespace tf::data::jinja
