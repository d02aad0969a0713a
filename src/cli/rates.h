// defines: tf::cli::bench_rates (the cost model's cpu rates calibrated from tightfit bench's JSON)
#pragma once

#include <string>

#include "offload/cost_model.h"

namespace tf::cli {

// offload::CostRates::cpu(threads) calibrated from the file `path` that `tightfit bench --json`
// wrote on this machine: the arithmetic from its training step's rate at its tokens per
// micro-batch, the memory bandwidth from its fastest memory-bound op. Throws naming the file for
// a file that is not such JSON, a bench of a device backend, or one run at another thread count
// (its rates would not be this run's). Each file is read once per process.
offload::CostRates bench_rates(const std::string& path, int threads);

}  // namespace tf::cli
