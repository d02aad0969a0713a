// defines: tf::test::PlanCli, the fixture of tests that run `tightfit plan --json` (the configs in
// examples/configs, the plan's JSON, its items and alternatives)
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "tests/cli_test_util.h"

namespace tf::test {

class PlanCli : public Cli {
 protected:
  static std::string config(const char* name) {
    return (std::filesystem::path(TIGHTFIT_FIXTURES).parent_path().parent_path() / "examples" / "configs" /
            name)
        .string();
  }
  // The plan's JSON; `want_status` -1 takes either exit status of a plan (0 fits, 2 does not).
  nlohmann::json plan_json(std::vector<std::string> args, int want_status = 0) {
    args.insert(args.begin(), "plan");
    args.push_back("--json");
    const Result r = run(args);
    if (want_status >= 0) {
      EXPECT_EQ(r.status, want_status) << r.err;
    }
    nlohmann::json j = nlohmann::json::parse(r.out, nullptr, false);
    EXPECT_TRUE(j.is_object()) << r.out << r.err;
    return j;
  }
  static uint64_t item(const nlohmann::json& plan, const std::string& component) {
    for (const auto& i : plan["items"])
      if (i["component"] == component) return i["bytes"].get<uint64_t>();
    ADD_FAILURE() << "no item " << component << " in " << plan.dump();
    return 0;
  }
  static const nlohmann::json& alternative(const nlohmann::json& plan, const std::string& weights,
                                           const std::string& checkpointing) {
    for (const auto& a : plan["alternatives"])
      if (a["weights"] == weights && a["checkpointing"] == checkpointing) return a;
    static const nlohmann::json none;
    ADD_FAILURE() << "no alternative " << weights << "/" << checkpointing;
    return none;
  }
};

}  // namespace tf::test
