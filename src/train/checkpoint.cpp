// defines: save_checkpoint / load_checkpoint (the LoRA modules, AdamW moments, trainer and data cursor
// of a run, checked whole before use), latest_checkpoint, list_checkpoints
#include "src/train/checkpoint.h"

#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "src/core/error.h"
#include "src/io/durable.h"
#include "src/io/safetensors.h"

namespace tf {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kTensorFile = "lora.safetensors";
constexpr const char* kStateFile = "state.json";
constexpr const char* kFormat = "tightfit-checkpoint";
constexpr int kFormatVersion = 1;
constexpr const char* kParts[3] = {"param", "adam_m", "adam_v"};

// FNV-1a 64 of a file's bytes: detects truncation and corruption of a checkpoint; it guards
// against accidents, not against tampering.
std::optional<uint64_t> file_fnv1a64(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  uint64_t h = 0xcbf29ce484222325ull;
  std::vector<char> buf(size_t(1) << 20);
  while (in) {
    in.read(buf.data(), std::streamsize(buf.size()));
    const std::streamsize n = in.gcount();
    for (std::streamsize i = 0; i < n; ++i) {
      h ^= uint8_t(buf[size_t(i)]);
      h *= 0x100000001b3ull;
    }
  }
  if (in.bad()) return std::nullopt;
  return h;
}

std::string hex64(uint64_t v) {
  char s[17];
  std::snprintf(s, sizeof(s), "%016llx", static_cast<unsigned long long>(v));
  return s;
}

std::optional<int64_t> parse_step_name(const std::string& name, std::string_view prefix) {
  if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) return std::nullopt;
  int64_t step = 0;
  const char* first = name.data() + prefix.size();
  const char* last = name.data() + name.size();
  const auto [end, ec] = std::from_chars(first, last, step);
  if (ec != std::errc() || end != last || step < 0 || (*first == '0' && last - first > 1))
    return std::nullopt;
  return step;
}

std::string tensor_name(const char* part, int layer, const LoraModule& m, const char* which) {
  return std::string(part) + ".layers." + std::to_string(layer) + "." + m.name + "." + which;
}

// The adapted modules by name (Phi-3's qkv_proj and gate_up_proj whole), so that a resume into a
// model whose projections are laid out otherwise is refused by what each adapts.
json target_list(const LoraState& lora) {
  json list = json::array();
  for (const LoraModule& m : lora_modules(lora.model)) {
    if (lora.config.has(m.first)) list.push_back(m.name);
  }
  return list;
}

json parse_json(const std::string& text, const std::string& what) {
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    TF_FAIL(what, " is not valid JSON: ", e.what());
  }
}

json read_state(const fs::path& dir) {
  const fs::path path = dir / kStateFile;
  std::ifstream in(path, std::ios::binary);
  TF_CHECK(in, path.string(), ": missing (the checkpoint is incomplete)");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  json state = parse_json(text, path.string());
  TF_CHECK(state.is_object() && state.value("format", "") == kFormat, path.string(),
           ": not a tightfit checkpoint state (no \"format\": \"", kFormat, "\")");
  TF_CHECK(state.value("version", 0) == kFormatVersion, path.string(), ": checkpoint format version ",
           state.value("version", 0), " is not supported (this build reads version ", kFormatVersion, ")");
  return state;
}

// Reads state.json and checks the tensor file against it; throws naming what is wrong.
json verify_checkpoint(const fs::path& dir, int64_t step) {
  json state = read_state(dir);
  const std::string where = (dir / kStateFile).string();
  try {
    TF_CHECK(state.at("step").get<int64_t>() == step, where, ": records step ", state.at("step").dump(),
             " but the directory is for step ", step);
    const json& tensors = state.at("tensors");
    const fs::path file = dir / kTensorFile;
    std::error_code ec;
    const auto size = fs::file_size(file, ec);
    TF_CHECK(!ec, file.string(), ": missing (the checkpoint is incomplete)");
    TF_CHECK(size == tensors.at("bytes").get<uint64_t>(), file.string(), ": ", size, " bytes but ",
             tensors.at("bytes").get<uint64_t>(), " were written (truncated or replaced)");
    const auto sum = file_fnv1a64(file.string());
    TF_CHECK(sum.has_value(), file.string(), ": cannot be read");
    TF_CHECK(hex64(*sum) == tensors.at("fnv1a64").get<std::string>(), file.string(),
             ": checksum mismatch (the file is corrupted)");
  } catch (const json::exception& e) {
    TF_FAIL(where, ": malformed checkpoint state: ", e.what());
  }
  return state;
}

