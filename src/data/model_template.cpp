// defines: the model's own chat template rendered into loss segments (src/data/model_template.h)
#include "src/data/model_template.h"

#include "src/core/error.h"

namespace tf::data {
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

}  // namespace tf::data
