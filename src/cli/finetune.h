// defines: tf::cli::run_finetune (the finetune subcommand's work)
#pragma once

#include "src/cli/options.h"

namespace tf::cli {

// Trains per `o`, writing the run directory; returns the process exit status. SIGINT/SIGTERM
// finish the current step, save a checkpoint and return 0.
int run_finetune(const FinetuneOptions& o);

}  // namespace tf::cli
