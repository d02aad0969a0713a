// The HTML report: a point per step and per eval (the eval before training at step 0), the log
// scale for losses that fall by decades, throughput and memory charts, resumed runs that logged a
// step twice, runs of one step and of tens of thousands, skipped steps, the figures table, and the
// page's self-containment.
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
  in.metrics.evals.push_back(EvalMetrics{0, 2.75, 0});
  for (int s = 0; s < steps; ++s) {
    // A falling, noisy curve, with one skipped (NaN) step.
    const bool skip = s == 7;
    in.metrics.steps.push_back(
        StepMetrics{s, skip ? std::nan("") : 3.0 * std::exp(-s / 20.0) + 0.1 * std::sin(s), 1e-4, 0.5, 1024,
                    2048.0, int64_t(300) << 20, skip});
    if (s % 10 == 9) in.metrics.evals.push_back(EvalMetrics{s + 1, 2.5 * std::exp(-s / 25.0), 0});
  }
  in.metrics.evals.back().eval_loss = 1.25;
  in.config_json =
      R"({"lora_rank":16,"lr":0.0002,"template":"<|user|> & \"q\"","targets":["q_proj","v_proj"]})";
  return in;
}

// The text of `html` from the first `from` on to the next `to` after it ("" when absent).
std::string between(const std::string& html, const std::string& from, const std::string& to) {
  const size_t a = html.find(from);
  if (a == std::string::npos) return "";
  const size_t b = html.find(to, a);
  return html.substr(a, b == std::string::npos ? std::string::npos : b - a);
}

// The plot (linear, or log-scale when `log`) of the chart with id `chart`.
std::string plot(const std::string& html, const std::string& chart, bool log = false) {
  const std::string fig = between(html, "<figure class=\"chart\" id=\"" + chart + "\"", "</figure>");
  return between(fig, log ? "scale-log" : "<svg", "</svg>");
}

std::string attribute(const std::string& html, const std::string& element_start, const std::string& name) {
  const std::string el = between(html, element_start, ">");
  const size_t at = el.find(" " + name + "=\"");
  if (at == std::string::npos) return "";
  const size_t start = at + name.size() + 3;
  return el.substr(start, el.find('"', start) - start);
}

std::vector<std::string> words(const std::string& s) {
  std::istringstream ss(s);
  std::vector<std::string> out;
  for (std::string w; ss >> w;) out.push_back(w);
  return out;
}

// The (x, y) pixel points of the polyline with class `cls`.
std::vector<std::pair<double, double>> polyline_points(const std::string& html, const std::string& cls) {
  std::vector<std::pair<double, double>> pts;
  for (const std::string& p : words(attribute(html, "<polyline class=\"" + cls + "\"", "points"))) {
    const size_t comma = p.find(',');
    pts.emplace_back(std::stod(p.substr(0, comma)), std::stod(p.substr(comma + 1)));
  }
  return pts;
}

// The values the polyline with class `cls` carries for the hover readout.
std::vector<double> polyline_values(const std::string& html, const std::string& cls) {
  std::vector<double> v;
  for (const std::string& w : words(attribute(html, "<polyline class=\"" + cls + "\"", "data-v"))) {
    v.push_back(std::stod(w));
  }
  return v;
}

size_t count(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t at = s.find(what); at != std::string::npos; at = s.find(what, at + 1)) ++n;
  return n;
}

TEST(Report, ChartsHaveAPointPerStepAndEval) {
  const std::string html = render_report(synthetic(60));
  const std::string loss = plot(html, "chart-loss");
  // 60 steps, one of them with a NaN loss, which has no point.
  EXPECT_EQ(polyline_points(loss, "series-loss").size(), 59u);
  EXPECT_EQ(polyline_points(loss, "series-loss-smoothed").size(), 59u);
  // The eval before training and one every 10 steps.
  EXPECT_EQ(polyline_points(plot(html, "chart-eval"), "series-eval").size(), 7u);
  // Tick labels on both axes: steps 0..60 by 10, and the loss range.
  EXPECT_NE(loss.find(">60</text>"), std::string::npos);
  EXPECT_NE(loss.find(">0</text>"), std::string::npos);

  ReportInput clean = synthetic(12);
  for (auto& s : clean.metrics.steps) s.loss = std::isnan(s.loss) ? 1.0 : s.loss;
  const std::string small = plot(render_report(clean), "chart-loss");
  EXPECT_EQ(polyline_points(small, "series-loss").size(), 12u);
  EXPECT_TRUE(polyline_points(small, "series-loss-smoothed").empty());  // too few steps to smooth
}

