// defines: tf::data::ModelTemplate (a model's own Jinja chat template with the token texts it
// names), ThinkMode, think_mode_by_name, template_context
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
  std::time_t now = 0;  // what strftime_now formats; 0: the time of rendering
};

// The variables transformers renders a conversation with: messages as dicts (role, content, and
// where present tool_calls [{id, type: "function", function: {name, arguments (an object)}}],
// tool_call_id, name), tools (the list, or none), documents (none), add_generation_prompt,
// bos_token, eos_token.
nlohmann::ordered_json template_context(const std::vector<Message>& msgs, std::string_view tools_json,
                                        bool add_generation_prompt, std::string_view bos,
                                        std::string_view eos);

}  // namespace tf::data
