// defines: tf::render_report, write_report, html_escape (RUN/report.html: charts as inline SVG drawn
//          here, one inline script for hover readouts)
#include "src/train/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <utility>
#include <vector>

#include "src/core/error.h"
#include "src/io/durable.h"

namespace tf {

namespace {

std::string num(double v, int precision = 6) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.*g", precision, v);
  return buf;
}

// Ticks sit on round numbers: enough digits to print them exactly, and plain notation up to
// 10^10, so a throughput axis reads 15000 rather than 1.5e+04.
std::string tick_label(double v) {
  return num(v, 10);
}

struct Series {
  std::string name;
  std::string css_class;  // on its polyline and its point markers
  std::string color;
  double width = 2;
  std::vector<double> x, y;  // finite points, x ascending
};

struct Chart {
  std::string id, title, y_label;
  std::string unit = {};  // appended to values in the hover readout
  std::vector<Series> series;
  std::vector<double> marks = {};  // steps flagged under the plot (skipped steps)
  bool offer_log = false;          // draw a log-scale variant too, when every value is positive
  std::string empty = "no data";   // said in place of a plot without points
  bool from_zero = false;          // amounts (throughput, memory) mislead on an axis that starts elsewhere
};

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
  bool log = false;
  double lo = 0, hi = 1;  // data units
  std::vector<double> ticks;
  double t(double v) const { return log ? std::log10(v) : v; }
};

Axis linear_axis(double lo, double hi, bool integer, bool from_zero) {
  const bool non_negative = lo >= 0;
  if (from_zero) lo = std::min(lo, 0.0);
  if (!(hi > lo)) {
    // One value: centre it in a small band instead of dividing by zero.
    const double pad = lo == 0 ? 1 : std::abs(lo) * 0.1;
    lo -= pad;
    hi += pad;
  }
  // Steps and amounts are never negative; an axis reaching below zero only wastes the plot.
  if (non_negative) lo = std::max(lo, 0.0);
  double step = nice_step(hi - lo, 5);
  if (integer) step = std::max(step, 1.0);
  Axis a;
  a.lo = std::floor(lo / step) * step;
  a.hi = std::ceil(hi / step) * step;
  // Ticks are counted, not accumulated, so rounding cannot add or drop the last one.
  const int n = int(std::lround((a.hi - a.lo) / step));
  for (int i = 0; i <= n; ++i) {
    const double v = a.lo + i * step;
    a.ticks.push_back(std::abs(v) < step * 1e-9 ? 0.0 : v);
  }
  return a;
}

// Bounds and ticks on powers of ten, or on 1-2-5 (1..9) multiples of them over ranges of under
// 2.5 decades (one decade); over many decades every k-th power, so that labels never crowd. lo
// must be positive.
Axis log_axis(double lo, double hi) {
  if (!(hi > lo)) lo /= 2, hi *= 2;
  const double decades = std::log10(hi / lo);
  std::vector<double> candidates;
  // Past the ends of the double range a power of ten underflows or overflows.
  const auto add = [&](double c) {
    if (std::isnormal(c)) candidates.push_back(c);
  };
  const int e0 = int(std::floor(std::log10(lo))) - 1, e1 = int(std::ceil(std::log10(hi))) + 1;
  if (decades > 2.5) {
    const int k = int(std::ceil(decades / 8));
    for (int e = e0 - k; e <= e1 + k; ++e) {
      if (e % k == 0) add(std::pow(10.0, e));
    }
  } else {
    const std::vector<double> mantissas =
        decades > 1 ? std::vector<double>{1, 2, 5} : std::vector<double>{1, 2, 3, 4, 5, 6, 7, 8, 9};
    for (int e = e0; e <= e1; ++e) {
      for (double m : mantissas) add(m * std::pow(10.0, e));
    }
  }
  Axis a;
  a.log = true;
  a.lo = candidates.front();
  a.hi = candidates.back();
  for (double c : candidates) {
    if (c <= lo * (1 + 1e-12)) a.lo = c;
  }
  for (auto it = candidates.rbegin(); it != candidates.rend(); ++it) {
    if (*it >= hi * (1 - 1e-12)) a.hi = *it;
  }
  for (double c : candidates) {
    if (c >= a.lo && c <= a.hi) a.ticks.push_back(c);
  }
  return a;
}