TEST(Report, EvalBeforeTrainingIsPlottedAtStepZero) {
  ReportInput in;
  for (int s = 0; s < 60; ++s)
    in.metrics.steps.push_back(StepMetrics{s, 2.0 - s / 60.0, 0, 0, 10, 5, 1, false});
  in.metrics.evals = {{0, 2.75, 0}, {30, 1.9, 0}, {60, 1.25, 0}};
  const std::string html = render_report(in);
  const std::string eval = plot(html, "chart-eval");
  const auto pts = polyline_points(eval, "series-eval");
  ASSERT_EQ(pts.size(), 3u);
  // Step 0 sits on the plot's left edge, where the step axis starts.
  EXPECT_EQ(attribute(eval, "<svg", "data-x0"), "0");
  EXPECT_EQ(pts[0].first, std::stod(attribute(eval, "<svg", "data-px0")));
  EXPECT_EQ(polyline_values(eval, "series-eval"), (std::vector<double>{2.75, 1.9, 1.25}));
  EXPECT_EQ(count(eval, "<circle"), 3u);  // few points: each gets a dot
  EXPECT_NE(html.find("<th>eval loss before</th><td>2.75</td>"), std::string::npos);
  EXPECT_NE(html.find("<th>eval loss after</th><td>1.25 (after 60 steps)</td>"), std::string::npos);

  // A run stopped before its first later eval: the eval before training alone still shows, as a dot.
  in.metrics.evals.resize(1);
  const std::string only = render_report(in);
  EXPECT_EQ(count(plot(only, "chart-eval"), "<circle"), 1u);
  EXPECT_NE(only.find("<th>eval loss before</th><td>2.75</td>"), std::string::npos);
  EXPECT_EQ(only.find("eval loss after"), std::string::npos);
}

TEST(Report, LossesFallingByDecadesDefaultToALogScale) {
  ReportInput in;
  // 3 -> 3e-4 exponentially: a straight line on a log axis.
  for (int s = 0; s < 100; ++s) {
    in.metrics.steps.push_back(StepMetrics{s, 3 * std::pow(10.0, -4.0 * s / 99), 0, 0, 10, 5, 1, false});
  }
  const std::string html = render_report(in);
  EXPECT_NE(html.find("<input type=\"checkbox\" id=\"log-loss\" checked>"), std::string::npos);
  const std::string log = plot(html, "chart-loss", true);
  ASSERT_NE(log, "");
  for (const char* tick : {">0.0001</text>", ">0.001</text>", ">0.01</text>", ">0.1</text>", ">1</text>"}) {
    EXPECT_NE(log.find(tick), std::string::npos) << tick;
  }
  const auto lp = polyline_points(log, "series-loss");
  ASSERT_EQ(lp.size(), 100u);
  const double per_step = (lp[99].second - lp[0].second) / 99;
  EXPECT_GT(per_step, 1);  // falls across the plot
  for (size_t i = 0; i < lp.size(); ++i) EXPECT_NEAR(lp[i].second, lp[0].second + per_step * i, 1e-2) << i;
  // The linear plot is drawn too, for the switch; there the curve is anything but straight.
  const auto lin = polyline_points(plot(html, "chart-loss"), "series-loss");
  ASSERT_EQ(lin.size(), 100u);
  EXPECT_GT(std::abs(lin[50].second - (lin[0].second + lin[99].second) / 2), 50);

  // Within 1.5 decades the switch is offered, off.
  for (auto& s : in.metrics.steps) s.loss = 2 - s.step / 100.0;
  const std::string flat = render_report(in);
  EXPECT_NE(flat.find("<input type=\"checkbox\" id=\"log-loss\">"), std::string::npos);
  EXPECT_NE(plot(flat, "chart-loss", true), "");

  // A zero loss has no place on a log axis: no switch, one plot.
  in.metrics.steps[40].loss = 0;
  const std::string zero = render_report(in);
  EXPECT_EQ(zero.find("id=\"log-loss\""), std::string::npos);
  EXPECT_EQ(zero.find("class=\"plot scale-log\""), std::string::npos);
  EXPECT_EQ(polyline_points(plot(zero, "chart-loss"), "series-loss").size(), 100u);
}

