// defines: tf::data::ModelTemplate (a model's own Jinja chat template with the token texts it
// names), ThinkMode, think_mode_by_name, model_chat_template, template_context, render_model_template
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "src/data/chat_template.h"
#include "src/data/jinja.h"

namespace tf::data {

// What the loss makes of the <think>...</think> blocks of reasoning models' assistant turns:
// Keep trains on them as the template renders them (a template that drops earlier turns' reasoning
// still drops it); Strip takes them out of the assistant turns before rendering.
enum class ThinkMode { Keep, Strip };

// "keep" or "strip"; anything else is an error naming both.
ThinkMode think_mode_by_name(std::string_view name);

struct ModelTemplate {
  std::shared_ptr<const jinja::Template> jinja;
  std::string bos_token, eos_token;  // the texts bos_token / eos_token stand for in the template
  ThinkMode think = ThinkMode::Keep;
  std::time_t now = 0;  // what strftime_now formats
};

// A ChatTemplate of kind Model for the Jinja text `jinja` (`source` names it in errors): parsed
// here, so a template tightfit cannot render is refused before any data is read. `bos` / `eos` are
// the tokenizer's BOS / EOS token texts (empty where it has none); strftime_now renders `now`.
ChatTemplate model_chat_template(std::string_view jinja, std::string source, std::string bos, std::string eos,
                                 ThinkMode think, std::time_t now);

// The variables transformers renders a conversation with: messages as dicts (role, content, and
// where present tool_calls [{id, type: "function", function: {name, arguments (an object)}}],
// tool_call_id, name), tools (the list, or none), documents (none), add_generation_prompt,
// bos_token, eos_token.
nlohmann::ordered_json template_context(const std::vector<Message>& msgs, std::string_view tools_json,
                                        bool add_generation_prompt, std::string_view bos,
                                        std::string_view eos);

// Renders a conversation with the model's template, split into segments by which turn each byte
// belongs to. Where the template has {% generation %} blocks their output is the assistant text;
// elsewhere turn i's text is what rendering messages[:i+1] adds to rendering messages[:i] (with the
// generation prompt when turn i is the assistant's: the header is the prompt's, the reply the
// turn's), which needs no knowledge of the template. Whether each piece counts in the loss follows
// turn_trained / end_trained / frame_trained; a BOS the template writes as text becomes the BOS flag
// so that the tokenizer does not add a second one.
std::vector<Segment> render_model_template(const ModelTemplate& t, const std::vector<Message>& msgs,
                                           const std::string& tools_json, const LossOptions& loss);

}  // namespace tf::data