// "lr: 0.0001 -> 0.0002; seq_len: removed; pack: added (true)".
std::string config_diff(const json& saved, const json& now) {
  std::string out;
  auto add = [&](const std::string& s) { out += (out.empty() ? "" : "; ") + s; };
  for (const auto& [k, v] : saved.items()) {
    if (!now.contains(k)) {
      add(k + ": " + v.dump() + " -> (absent)");
    } else if (now.at(k) != v) {
      add(k + ": " + v.dump() + " -> " + now.at(k).dump());
    }
  }
  for (const auto& [k, v] : now.items()) {
    if (!saved.contains(k)) add(k + ": (absent) -> " + v.dump());
  }
  return out;
}

void fault_point(const char* stage) {
  if (checkpoint_fault_hook) checkpoint_fault_hook(stage);
}

// Whether `dir` holds a checkpoint of the run whose config hash is `hash`: its state.json parses
// and names step `step` and that hash. The tensors are not verified: a damaged checkpoint of the
// run is still the run's to replace or remove, while anything else in checkpoints/ is left alone.
bool written_by_run(const fs::path& dir, int64_t step, const std::string& hash) {
  try {
    const json state = read_state(dir);
    return state.value("step", int64_t(-1)) == step && state.value("config_hash", std::string()) == hash;
  } catch (const Error&) {
    return false;
  } catch (const json::exception&) {
    return false;
  }
}

// ".tmp-step-N-PID", the name a save fills a checkpoint under.
bool is_save_temporary(const std::string& name) {
  constexpr std::string_view prefix = ".tmp-step-";
  const size_t dash = name.rfind('-');
  if (name.compare(0, prefix.size(), prefix) != 0 || dash < prefix.size()) return false;
  const auto digits = [&](size_t from, size_t to) {
    return to > from && std::all_of(name.begin() + long(from), name.begin() + long(to),
                                    [](char c) { return c >= '0' && c <= '9'; });
  };
  return digits(prefix.size(), dash) && digits(dash + 1, name.size());
}

void remove_dir(const fs::path& p) {
  std::error_code ec;
  fs::remove_all(p, ec);
  TF_CHECK(!ec, p.string(), ": cannot remove: ", ec.message());
}

// Removes one of the run's checkpoints. It is first renamed to a save temporary's name, so that a
// crash in the middle of the removal leaves a directory the next save recognises and removes,
// never a half-deleted step-N that no longer reads as the run's own and so would stay forever.
void remove_checkpoint(const fs::path& ckpt) {
  const fs::path doomed =
      ckpt.parent_path() / (".tmp-" + ckpt.filename().string() + "-" + std::to_string(::getpid()));
  TF_CHECK(std::rename(ckpt.c_str(), doomed.c_str()) == 0, ckpt.string(), ": cannot rename to ",
           doomed.string(), " for removal: ", std::strerror(errno));
  fault_point("retired");
  remove_dir(doomed);
}

}  // namespace

void (*checkpoint_fault_hook)(const char* stage) = nullptr;

std::vector<CheckpointInfo> list_checkpoints(const std::string& run_dir) {
  std::vector<CheckpointInfo> out;
  const fs::path dir = fs::path(run_dir) / "checkpoints";
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return out;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const auto step = parse_step_name(entry.path().filename().string(), "step-");
    if (step && entry.is_directory(ec)) out.push_back({*step, entry.path().string()});
  }
  TF_CHECK(!ec, dir.string(), ": cannot list: ", ec.message());
  std::sort(out.begin(), out.end(),
            [](const CheckpointInfo& a, const CheckpointInfo& b) { return a.step < b.step; });
  return out;
}

std::optional<CheckpointInfo> latest_checkpoint(const std::string& run_dir,
                                                std::vector<std::string>* rejected) {
  const std::vector<CheckpointInfo> all = list_checkpoints(run_dir);
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    try {
      verify_checkpoint(it->path, it->step);
      return *it;
    } catch (const Error& e) {
      if (rejected) rejected->push_back(it->path + ": " + e.what());
    }
  }
  return std::nullopt;
}