TEST(Report, ExtremeLossesStayOnTheAxes) {
  ReportInput in;
  // 40 decades: the log axis ticks every few powers of ten instead of crowding 40 labels.
  for (int s = 0; s < 41; ++s)
    in.metrics.steps.push_back(StepMetrics{s, std::pow(10.0, -s), 0, 0, 1, 1, 1, false});
  const std::string log = plot(render_report(in), "chart-loss", true);
  const size_t y_labels = count(log, "text-anchor=\"end\"");
  EXPECT_GE(y_labels, 4u);
  EXPECT_LE(y_labels, 10u);
  // A subnormal loss (a hand-edited file; training losses are floats) has no log axis, and the
  // linear plot stays finite.
  in.metrics.steps[40].loss = 1e-320;
  const std::string html = render_report(in);
  EXPECT_EQ(html.find("class=\"plot scale-log\""), std::string::npos);
  for (const auto& [x, y] : polyline_points(plot(html, "chart-loss"), "series-loss")) {
    ASSERT_TRUE(std::isfinite(x) && std::isfinite(y));
  }
}

TEST(Report, ThroughputAndMemoryOverSteps) {
  ReportInput in;
  for (int s = 0; s < 30; ++s) {
    in.metrics.steps.push_back(
        StepMetrics{s, 1.0, 0, 0, 100, 1000.0 + 10 * s, (int64_t(100) + s) << 20, s == 4});
  }
  in.metrics.steps[4].loss = std::nan("");
  const std::string html = render_report(in);
  const std::string tok = plot(html, "chart-tokens-per-s");
  const std::vector<double> tv = polyline_values(tok, "series-tokens-per-s");
  ASSERT_EQ(tv.size(), 30u);  // a skipped step still took its time
  EXPECT_EQ(polyline_points(tok, "series-tokens-per-s").size(), 30u);
  for (int s = 0; s < 30; ++s) EXPECT_EQ(tv[size_t(s)], 1000.0 + 10 * s) << s;
  EXPECT_NE(tok.find(">0</text>"), std::string::npos);  // an amount: the axis starts at zero
  EXPECT_EQ(attribute(tok, "<svg", "data-unit"), " tokens/s");

  const std::string mem = plot(html, "chart-memory");
  const std::vector<double> mv = polyline_values(mem, "series-memory");
  ASSERT_EQ(mv.size(), 30u);
  for (int s = 0; s < 30; ++s) EXPECT_EQ(mv[size_t(s)], 100.0 + s) << s;  // in MiB
  EXPECT_NE(mem.find(">memory (MiB)</text>"), std::string::npos);
  EXPECT_NE(mem.find(">0</text>"), std::string::npos);
  EXPECT_NE(html.find("<th>peak memory</th><td>129 MiB</td>"), std::string::npos);
  EXPECT_NE(html.find("<th>tokens / s</th><td>1138</td>"), std::string::npos);  // 3000 tokens in 2.64 s
}

TEST(Report, AResumedRunsRepeatedStepsCountOnce) {
  ReportInput in;
  // Steps 0..9 logged, then the run resumed from step 5 and logged 5..14 again; eval 10 twice.
  for (int s = 0; s < 10; ++s) in.metrics.steps.push_back(StepMetrics{s, 1.0 + s, 0, 0, 10, 5, 1, false});
  in.metrics.evals = {{0, 9, 0}, {10, 8, 0}};
  for (int s = 5; s < 15; ++s) in.metrics.steps.push_back(StepMetrics{s, 100.0 + s, 0, 0, 10, 5, 1, false});
  in.metrics.evals.push_back(EvalMetrics{10, 7, 0});
  const std::string html = render_report(in);
  const std::vector<double> v = polyline_values(plot(html, "chart-loss"), "series-loss");
  const std::vector<double> want{1, 2, 3, 4, 5, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114};
  EXPECT_EQ(v, want);
  const auto pts = polyline_points(plot(html, "chart-loss"), "series-loss");
  for (size_t i = 1; i < pts.size(); ++i) EXPECT_GT(pts[i].first, pts[i - 1].first) << i;
  EXPECT_EQ(polyline_values(plot(html, "chart-eval"), "series-eval"), (std::vector<double>{9, 7}));
  EXPECT_NE(html.find("<th>steps</th><td>15</td>"), std::string::npos);
  EXPECT_NE(html.find("<th>eval loss after</th><td>7 (after 10 steps)</td>"), std::string::npos);
}

