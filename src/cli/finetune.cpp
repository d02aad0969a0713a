#include "src/cli/finetune.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>

#include "kernels/backend.h"
#include "kernels/cpu/bf16_gemm.h"
#include "kernels/cpu/threads.h"
#include "kernels/ops.h"
#include "kernels/profile.h"
#include "src/cli/common.h"
#include "src/cli/outputs.h"
#include "src/cli/plan.h"
#include "src/core/error.h"
#include "src/core/process_memory.h"
#include "src/data/sampler.h"
#include "src/dist/comm.h"
#include "src/dist/device_sum.h"
#include "src/io/durable.h"
#include "src/io/peft.h"
#include "src/train/checkpoint.h"
#include "src/train/metrics.h"
#include "src/train/report.h"
#include "src/train/trainer.h"

namespace tf::cli {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

std::atomic<int> g_stop_signal{0};
extern "C" void on_stop_signal(int sig) {
  // The first signal stops at the next safe point, which may be after a long phase (loading a
  // model, an evaluation); a second one stops at once.
  if (g_stop_signal.exchange(sig) != 0) {
    std::signal(sig, SIG_DFL);
    std::raise(sig);
    return;
  }
  // write(2), as printf is not async-signal-safe.
  static const char note[] = "\ntightfit: stopping at the next safe point; a second signal stops at once\n";
  [[maybe_unused]] const ssize_t written = ::write(STDERR_FILENO, note, sizeof note - 1);
}

// Held by the process that works on a run directory, for as long as it does.
constexpr const char* kLockFile = ".lock";

// The options with model, data, eval_data and out as absolute, normalised paths, so that the run
// directory names the same files from any working directory.
FinetuneOptions with_absolute_paths(FinetuneOptions o) {
  for (std::string* p : {&o.model, &o.data, &o.eval_data, &o.out}) {
    if (p->empty()) continue;
    std::error_code ec;
    // Lexical, not canonical: a path through a link keeps the user's name (an HF cache's snapshot
    // rather than its blob); resume compares files by identity anyway.
    fs::path abs = fs::absolute(*p, ec).lexically_normal();
    if (ec) TF_FAIL(*p, ": cannot make the path absolute: ", ec.message());
    if (!abs.has_filename()) abs = abs.parent_path();
    *p = abs.string();
  }
  return o;
}

// The config.json of a tightfit run (a JSON object with the options finetune writes), or nothing
// for any other file or none.
std::optional<nlohmann::json> read_run_config(const fs::path& path) {
  std::ifstream in(path);
  if (!in) return std::nullopt;
  nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  if (!j.is_object() || !j.contains("model") || !j["model"].is_string() || !j.contains("data") ||
      !j["data"].is_string() || !j.contains("lora_rank"))
    return std::nullopt;
  return j;
}

// Until its config.json is committed, a run that another process is starting holds only its lock
// file and the temporary of that config.json (AtomicFile's ".config.json.tmp.*"); neither makes
// the directory someone else's. A process killed there leaves the same, and a new run may start.
bool holds_only_a_starting_run(const std::string& dir) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    // A run killed while loading leaves its spill file too (replaced when the run starts again).
    if (name != kLockFile && name != "base-spill.bin" && name.rfind(".config.json.tmp.", 0) != 0)
      return false;
  }
  TF_CHECK(!ec, dir, ": cannot list: ", ec.message());
  return true;
}

// Refuses an --out this invocation must not write to and returns the run's stored config when
// resuming. Before the lock is taken (`locked` false) only what needs no lock is checked, so that
// nothing, not even the lock file, is created in a directory that is not ours.
std::optional<nlohmann::json> check_run_dir(const FinetuneOptions& o, bool locked) {
  std::error_code ec;
  const fs::file_status st = fs::status(o.out, ec);
  if (!fs::exists(st)) {
    TF_CHECK(!o.resume, o.out, ": nothing to resume (no such directory)");
    return std::nullopt;
  }
  TF_CHECK(fs::is_directory(st), o.out, ": exists and is not a directory; choose another --out");
  std::optional<nlohmann::json> stored = read_run_config(fs::path(o.out) / "config.json");
  TF_CHECK(stored || holds_only_a_starting_run(o.out), o.out, ": is not a tightfit run and is not empty (",
           describe_entries(o.out, 4, kLockFile), "); choose an empty or new --out");
  if (!locked) return std::nullopt;
  TF_CHECK(stored || !o.resume, o.out, ": nothing to resume (no config.json)");
  TF_CHECK(!stored || o.resume, o.out, " already holds a run; pass --resume to continue it or choose ",
           "another --out");
  return stored;
}

// Fits `relevant` (this invocation's options that a resume must keep) to the run's stored config
// and refuses a change. Files are compared by identity: older versions stored paths as given,
// relative to the working directory, and the same file may be named differently now (relative,
// absolute, through a link). Then the stored name is kept, so that the config hash is still the
// one the run's checkpoints carry.
void match_stored_config(nlohmann::json& relevant, const nlohmann::json& stored, const std::string& run) {
  for (const char* key : {"model", "data"}) {
    if (!relevant.contains(key) || !stored.contains(key) || !stored[key].is_string()) continue;
    const std::string was = stored[key].get<std::string>();
    std::error_code ec;
    if (was != relevant[key] && fs::equivalent(was, relevant[key].get<std::string>(), ec))
      relevant[key] = was;
  }
  // A run from before --quant existed computed with its base dequantized to f32 (none).
  auto stored_value = [&](const std::string& key) -> std::optional<nlohmann::json> {
    if (stored.contains(key)) return stored[key];
    if (key == "quant") return nlohmann::json("none");
    return std::nullopt;
  };
  std::string changed;
  for (const auto& [key, now] : relevant.items()) {
    const std::optional<nlohmann::json> was = stored_value(key);
    if (was && *was == now) continue;
    changed +=
        (changed.empty() ? "" : "; ") + key + ": " + (was ? was->dump() : "(absent)") + " -> " + now.dump();
  }
  TF_CHECK(changed.empty(), "cannot resume ", run, ": the run's configuration changed (", changed,
           "); start a new run directory, or restore the original options");
}

