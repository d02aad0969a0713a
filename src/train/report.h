// defines: tf::ReportInput, render_report, write_report (RUN/report.html: loss and eval curves as
//          inline SVG, the resolved config, the final figures), html_escape
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "src/train/metrics.h"

namespace tf {

struct ReportInput {
  std::string title;        // shown as the page heading, e.g. the run directory
  MetricsLog metrics;       // as read back from metrics.jsonl
  std::string config_json;  // the resolved config: a JSON object, shown as a table ("" for none)
  std::optional<double> eval_loss_before;  // eval loss of the base model, when measured
  std::optional<double> eval_loss_after;   // eval loss with the trained adapter
};

// Escapes &, <, >, " and ' for HTML text and attribute values.
std::string html_escape(std::string_view s);

// A self-contained HTML page (no scripts, no external resources). The training-loss chart has one
// polyline (class "series-loss") with a point per step whose loss is finite, plus a lighter
// exponentially smoothed line when there are enough steps to be noisy; the eval chart has one
// polyline (class "series-eval") with a point per eval line.
std::string render_report(const ReportInput& in);

// Writes render_report(in) to `path` atomically (temporary file + rename).
void write_report(const std::string& path, const ReportInput& in);

}  // namespace tf
