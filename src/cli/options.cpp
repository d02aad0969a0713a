// The finetune options' JSON form and hash, the expansion of --config files into options, and the
// checks of input paths and --threads.
#include "src/cli/options.h"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <thread>

#include "src/core/error.h"

namespace tf::cli {

namespace fs = std::filesystem;
using nlohmann::json;

json to_json(const FinetuneOptions& o) {
  json j{{"model", o.model},
         {"data", o.data},
         {"eval_data", o.eval_data},
         {"quant", o.quant},
         {"out", o.out},
         {"lora_rank", o.lora_rank},
         {"lora_alpha", o.lora_alpha},
         {"lora_dropout", o.lora_dropout},
         {"lora_targets", o.lora_targets},
         {"rslora", o.rslora},
         {"lr", o.lr},
         {"weight_decay", o.weight_decay},
         {"clip", o.clip},
         {"warmup", o.warmup},
         {"schedule", o.schedule},
         {"steps", o.steps},
         {"epochs", o.epochs},
         {"seq_len", o.seq_len},
         {"micro_batch", o.micro_batch_auto ? json("auto") : json(o.micro_batch)},
         {"grad_accum", o.micro_batch_auto ? json("auto") : json(o.grad_accum)},
         {"batch_size", o.batch_size},
         {"pack", o.pack},
         {"template", o.template_name},
         {"think", o.think},
         {"train_on", o.train_on},
         {"mask_history", o.mask_history},
         {"train_on_eos", o.train_on_eos},
         {"skip_bad_lines", o.skip_bad_lines},
         {"seed", o.seed},
         {"save_every", o.save_every},
         {"keep", o.keep},
         {"eval_every", o.eval_every},
         {"checkpointing", o.checkpointing},
         {"device", o.device},
         {"attention", o.attention},
         {"matmul", o.matmul},
         {"weights", o.weights},
         {"mlp_chunk", o.mlp_chunk},
         {"loss_chunk", o.loss_chunk},
         {"embedding", o.embedding},
         {"max_mem", o.max_mem},
         {"max_host_mem", o.max_host_mem},
         {"threads", o.threads}};
  // Single-process runs leave it out, so that their config hash is what it was before data parallel.
  if (o.ranks > 1) j["ranks"] = o.ranks;
  if (o.shard_weights) j["shard_weights"] = true;
  if (!o.matmul_chosen.empty()) j["matmul_chosen"] = o.matmul_chosen;
  // What auto chose, once the plan has chosen (a resumed run keeps it).
  if (o.micro_batch_auto) {
    j["micro_batch_chosen"] = o.micro_batch;
    j["grad_accum_chosen"] = o.grad_accum;
  }
  return j;
}

void resolve_batching(FinetuneOptions& o) {
  if (o.micro_batch_arg == "auto") {
    o.micro_batch_auto = true;
  } else if (!o.micro_batch_arg.empty()) {
    size_t used = 0;
    int v = 0;
    try {
      v = std::stoi(o.micro_batch_arg, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    TF_CHECK(used > 0 && used == o.micro_batch_arg.size(), "--micro-batch must be a count or auto, got '",
             o.micro_batch_arg, "'");
    o.micro_batch = v;
  }
  TF_CHECK(o.batch_size >= 0 && o.batch_size <= (1 << 20), "--batch-size must be in [0, 1048576], got ",
           o.batch_size);
  TF_CHECK(o.grad_accum >= 1 && o.grad_accum <= 4096, "--grad-accum must be in [1, 4096], got ",
           o.grad_accum);
  if (o.micro_batch_auto) {
    if (o.batch_size == 0) o.batch_size = 4 * o.grad_accum;
    return;
  }
  TF_CHECK(o.micro_batch >= 1 && o.micro_batch <= 4096, "--micro-batch must be in [1, 4096], got ",
           o.micro_batch);
  if (o.batch_size == 0) {
    o.batch_size = o.micro_batch * o.grad_accum;
    return;
  }
  TF_CHECK(o.batch_size % o.micro_batch == 0, "--batch-size ", o.batch_size,
           " is not a multiple of --micro-batch ", o.micro_batch);
  TF_CHECK(o.grad_accum == 1 || o.grad_accum * o.micro_batch == o.batch_size, "--batch-size ", o.batch_size,
           " differs from --micro-batch ", o.micro_batch, " x --grad-accum ", o.grad_accum,
           "; give two of the three");
  o.grad_accum = o.batch_size / o.micro_batch;
}

json resume_relevant(const FinetuneOptions& o) {
  json all = to_json(o);
  // Options that may change between a run and its resumption. None changes what is trained;
  // --threads changes how OpenBLAS splits its sums, so only a resume with the same --threads
  // repeats an uninterrupted run bit for bit (finetune notes a change).
  // Streamed weights and the budgets change where bytes live, not the numbers; the MLP's chunks
  // change only the order the MLP adapters' gradients sum their rows in, as --threads does.
  // --matmul changes how the frozen products round (bf16 or f32 operands) within its bound, so a
  // resume under another continues the training, not its bits.
  for (const char* free : {"out",
                           "save_every",
                           "keep",
                           "eval_every",
                           "eval_data",
                           "checkpointing",
                           "device",
                           "attention",
                           "matmul",
                           "matmul_chosen",
                           "weights",
                           "mlp_chunk",
                           "loss_chunk",
                           "embedding",
                           "max_mem",
                           "max_host_mem",
                           "threads",
                           "micro_batch_chosen",
                           "grad_accum_chosen",
                           "shard_weights"})
    all.erase(free);
  // A count of sequences per step says no more than micro_batch and grad_accum do (and runs from
  // before it existed keep their hash); under auto it is what the step is.
  if (!o.micro_batch_auto) all.erase("batch_size");
  // Runs from before --think existed trained as its default does; leaving it out keeps their hash.
  if (o.think == "keep") all.erase("think");
  // Runs from before these options existed trained as their defaults do; leaving the defaults out
  // keeps those runs' config hash, so they still resume.
  if (!o.mask_history) all.erase("mask_history");
  if (o.train_on_eos == "turn") all.erase("train_on_eos");
  return all;
}

uint64_t parse_size(const std::string& option, const std::string& text) {
  size_t used = 0;
  double value = 0;
  const bool digits = !text.empty() && (std::isdigit(static_cast<unsigned char>(text[0])) || text[0] == '.');
  if (digits) {
    try {
      value = std::stod(text, &used);
    } catch (const std::exception&) {
      used = 0;
    }
  }
  TF_CHECK(used > 0, option, " must be a size such as 8GiB, 512MiB or 2.5GB, got '", text, "'");
  std::string unit = text.substr(used);
  unit.erase(0, unit.find_first_not_of(' '));
  static const std::map<std::string, double> units = {
      {"", 1},         {"B", 1},      {"K", 0x1p10},   {"KiB", 0x1p10}, {"M", 0x1p20},
      {"MiB", 0x1p20}, {"G", 0x1p30}, {"GiB", 0x1p30}, {"T", 0x1p40},   {"TiB", 0x1p40},
      {"KB", 1e3},     {"MB", 1e6},   {"GB", 1e9},     {"TB", 1e12}};
  const auto u = units.find(unit);
  TF_CHECK(u != units.end(), option, ": unknown unit '", unit, "' in '", text,
           "' (B, KiB, MiB, GiB, TiB in powers of 1024; KB, MB, GB, TB in powers of 1000)");
  const double bytes = std::floor(value * u->second);
  TF_CHECK(std::isfinite(bytes) && bytes >= 1 && bytes <= 0x1p62, option,
           " must be between 1 byte and 4 EiB, got '", text, "'");
  return uint64_t(bytes);
}

std::string config_hash(const json& relevant) {
  // FNV-1a over the canonical dump (nlohmann sorts object keys).
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : relevant.dump()) {
    h ^= c;
    h *= 1099511628211ull;
  }
  std::ostringstream os;
  os << std::hex << h;
  return os.str();
}

namespace {

// A config file holds a few dozen options; the bound keeps a device or a wrong file from being
// read whole.
constexpr size_t kMaxConfigBytes = size_t(1) << 20;

json read_config_file(const std::string& path) {
  check_input_file("--config", path, "a JSON config file");
  std::ifstream in(path, std::ios::binary);
  TF_CHECK(in, "--config ", path, ": cannot open: ", std::strerror(errno));
  std::string text(kMaxConfigBytes + 1, '\0');
  in.read(text.data(), std::streamsize(text.size()));
  TF_CHECK(!in.bad(), "--config ", path, ": read error: ", std::strerror(errno));
  text.resize(size_t(in.gcount()));
  TF_CHECK(text.size() <= kMaxConfigBytes, "--config ", path, ": larger than ", kMaxConfigBytes,
           " bytes, which no config file needs");
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    TF_FAIL(path, ": not valid JSON: ", e.what());
  }
  TF_CHECK(j.is_object(), path, ": a config file must be a JSON object of option names to values, not ",
           j.type_name());
  return j;
}

// An integer option's value as a command-line token. 1e3 is an integer to a person writing JSON.
std::string integer_token(const json& value, bool is_unsigned, const std::string& where) {
  const std::string kind = is_unsigned ? "a non-negative integer" : "an integer";
  TF_CHECK(value.is_number(), where, " must be ", kind, ", not ", value.dump());
  if (is_unsigned && value.is_number_unsigned()) return value.dump();  // any uint64, exactly
  const double v = value.get<double>();
  TF_CHECK(v == std::floor(v) && (v >= 0 || !is_unsigned), where, " must be ", kind, ", not ", value.dump());
  // Every signed integer option is a C++ int; the unsigned ones (seeds) are 64-bit.
  const double lo = is_unsigned ? 0.0 : double(std::numeric_limits<int>::min());
  const double hi = is_unsigned ? 0x1p64 : double(std::numeric_limits<int>::max()) + 1.0;
  TF_CHECK(v >= lo && v < hi, where, " is out of range: ", value.dump());
  return is_unsigned ? std::to_string(uint64_t(v)) : std::to_string(int(v));
}

// The command-line tokens that give option `opt` a config file's `value`. `name` is the key with '-'
// for '_' (a flag's --no- form, perhaps); `where` names the file and key for errors.
std::vector<std::string> config_tokens(const CLI::Option& opt, const std::string& name, const json& value,
                                       const std::string& where) {
  if (opt.get_expected_max() == 0) {  // a flag
    TF_CHECK(value.is_boolean(), where, " is a flag: give true or false, not ", value.dump());
    const auto& negations = opt.get_fnames();
    const bool negated = std::find(negations.begin(), negations.end(), name) != negations.end();
    if (value.get<bool>() != negated) return {opt.get_name()};
    if (negations.empty()) return {};
    return {"--" + negations.front()};
  }
  const std::string type = opt.get_type_name().substr(0, opt.get_type_name().find(':'));
  // One token "--name=value", so that a value starting with '-' is not read as an option.
  const std::string prefix = opt.get_name() + "=";
  if (type == "INT|auto" && value.is_string() && value.get<std::string>() == "auto") return {prefix + "auto"};
  if (type == "INT" || type == "UINT" || type == "INT|auto")
    return {prefix + integer_token(value, type == "UINT", where)};
  if (type == "FLOAT") {
    TF_CHECK(value.is_number(), where, " must be a number, not ", value.dump());
    return {prefix + value.dump()};
  }
  TF_CHECK(value.is_string(), where, " must be a string, not ", value.dump());
  return {prefix + value.get<std::string>()};
}

}  // namespace

std::vector<std::string> expand_config_files(const CLI::App& cmd, const std::vector<std::string>& args) {
  std::vector<std::string> paths, rest;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--config" && i + 1 < args.size()) {
      paths.push_back(args[++i]);
    } else if (args[i].rfind("--config=", 0) == 0) {
      paths.push_back(args[i].substr(9));
    } else {
      rest.push_back(args[i]);
    }
  }
  // Each option's tokens from the last file that sets it, in the order options were first set.
  std::vector<std::pair<const CLI::Option*, std::vector<std::string>>> set;
  for (const std::string& path : paths) {
    const json j = read_config_file(path);
    std::map<const CLI::Option*, std::string> keys;  // the key that set each option in this file
    for (const auto& [key, value] : j.items()) {
      std::string name = key;
      for (char& c : name)
        if (c == '_') c = '-';
      TF_CHECK(name != "config", path, ": \"", key,
               "\": a config file cannot name another one (give several ",
               "--config options instead; a later file overrides an earlier one)");
      const CLI::Option* opt = cmd.get_option_no_throw("--" + name);
      TF_CHECK(opt && opt != cmd.get_help_ptr(), path, ": unknown option \"", key, "\" (tightfit ",
               cmd.get_name(), " --help lists them)");
      const auto [seen, fresh] = keys.emplace(opt, key);
      TF_CHECK(fresh, path, ": \"", seen->second, "\" and \"", key, "\" both set ", opt->get_name());
      std::vector<std::string> tokens =
          config_tokens(*opt, name, value, path + ": \"" + key + "\" (" + opt->get_name() + ")");
      const auto it = std::find_if(set.begin(), set.end(), [&](const auto& s) { return s.first == opt; });
      if (it == set.end()) {
        set.emplace_back(opt, std::move(tokens));
      } else {
        it->second = std::move(tokens);
      }
    }
  }
  std::vector<std::string> out;
  for (const auto& [opt, tokens] : set) out.insert(out.end(), tokens.begin(), tokens.end());
  out.insert(out.end(), rest.begin(), rest.end());
  return out;
}

void check_input_file(const std::string& option, const std::string& path, const std::string& expected) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  TF_CHECK(fs::exists(st), option, " ", path, ": no such file");
  TF_CHECK(!fs::is_directory(st), option, " ", path, ": is a directory, expected ", expected);
}

std::string check_threads(int threads) {
  TF_CHECK(threads >= 0, "--threads must be 0 (one per hardware thread) or more, got ", threads);
  const unsigned hardware = std::thread::hardware_concurrency();
  if (hardware == 0 || unsigned(threads) <= hardware) return {};
  return "warning: --threads " + std::to_string(threads) + " is more than the " + std::to_string(hardware) +
         " hardware threads of this machine; the extra threads share cores and slow every step";
}

}  // namespace tf::cli