std::string save_checkpoint(const std::string& run_dir, const LoraState& lora, const TrainerState& trainer,
                            const CheckpointMeta& meta, int keep) {
  TF_CHECK(keep >= 1, "the number of checkpoints to keep must be at least 1, got ", keep);
  TF_CHECK(trainer.step >= 0, "checkpoint step must not be negative, got ", trainer.step);
  const json cursor = parse_json(meta.data_cursor, "the data cursor of the checkpoint");
  const json config =
      meta.config_json.empty() ? json(nullptr) : parse_json(meta.config_json, "the run config");
  TF_CHECK(config.is_null() || config.is_object(), "the run config of a checkpoint must be a JSON object");

  const fs::path ckpt_root = fs::path(run_dir) / "checkpoints";
  std::error_code ec;
  fs::create_directories(ckpt_root, ec);
  TF_CHECK(!ec, ckpt_root.string(), ": cannot create: ", ec.message());
  const std::string name = "step-" + std::to_string(trainer.step);
  const std::string tmp_name = ".tmp-" + name + "-" + std::to_string(::getpid());
  const fs::path final_dir = ckpt_root / name;
  TF_CHECK(!fs::exists(final_dir, ec) || written_by_run(final_dir, trainer.step, meta.config_hash),
           final_dir.string(), ": exists and is not a checkpoint of this run; move it out of ",
           ckpt_root.string(), ", then run again");
  for (const auto& entry : fs::directory_iterator(ckpt_root, ec)) {
    if (is_save_temporary(entry.path().filename().string())) remove_dir(entry.path());
  }
  TF_CHECK(!ec, ckpt_root.string(), ": cannot list: ", ec.message());
  const fs::path tmp = ckpt_root / tmp_name;
  fs::create_directory(tmp, ec);
  TF_CHECK(!ec, tmp.string(), ": cannot create: ", ec.message());

  // Every adapter's A and B are views into the flat buffers; the moments share the offsets.
  const float* base = lora.params.as<float>();
  const DeviceMem* parts[3] = {&lora.params, &lora.adam_m, &lora.adam_v};
  std::vector<io::SafetensorsWriteTensor> tensors;
  for (int p = 0; p < 3; ++p) {
    const float* buf = parts[p]->as<float>();
    for (int l = 0; l < int(lora.layers.size()); ++l) {
      for (const LoraModule& m : lora_modules(lora.model)) {
        const LoraAdapter a = lora.module(l, m);
        if (!a.active()) continue;
        const auto span_of = [&](const float* view, int64_t n) {
          return std::as_bytes(std::span<const float>(buf + (view - base), size_t(n)));
        };
        tensors.push_back({tensor_name(kParts[p], l, m, "A"),
                           io::StDType::F32,
                           {a.rank, a.in},
                           span_of(a.A, int64_t(a.rank) * a.in)});
        tensors.push_back({tensor_name(kParts[p], l, m, "B"),
                           io::StDType::F32,
                           {a.out, a.rank},
                           span_of(a.B, int64_t(a.out) * a.rank)});
      }
    }
  }
  const std::string tensor_path = (tmp / kTensorFile).string();
  io::write_safetensors(tensor_path, tensors);
  const auto sum = file_fnv1a64(tensor_path);
  TF_CHECK(sum.has_value(), tensor_path, ": cannot read back the file just written");
  fault_point("tensors written");

  json state = json::object();
  state["format"] = kFormat;
  state["version"] = kFormatVersion;
  state["step"] = trainer.step;
  state["trainer"] = {{"step", trainer.step},
                      {"adam_steps", trainer.adam_steps},
                      {"skipped_total", trainer.skipped_total},
                      {"consecutive_skips", trainer.consecutive_skips}};
  state["rng"] = {{"generator", "philox4x32-10"}, {"seed", meta.seed}};
  state["data_cursor"] = cursor;
  state["config_hash"] = meta.config_hash;
  state["config"] = config;
  state["lora"] = {{"rank", lora.config.rank},
                   {"targets", target_list(lora)},
                   {"n_layers", lora.layers.size()},
                   {"n_params", lora.n_params}};
  state["tensors"] = {{"file", kTensorFile}, {"bytes", fs::file_size(tensor_path)}, {"fnv1a64", hex64(*sum)}};
  io::write_file_synced((tmp / kStateFile).string(), state.dump(2) + "\n");
  io::fsync_dir(tmp.string());
  fault_point("state written");

  if (fs::exists(final_dir, ec)) {
    // A leftover from an abandoned continuation or a damaged copy: the new one replaces it whole.
    io::replace_dir(tmp.string(), final_dir.string());
  } else {
    TF_CHECK(std::rename(tmp.c_str(), final_dir.c_str()) == 0, final_dir.string(), ": cannot rename ",
             tmp.string(), " to it: ", std::strerror(errno));
    io::fsync_dir(ckpt_root.string());
  }
  fault_point("committed");

  // Only now that the new checkpoint is durable may older ones go, and only the run's own.
  std::vector<CheckpointInfo> all = list_checkpoints(run_dir);
  int kept = 0;
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    if (!written_by_run(it->path, it->step, meta.config_hash)) continue;
    if (it->step > trainer.step || ++kept > keep) remove_checkpoint(it->path);
  }
  io::fsync_dir(ckpt_root.string());
  return final_dir.string();
}