// At most two points (the lowest and the highest, in step order) per bucket of steps: a run of
// thousands of steps keeps its spikes and its envelope in a few hundred points.
constexpr size_t kBuckets = 300;

Series downsample(const Series& s, double x_lo, double x_hi) {
  if (s.x.size() <= 2 * kBuckets) return s;
  Series out = s;
  out.x.clear();
  out.y.clear();
  size_t i = 0;
  const auto bucket = [&](double x) {
    return std::min(size_t((x - x_lo) / (x_hi - x_lo) * kBuckets), kBuckets - 1);
  };
  while (i < s.x.size()) {
    const size_t b = bucket(s.x[i]);
    size_t j = i, lo = i, hi = i;
    for (; j < s.x.size() && bucket(s.x[j]) == b; ++j) {
      if (s.y[j] < s.y[lo]) lo = j;
      if (s.y[j] > s.y[hi]) hi = j;
    }
    for (size_t k : {std::min(lo, hi), std::max(lo, hi)}) {
      if (!out.x.empty() && out.x.back() == s.x[k]) continue;
      out.x.push_back(s.x[k]);
      out.y.push_back(s.y[k]);
    }
    i = j;
  }
  return out;
}

// Up to this many points a series also gets a dot per point, so that a one-step run or a handful
// of evaluations still shows.
constexpr size_t kDotsUpTo = 40;