// Whether every LoRA parameter and AdamW moment is finite, computed where they live: a sum of squares
// in double is finite exactly when every f32 term is.
bool lora_state_finite(const LoraState& lora) {
  for (const DeviceMem* b : {&lora.params, &lora.adam_m, &lora.adam_v}) {
    if (!std::isfinite(lora.backend().sum_squares(b->as<float>(), lora.n_params))) return false;
  }
  return true;
}

// The adapters readable on the host: the model's own where the backend's memory is host memory,
// else a copy made in `staging` (a copy of a large adapter's moments would otherwise count twice in
// the run's peak memory on the cpu).
LoraState& host_lora(LlamaModel& model, LoraState& staging) {
  if (model.backend().host_memory()) return model.lora();
  staging = model.lora().host_copy();
  return staging;
}

float largest_magnitude(const LoraState& lora) {
  const float* p = lora.params.as<float>();
  float m = 0;
  for (int64_t i = 0; i < lora.n_params; ++i) m = std::max(m, std::fabs(p[i]));
  return m;
}

// Every finetune option's value, before anything loads (--threads is checked for every subcommand
// by check_threads).
void check_options(const FinetuneOptions& o) {
  TF_CHECK(!o.model.empty(), "--model is required");
  TF_CHECK(!o.data.empty(), "--data is required");
  TF_CHECK(!o.out.empty(), "--out is required");
  check_input_file("--data", o.data, "a JSONL file");
  if (!o.eval_data.empty()) check_input_file("--eval-data", o.eval_data, "a JSONL file");
  TF_CHECK(o.lora_rank >= 1 && o.lora_rank <= 4096, "--lora-rank must be in [1, 4096], got ", o.lora_rank);
  TF_CHECK(std::isfinite(o.lora_alpha) && o.lora_alpha > 0, "--lora-alpha must be positive, got ",
           o.lora_alpha);
  TF_CHECK(o.lora_dropout >= 0 && o.lora_dropout < 1, "--lora-dropout must be in [0, 1), got ",
           o.lora_dropout);
  TF_CHECK(std::isfinite(o.lr) && o.lr > 0, "--lr must be positive, got ", o.lr);
  TF_CHECK(std::isfinite(o.weight_decay) && o.weight_decay >= 0, "--weight-decay must not be negative, got ",
           o.weight_decay);
  TF_CHECK(std::isfinite(o.clip) && o.clip >= 0, "--clip must be positive, or 0 for no clipping, got ",
           o.clip);
  TF_CHECK(o.warmup >= 0, "--warmup must not be negative, got ", o.warmup);
  parse_lr_schedule(o.schedule);
  TF_CHECK(o.steps >= 0 && o.steps <= kMaxSteps, "--steps must be in [0, ", kMaxSteps, "], got ", o.steps);
  TF_CHECK(std::isfinite(o.epochs), "--epochs must be a finite number, got ", o.epochs);
  TF_CHECK(o.steps > 0 || o.epochs > 0, "--epochs must be positive when --steps is 0, got ", o.epochs);
  TF_CHECK(o.seq_len >= 8 && o.seq_len <= (1 << 20), "--seq-len must be in [8, 1048576], got ", o.seq_len);
  if (o.template_name != "auto") data::template_by_name(o.template_name);
  data::think_mode_by_name(o.think);
  tokenize_options(o.seq_len, o.train_on, o.mask_history, o.train_on_eos);
  TF_CHECK(o.checkpointing == "auto" || o.checkpointing == "none" || o.checkpointing == "block" ||
               o.checkpointing == "offload",
           "--checkpointing must be auto, none, block or offload, got '", o.checkpointing, "'");
  quant_option(o.quant);
  check_device(o.device, parse_attention(o.attention));
  check_matmul_option(o.matmul, o.device);
  TF_CHECK(o.weights == "auto" || o.weights == "resident" || o.weights == "host" || o.weights == "disk",
           "--weights must be auto, resident, host or disk, got '", o.weights, "'");
  TF_CHECK(o.embedding == "auto" || o.embedding == "device" || o.embedding == "host",
           "--embedding must be auto, device or host, got '", o.embedding, "'");
  if (o.max_mem != "auto") parse_size("--max-mem", o.max_mem);
  if (o.max_host_mem != "auto") parse_size("--max-host-mem", o.max_host_mem);
  TF_CHECK(o.save_every >= 0, "--save-every must not be negative (0: only at the end), got ", o.save_every);
  TF_CHECK(o.keep >= 1, "--keep must be at least 1, got ", o.keep);
  TF_CHECK(o.eval_every >= 0, "--eval-every must not be negative (0: before and after training only), got ",
           o.eval_every);
}

// Says what tokenisation did to the examples of `path` that were too long or had nothing to train on.
void print_dropped(const data::TokenizedDataset& d, const std::string& path, const FinetuneOptions& o,
                   const data::ChatTemplate& tmpl) {
  const char* target = o.train_on == "all" ? "token" : "completion or assistant token";
  if (d.truncated)
    std::printf(
        "note: %s: %zu examples longer than --seq-len %d tokens were truncated to their first %d tokens\n",
        path.c_str(), d.truncated, o.seq_len, o.seq_len);
  if (d.dropped_too_long)
    std::printf(
        "note: %s: %zu examples longer than --seq-len %d tokens were dropped: their first %d tokens hold no "
        "%s to train on\n",
        path.c_str(), d.dropped_too_long, o.seq_len, o.seq_len, target);
  if (d.dropped_no_target)
    std::printf("note: %s: %zu examples were dropped: they hold no %s to train on\n", path.c_str(),
                d.dropped_no_target, target);
  if (d.skipped_bad)
    std::printf("warning: %s: skipped %zu records the '%s' template cannot render\n", path.c_str(),
                d.skipped_bad, std::string(data::template_name(tmpl.kind)).c_str());
}

