// defines: the cost model's cpu rates from tightfit bench's JSON (src/cli/rates.h)
#include "src/cli/rates.h"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <utility>

#include "src/core/error.h"

namespace tf::cli {

namespace {

// A positive finite number at j[key], or a named error.
double positive(const nlohmann::json& j, const char* key, const std::string& where) {
  TF_CHECK(j.is_object() && j.contains(key) && j[key].is_number(), where, ": no number \"", key,
           "\"; --rates takes the file `tightfit bench --json FILE` writes");
  const double v = j[key].get<double>();
  TF_CHECK(std::isfinite(v) && v > 0, where, ": \"", key, "\" is ", v, "; a rate must be positive");
  return v;
}

offload::CostRates read_rates(const std::string& path, int threads) {
  std::ifstream in(path);
  TF_CHECK(in, path, ": cannot open the bench results given to --rates");
  const nlohmann::json doc = nlohmann::json::parse(in, nullptr, false);
  TF_CHECK(doc.is_object(), path, ": not JSON; --rates takes the file `tightfit bench --json FILE` writes");
  TF_CHECK(
      doc.contains("machine") && doc.contains("train") && doc.contains("memory") && doc["memory"].is_object(),
      path,
      ": no \"machine\", \"train\" and \"memory\"; --rates takes the file `tightfit bench --json "
      "FILE` writes");
  TF_CHECK(doc["memory"].value("tier", "") == "host", path,
           ": a bench of a device backend; --rates calibrates the cpu's rates from a bench on the cpu");
  const double bench_threads = positive(doc["machine"], "threads", path + ": machine");
  TF_CHECK(bench_threads == threads, path, ": measured at ", bench_threads, " threads, but this run uses ",
           threads, "; run tightfit bench with --threads ", threads);
  const nlohmann::json& train = doc["train"];
  TF_CHECK(train.value("unit", "") == "FLOP/s", path, ": train's rate is not in FLOP/s");
  const double flops = positive(train, "rate", path + ": train");
  const double rows = positive(doc, "tokens_per_micro_batch", path);
  double bytes = 0;
  if (doc.contains("ops") && doc["ops"].is_array())
    for (const nlohmann::json& op : doc["ops"])
      if (op.is_object() && op.value("unit", "") == "B/s" && op.contains("rate") && op["rate"].is_number())
        bytes = std::max(bytes, op["rate"].get<double>());
  offload::CostRates::Measured m;
  m.flops_s = flops;
  m.rows = rows;
  m.memory_bytes_s = bytes;
  // The per-op cost and the disk rate where bench resolved them: null where it could not (no model
  // file, timings too noisy) keeps the nominal.
  const auto optional_rate = [&](const char* part, const char* key) {
    if (!doc.contains(part) || doc[part].is_null()) return 0.0;
    const nlohmann::json& p = doc[part];
    return p.is_object() && p.contains(key) && p[key].is_null() ? 0.0 : positive(p, key, path + ": " + part);
  };
  m.op_overhead_s = optional_rate("op_cost", "seconds_per_op");
  m.disk_bytes_s = optional_rate("disk", "rate");
  char from[64];
  std::snprintf(from, sizeof from, "a training step of %.0f rows", rows);
  std::string source = "measured by tightfit bench (" + path + ", " + from;
  source += m.op_overhead_s > 0 ? ", the per-op cost" : ", the per-op cost nominal";
  source += m.disk_bytes_s > 0 ? ", the disk reading " + doc["disk"].value("file", std::string("?"))
                               : ", the disk nominal";
  return offload::CostRates::cpu(threads).calibrated(m, source + ")");
}

}  // namespace

offload::CostRates bench_rates(const std::string& path, int threads) {
  static std::map<std::pair<std::string, int>, offload::CostRates> read;
  const auto key = std::make_pair(path, threads);
  auto it = read.find(key);
  if (it == read.end()) it = read.emplace(key, read_rates(path, threads)).first;
  return it->second;
}

}  // namespace tf::cli