// One SVG plot of `c` on the shared step range, with a linear or a log y axis. Series with no
// points are left out of the plot but kept in the legend, so an empty chart still says what it
// would show. The data-* attributes let the page's script map the pointer back to a step.
std::string plot_svg(const Chart& c, double x_lo, double x_hi, bool log_y, const std::string& svg_class) {
  constexpr double kW = 720, kH = 360, kLeft = 70, kRight = 20, kTop = 58, kBottom = 46;
  const double pw = kW - kLeft - kRight, ph = kH - kTop - kBottom;
  double ymin = INFINITY, ymax = -INFINITY;
  for (const Series& s : c.series) {
    for (double v : s.y) ymin = std::min(ymin, v), ymax = std::max(ymax, v);
  }
  std::string svg = "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"" + svg_class + "\" viewBox=\"0 0 " +
                    num(kW) + " " + num(kH) + "\" width=\"" + num(kW) + "\" height=\"" + num(kH) +
                    "\" role=\"img\"";
  const Axis ax = linear_axis(x_lo, x_hi, true, false);
  const auto px = [&](double x) { return kLeft + (x - ax.lo) / (ax.hi - ax.lo) * pw; };
  svg += " data-x0=\"" + num(ax.lo) + "\" data-x1=\"" + num(ax.hi) + "\" data-px0=\"" + num(kLeft) +
         "\" data-px1=\"" + num(kLeft + pw) + "\" data-py0=\"" + num(kTop) + "\" data-py1=\"" +
         num(kTop + ph) + "\" data-unit=\"" + html_escape(c.unit) + "\">\n";
  svg += "<title>" + html_escape(c.title) + "</title>\n";
  svg += "<text x=\"" + num(kW / 2) + "\" y=\"22\" text-anchor=\"middle\" class=\"chart-title\">" +
         html_escape(c.title) + (log_y ? " (log scale)" : "") + "</text>\n";
  double legend_x = kLeft;
  const auto legend = [&](const std::string& name, const std::string& color) {
    svg += "<rect x=\"" + num(legend_x) + "\" y=\"" + num(kTop - 18) +
           "\" width=\"14\" height=\"4\" fill=\"" + color + "\"/><text x=\"" + num(legend_x + 18) +
           "\" y=\"" + num(kTop - 12) + "\" font-size=\"12\">" + html_escape(name) + "</text>\n";
    legend_x += 34 + 7 * double(name.size());
  };
  for (const Series& s : c.series) legend(s.name, s.color);
  if (!c.marks.empty()) legend("skipped step", "#d62728");
  if (!std::isfinite(ymin)) {
    svg += "<text x=\"" + num(kW / 2) + "\" y=\"" + num(kH / 2) + "\" text-anchor=\"middle\">" +
           html_escape(c.empty) + "</text>\n</svg>\n";
    return svg;
  }
  const Axis ay = log_y ? log_axis(ymin, ymax) : linear_axis(ymin, ymax, false, c.from_zero);
  const auto py = [&](double y) {
    return kTop + ph - (ay.t(y) - ay.t(ay.lo)) / (ay.t(ay.hi) - ay.t(ay.lo)) * ph;
  };

  svg += "<g class=\"grid\" stroke=\"#ddd\" stroke-width=\"1\">\n";
  std::string labels;
  for (double v : ax.ticks) {
    const double x = px(v);
    svg += "<line x1=\"" + num(x) + "\" y1=\"" + num(kTop) + "\" x2=\"" + num(x) + "\" y2=\"" +
           num(kTop + ph) + "\"/>\n";
    labels += "<text x=\"" + num(x) + "\" y=\"" + num(kTop + ph + 18) + "\" text-anchor=\"middle\">" +
              tick_label(v) + "</text>\n";
  }
  for (double v : ay.ticks) {
    const double y = py(v);
    svg += "<line x1=\"" + num(kLeft) + "\" y1=\"" + num(y) + "\" x2=\"" + num(kLeft + pw) + "\" y2=\"" +
           num(y) + "\"/>\n";
    labels += "<text x=\"" + num(kLeft - 6) + "\" y=\"" + num(y + 4) + "\" text-anchor=\"end\">" +
              tick_label(v) + "</text>\n";
  }
  svg += "</g>\n<g class=\"tick-labels\" font-size=\"12\" fill=\"#333\">\n" + labels + "</g>\n";
  svg += "<rect x=\"" + num(kLeft) + "\" y=\"" + num(kTop) + "\" width=\"" + num(pw) + "\" height=\"" +
         num(ph) + "\" fill=\"none\" stroke=\"#333\"/>\n";
  svg += "<text x=\"" + num(kLeft + pw / 2) + "\" y=\"" + num(kH - 8) +
         "\" text-anchor=\"middle\">step</text>\n";
  svg += "<text transform=\"translate(16 " + num(kTop + ph / 2) + ") rotate(-90)\" text-anchor=\"middle\">" +
         html_escape(c.y_label) + "</text>\n";
  for (const Series& full : c.series) {
    if (full.x.empty()) continue;
    const Series s = downsample(full, ax.lo, ax.hi);
    std::string points, values;
    for (size_t i = 0; i < s.x.size(); ++i) {
      points += (i ? " " : "") + num(px(s.x[i])) + "," + num(py(s.y[i]));
      values += (i ? " " : "") + num(s.y[i], 5);
    }
    svg += "<polyline class=\"" + s.css_class + "\" fill=\"none\" stroke=\"" + s.color +
           "\" stroke-width=\"" + num(s.width) + "\" data-name=\"" + html_escape(s.name) + "\" data-v=\"" +
           values + "\" points=\"" + points + "\"/>\n";
    if (s.x.size() <= kDotsUpTo) {
      svg += "<g class=\"dots " + s.css_class + "\" fill=\"" + s.color + "\">";
      for (size_t i = 0; i < s.x.size(); ++i) {
        svg += "<circle cx=\"" + num(px(s.x[i])) + "\" cy=\"" + num(py(s.y[i])) + "\" r=\"3.5\"/>";
      }
      svg += "</g>\n";
    }
  }
  if (!c.marks.empty()) {
    // One tick per pixel column at most, however many steps were skipped.
    svg += "<g class=\"marks-skipped\" stroke=\"#d62728\" stroke-width=\"2\">";
    double last = -1;
    for (double m : c.marks) {
      const double x = std::round(px(m));
      if (x == last) continue;
      last = x;
      svg += "<line x1=\"" + num(x) + "\" y1=\"" + num(kTop + ph) + "\" x2=\"" + num(x) + "\" y2=\"" +
             num(kTop + ph - 10) + "\"/>";
    }
    svg += "</g>\n";
  }
  svg += "</svg>\n";
  return svg;
}