LoadedCheckpoint load_checkpoint(const std::string& dir, const std::string& config_hash,
                                 const std::string& config_json, LoraState& lora) {
  const fs::path path(dir);
  const auto step = parse_step_name(path.filename().string(), "step-");
  TF_CHECK(step.has_value(), dir, ": not a checkpoint directory (expected a name step-N)");
  const json state = verify_checkpoint(path, *step);
  const std::string where = (path / kStateFile).string();
  LoadedCheckpoint out;
  try {
    const std::string saved_hash = state.at("config_hash").get<std::string>();
    if (saved_hash != config_hash) {
      const json& saved_cfg = state.at("config");
      const json now_cfg = config_json.empty() ? json(nullptr) : parse_json(config_json, "the run config");
      std::string changed;
      if (saved_cfg.is_object() && now_cfg.is_object()) changed = config_diff(saved_cfg, now_cfg);
      TF_FAIL("cannot resume from ", dir,
              ": the run's configuration changed since the checkpoint was written (",
              changed.empty() ? "config hash " + saved_hash + " -> " + config_hash : changed,
              "); start a new run directory, or restore the original options");
    }
    const json& lj = state.at("lora");
    const json want_targets = target_list(lora);
    TF_CHECK(lj.at("rank").get<int>() == lora.config.rank, "cannot resume from ", dir,
             ": the checkpoint has LoRA rank ", lj.at("rank").get<int>(), " but this run uses rank ",
             lora.config.rank);
    TF_CHECK(lj.at("targets") == want_targets, "cannot resume from ", dir, ": the checkpoint adapts ",
             lj.at("targets").dump(), " but this run adapts ", want_targets.dump());
    TF_CHECK(lj.at("n_layers").get<size_t>() == lora.layers.size(), "cannot resume from ", dir,
             ": the checkpoint is for a model with ", lj.at("n_layers").get<size_t>(),
             " layers, this one has ", lora.layers.size());
    const json& tj = state.at("trainer");
    out.trainer.step = tj.at("step").get<int64_t>();
    out.trainer.adam_steps = tj.at("adam_steps").get<int64_t>();
    out.trainer.skipped_total = tj.at("skipped_total").get<int64_t>();
    out.trainer.consecutive_skips = tj.at("consecutive_skips").get<int64_t>();
    out.seed = state.at("rng").at("seed").get<uint64_t>();
    out.data_cursor = state.at("data_cursor").dump();
  } catch (const json::exception& e) {
    TF_FAIL(where, ": malformed checkpoint state: ", e.what());
  }

  const io::SafetensorsFile file = io::SafetensorsFile::open((path / kTensorFile).string());
  // Check every tensor before copying any, so a refused load leaves `lora` as it was.
  struct Copy {
    float* dst;
    const io::SafetensorsTensor* src;
  };
  std::vector<Copy> copies;
  std::set<std::string> expected;
  float* base = lora.params.as<float>();
  DeviceMem* parts[3] = {&lora.params, &lora.adam_m, &lora.adam_v};
  for (int p = 0; p < 3; ++p) {
    float* buf = parts[p]->as<float>();
    for (int l = 0; l < int(lora.layers.size()); ++l) {
      for (const LoraModule& m : lora_modules(lora.model)) {
        const LoraAdapter a = lora.module(l, m);
        if (!a.active()) continue;
        const std::pair<const char*, std::vector<int64_t>> halves[2] = {{"A", {a.rank, a.in}},
                                                                        {"B", {a.out, a.rank}}};
        for (const auto& [which, shape] : halves) {
          const std::string name = tensor_name(kParts[p], l, m, which);
          expected.insert(name);
          const io::SafetensorsTensor* st = file.find(name);
          TF_CHECK(st, "cannot resume from ", dir, ": tensor ", name, " is missing from ", file.path());
          TF_CHECK(st->dtype == io::StDType::F32 && st->shape == shape, "cannot resume from ", dir,
                   ": tensor ", name, " is ", io::st_dtype_name(st->dtype), " ", st->shape_str(),
                   " but this run's layout needs F32 [", shape[0], ", ", shape[1], "]");
          const float* view = which[0] == 'A' ? a.A : a.B;
          copies.push_back({buf + (view - base), st});
        }
      }
    }
  }
  for (const auto& t : file.tensors()) {
    TF_CHECK(expected.count(t.name), "cannot resume from ", dir, ": ", file.path(), " holds tensor ", t.name,
             ", which this run's LoRA layout does not have");
  }
  for (const Copy& c : copies) std::memcpy(c.dst, c.src->bytes.data(), c.src->bytes.size());
  return out;
}

}  // namespace tf
