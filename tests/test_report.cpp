#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "src/core/error.h"
#include "src/train/report.h"

namespace tf {
namespace {

namespace fs = std::filesystem;

ReportInput synthetic(int steps) {
  ReportInput in;
  in.title = "runs/demo <test>";
  for (int s = 0; s < steps; ++s) {
    // A falling, noisy curve, with one skipped (NaN) step.
    const bool skip = s == 7;
    in.metrics.steps.push_back(
        StepMetrics{s, skip ? std::nan("") : 3.0 * std::exp(-s / 20.0) + 0.1 * std::sin(s), 1e-4, 0.5, 1024,
                    2048.0, int64_t(300) << 20, skip});
    if (s % 10 == 9) in.metrics.evals.push_back(EvalMetrics{s + 1, 2.5 * std::exp(-s / 25.0), 0});
  }
  in.config_json =
      R"({"lora_rank":16,"lr":0.0002,"template":"<|user|> & \"q\"","targets":["q_proj","v_proj"]})";
  in.eval_loss_before = 2.75;
  in.eval_loss_after = 1.25;
  return in;
}

// The `points` attribute of the polyline with class `cls`, split into points.
std::vector<std::string> polyline_points(const std::string& html, const std::string& cls) {
  const size_t at = html.find("<polyline class=\"" + cls + "\"");
  if (at == std::string::npos) return {};
  const size_t start = html.find("points=\"", at) + 8;
  std::istringstream ss(html.substr(start, html.find('"', start) - start));
  std::vector<std::string> pts;
  for (std::string p; ss >> p;) pts.push_back(p);
  return pts;
}

TEST(Report, ChartsHaveAPointPerStepAndEval) {
  const ReportInput in = synthetic(60);
  const std::string html = render_report(in);
  EXPECT_NE(html.find("<svg"), std::string::npos);
  // 60 steps, one of them with a NaN loss, which has no point.
  EXPECT_EQ(polyline_points(html, "series-loss").size(), 59u);
  EXPECT_EQ(polyline_points(html, "series-loss-smoothed").size(), 59u);
  EXPECT_EQ(polyline_points(html, "series-eval").size(), 6u);
  // Tick labels on both axes: steps 0..60 by 10, and the loss range.
  EXPECT_NE(html.find(">60</text>"), std::string::npos);
  EXPECT_NE(html.find(">0</text>"), std::string::npos);

  ReportInput clean = synthetic(12);
  for (auto& s : clean.metrics.steps) s.loss = std::isnan(s.loss) ? 1.0 : s.loss;
  const std::string small = render_report(clean);
  EXPECT_EQ(polyline_points(small, "series-loss").size(), 12u);
  EXPECT_TRUE(polyline_points(small, "series-loss-smoothed").empty());  // too few steps to smooth
}

TEST(Report, ShowsConfigAndFiguresEscaped) {
  const std::string html = render_report(synthetic(60));
  for (const char* key : {"lora_rank", "lr", "template", "targets"}) {
    EXPECT_NE(html.find(std::string("<td>") + key + "</td>"), std::string::npos) << key;
  }
  EXPECT_NE(html.find("&lt;|user|&gt; &amp; &quot;q&quot;"), std::string::npos);
  EXPECT_EQ(html.find("<|user|>"), std::string::npos);
  EXPECT_NE(html.find("<h1>runs/demo &lt;test&gt;</h1>"), std::string::npos);
  EXPECT_NE(html.find("<th>steps</th><td>60</td>"), std::string::npos);
  EXPECT_NE(html.find("<th>eval loss before</th><td>2.75</td>"), std::string::npos);
  EXPECT_NE(html.find("<th>eval loss after</th><td>1.25</td>"), std::string::npos);
  EXPECT_NE(html.find("<th>tokens / s</th><td>2048</td>"), std::string::npos);
  EXPECT_NE(html.find("<th>peak memory</th><td>300 MiB</td>"), std::string::npos);
  EXPECT_NE(html.find("<th>skipped steps</th><td>1</td>"), std::string::npos);
  EXPECT_EQ(html_escape("a<b>&'\""), "a&lt;b&gt;&amp;&#39;&quot;");
}

TEST(Report, EmptyRunAndBadConfig) {
  ReportInput in;
  in.title = "empty";
  const std::string html = render_report(in);
  EXPECT_NE(html.find("no data"), std::string::npos);
  EXPECT_NE(html.find("(not recorded)"), std::string::npos);
  in.config_json = "[1,2]";
  EXPECT_THROW(render_report(in), Error);
  in.config_json = "{oops";
  EXPECT_THROW(render_report(in), Error);
}

TEST(Report, WrittenAtomically) {
  const fs::path dir = fs::temp_directory_path() / ("tf-report-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string path = (dir / "report.html").string();
  std::ofstream(path) << "old";
  const ReportInput in = synthetic(30);
  write_report(path, in);
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  EXPECT_EQ(ss.str(), render_report(in));
  int entries = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir)) ++entries;
  EXPECT_EQ(entries, 1);
  // A report into a missing directory fails naming it.
  try {
    write_report((dir / "absent" / "report.html").string(), in);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("absent/report.html"), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace tf
