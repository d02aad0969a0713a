#include "src/train/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <vector>

#include "src/core/error.h"
#include "src/io/durable.h"

namespace tf {

namespace {

struct Series {
  std::string name;
  std::string css_class;
  std::string color;
  double width = 2;
  std::vector<double> x, y;  // finite points only
};

std::string num(double v, int precision = 6) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.*g", precision, v);
  return buf;
}

// Tick spacing of 1, 2 or 5 times a power of ten giving about `target` intervals over `range`.
double nice_step(double range, int target) {
  const double raw = range / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0}) {
    if (raw <= m * mag) return m * mag;
  }
  return 10 * mag;
}

struct Axis {
  double lo, hi, step;
};

Axis make_axis(double lo, double hi, bool integer) {
  if (!(hi > lo)) {
    // One value: centre it in a small band instead of dividing by zero.
    const double pad = lo == 0 ? 1 : std::abs(lo) * 0.1;
    lo -= pad;
    hi += pad;
  }
  double step = nice_step(hi - lo, 5);
  if (integer) step = std::max(step, 1.0);
  return {std::floor(lo / step) * step, std::ceil(hi / step) * step, step};
}

// A line chart with labelled axes; series with no points are left out of the plot but kept in
// the legend, so an empty chart still says what it would show.
std::string line_chart(const std::string& title, const std::string& x_label, const std::string& y_label,
                       const std::vector<Series>& series) {
  constexpr double kW = 720, kH = 360, kLeft = 70, kRight = 20, kTop = 40, kBottom = 50;
  double xmin = INFINITY, xmax = -INFINITY, ymin = INFINITY, ymax = -INFINITY;
  for (const Series& s : series) {
    for (double v : s.x) xmin = std::min(xmin, v), xmax = std::max(xmax, v);
    for (double v : s.y) ymin = std::min(ymin, v), ymax = std::max(ymax, v);
  }
  std::string svg = "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 " + num(kW) + " " + num(kH) +
                    "\" width=\"" + num(kW) + "\" height=\"" + num(kH) + "\" role=\"img\">\n";
  svg += "<title>" + html_escape(title) + "</title>\n";
  svg += "<text x=\"" + num(kW / 2) + "\" y=\"24\" text-anchor=\"middle\" class=\"chart-title\">" +
         html_escape(title) + "</text>\n";
  if (!std::isfinite(xmin)) {
    svg += "<text x=\"" + num(kW / 2) + "\" y=\"" + num(kH / 2) +
           "\" text-anchor=\"middle\">no data</text>\n</svg>\n";
    return svg;
  }
  const Axis ax = make_axis(xmin, xmax, true), ay = make_axis(ymin, ymax, false);
  const double pw = kW - kLeft - kRight, ph = kH - kTop - kBottom;
  const auto px = [&](double x) { return kLeft + (x - ax.lo) / (ax.hi - ax.lo) * pw; };
  const auto py = [&](double y) { return kTop + ph - (y - ay.lo) / (ay.hi - ay.lo) * ph; };

  svg += "<g class=\"grid\" stroke=\"#ddd\" stroke-width=\"1\">\n";
  std::string labels;
  // Ticks are counted, not accumulated, so rounding cannot add or drop the last one.
  const int nx = int(std::lround((ax.hi - ax.lo) / ax.step)),
            ny = int(std::lround((ay.hi - ay.lo) / ay.step));
  for (int i = 0; i <= nx; ++i) {
    const double v = ax.lo + i * ax.step, x = px(v);
    svg += "<line x1=\"" + num(x) + "\" y1=\"" + num(kTop) + "\" x2=\"" + num(x) + "\" y2=\"" +
           num(kTop + ph) + "\"/>\n";
    labels += "<text x=\"" + num(x) + "\" y=\"" + num(kTop + ph + 18) + "\" text-anchor=\"middle\">" +
              num(v) + "</text>\n";
  }
  for (int i = 0; i <= ny; ++i) {
    const double v = ay.lo + i * ay.step, y = py(v);
    svg += "<line x1=\"" + num(kLeft) + "\" y1=\"" + num(y) + "\" x2=\"" + num(kLeft + pw) + "\" y2=\"" +
           num(y) + "\"/>\n";
    labels += "<text x=\"" + num(kLeft - 6) + "\" y=\"" + num(y + 4) + "\" text-anchor=\"end\">" +
              num(std::abs(v) < ay.step * 1e-9 ? 0.0 : v, 4) + "</text>\n";
  }
  svg += "</g>\n<g class=\"tick-labels\" font-size=\"12\" fill=\"#333\">\n" + labels + "</g>\n";
  svg += "<rect x=\"" + num(kLeft) + "\" y=\"" + num(kTop) + "\" width=\"" + num(pw) + "\" height=\"" +
         num(ph) + "\" fill=\"none\" stroke=\"#333\"/>\n";
  svg += "<text x=\"" + num(kLeft + pw / 2) + "\" y=\"" + num(kH - 10) + "\" text-anchor=\"middle\">" +
         html_escape(x_label) + "</text>\n";
  svg += "<text transform=\"translate(16 " + num(kTop + ph / 2) + ") rotate(-90)\" text-anchor=\"middle\">" +
         html_escape(y_label) + "</text>\n";
  double legend_x = kLeft + 10;
  for (const Series& s : series) {
    if (!s.x.empty()) {
      svg += "<polyline class=\"" + s.css_class + "\" fill=\"none\" stroke=\"" + s.color +
             "\" stroke-width=\"" + num(s.width) + "\" points=\"";
      for (size_t i = 0; i < s.x.size(); ++i) svg += (i ? " " : "") + num(px(s.x[i])) + "," + num(py(s.y[i]));
      svg += "\"/>\n";
    }
    svg += "<rect x=\"" + num(legend_x) + "\" y=\"" + num(kTop + 8) + "\" width=\"14\" height=\"4\" fill=\"" +
           s.color + "\"/><text x=\"" + num(legend_x + 18) + "\" y=\"" + num(kTop + 14) +
           "\" font-size=\"12\">" + html_escape(s.name) + "</text>\n";
    legend_x += 30 + 7 * double(s.name.size());
  }
  svg += "</svg>\n";
  return svg;
}