// Whether a log axis can show `c`: it has points, and all of them are positive and far enough
// from the ends of the double range for the powers of ten around them to exist.
bool fits_log_axis(const Chart& c) {
  bool any = false;
  for (const Series& s : c.series) {
    for (double v : s.y) {
      if (!(v >= 1e-300 && v <= 1e300)) return false;
      any = true;
    }
  }
  return any;
}

// A chart in a <figure>: with a log variant, both scales are drawn and the page's "log scale"
// checkbox shows one of them by CSS alone, so the switch works without the script.
std::string figure(const Chart& c, double x_lo, double x_hi, bool* has_log) {
  std::string f = "<figure class=\"chart\" id=\"" + c.id + "\">\n";
  if (c.offer_log && fits_log_axis(c)) {
    *has_log = true;
    f += plot_svg(c, x_lo, x_hi, false, "plot scale-linear");
    f += plot_svg(c, x_lo, x_hi, true, "plot scale-log");
  } else {
    f += plot_svg(c, x_lo, x_hi, false, "plot");
  }
  return f + "</figure>\n";
}

// Hover readout: the value of each series at the step under the pointer, and a cursor line.
// It marks <body data-charts-ready="N"> once N plots are wired, which tools/check_report.py
// looks for in a headless browser.
constexpr const char* kScript = R"JS(
(() => {
  const fmt = (v) => String(Number(v.toPrecision(4)));
  let wired = 0;
  for (const fig of document.querySelectorAll("figure.chart")) {
    const idle = fig.querySelector("polyline[data-v]") ? "point at the chart to read its values" : "";
    const out = document.createElement("div");
    out.className = "readout";
    out.textContent = idle;
    fig.appendChild(out);
    for (const svg of fig.querySelectorAll("svg.plot")) {
      const d = svg.dataset;
      const [x0, x1, px0, px1] = [d.x0, d.x1, d.px0, d.px1].map(Number);
      const series = [...svg.querySelectorAll("polyline[data-v]")].map((p) => ({
        name: p.dataset.name,
        v: p.dataset.v.split(" ").map(Number),
        px: p.getAttribute("points").split(" ").map((q) => Number(q.split(",")[0])),
      }));
      const cursor = document.createElementNS("http://www.w3.org/2000/svg", "line");
      cursor.setAttribute("class", "cursor");
      cursor.setAttribute("y1", d.py0);
      cursor.setAttribute("y2", d.py1);
      cursor.setAttribute("visibility", "hidden");
      svg.appendChild(cursor);
      svg.addEventListener("mousemove", (ev) => {
        if (!series.length) return;
        const at = new DOMPoint(ev.clientX, ev.clientY).matrixTransform(svg.getScreenCTM().inverse()).x;
        let step = null;
        const parts = series.map((s) => {
          let lo = 0, hi = s.px.length - 1;
          while (lo < hi) {
            const mid = (lo + hi) >> 1;
            if (s.px[mid] < at) lo = mid + 1; else hi = mid;
          }
          if (lo > 0 && at - s.px[lo - 1] < s.px[lo] - at) --lo;
          if (step === null) {
            step = Math.round(x0 + (s.px[lo] - px0) / (px1 - px0) * (x1 - x0));
            cursor.setAttribute("x1", s.px[lo]);
            cursor.setAttribute("x2", s.px[lo]);
          }
          return s.name + " " + fmt(s.v[lo]) + d.unit;
        });
        cursor.setAttribute("visibility", "visible");
        out.textContent = "step " + step + ": " + parts.join(", ");
      });
      svg.addEventListener("mouseleave", () => {
        cursor.setAttribute("visibility", "hidden");
        out.textContent = idle;
      });
      ++wired;
    }
  }
  document.body.dataset.chartsReady = String(wired);
})();
)JS";

constexpr const char* kByteUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};

// The unit (index into kByteUnits) that `b` bytes read best in.
int byte_unit(double b) {
  int u = 0;
  for (; b >= 1024 && u < 4; b /= 1024) ++u;
  return u;
}

