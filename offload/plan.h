// defines: tf::offload::Tier, tf::offload::PlanItem, tf::offload::Budget, tf::offload::Plan (the
// planner's byte model of a run: what every component takes in which memory, the predicted peak
// per tier, and whether it fits a budget)
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace tf::offload {

// Where bytes live. Device is a device backend's own memory (absent on the cpu backend, whose
// memory is host memory); Host is the process's RAM (what its RSS measures); Disk is what is read
// from files while training (streamed weights), which costs no memory but bounds nothing either.
enum class Tier : uint8_t { Device, Host, Disk };
const char* tier_name(Tier t);

// One component of a run: `bytes` of `tier`, all live at the run's peak unless `transient` (a peak
// of its own while loading, such as a parser's scratch, freed before training; a tier's peak counts
// only its largest transient item, on top of everything else, which bounds the peak from above).
struct PlanItem {
  std::string component;  // "base weights (blocks)", "LoRA parameters", "saved activations", ...
  std::string detail;     // how it is sized, for the table: "30 layers x 2 x 512 tokens, per block"
  Tier tier = Tier::Host;
  uint64_t bytes = 0;
  bool transient = false;
};

// Where a model's per-layer base weights live while it trains (--weights): Resident in the
// backend's memory; Host, in host memory, each layer's block copied to the device just before use
// (device backends only); Disk, read from the model file a block at a time around the page cache;
// Shard (--shard-weights, several data-parallel ranks), split across the ranks, each holding 1/N
// of every block in host memory, a block all-gathered from the ranks just before use.
// Embeddings, the final norm and lm_head always stay resident.
enum class WeightTier : uint8_t { Resident, Host, Disk, Shard };
const char* weight_tier_name(WeightTier t);

struct Budget {
  std::optional<uint64_t> device;  // --max-mem on a device backend
  std::optional<uint64_t> host;    // --max-host-mem, or --max-mem on the cpu backend
};

struct Plan {
  std::vector<PlanItem> items;
  // Sum of the non-transient items of the tier plus its largest transient one.
  uint64_t peak(Tier t) const;
  // Whether each budgeted tier's peak is within its budget.
  bool fits(const Budget& b) const;
  // The items sorted by bytes, largest first, of the tiers over budget.
  std::vector<PlanItem> largest_over(const Budget& b, size_t n) const;
  nlohmann::json to_json() const;
  // One line per item, grouped by tier, with each tier's peak.
  std::string table() const;
};

}  // namespace tf::offload