std::string bytes_text(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) b /= 1024, ++u;
  return num(b, 4) + " " + units[u];
}

std::string value_text(const nlohmann::json& v) {
  return v.is_string() ? v.get<std::string>() : v.dump();
}

}  // namespace

std::string html_escape(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string render_report(const ReportInput& in) {
  const MetricsLog& m = in.metrics;
  Series loss{"train loss", "series-loss", "#1f77b4", 1.5, {}, {}};
  Series smooth{"smoothed", "series-loss-smoothed", "#ff7f0e", 2.5, {}, {}};
  double ema = 0, ema_weight = 0, total_tokens = 0, total_seconds = 0, peak = 0;
  int64_t skipped = 0;
  std::optional<double> final_loss;
  // Smoothing only helps once there are enough steps for noise to hide the trend.
  constexpr size_t kSmoothFrom = 20;
  constexpr double kEmaDecay = 0.9;
  for (const StepMetrics& s : m.steps) {
    skipped += s.skipped;
    peak = std::max(peak, double(s.peak_mem_bytes));
    if (s.tokens_per_s > 0 && std::isfinite(s.tokens_per_s)) {
      total_tokens += double(s.tokens);
      total_seconds += double(s.tokens) / s.tokens_per_s;
    }
    if (!std::isfinite(s.loss)) continue;
    loss.x.push_back(double(s.step));
    loss.y.push_back(s.loss);
    final_loss = s.loss;
    // Bias-corrected EMA, so the first points are not pulled towards zero.
    ema = kEmaDecay * ema + (1 - kEmaDecay) * s.loss;
    ema_weight = kEmaDecay * ema_weight + (1 - kEmaDecay);
    smooth.x.push_back(double(s.step));
    smooth.y.push_back(ema / ema_weight);
  }
  std::vector<Series> loss_series{loss};
  if (loss.x.size() >= kSmoothFrom) loss_series.push_back(smooth);
  Series eval{"eval loss", "series-eval", "#2ca02c", 2, {}, {}};
  for (const EvalMetrics& e : m.evals) {
    if (!std::isfinite(e.eval_loss)) continue;
    eval.x.push_back(double(e.eval_step));
    eval.y.push_back(e.eval_loss);
  }

  std::string h = "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>" +
                  html_escape(in.title) + "</title>\n";
  h += "<style>body{font-family:sans-serif;margin:2em;color:#222;max-width:780px}"
       "table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:4px 10px;"
       "text-align:left;vertical-align:top}th{background:#f4f4f4}td.v{font-family:monospace;word-break:break-"
       "all}"
       ".chart-title{font-size:16px;font-weight:bold}svg{display:block;margin:1em "
       "0}</style>\n</head>\n<body>\n";
  h += "<h1>" + html_escape(in.title) + "</h1>\n<h2>Results</h2>\n<table class=\"figures\">\n";
  const auto row = [&](const std::string& k, const std::string& v) {
    h += "<tr><th>" + html_escape(k) + "</th><td>" + html_escape(v) + "</td></tr>\n";
  };
  row("steps", std::to_string(m.steps.size()));
  row("final train loss", final_loss ? num(*final_loss) : "-");
  if (in.eval_loss_before) row("eval loss before", num(*in.eval_loss_before));
  if (in.eval_loss_after) row("eval loss after", num(*in.eval_loss_after));
  if (!m.evals.empty()) row("last eval loss", num(m.evals.back().eval_loss));
  row("tokens / s", total_seconds > 0 ? num(total_tokens / total_seconds, 4) : "-");
  row("peak memory", peak > 0 ? bytes_text(peak) : "-");
  row("skipped steps", std::to_string(skipped));
  h += "</table>\n";
  h += line_chart("Training loss", "step", "loss", loss_series);
  h += line_chart("Eval loss", "step", "loss", {eval});

  h += "<h2>Configuration</h2>\n";
  if (in.config_json.empty()) {
    h += "<p>(not recorded)</p>\n";
  } else {
    nlohmann::json cfg;
    try {
      cfg = nlohmann::json::parse(in.config_json);
    } catch (const nlohmann::json::exception& e) {
      TF_FAIL("the report's config is not valid JSON: ", e.what());
    }
    TF_CHECK(cfg.is_object(), "the report's config must be a JSON object, got ", cfg.type_name());
    h += "<table class=\"config\">\n<tr><th>option</th><th>value</th></tr>\n";
    for (const auto& [k, v] : cfg.items()) {
      h +=
          "<tr><td>" + html_escape(k) + "</td><td class=\"v\">" + html_escape(value_text(v)) + "</td></tr>\n";
    }
    h += "</table>\n";
  }
  h += "</body>\n</html>\n";
  return h;
}

void write_report(const std::string& path, const ReportInput& in) {
  io::write_file_atomic(path, render_report(in));
}

}  // namespace tf