std::string bytes_text(double b) {
  const int u = byte_unit(b);
  return num(b / std::pow(1024.0, u), 4) + " " + kByteUnits[u];
}

std::string value_text(const nlohmann::json& v) {
  return v.is_string() ? v.get<std::string>() : v.dump();
}

// A resumed run may log a step again (the later line is the one the run continued from); the
// report keeps the last line per step, in step order.
template <typename T, typename Key>
std::vector<T> last_per_step(const std::vector<T>& lines, Key key) {
  std::map<int64_t, T> by_step;
  for (const T& l : lines) by_step.insert_or_assign(key(l), l);
  std::vector<T> out;
  for (const auto& [step, l] : by_step) out.push_back(l);
  return out;
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
  const std::vector<StepMetrics> steps =
      last_per_step(in.metrics.steps, [](const StepMetrics& s) { return s.step; });
  const std::vector<EvalMetrics> evals =
      last_per_step(in.metrics.evals, [](const EvalMetrics& e) { return e.eval_step; });

  Series loss{"train loss", "series-loss", "#1f77b4", 1.5, {}, {}};
  Series smooth{"smoothed", "series-loss-smoothed", "#ff7f0e", 2.5, {}, {}};
  Series tok_s{"tokens/s", "series-tokens-per-s", "#9467bd", 1.5, {}, {}};
  Series mem{"peak tracked memory", "series-memory", "#8c564b", 2, {}, {}};
  std::vector<double> skipped_steps;
  double ema = 0, ema_weight = 0, total_tokens = 0, total_seconds = 0, peak = 0;
  std::optional<double> final_loss;
  // Smoothing only helps once there are enough steps for noise to hide the trend.
  constexpr size_t kSmoothFrom = 20;
  constexpr double kEmaDecay = 0.9;
  for (const StepMetrics& s : steps) {
    const double x = double(s.step);
    if (s.skipped) skipped_steps.push_back(x);
    peak = std::max(peak, double(s.peak_mem_bytes));
    if (s.peak_mem_bytes > 0) mem.x.push_back(x), mem.y.push_back(double(s.peak_mem_bytes));
    if (s.tokens_per_s > 0 && std::isfinite(s.tokens_per_s)) {
      total_tokens += double(s.tokens);
      total_seconds += double(s.tokens) / s.tokens_per_s;
      tok_s.x.push_back(x);
      tok_s.y.push_back(s.tokens_per_s);
    }
    if (!std::isfinite(s.loss)) continue;
    loss.x.push_back(x);
    loss.y.push_back(s.loss);
    final_loss = s.loss;
    // Bias-corrected EMA, so the first points are not pulled towards zero.
    ema = kEmaDecay * ema + (1 - kEmaDecay) * s.loss;
    ema_weight = kEmaDecay * ema_weight + (1 - kEmaDecay);
    smooth.x.push_back(x);
    smooth.y.push_back(ema / ema_weight);
  }
  Series eval{"eval loss", "series-eval", "#2ca02c", 2, {}, {}};
  std::optional<double> eval_before;
  std::optional<EvalMetrics> eval_last;
  for (const EvalMetrics& e : evals) {
    if (!std::isfinite(e.eval_loss)) continue;
    eval.x.push_back(double(e.eval_step));
    eval.y.push_back(e.eval_loss);
    if (e.eval_step == 0) eval_before = e.eval_loss;
    if (e.eval_step > 0) eval_last = e;
  }
  const int mem_unit = byte_unit(peak);
  for (double& v : mem.y) v /= std::pow(1024.0, mem_unit);

  // Every chart spans the same steps, so the charts line up one above the other.
  double x_lo = INFINITY, x_hi = -INFINITY;
  for (const StepMetrics& s : steps)
    x_lo = std::min(x_lo, double(s.step)), x_hi = std::max(x_hi, double(s.step));
  for (double x : eval.x) x_lo = std::min(x_lo, x), x_hi = std::max(x_hi, x);
  if (!std::isfinite(x_lo)) x_lo = x_hi = 0;

  Chart train_chart{.id = "chart-loss",
                    .title = "Training loss",
                    .y_label = "loss",
                    .series = {loss},
                    .marks = skipped_steps,
                    .offer_log = true};
  if (loss.x.size() >= kSmoothFrom) train_chart.series.push_back(smooth);
  const Chart eval_chart{.id = "chart-eval",
                         .title = "Eval loss",
                         .y_label = "loss",
                         .series = {eval},
                         .offer_log = true,
                         .empty = "no evaluations (train with --eval-data)"};
  const Chart tok_chart{.id = "chart-tokens-per-s",
                        .title = "Throughput",
                        .y_label = "tokens / s",
                        .unit = " tokens/s",
                        .series = {tok_s},
                        .from_zero = true};
  const Chart mem_chart{.id = "chart-memory",
                        .title = "Peak tracked memory",
                        .y_label = std::string("memory (") + kByteUnits[mem_unit] + ")",
                        .unit = std::string(" ") + kByteUnits[mem_unit],
                        .series = {mem},
                        .from_zero = true};
  // Log scale by default once the losses fall by more than 1.5 decades: on a linear axis the
  // whole second half of such a run is a flat line along the bottom.
  double loss_lo = INFINITY, loss_hi = -INFINITY;
  for (const std::vector<double>* ys : {&loss.y, &eval.y}) {
    for (double v : *ys) loss_lo = std::min(loss_lo, v), loss_hi = std::max(loss_hi, v);
  }
  const bool log_default = loss_lo > 0 && std::log10(loss_hi / loss_lo) > 1.5;

  std::string h = "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>" +
                  html_escape(in.title) + "</title>\n";
  h += "<style>body{font-family:sans-serif;margin:2em;color:#222;max-width:780px}"
       "table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:4px 10px;"
       "text-align:left;vertical-align:top}th{background:#f4f4f4}td.v{font-family:monospace;word-break:break-"
       "all}"
       ".chart-title{font-size:16px;font-weight:bold}figure.chart{margin:1.5em 0}"
       "svg.plot{display:block;max-width:100%;height:auto}"
       "#log-loss:checked~figure svg.scale-linear,#log-loss:not(:checked)~figure svg.scale-log{display:none}"
       ".readout{font-family:monospace;font-size:13px;color:#888;min-height:1.3em;margin-left:70px}"
       ".cursor{stroke:#666;stroke-dasharray:4 3;pointer-events:none}</style>\n</head>\n<body>\n";
  h += "<h1>" + html_escape(in.title) + "</h1>\n<h2>Results</h2>\n<table class=\"figures\">\n";
  const auto row = [&](const std::string& k, const std::string& v) {
    h += "<tr><th>" + html_escape(k) + "</th><td>" + html_escape(v) + "</td></tr>\n";
  };
  row("steps", std::to_string(steps.size()));
  row("final train loss", final_loss ? num(*final_loss) : "-");
  if (eval_before) row("eval loss before", num(*eval_before));
  if (eval_last) {
    row("eval loss after",
        num(eval_last->eval_loss) + " (after " + std::to_string(eval_last->eval_step) + " steps)");
  }
  row("tokens / s", total_seconds > 0 ? num(total_tokens / total_seconds, 4) : "-");
  row("peak memory", peak > 0 ? bytes_text(peak) : "-");
  row("skipped steps", std::to_string(skipped_steps.size()));
  h += "</table>\n<h2>Charts</h2>\n";
  bool has_log = false;
  std::string charts;
  for (const Chart* c : {&std::as_const(train_chart), &eval_chart, &tok_chart, &mem_chart}) {
    charts += figure(*c, x_lo, x_hi, &has_log);
  }
  if (has_log) {
    // Before the charts: the CSS that switches scales selects figures following the checkbox.
    h += std::string("<input type=\"checkbox\" id=\"log-loss\"") + (log_default ? " checked" : "") +
         "><label for=\"log-loss\"> log scale for the losses</label>\n";
  }
  h += charts;

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
  h += std::string("<script>") + kScript + "</script>\n</body>\n</html>\n";
  return h;
}

void write_report(const std::string& path, const ReportInput& in) {
  io::write_file_atomic(path, render_report(in));
}

}  // namespace tf
