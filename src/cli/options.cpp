#include "src/cli/options.h"

#include <fstream>
#include <sstream>

#include "src/core/error.h"

namespace tf::cli {

using nlohmann::json;

json to_json(const FinetuneOptions& o) {
  return json{{"model", o.model},
              {"data", o.data},
              {"eval_data", o.eval_data},
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
              {"micro_batch", o.micro_batch},
              {"grad_accum", o.grad_accum},
              {"pack", o.pack},
              {"template", o.template_name},
              {"train_on", o.train_on},
              {"skip_bad_lines", o.skip_bad_lines},
              {"seed", o.seed},
              {"save_every", o.save_every},
              {"keep", o.keep},
              {"eval_every", o.eval_every},
              {"checkpointing", o.checkpointing},
              {"device", o.device},
              {"threads", o.threads}};
}

json resume_relevant(const FinetuneOptions& o) {
  json all = to_json(o);
  // Options that may change between a run and its resumption without changing its numbers.
  for (const char* free :
       {"out", "save_every", "keep", "eval_every", "eval_data", "checkpointing", "device", "threads"})
    all.erase(free);
  return all;
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

std::vector<std::string> expand_config_file(const std::vector<std::string>& args) {
  std::vector<std::string> out, rest;
  std::string path;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--config" && i + 1 < args.size()) {
      path = args[++i];
    } else if (args[i].rfind("--config=", 0) == 0) {
      path = args[i].substr(9);
    } else {
      rest.push_back(args[i]);
    }
  }
  if (path.empty()) return rest;
  std::ifstream in(path);
  TF_CHECK(in, path, ": cannot open config file");
  const json j = json::parse(in, nullptr, false);
  TF_CHECK(!j.is_discarded(), path, ": not valid JSON");
  TF_CHECK(j.is_object(), path, ": a config file must be a JSON object of option names to values");
  for (const auto& [key, value] : j.items()) {
    std::string name = key;
    for (char& c : name)
      if (c == '_') c = '-';
    if (value.is_boolean()) {
      out.push_back((value.get<bool>() ? "--" : "--no-") + name);
    } else if (value.is_string()) {
      out.push_back("--" + name);
      out.push_back(value.get<std::string>());
    } else if (value.is_number()) {
      out.push_back("--" + name);
      out.push_back(value.dump());
    } else {
      TF_FAIL(path, ": option \"", key, "\" must be a string, number or boolean, got ", value.dump());
    }
  }
  out.insert(out.end(), rest.begin(), rest.end());
  return out;
}

}  // namespace tf::cli
