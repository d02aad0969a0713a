// defines: tf::cli::DataOptions and run_data, the `tightfit data` subcommand: a dataset as training
// sees it (rendered examples with their loss-bearing tokens marked, counts, drops, packing)
#pragma once

#include <string>

namespace tf::cli {

struct DataOptions {
  std::string model, data;
  std::string template_name = "auto";
  std::string think = "keep";  // --think, for the model's own template: keep or strip
  int seq_len = 512;
  int micro_batch = 4;  // rows per batch, for the packing efficiency
  std::string train_on = "completion";
  bool mask_history = false;
  std::string train_on_eos = "turn";
  int examples = 3;   // shown rendered, from the start of the file
  bool json = false;  // print one JSON object instead of text
};

// Reads only the model's tokenizer and chat template, never its weights. Bad lines are counted and
// reported, not fatal. Trained text is marked [[like this]], or in colour on a terminal.
int run_data(const DataOptions& o);

}  // namespace tf::cli
