// defines: tests of the OpenMP wait policy tightfit chooses for libgomp (kernels/cpu/threads.h):
// where the environment sets none, the tightfit process runs under tightfit's default, as libgomp
// itself reports it, and the log says so; a policy in the environment is left as it is, and the log
// names it
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "kernels/cpu/threads.h"
#include "tests/cli_test_util.h"

namespace tf {
namespace {

class WaitPolicy : public test::Cli {
 protected:
  void SetUp() override {
    test::Cli::SetUp();
    for (const char* name : {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"})
      if (const char* v = std::getenv(name)) saved_.emplace_back(name, v);
    unsetenv("OMP_WAIT_POLICY");
    unsetenv("GOMP_SPINCOUNT");
    // libgomp prints the settings it started with on stderr.
    setenv("OMP_DISPLAY_ENV", "verbose", 1);
  }
  void TearDown() override {
    unsetenv("OMP_DISPLAY_ENV");
    unsetenv("OMP_WAIT_POLICY");
    for (const auto& [name, value] : saved_) setenv(name.c_str(), value.c_str(), 1);
    test::Cli::TearDown();
  }
  test::Result bench() {
    return run({"bench", "--config", "tiny", "--device", "cpu", "--seq", "16", "--steps", "1", "--lora-rank",
                "2", "--threads", "1"});
  }
  // The value of `setting` in the last settings libgomp printed: those of the process that ran.
  static std::string libgomp_setting(const std::string& err, const std::string& setting) {
    const size_t at = err.rfind("  " + setting + " = '");
    if (at == std::string::npos) return "(not printed)";
    const size_t start = at + setting.size() + 6;
    return err.substr(start, err.find('\'', start) - start);
  }

  std::vector<std::pair<std::string, std::string>> saved_;
};

TEST_F(WaitPolicy, TightfitRunsUnderItsDefaultWhereTheEnvironmentSetsNone) {
  const test::Result r = bench();
  ASSERT_EQ(r.status, 0) << r.err;
  // Passive: no spinning at all, where libgomp's default spins 300000 times.
  EXPECT_EQ(libgomp_setting(r.err, "OMP_WAIT_POLICY"), "PASSIVE") << r.err;
  EXPECT_EQ(libgomp_setting(r.err, "GOMP_SPINCOUNT"), "0") << r.err;
  EXPECT_NE(r.out.find("threads   idle threads sleep at once (OMP_WAIT_POLICY=" +
                       std::string(cpu::kDefaultWaitPolicy) + ", tightfit's default"),
            std::string::npos)
      << r.out;
}

TEST_F(WaitPolicy, APolicyInTheEnvironmentIsKeptAndNamed) {
  setenv("GOMP_SPINCOUNT", "1234", 1);
  const test::Result r = bench();
  unsetenv("GOMP_SPINCOUNT");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(libgomp_setting(r.err, "GOMP_SPINCOUNT"), "1234") << r.err;
  EXPECT_NE(r.out.find("threads   as the environment sets it (GOMP_SPINCOUNT=1234)"), std::string::npos)
      << r.out;
}

}  // namespace
}  // namespace tf
