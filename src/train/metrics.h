// defines: tf::StepMetrics, EvalMetrics, MetricsLog, MetricsWriter (RUN/metrics.jsonl),
//          read_metrics, truncate_metrics_for_resume
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tf {

// One line per optimizer step:
// {"step":..,"loss":..,"lr":..,"grad_norm":..,"tokens":..,"tokens_per_s":..,"peak_mem_bytes":..,"skipped":..}
struct StepMetrics {
  int64_t step = 0;  // 0-based index of the step (StepStats::step)
  double loss = 0;
  double lr = 0;
  double grad_norm = 0;
  int64_t tokens = 0;
  double tokens_per_s = 0;
  int64_t peak_mem_bytes = 0;  // the tracked peak of the backend's memory
  bool skipped = false;
  int64_t rss_peak_bytes = 0;     // the process's peak resident memory (VmHWM); 0 in older runs
  int64_t device_peak_bytes = 0;  // a device backend's peak of device memory in use; 0 on the cpu
};

// {"eval_step":..,"eval_loss":..,"eval_ppl":..}. eval_step is the number of optimizer steps taken
// when the evaluation ran (0 = before training).
struct EvalMetrics {
  int64_t eval_step = 0;
  double eval_loss = 0;
  double eval_ppl = 0;
};

struct MetricsLog {
  std::vector<StepMetrics> steps;  // in file order
  std::vector<EvalMetrics> evals;
};

// Appends lines to a metrics.jsonl. Each line reaches the kernel with one write() as soon as it is
// logged, so a killed process loses at most the line being written; sync() also makes the lines
// durable across a power loss and is meant to be called before a checkpoint is saved, so that a
// checkpoint never gets ahead of the metrics it resumes.
//
// Non-finite numbers (a skipped step's loss) are written as null, since JSON has no NaN.
class MetricsWriter {
 public:
  explicit MetricsWriter(const std::string& path);  // creates the file or appends to it
  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;

  void write(const StepMetrics& m);
  void write(const EvalMetrics& m);
  void sync();
  const std::string& path() const { return path_; }

 private:
  void write_line(const std::string& line);
  std::string path_;
  int fd_ = -1;
};

// Reads a metrics.jsonl. A last line without its newline (a crash mid-write) is ignored; any other
// line that is not a step or eval record is a tf::Error naming the file and line. nulls read back
// as NaN.
MetricsLog read_metrics(const std::string& path);

// For a run resumed from the checkpoint at step N (N steps taken): keeps the step lines with
// step < N and the eval lines with eval_step <= N (an evaluation after step N-1 is logged before
// checkpoint N is saved), drops everything else, including a torn last line, and rewrites the file
// atomically. The resumed run then appends exactly what an uninterrupted run wrote after that
// point. A missing file is left missing.
void truncate_metrics_for_resume(const std::string& path, int64_t resume_step);

}  // namespace tf
