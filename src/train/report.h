// defines: tf::ReportInput, render_report, write_report (RUN/report.html: loss, eval, throughput and
//          memory charts as inline SVG, the resolved config, the final figures), html_escape
#pragma once

#include <string>
#include <string_view>

#include "src/train/metrics.h"

namespace tf {

struct ReportInput {
  std::string title;        // shown as the page heading, e.g. the run directory
  MetricsLog metrics;       // as read back from metrics.jsonl
  std::string config_json;  // the resolved config: a JSON object, shown as a table ("" for none)
};

// Escapes &, <, >, " and ' for HTML text and attribute values.
std::string html_escape(std::string_view s);

// A self-contained HTML page: inline SVG and CSS, one inline script (hover readouts; the page
// reads fully without it), no external resources. Where a step or an eval step is logged more
// than once (a resumed run), its last line counts. The figures table takes "eval loss before"
// from the eval line at step 0 and "eval loss after" from the last later one.
//
// Charts, each a <figure class="chart"> over the same step range:
// - "chart-loss": polyline "series-loss", a point per step whose loss is finite, plus an
//   exponentially smoothed "series-loss-smoothed" once there are enough steps to be noisy, and a
//   tick under the plot per skipped step (group "marks-skipped");
// - "chart-eval": polyline "series-eval", a point per eval line (step 0 = before training);
// - "chart-tokens-per-s": "series-tokens-per-s", and "chart-memory": "series-memory", the peak
//   tracked memory, both on axes from zero.
// The two loss charts are drawn twice, as <svg class="plot scale-linear"> and "plot scale-log"
// (when all their values are positive), and a checkbox #log-loss shows one of them by CSS; it
// starts checked when the losses span more than 1.5 decades. A series of thousands of steps is cut
// to the lowest and highest point per bucket of steps; one of a few points gets a dot per point.
// Each polyline carries its values (data-v) for the readout.
std::string render_report(const ReportInput& in);

// Writes render_report(in) to `path` atomically (temporary file + rename).
void write_report(const std::string& path, const ReportInput& in);

}  // namespace tf
