// Chat templates as published: every template llama.cpp ships (tests/fixtures/templates, copied and
// rendered by tools/make_template_fixtures.py with transformers' jinja2 environment) renders each
// fixed conversation byte for byte as Python renders it, refuses where Python raises, and where it
// has {% generation %} blocks marks the spans transformers' return_assistant_tokens_mask marks.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "src/core/error.h"
#include "src/data/jinja.h"
#include "src/data/model_template.h"

namespace tf::data {
namespace {

const std::string kDir = std::string(TIGHTFIT_FIXTURES) + "/templates/";

nlohmann::ordered_json read_json(const std::string& name) {
  std::ifstream in(kDir + name);
  EXPECT_TRUE(in) << kDir + name;
  return nlohmann::ordered_json::parse(in);
}

std::string read_text(const std::string& name) {
  std::ifstream in(kDir + name, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<Message> messages_of(const nlohmann::ordered_json& j) {
  std::vector<Message> msgs;
  for (const auto& m : j) {
    Message msg(m["role"], m["content"]);
    if (m.contains("tool_calls"))
      for (const auto& c : m["tool_calls"]) msg.tool_calls.push_back({c["id"], c["name"], c["arguments"]});
    msg.tool_call_id = m.value("tool_call_id", "");
    msg.name = m.value("name", "");
    msgs.push_back(std::move(msg));
  }
  return msgs;
}

// Templates that do not render every conversation as Python does, each with why. Keeping the list
// exact means a template that starts (or stops) matching is noticed.
const std::set<std::string> kKnownDifferent = {};

TEST(DataJinjaTemplates, EveryTemplateRendersAsTransformersDoes) {
  const auto convs = read_json("conversations.json");
  const auto expected = read_json("expected.json");
  const auto index = read_json("index.json");
  const std::time_t now = convs["now_unix"].get<std::time_t>();
  const std::string bos = convs["bos_token"], eos = convs["eos_token"];
  size_t identical = 0, compared = 0;
  std::set<std::string> different;
  for (const auto& [file, source] : index.items()) {
    ASSERT_TRUE(expected.contains(file)) << file;
    std::unique_ptr<jinja::Template> t;
    try {
      t = std::make_unique<jinja::Template>(read_text(file), file);
    } catch (const Error& e) {
      different.insert(file);
      std::printf("refused %s: %s\n", file.c_str(), e.what());
      continue;
    }
    bool all_same = true;
    for (const auto& [name, conv] : convs["conversations"].items()) {
      const auto& want = expected[file][name];
      const auto ctx = template_context(messages_of(conv["messages"]),
                                        conv.contains("tools") ? conv["tools"].dump() : std::string(),
                                        conv["add_generation_prompt"], bos, eos);
      ++compared;
      std::string got, error;
      std::vector<jinja::Span> spans;
      try {
        jinja::Rendered r = t->render(ctx, now);
        got = std::move(r.text);
        spans = std::move(r.generation);
      } catch (const Error& e) {
        error = e.what();
      }
      bool same;
      if (want.contains("error")) {
        same = !error.empty();
        if (!same)
          std::printf("%s / %s: Python raises (%s), we render\n", file.c_str(), name.c_str(),
                      want["error"].get<std::string>().c_str());
      } else {
        same = error.empty() && got == want["text"].get<std::string>();
        if (!error.empty()) {
          std::printf("%s / %s: we raise: %s\n", file.c_str(), name.c_str(), error.c_str());
        } else if (!same) {
          const std::string w = want["text"];
          size_t at = 0;
          while (at < w.size() && at < got.size() && w[at] == got[at]) ++at;
          std::printf("%s / %s: differs at byte %zu:\n  want: %s\n  got:  %s\n", file.c_str(), name.c_str(),
                      at, w.substr(at > 40 ? at - 40 : 0, 120).c_str(),
                      got.substr(at > 40 ? at - 40 : 0, 120).c_str());
        }
        if (same && want.contains("generation")) {
          std::vector<jinja::Span> want_spans;
          for (const auto& s : want["generation"]) want_spans.push_back({s[0], s[1]});
          same = spans == want_spans;
          if (!same) std::printf("%s / %s: generation spans differ\n", file.c_str(), name.c_str());
        }
      }
      identical += same;
      all_same = all_same && same;
    }
    if (!all_same) different.insert(file);
  }
  std::printf("%zu of %zu renders identical; %zu of %zu templates render every conversation identically\n",
              identical, compared, index.size() - different.size(), index.size());
  EXPECT_EQ(different, kKnownDifferent);
}

}  // namespace
}  // namespace tf::data