void print_skipped_lines(const data::Dataset& d) {
  if (d.skipped_lines)
    std::printf("warning: skipped %zu bad lines of %s (first: %s)\n", d.skipped_lines, d.path.c_str(),
                d.first_problems.front().c_str());
}

// Counts the optimizer steps of `epochs` passes over the data (packing makes this data-dependent),
// each step taking `accum` micro-batches on each of `ranks` ranks.
int64_t steps_for_epochs(const data::TokenizedDataset& d, const data::BatchOptions& bo, double epochs,
                         int accum, int ranks, uint64_t seed) {
  data::Sampler s(d.size(), seed, true, 1);
  data::TokenBatch b;
  int64_t batches = 0;
  while (data::next_batch(d, s, bo, b)) ++batches;
  const double steps = std::ceil(double(batches) * epochs / (double(accum) * ranks));
  TF_CHECK(steps <= double(kMaxSteps), "--epochs ", epochs, " makes ", steps, " optimizer steps (", batches,
           " micro-batches per epoch, --grad-accum ", accum, " on ", ranks,
           " ranks), more than the limit of ", kMaxSteps);
  return std::max<int64_t>(1, int64_t(steps));
}

std::string cursor_json(const data::SamplerCursor& c) {
  return nlohmann::json{{"epoch", c.epoch}, {"index", c.index}}.dump();
}

data::SamplerCursor parse_cursor(const std::string& text, const std::string& where) {
  const auto j = nlohmann::json::parse(text, nullptr, false);
  TF_CHECK(j.is_object() && j.contains("epoch") && j.contains("index"), where, ": bad data cursor ", text);
  return {j["epoch"].get<uint64_t>(), j["index"].get<uint64_t>()};
}

class Progress {
 public:
  Progress(int64_t total, int64_t start) : total_(total), start_step_(start), tty_(stdout_is_terminal()) {}
  void step(const StepStats& st, double tok_s, size_t peak) {
    const double elapsed = std::chrono::duration<double>(Clock::now() - t0_).count();
    const int64_t done = st.step + 1 - start_step_;
    const double eta = done > 0 ? elapsed / double(done) * double(total_ - st.step - 1) : 0;
    if (tty_) {
      const int width = 24, filled = int(double(width) * double(st.step + 1) / double(total_));
      std::printf("\r[%s%s] %lld/%lld loss %.4f  %.0f tok/s  ETA %s  mem %s%s   ",
                  std::string(size_t(filled), '#').c_str(), std::string(size_t(width - filled), '.').c_str(),
                  (long long)(st.step + 1), (long long)total_, st.loss, tok_s, duration(eta).c_str(),
                  format_bytes(double(peak)).c_str(), st.skipped ? " SKIPPED" : "");
      std::fflush(stdout);
    } else if (elapsed - last_log_ >= 10.0 || st.step + 1 == total_ || done == 1) {
      last_log_ = elapsed;
      std::printf("step %lld/%lld  loss %.4f  lr %.3g  grad_norm %.3f  %.0f tok/s  ETA %s  peak mem %s%s\n",
                  (long long)(st.step + 1), (long long)total_, st.loss, st.lr, st.grad_norm, tok_s,
                  duration(eta).c_str(), format_bytes(double(peak)).c_str(),
                  st.skipped ? "  (skipped: non-finite)" : "");
      std::fflush(stdout);
    }
  }
  void message(const std::string& m) {
    if (tty_) std::printf("\n");
    std::printf("%s\n", m.c_str());
    std::fflush(stdout);
  }

 private:
  static std::string duration(double s) {
    char buf[32];
    const long t = long(s);
    std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
    return buf;
  }
  int64_t total_, start_step_;
  bool tty_;
  Clock::time_point t0_ = Clock::now();
  double last_log_ = -1e9;
};

// What stopped the run: this rank's signal, or another rank's (data parallel ranks stop together).
std::string stop_cause(int sig) {
  return sig != 0 ? "signal " + std::to_string(sig) : std::string("a signal to another rank");
}

