#include "src/train/metrics.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "src/io/durable.h"

namespace tf {

namespace {

using nlohmann::ordered_json;

ordered_json number_or_null(double v) {
  return std::isfinite(v) ? ordered_json(v) : ordered_json(nullptr);
}

double read_number(const nlohmann::json& j, const char* key) {
  const auto& v = j.at(key);
  return v.is_null() ? std::numeric_limits<double>::quiet_NaN() : v.get<double>();
}

enum class LineKind { Step, Eval };

struct Line {
  LineKind kind;
  StepMetrics step;
  EvalMetrics eval;
};

Line parse_line(const std::string& text, const std::string& path, size_t line_no) {
  const std::string where = path + ":" + std::to_string(line_no);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    TF_FAIL(where, ": not a JSON line: ", e.what());
  }
  TF_CHECK(j.is_object(), where, ": expected a JSON object");
  Line out{};
  try {
    if (j.contains("step")) {
      out.kind = LineKind::Step;
      StepMetrics& m = out.step;
      m.step = j.at("step").get<int64_t>();
      m.loss = read_number(j, "loss");
      m.lr = read_number(j, "lr");
      m.grad_norm = read_number(j, "grad_norm");
      m.tokens = j.at("tokens").get<int64_t>();
      m.tokens_per_s = read_number(j, "tokens_per_s");
      m.peak_mem_bytes = j.at("peak_mem_bytes").get<int64_t>();
      m.rss_peak_bytes = j.value("rss_peak_bytes", int64_t(0));
      m.device_peak_bytes = j.value("device_peak_bytes", int64_t(0));
      m.skipped = j.at("skipped").get<bool>();
    } else if (j.contains("eval_step")) {
      out.kind = LineKind::Eval;
      out.eval.eval_step = j.at("eval_step").get<int64_t>();
      out.eval.eval_loss = read_number(j, "eval_loss");
      out.eval.eval_ppl = read_number(j, "eval_ppl");
    } else {
      TF_FAIL(where, ": neither a step line (\"step\") nor an eval line (\"eval_step\")");
    }
  } catch (const nlohmann::json::exception& e) {
    TF_FAIL(where, ": malformed metrics line: ", e.what());
  }
  return out;
}

// Calls fn(line text, parsed line) for each newline-terminated, non-empty line.
template <typename Fn>
void for_each_line(const std::string& path, Fn fn) {
  std::ifstream in(path, std::ios::binary);
  TF_CHECK(in, path, ": cannot open the metrics file: ", std::strerror(errno));
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  size_t pos = 0, line_no = 0;
  while (pos < text.size()) {
    const size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) break;  // torn last line
    ++line_no;
    const std::string line = text.substr(pos, nl - pos);
    pos = nl + 1;
    if (line.empty()) continue;
    fn(line, parse_line(line, path, line_no));
  }
}

}  // namespace

MetricsWriter::MetricsWriter(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  TF_CHECK(fd_ >= 0, path, ": cannot open the metrics file for writing: ", std::strerror(errno));
}

MetricsWriter::~MetricsWriter() {
  if (fd_ >= 0) ::close(fd_);
}

void MetricsWriter::write_line(const std::string& line) {
  // One write() per line: O_APPEND writes of a line are not interleaved and are not split by a
  // crash of this process.
  size_t done = 0;
  while (done < line.size()) {
    const ssize_t w = ::write(fd_, line.data() + done, line.size() - done);
    if (w < 0 && errno == EINTR) continue;
    TF_CHECK(w > 0, path_, ": write failed: ", std::strerror(errno));
    done += size_t(w);
  }
}

void MetricsWriter::write(const StepMetrics& m) {
  ordered_json j;
  j["step"] = m.step;
  j["loss"] = number_or_null(m.loss);
  j["lr"] = number_or_null(m.lr);
  j["grad_norm"] = number_or_null(m.grad_norm);
  j["tokens"] = m.tokens;
  j["tokens_per_s"] = number_or_null(m.tokens_per_s);
  j["peak_mem_bytes"] = m.peak_mem_bytes;
  j["rss_peak_bytes"] = m.rss_peak_bytes;
  if (m.device_peak_bytes) j["device_peak_bytes"] = m.device_peak_bytes;
  j["skipped"] = m.skipped;
  write_line(j.dump() + "\n");
}

void MetricsWriter::write(const EvalMetrics& m) {
  ordered_json j;
  j["eval_step"] = m.eval_step;
  j["eval_loss"] = number_or_null(m.eval_loss);
  j["eval_ppl"] = number_or_null(m.eval_ppl);
  write_line(j.dump() + "\n");
}

void MetricsWriter::sync() {
  TF_CHECK(::fdatasync(fd_) == 0, path_, ": fdatasync failed: ", std::strerror(errno));
}

MetricsLog read_metrics(const std::string& path) {
  MetricsLog log;
  for_each_line(path, [&](const std::string&, const Line& l) {
    if (l.kind == LineKind::Step) {
      log.steps.push_back(l.step);
    } else {
      log.evals.push_back(l.eval);
    }
  });
  return log;
}

void truncate_metrics_for_resume(const std::string& path, int64_t resume_step) {
  if (::access(path.c_str(), F_OK) != 0) return;
  std::string kept;
  for_each_line(path, [&](const std::string& text, const Line& l) {
    const bool keep = l.kind == LineKind::Step ? l.step.step < resume_step : l.eval.eval_step <= resume_step;
    if (keep) kept += text + "\n";
  });
  io::write_file_atomic(path, kept);
}

}  // namespace tf
