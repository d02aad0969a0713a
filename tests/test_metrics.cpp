#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "src/core/error.h"
#include "src/train/metrics.h"

namespace tf {
namespace {

namespace fs = std::filesystem;

struct TempFile {
  fs::path path;
  explicit TempFile(const std::string& tag = "") {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path = fs::temp_directory_path() /
           ("tf-metrics-" + std::to_string(::getpid()) + "-" + info->name() + tag + ".jsonl");
    fs::remove(path);
  }
  ~TempFile() { fs::remove(path); }
  std::string str() const { return path.string(); }
};

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

StepMetrics step_line(int64_t s) {
  // Values with long binary expansions: the text must carry every bit of a double.
  return StepMetrics{s,
                     4.0 / double(s + 3),
                     1e-4 * double(s) / 7.0,
                     0.1 + double(s) / 3.0,
                     512 * (s + 1),
                     1234.5678 + double(s),
                     int64_t(1) << 33,
                     s == 2,
                     (int64_t(3) << 30) + s,
                     s % 2 ? (int64_t(5) << 30) + s : 0};
}

// Writes the lines an uninterrupted run of `steps` steps writes, evaluating every 2 steps.
void write_run(MetricsWriter& w, int64_t from, int64_t to) {
  for (int64_t s = from; s < to; ++s) {
    w.write(step_line(s));
    if ((s + 1) % 2 == 0) w.write(EvalMetrics{s + 1, 2.5 - double(s) / 10, std::exp(2.5 - double(s) / 10)});
  }
}

TEST(Metrics, WritesAndReadsBackExactly) {
  TempFile f;
  {
    MetricsWriter w(f.str());
    w.write(EvalMetrics{0, 3.0, std::exp(3.0)});
    write_run(w, 0, 5);
    StepMetrics nan_step = step_line(5);
    nan_step.loss = std::nan("");
    nan_step.skipped = true;
    w.write(nan_step);
    w.sync();
  }
  const std::string text = slurp(f.str());
  EXPECT_NE(text.find(R"({"step":0,"loss":1.3333333333333333,)"), std::string::npos) << text;
  EXPECT_NE(text.find(R"("loss":null)"), std::string::npos) << text;
  EXPECT_NE(text.find(R"({"eval_step":2,"eval_loss":2.4,"eval_ppl":)"), std::string::npos) << text;

  const MetricsLog log = read_metrics(f.str());
  ASSERT_EQ(log.steps.size(), 6u);
  ASSERT_EQ(log.evals.size(), 3u);
  for (int64_t s = 0; s < 5; ++s) {
    const StepMetrics want = step_line(s);
    const StepMetrics& got = log.steps[size_t(s)];
    EXPECT_EQ(got.step, want.step);
    EXPECT_EQ(got.loss, want.loss);
    EXPECT_EQ(got.lr, want.lr);
    EXPECT_EQ(got.grad_norm, want.grad_norm);
    EXPECT_EQ(got.tokens, want.tokens);
    EXPECT_EQ(got.tokens_per_s, want.tokens_per_s);
    EXPECT_EQ(got.peak_mem_bytes, want.peak_mem_bytes);
    EXPECT_EQ(got.rss_peak_bytes, want.rss_peak_bytes);
    EXPECT_EQ(got.device_peak_bytes, want.device_peak_bytes);
    EXPECT_EQ(got.skipped, want.skipped);
  }
  EXPECT_TRUE(std::isnan(log.steps[5].loss));
  EXPECT_TRUE(log.steps[5].skipped);
  EXPECT_EQ(log.evals[0].eval_step, 0);
  EXPECT_EQ(log.evals[2].eval_step, 4);
  EXPECT_EQ(log.evals[2].eval_ppl, std::exp(2.5 - 0.3));
}

TEST(Metrics, ResumedFileEqualsUninterruptedFile) {
  TempFile whole("-whole"), resumed("-resumed");
  {
    MetricsWriter w(whole.str());
    write_run(w, 0, 9);
  }
  {
    // Killed after step 6's line, with the eval after step 7 half written; the checkpoint is at 4.
    MetricsWriter w(resumed.str());
    write_run(w, 0, 7);
  }
  {
    std::ofstream torn(resumed.str(), std::ios::app | std::ios::binary);
    torn << R"({"eval_step":8,"eval_lo)";
  }
  EXPECT_EQ(read_metrics(resumed.str()).steps.size(), 7u);  // the torn line is ignored
  truncate_metrics_for_resume(resumed.str(), 4);
  const MetricsLog kept = read_metrics(resumed.str());
  ASSERT_EQ(kept.steps.size(), 4u);
  EXPECT_EQ(kept.steps.back().step, 3);
  ASSERT_EQ(kept.evals.size(), 2u);
  EXPECT_EQ(kept.evals.back().eval_step, 4);
  {
    MetricsWriter w(resumed.str());
    write_run(w, 4, 9);
  }
  EXPECT_EQ(slurp(resumed.str()), slurp(whole.str()));

  TempFile missing("-missing");
  truncate_metrics_for_resume(missing.str(), 3);
  EXPECT_FALSE(fs::exists(missing.path));
}

TEST(Metrics, MalformedLinesNameFileAndLine) {
  TempFile f;
  const auto expect_error = [&](const std::string& content, const std::string& needle) {
    {
      std::ofstream out(f.path, std::ios::binary | std::ios::trunc);
      out << content;
    }
    try {
      read_metrics(f.str());
      ADD_FAILURE() << "no error for: " << content;
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(f.str() + ":2"), std::string::npos) << msg;
      EXPECT_NE(msg.find(needle), std::string::npos) << msg;
    }
  };
  const std::string good = R"({"eval_step":0,"eval_loss":1,"eval_ppl":2.7})"
                           "\n";
  expect_error(good + "{oops\n", "not a JSON line");
  expect_error(good + "[1,2]\n", "expected a JSON object");
  expect_error(good + R"({"hello":1})"
                      "\n",
               "neither a step line");
  expect_error(good + R"({"step":"three","loss":1})"
                      "\n",
               "malformed metrics line");
  expect_error(good + R"({"step":3,"loss":1})"
                      "\n",
               "malformed metrics line");
  EXPECT_THROW(read_metrics(f.str() + ".absent"), Error);
}

}  // namespace
}  // namespace tf