// FNV-1a of the bytes: a cheap fingerprint of the LoRA parameters, compared across ranks.
uint64_t fingerprint(const void* data, size_t bytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

// The ranks of a data-parallel run must compute identical optimizer steps; this refuses a rank
// whose parameters differ from rank 0's (a bug, or ranks that did not start from the same state).
void expect_same_as_rank0(dist::Communicator& comm, const LoraState& host, int64_t step) {
  const uint64_t mine = fingerprint(host.params.as<float>(), size_t(host.n_params) * sizeof(float));
  uint64_t lead = mine;
  comm.broadcast(std::as_writable_bytes(std::span(&lead, 1)), 0);
  TF_CHECK(mine == lead, "after step ", step, " rank ", comm.rank(),
           "'s LoRA parameters differ from rank 0's ", "(fingerprints ", mine, " and ", lead,
           "); the ranks did not compute the same optimizer step");
}

// Over several ranks each drives a GPU of its own: --device cuda, or auto where GPUs are found,
// becomes cuda:N for N the rank's index on its machine modulo the GPUs it sees (a cuda:N given is
// kept: a launcher that gives each rank its own CUDA_VISIBLE_DEVICES passes cuda:0). `line`
// receives which GPU and why, where one was chosen.
std::string rank_device(const std::string& spec, int rank, std::string* line) {
  if (spec != "cuda" && spec != "auto") return spec;
  std::string why;
  const int gpus = count_gpus(&why);
  if (gpus == 0) return spec;  // auto runs on the cpu; cuda is refused with `why` when it is made
  const int local = dist::launcher_local_rank();
  const int device = dist::device_for_rank(local, rank, gpus);
  *line = "rank " + std::to_string(rank) + " drives cuda:" + std::to_string(device) + " (" +
          (local >= 0 ? "local rank " + std::to_string(local)
                      : "rank " + std::to_string(rank) + ", the launcher gave no local rank") +
          ", " + std::to_string(gpus) + (gpus == 1 ? " GPU" : " GPUs") + " visible; --device " + spec + ")";
  return "cuda:" + std::to_string(device);
}

// One rank's finetune: every rank runs this, rank 0 alone writes in the run directory.
int finetune_rank(const FinetuneOptions& given, dist::Communicator& comm) {
  FinetuneOptions o = given;
  resolve_batching(o);
  check_options(o);
  o = with_absolute_paths(o);
  o.ranks = comm.size();
  const bool lead = comm.rank() == 0;
  std::string device_spec = o.device;  // this rank's --device: over ranks, its own GPU
  if (comm.size() > 1) {
    char host[256] = "?";
    gethostname(host, sizeof host - 1);
    std::printf("rank %d of %d (pid %d on %s), collectives over %s\n", comm.rank(), comm.size(),
                int(getpid()), host, comm.describe().c_str());
    std::string device_line;
    device_spec = rank_device(o.device, comm.rank(), &device_line);
    if (!device_line.empty()) std::printf("%s\n", device_line.c_str());
    std::fflush(stdout);
    // Rank 0 speaks for the run; the others' lines would repeat it.
    if (!lead)
      TF_CHECK(std::freopen("/dev/null", "w", stdout), "cannot silence rank ", comm.rank(), "'s output");
  }
  cpu::set_num_threads(o.threads);
  const fs::path run(o.out);
  const std::string config_path = (run / "config.json").string();
  const std::string adapter_path = (run / "adapter").string();
  std::optional<io::DirLock> lock;
  std::optional<nlohmann::json> stored;
  if (lead) {
    check_run_dir(o, false);
    fs::create_directories(run);
    lock.emplace((run / kLockFile).string(), o.out, "wait for it to finish, or stop it");
    stored = check_run_dir(o, true);
  }
  if (comm.size() > 1) {
    const std::string text = dist::broadcast_string(comm, stored ? stored->dump() : "");
    if (!text.empty()) stored = nlohmann::json::parse(text);
  }
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
  nlohmann::json relevant = resume_relevant(o);
  if (stored) {
    const int stored_ranks = stored->value("ranks", 1);
    TF_CHECK(stored_ranks == o.ranks, "cannot resume ", o.out, ": the run trained on ", stored_ranks,
             stored_ranks == 1 ? " rank" : " ranks", " and this launch has ", o.ranks,
             ", which would change the global batch and each rank's share of the data; launch it as it "
             "started (mpirun -np ",
             stored_ranks, ")");
    match_stored_config(relevant, *stored, o.out);
    if (stored->contains("threads") && (*stored)["threads"] != o.threads)
      std::printf(
          "note: --threads %d differs from the run's %s; the run continues, but matrix products split "
          "their sums by thread count, so its losses can differ in the last bits from an "
          "uninterrupted run\n",
          o.threads, (*stored)["threads"].dump().c_str());
    // The adapter is written last (then the report), so with both the run is complete.
    if (dist::broadcast_flag(
            comm, fs::exists(run / "adapter" / "adapter_config.json") && fs::exists(run / "report.html"))) {
      std::printf(
          "%s: the run is finished (adapter %s); nothing to resume. Export it with tightfit export, or "
          "train further in a new --out\n",
          o.out.c_str(), adapter_path.c_str());
      return 0;
    }
  }
  if (lead)
    TF_CHECK(may_replace_export_dir(adapter_path), adapter_path, ": was not written by tightfit (",
             describe_entries(adapter_path), "); move it out of the run directory, then run again");

  const LoraConfig lora = lora_config(o);

  // The plan comes first, from the model's headers alone: a run that cannot fit is refused before
  // anything heavy loads.
  std::string device_note;
  std::unique_ptr<Backend> backend = make_backend(device_spec, &device_note, parse_attention(o.attention));
  const RunPlan plan = [&] {
    const uint64_t startup = process_memory().rss;
    const io::ModelDescription d = io::describe_model(o.model, quant_option(o.quant));
    // A resumed run keeps the micro-batch auto chose when it started: the split changes the sums.
    FinetuneOptions po = o;
    const bool kept = o.micro_batch_auto && stored && stored->contains("micro_batch_chosen") &&
                      (*stored)["micro_batch_chosen"].is_number_integer();
    if (kept) {
      po.micro_batch_auto = false;
      po.micro_batch = (*stored)["micro_batch_chosen"].get<int>();
      TF_CHECK(po.micro_batch >= 1 && o.batch_size % po.micro_batch == 0, config_path,
               ": micro_batch_chosen ", po.micro_batch, " does not divide batch_size ", o.batch_size);
      po.grad_accum = o.batch_size / po.micro_batch;
    }
    RunPlan p = plan_run(po, d, *backend, resolve_budget(po, *backend), startup);
    if (kept)
      p.choices.push_back("micro-batch " + std::to_string(p.micro_batch) + " x grad-accum " +
                          std::to_string(p.grad_accum) + " (auto, as the run chose it when it started)");
    if (!p.fits) {
      std::printf("%s", p.plan.table().c_str());
      std::string why;
      for (const std::string& line : refusal_lines(po, d, *backend, p))
        why += (why.empty() ? "" : "; ") + line;
      TF_FAIL("the run does not fit its memory budget (tightfit plan shows the whole table): ", why);
    }
    return p;
  }();
  o.micro_batch = plan.micro_batch;
  o.grad_accum = plan.grad_accum;
  if (comm.size() > 1) {
    // Each rank plans from its own process; the global batch needs them to agree.
    int64_t chosen[2] = {o.micro_batch, o.grad_accum};
    comm.broadcast(std::as_writable_bytes(std::span(chosen)), 0);
    TF_CHECK(chosen[0] == o.micro_batch && chosen[1] == o.grad_accum, "rank ", comm.rank(),
             "'s plan chose micro-batch ", o.micro_batch, " x grad-accum ", o.grad_accum, ", rank 0's ",
             chosen[0], " x ", chosen[1], "; give --micro-batch and --grad-accum as counts");
  }
  release_free_memory();
  std::printf("loading %s\n", o.model.c_str());
  CommExchange exchange(comm);
  ModelLayout layout = plan.layout;
  if (plan.tier == offload::WeightTier::Shard) layout.exchange = &exchange;
  Session s = open_session(
      o.model, lora, int64_t(o.micro_batch) * o.seq_len, [&](const LlamaConfig&) { return plan.policy; }, {},
      quant_option(o.quant), device_spec, o.attention, std::move(backend), device_note, plan.tier, layout,
      spill_options(o.spill_dir, o.out, comm.size() > 1 ? comm.rank() : -1));
  std::printf("base weights (--quant %s): %s\n", o.quant.c_str(),
              io::weight_memory(s.model->weights()).summary().c_str());
  const std::string matmul_line = apply_matmul_option(o.matmul, *s.backend, s.model->weights());
  if (!matmul_line.empty()) o.matmul_chosen = cpu::matmul_precision_name(cpu::matmul_precision());
  const LlamaConfig& cfg = s.model->config();
  const CheckpointPolicy policy = s.model->policy();
  const tok::Tokenizer& tokenizer = s.tokenizer();
  const data::ChatTemplate tmpl = choose_template(o.template_name, s.loaded, o.think);

  data::LoadOptions lo;
  lo.skip_bad_lines = o.skip_bad_lines;
  data::TokenizeOptions to = tokenize_options(o.seq_len, o.train_on, o.mask_history, o.train_on_eos);
  to.skip_bad_lines = o.skip_bad_lines;
  TF_CHECK(cfg.rope.scaling != RopeScalingType::Dynamic || o.seq_len <= cfg.rope.original_max_positions,
           "--seq-len ", o.seq_len, " is above the model's max_position_embeddings ",
           cfg.rope.original_max_positions,
           ": past it, its dynamic (NTK) rope scaling changes the frequencies with the sequence length, "
           "which tightfit does not run; use --seq-len ",
           cfg.rope.original_max_positions, " or less");
  TF_CHECK(cfg.attention_dropout == 0.0f, o.model, ": the model's config sets attention_dropout ",
           cfg.attention_dropout,
           "; tightfit trains without dropout on the attention probabilities (set it to 0 "
           "in config.json to train without)");
  check_lora_targets(cfg, lora_config(o).targets);
  TF_CHECK(cfg.residual_dropout == 0.0f && cfg.embedding_dropout == 0.0f, o.model,
           ": the model's config sets resid_pdrop ", cfg.residual_dropout, " and embd_pdrop ",
           cfg.embedding_dropout,
           "; tightfit trains without dropout on the residual branches and the embeddings (set both to 0 in "
           "config.json to train without)");
  TF_CHECK(cfg.rope.scaling != RopeScalingType::LongRope || cfg.rope.has_long_factors() ||
               o.seq_len <= cfg.rope.original_max_positions,
           "--seq-len ", o.seq_len, " is above the model's original_max_position_embeddings ",
           cfg.rope.original_max_positions,
           ": past it, its longrope scaling switches to the long factors, and the model has none; use "
           "--seq-len ",
           cfg.rope.original_max_positions, " or less");
  if (o.seq_len > cfg.max_positions)
    std::printf(
        "warning: --seq-len %d is above the model's max_position_embeddings %d; examples longer than that "
        "train on positions the model was not trained for\n",
        o.seq_len, cfg.max_positions);
  const data::Dataset train_raw = data::load_jsonl(o.data, lo);
  const data::TokenizedDataset train = data::tokenize_dataset(train_raw, tmpl, tokenizer, to);
  print_skipped_lines(train_raw);
  print_dropped(train, o.data, o, tmpl);
  std::optional<data::TokenizedDataset> eval;
  if (!o.eval_data.empty()) {
    const data::Dataset eval_raw = data::load_jsonl(o.eval_data, lo);
    eval = data::tokenize_dataset(eval_raw, tmpl, tokenizer, to);
    print_skipped_lines(eval_raw);
    print_dropped(*eval, o.eval_data, o, tmpl);
  }

  const int32_t pad_id = tokenizer.pad_id() >= 0 ? tokenizer.pad_id() : std::max(tokenizer.eos_id(), 0);
  data::BatchOptions bo;
  bo.batch = o.micro_batch;
  bo.seq = o.seq_len;
  bo.pack = o.pack;
  bo.pad_id = pad_id;
  const int64_t total_steps =
      o.steps > 0 ? o.steps : steps_for_epochs(train, bo, o.epochs, o.grad_accum, comm.size(), o.seed);

  TrainConfig tc;
  tc.lr.peak_lr = o.lr;
  tc.lr.warmup_steps = o.warmup;
  tc.lr.total_steps = total_steps;
  tc.lr.schedule = parse_lr_schedule(o.schedule);
  tc.weight_decay = o.weight_decay;
  tc.clip = o.clip;
  tc.overlap_grad_sum = o.overlap_grad_sum;
  LlamaModel& model = *s.model;
  // A GPU's gradients are summed where they are, by NCCL, where it is built; else through the host.
  std::string host_sum_why;
  const std::unique_ptr<dist::DeviceSum> device_sum =
      comm.size() > 1 ? dist::make_device_sum(comm, *s.backend, &host_sum_why) : nullptr;
  Trainer trainer(model, tc, &comm, device_sum.get());
  if (comm.size() > 1) {
    if (device_sum)
      std::printf("gradient sum: %s, %s\n", device_sum->describe().c_str(),
                  o.overlap_grad_sum ? "block by block, overlapped with the backward"
                                     : "after the backward (--no-overlap-grad-sum)");
    else if (!s.backend->host_memory())
      std::printf(
          "gradient sum: MPI on the host after the backward: the %s backend's LoRA gradients downloaded, "
          "summed in rank order and uploaded (no device sum: %s)\n",
          s.backend->name().c_str(), host_sum_why.c_str());
    else if (!o.overlap_grad_sum)
      std::printf("gradient sum: after the backward (--no-overlap-grad-sum)\n");
    else if (!comm.overlap())
      std::printf("gradient sum: after the backward, not overlapped: %s\n", comm.overlap_note().c_str());
    else
      std::printf("gradient sum: block by block, overlapped with the backward\n");
  }
  data::Sampler sampler(train.size(), o.seed, true, 0);

  const nlohmann::json resolved = to_json(o);
  const std::string hash = config_hash(relevant);
  const std::string metrics_path = (run / "metrics.jsonl").string();
  int64_t start = 0;
  std::string last_checkpoint;
  if (o.resume) {
    // Every rank resumes from the checkpoint rank 0 chose (one machine's, or a shared, filesystem).
    std::string chosen;
    if (lead) {
      std::vector<std::string> rejected;
      const auto latest = latest_checkpoint(o.out, &rejected);
      for (const auto& r : rejected) std::printf("warning: ignoring checkpoint %s\n", r.c_str());
      if (latest) chosen = latest->path;
    }
    chosen = dist::broadcast_string(comm, chosen);
    if (!chosen.empty()) {
      LoraState staging;
      LoraState& host = host_lora(model, staging);
      const LoadedCheckpoint ck = load_checkpoint(chosen, hash, relevant.dump(), host);
      model.lora().copy_from(host);
      trainer.restore(ck.trainer);
      sampler.restore(parse_cursor(ck.data_cursor, chosen));
      start = ck.trainer.step;
      last_checkpoint = chosen;
      if (lead) truncate_metrics_for_resume(metrics_path, start);
      std::printf("resuming from %s (step %lld)\n", chosen.c_str(), (long long)start);
    } else {
      // Stopped before its first checkpoint: the configuration matched, so start it over.
      if (lead) fs::remove(metrics_path);
      std::printf("no checkpoint in %s yet: training from step 0\n", o.out.c_str());
    }
  } else if (lead) {
    io::write_file_atomic(config_path, resolved.dump(2) + "\n");
  }
  if (lead) io::write_file_atomic((run / "plan.json").string(), plan.to_json().dump(2) + "\n");
  // Once config.json is written: a signal during the long phases before the first step. The ranks
  // agree, so that all stop or none does.
  const auto stopped_before_training = [&] {
    const int sig = g_stop_signal.load();
    if (!dist::any_rank(comm, sig != 0)) return false;
    if (start == 0) {
      std::printf(
          "stopped by %s before training started; nothing was trained yet (continue with "
          "--resume)\n",
          stop_cause(sig).c_str());
    } else {
      std::printf(
          "stopped by %s before training resumed; the run is still at step %lld (continue with "
          "--resume)\n",
          stop_cause(sig).c_str(), (long long)start);
    }
    return true;
  };
  if (stopped_before_training()) return 0;

  std::printf("model: %s, %d layers, hidden %d, vocab %d; LoRA r=%d alpha=%g on %s (%lld parameters)\n",
              cfg.architecture.c_str(), cfg.n_layers, cfg.hidden, cfg.vocab, lora.rank, double(lora.alpha),
              o.lora_targets.c_str(), (long long)model.lora().n_params);
  std::printf(
      "data: %zu training examples (%zu target tokens), template %s; %lld steps of %d x %d x %d tokens; "
      "checkpointing %s; weights %s; %d threads\n",
      train.size(), train.trainable_tokens(), std::string(data::template_name(tmpl.kind)).c_str(),
      (long long)total_steps, o.grad_accum, o.micro_batch, o.seq_len,
      policy == CheckpointPolicy::None       ? "none"
      : policy == CheckpointPolicy::PerBlock ? "per block"
                                             : "per block, inputs in host memory",
      offload::weight_tier_name(plan.tier), cpu::num_threads());
  std::printf("threads: %s\n", cpu::wait_policy().c_str());
  if (comm.size() > 1)
    std::printf(
        "data parallel: %d ranks; each step's global batch is %d ranks x %d micro-batches x %d sequences, "
        "rank r taking micro-batches r x %d to r x %d + %d of the step's %d in data order; gradients "
        "summed in rank order\n",
        comm.size(), comm.size(), o.grad_accum, o.micro_batch, o.grad_accum, o.grad_accum, o.grad_accum - 1,
        comm.size() * o.grad_accum);
  if (plan.tier == offload::WeightTier::Shard) {
    uint64_t share = 0;
    for (const offload::PlanItem& i : plan.plan.items)
      if (i.component == kShardsItem) share += i.bytes;
    std::printf(
        "weights: split across the %d ranks (--shard-weights), this rank holding 1/%d of every layer's "
        "block (%s), each block all-gathered from the ranks just before it runs, %s\n",
        comm.size(), comm.size(), format_bytes(double(share)).c_str(),
        comm.overlap() ? "the next one while the current one computes"
                       : ("not overlapped: " + comm.overlap_note()).c_str());
  }
  for (const std::string& choice : plan.choices) std::printf("plan: %s\n", choice.c_str());
  std::printf("plan: step times predicted at rates %s\n", plan.rates.describe().c_str());
  if (o.mlp_chunk != "auto" && model.mlp_rows() < model.max_tokens())
    std::printf("plan: MLP in chunks of %lld rows (--mlp-chunk)\n", (long long)model.mlp_rows());
  if (o.loss_chunk != "auto" && model.loss_rows() < model.max_tokens())
    std::printf("plan: loss in calls of %lld rows (--loss-chunk)\n", (long long)model.loss_rows());
  if (o.embedding == "host") std::printf("plan: embedding table in host memory (--embedding host)\n");
  std::printf("plan: predicted peak %s\n", peaks_text(plan.plan, plan.budget).c_str());
  if (plan.tier == offload::WeightTier::Disk && s.backend->host_memory() && !std::getenv("OMP_WAIT_POLICY"))
    std::printf(
        "note: OpenMP threads spin between parallel regions and slow the reads of streamed blocks; run with "
        "OMP_WAIT_POLICY=passive in the environment to hide more of them behind compute\n");
  std::printf("device: %s%s\n", s.device_note.empty() ? s.backend->describe().c_str() : s.device_note.c_str(),
              s.attention == "cpu" ? "" : ("; attention: " + s.attention).c_str());
  if (!matmul_line.empty()) std::printf("matmul: %s\n", matmul_line.c_str());

  std::fflush(stdout);  // the header shows before the evaluation, which can take long
  std::optional<MetricsWriter> metrics;
  if (lead) metrics.emplace(metrics_path);
  // Evaluations are rank 0's alone, the parameters being the same on every rank; with the weights
  // sharded every rank evaluates, since each block of rank 0's passes is gathered from them all.
  const bool evaluates = lead || plan.tier == offload::WeightTier::Shard;
  if (eval && start == 0 && evaluates) {
    // Logged as the eval at step 0, so the report of a resumed run still has it.
    const double before = evaluate_loss(model, *eval, o.micro_batch, o.seq_len, pad_id).mean();
    if (lead) metrics->write(EvalMetrics{0, before, std::exp(before)});
    std::printf("eval loss before training: %.4f (perplexity %.2f)\n", before, std::exp(before));
  }
  if (stopped_before_training()) return 0;

  // Memory is tracked where the model runs: host memory on the cpu, device memory on a GPU.
  MemTracker& mem = s.backend->tracker();
  mem.reset_peaks();
  Progress progress(total_steps, start);
  std::vector<data::TokenBatch> micro(size_t(o.grad_accum));
  std::vector<Batch> views(size_t(o.grad_accum));
  // Diverged weights are never saved. Their values can stay finite (a huge --lr makes them ~1e29)
  // while every forward pass overflows, so before a save they must also give a finite loss on the
  // step's last micro-batch (`probe`: false when this process has taken no step).
  const auto refuse_diverged = [&](int64_t done, bool probe) {
    std::string why;
    if (!lora_state_finite(model.lora())) {
      why = "became non-finite (NaN or infinity)";
    } else if (probe && !std::isfinite(model.forward_loss(views.back()).sum)) {
      LoraState staging;
      char buf[96];
      std::snprintf(buf, sizeof buf, "give a non-finite loss (largest |weight| %.3g)",
                    double(largest_magnitude(host_lora(model, staging))));
      why = buf;
    }
    TF_CHECK(why.empty(), "training diverged at step ", done, ": the LoRA weights ", why,
             "; they were not saved (",
             last_checkpoint.empty() ? "no checkpoint was saved before"
                                     : "the last checkpoint is " + last_checkpoint,
             "); lower --lr (now ", o.lr, ") and start a new run");
  };
  // Every rank checks its parameters against rank 0's (cheap, at each save); rank 0 alone saves.
  auto save = [&] {
    refuse_diverged(trainer.state().step, trainer.state().step > start);
    LoraState staging;
    LoraState& host = host_lora(model, staging);
    if (comm.size() > 1) expect_same_as_rank0(comm, host, trainer.state().step);
    if (!lead) return std::string();
    CheckpointMeta meta;
    meta.config_hash = hash;
    meta.config_json = relevant.dump();
    meta.data_cursor = cursor_json(sampler.cursor());
    meta.seed = o.seed;
    last_checkpoint = save_checkpoint(o.out, host, trainer.state(), meta, o.keep);
    return last_checkpoint;
  };
  auto run_eval = [&](int64_t step) {
    const double loss = evaluate_loss(model, *eval, o.micro_batch, o.seq_len, pad_id).mean();
    if (lead) metrics->write(EvalMetrics{step, loss, std::exp(loss)});
    return loss;
  };

  double last_loss = NAN, tok_s_sum = 0, wait_secs = 0, reduce_secs = 0, step_secs = 0, sum_work_secs = 0;
  bool overlapped = false;
  int64_t tok_s_n = 0;
  int64_t step = start;
  OpProfile profile;        // --profile: the training steps' ops, nothing else
  data::TokenBatch others;  // a micro-batch of another rank's share, formed to keep the data order
  for (; step < total_steps; ++step) {
    // The step's global batch is the next ranks x grad-accum micro-batches of the data order, the
    // same on every rank; rank r keeps the grad-accum consecutive ones from r x grad-accum on, so
    // that the shares are disjoint and every rank's sampler ends the step at the same cursor.
    for (int g = 0; g < comm.size() * o.grad_accum; ++g) {
      const bool mine = g / o.grad_accum == comm.rank();
      data::TokenBatch& b = mine ? micro[size_t(g % o.grad_accum)] : others;
      TF_CHECK(data::next_batch(train, sampler, bo, b), o.data, ": ran out of examples");
      if (mine) views[size_t(g % o.grad_accum)] = batch_view(b);
    }
    if (o.profile) s.backend->set_profile(&profile);
    const auto t0 = Clock::now();
    const StepStats st = trainer.step(views);
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    if (o.profile) {
      s.backend->set_profile(nullptr);
      profile.add_step(secs);
    }
    const double tok_s = double(st.tokens) / secs;
    tok_s_sum += tok_s;
    ++tok_s_n;
    wait_secs += st.wait_seconds;
    reduce_secs += st.reduce_seconds;
    sum_work_secs += st.sum_work_seconds;
    overlapped = overlapped || st.overlapped;
    step_secs += secs;
    last_loss = st.loss;
    const size_t peak = mem.peak_total();
    if (lead)
      metrics->write(StepMetrics{st.step, st.loss, st.lr, st.grad_norm, st.tokens, tok_s, int64_t(peak),
                                 st.skipped, int64_t(process_memory().peak_rss),
                                 int64_t(s.backend->device_memory_peak().value_or(0))});
    progress.step(st, tok_s, peak);
    const int64_t done = step + 1;
    refuse_diverged(done, false);
    if (evaluates && eval && o.eval_every > 0 && done % o.eval_every == 0 && done < total_steps)
      run_eval(done);
    if (lead) metrics->sync();
    const int sig = g_stop_signal.load();
    const bool stop = dist::any_rank(comm, sig != 0);
    if ((o.save_every > 0 && done % o.save_every == 0 && done < total_steps) || stop) {
      const std::string path = save();
      if (stop) {
        progress.message("stopped by " + stop_cause(sig) + " after step " + std::to_string(done) +
                         "; saved " + path + " (continue with --resume)");
        return 0;
      }
    }
  }

  std::optional<double> eval_after;
  if (eval && evaluates) {
    eval_after = run_eval(total_steps);
    if (lead) metrics->sync();
  }
  const std::string ck = save();
  if (!lead) return 0;
  TF_CHECK(may_replace_export_dir(adapter_path), adapter_path, ": appeared during training and was not ",
           "written by tightfit; move it out of the run directory, then continue with --resume");
  publish_export_dir(adapter_path, "peft", [&](const std::string& staged) {
    LoraState staging;
    io::export_peft(staged, host_lora(model, staging), model.config(), o.model);
  });
  ReportInput report;
  report.title = o.out;
  report.metrics = read_metrics(metrics_path);
  report.config_json = resolved.dump();
  write_report((run / "report.html").string(), report);

  progress.message("done: " + std::to_string(total_steps) + " steps");
  if (o.profile) {
    const std::string path = (run / "profile.json").string();
    io::write_file_atomic(path, profile.json());
    std::printf("per-op profile of this run's %lld steps (%s):\n%s", (long long)profile.steps(), path.c_str(),
                profile.table().c_str());
  }
  std::printf("final train loss %.4f", last_loss);
  if (eval_after) std::printf(", eval loss %.4f (perplexity %.2f)", *eval_after, std::exp(*eval_after));
  if (comm.size() > 1)
    std::printf(
        "\ndata parallel: %d ranks, mean throughput %.0f tokens/s per rank; gradient sum over the ranks "
        "%.3g ms a step (%.1f%% of the step), after waiting %.3g ms a step for the slowest rank",
        comm.size(), tok_s_n ? tok_s_sum / double(tok_s_n) / comm.size() : 0.0,
        tok_s_n ? 1e3 * reduce_secs / double(tok_s_n) : 0.0,
        step_secs > 0 ? 100 * reduce_secs / step_secs : 0.0,
        tok_s_n ? 1e3 * wait_secs / double(tok_s_n) : 0.0);
  if (comm.size() > 1 && overlapped)
    std::printf(
        "; overlapped with the backward: the sums worked %.3g ms a step, of which %.0f%% was hidden behind "
        "it (the step waited the rest, its wait for the slowest rank included)",
        tok_s_n ? 1e3 * sum_work_secs / double(tok_s_n) : 0.0,
        sum_work_secs > 0 ? 100 * std::max(0.0, 1 - reduce_secs / sum_work_secs) : 0.0);
  std::printf("\nmean throughput %.0f tokens/s; peak tracked memory %s on %s (weights %s, activations %s)\n",
              tok_s_n ? tok_s_sum / double(tok_s_n) : 0.0, format_bytes(double(mem.peak_total())).c_str(),
              s.backend->name().c_str(), format_bytes(double(mem.peak(MemTag::Weights))).c_str(),
              format_bytes(double(mem.peak(MemTag::Activations))).c_str());
  std::printf("peak process memory %s (predicted host peak %s)\n",
              format_bytes(double(process_memory().peak_rss)).c_str(),
              format_bytes(double(plan.plan.peak(offload::Tier::Host))).c_str());
  if (const std::optional<uint64_t> device = s.backend->device_memory_peak())
    std::printf("peak device memory %s (predicted device peak %s)\n", format_bytes(double(*device)).c_str(),
                format_bytes(double(plan.plan.peak(offload::Tier::Device))).c_str());
  std::printf("checkpoint %s\nadapter %s (PEFT)\nreport %s\n", ck.c_str(), (run / "adapter").c_str(),
              (run / "report.html").c_str());
  return 0;
}

}  // namespace

int run_finetune(const FinetuneOptions& given) {
  const std::unique_ptr<dist::Communicator> comm = dist::launch();
  if (comm->size() == 1) return finetune_rank(given, *comm);
  // An error on one rank must stop every rank: the others would wait for it in their next collective.
  try {
    return finetune_rank(given, *comm);
  } catch (const std::bad_alloc&) {
    comm->abort("out of memory");
  } catch (const std::exception& e) {
    comm->abort(e.what());
  }
}

}  // namespace tf::cli