TEST(Report, ThousandsOfStepsStaySmallAndKeepTheirSpikes) {
  ReportInput in;
  constexpr int kSteps = 20000;
  for (int s = 0; s < kSteps; ++s) {
    const double loss = s == 12345 ? 50.0 : 2.0 + std::sin(s * 0.7) * 0.5;
    in.metrics.steps.push_back(
        StepMetrics{s, loss, 0, 0, 10, 100.0 + s % 13, int64_t(1) << 30, s % 1000 == 3});
  }
  in.metrics.steps[5003].loss = std::nan("");
  const std::string html = render_report(in);
  EXPECT_LT(html.size(), 300u * 1024) << html.size();
  const std::string loss = plot(html, "chart-loss");
  for (const char* cls : {"series-loss", "series-loss-smoothed"}) {
    const auto pts = polyline_points(loss, cls);
    EXPECT_GT(pts.size(), 100u) << cls;
    EXPECT_LE(pts.size(), 600u) << cls;
    for (size_t i = 1; i < pts.size(); ++i) ASSERT_GT(pts[i].first, pts[i - 1].first) << cls << " " << i;
  }
  const std::vector<double> v = polyline_values(loss, "series-loss");
  EXPECT_EQ(*std::max_element(v.begin(), v.end()), 50.0);  // the spike survives
  EXPECT_EQ(*std::min_element(v.begin(), v.end()), 1.5);   // and the bottom of the envelope
  EXPECT_LE(polyline_points(plot(html, "chart-tokens-per-s"), "series-tokens-per-s").size(), 600u);
  EXPECT_EQ(count(loss, "<circle"), 0u);
  EXPECT_EQ(count(between(loss, "marks-skipped", "</g>"), "<line"), 20u);
  EXPECT_NE(html.find("<th>skipped steps</th><td>20</td>"), std::string::npos);
}

TEST(Report, OneStepRunShowsItsPoint) {
  ReportInput in;
  in.metrics.steps.push_back(StepMetrics{0, 2.5, 1e-4, 1, 64, 500, 1 << 20, false});
  const std::string html = render_report(in);
  const std::string loss = plot(html, "chart-loss");
  EXPECT_EQ(polyline_points(loss, "series-loss").size(), 1u);
  EXPECT_EQ(count(between(loss, "<g class=\"dots series-loss\"", "</g>"), "<circle"), 1u);
  EXPECT_EQ(loss.find(">-1</text>"), std::string::npos);  // the step axis does not reach below zero
  EXPECT_NE(plot(html, "chart-eval").find(">no evaluations (train with --eval-data)<"), std::string::npos);
  EXPECT_EQ(html.find("eval loss before"), std::string::npos);
}

TEST(Report, SkippedStepsAreMarked) {
  const std::string loss = plot(render_report(synthetic(60)), "chart-loss");
  const std::string marks = between(loss, "<g class=\"marks-skipped\"", "</g>");
  EXPECT_EQ(count(marks, "<line"), 1u);
  EXPECT_NE(loss.find(">skipped step</text>"), std::string::npos);
  ReportInput clean = synthetic(60);
  for (auto& s : clean.metrics.steps) s.skipped = false;
  EXPECT_EQ(render_report(clean).find("marks-skipped"), std::string::npos);
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
  EXPECT_NE(html.find("<th>eval loss after</th><td>1.25 (after 60 steps)</td>"), std::string::npos);
  EXPECT_NE(html.find("<th>tokens / s</th><td>2048</td>"), std::string::npos);
  EXPECT_NE(html.find("<th>peak memory</th><td>300 MiB</td>"), std::string::npos);
  EXPECT_NE(html.find("<th>skipped steps</th><td>1</td>"), std::string::npos);
  EXPECT_EQ(html_escape("a<b>&'\""), "a&lt;b&gt;&amp;&#39;&quot;");
}

TEST(Report, PageIsSelfContained) {
  const std::string html = render_report(synthetic(60));
  for (const char* external : {"src=", "href=", "<link", "@import", "url(", "//cdn"}) {
    EXPECT_EQ(html.find(external), std::string::npos) << external;
  }
  EXPECT_EQ(count(html, "<script>"), 1u);
  EXPECT_EQ(count(html, "<figure class=\"chart\""), 4u);
}

TEST(Report, EmptyRunAndBadConfig) {
  ReportInput in;
  in.title = "empty";
  const std::string html = render_report(in);
  EXPECT_EQ(count(html, "no data"), 3u);
  EXPECT_EQ(count(html, "no evaluations (train with --eval-data)"), 1u);
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
