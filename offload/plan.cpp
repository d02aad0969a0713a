#include "offload/plan.h"

#include <algorithm>
#include <cstdio>

namespace tf::offload {

const char* tier_name(Tier t) {
  switch (t) {
    case Tier::Device: return "device";
    case Tier::Host: return "host";
    case Tier::Disk: return "disk";
  }
  return "?";
}

const char* weight_tier_name(WeightTier t) {
  switch (t) {
    case WeightTier::Resident: return "resident";
    case WeightTier::Host: return "host";
    case WeightTier::Disk: return "disk";
    case WeightTier::Shard: return "shard";
  }
  return "?";
}

uint64_t Plan::peak(Tier t) const {
  uint64_t steady = 0, transient = 0;
  for (const PlanItem& i : items) {
    if (i.tier != t) continue;
    if (i.transient)
      transient = std::max(transient, i.bytes);
    else
      steady += i.bytes;
  }
  return steady + transient;
}

static std::optional<uint64_t> budget_of(const Budget& b, Tier t) {
  if (t == Tier::Device) return b.device;
  if (t == Tier::Host) return b.host;
  return std::nullopt;
}

bool Plan::fits(const Budget& b) const {
  for (Tier t : {Tier::Device, Tier::Host}) {
    const std::optional<uint64_t> limit = budget_of(b, t);
    if (limit && peak(t) > *limit) return false;
  }
  return true;
}

std::vector<PlanItem> Plan::largest_over(const Budget& b, size_t n) const {
  std::vector<PlanItem> over;
  for (const PlanItem& i : items) {
    const std::optional<uint64_t> limit = budget_of(b, i.tier);
    if (limit && peak(i.tier) > *limit) over.push_back(i);
  }
  std::stable_sort(over.begin(), over.end(),
                   [](const PlanItem& a, const PlanItem& c) { return a.bytes > c.bytes; });
  if (over.size() > n) over.resize(n);
  return over;
}

nlohmann::json Plan::to_json() const {
  nlohmann::json j;
  j["items"] = nlohmann::json::array();
  for (const PlanItem& i : items)
    j["items"].push_back({{"component", i.component},
                          {"detail", i.detail},
                          {"tier", tier_name(i.tier)},
                          {"bytes", i.bytes},
                          {"transient", i.transient}});
  for (Tier t : {Tier::Device, Tier::Host, Tier::Disk}) j["peak"][tier_name(t)] = peak(t);
  return j;
}

static std::string mib(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%10.1f MiB", double(bytes) / double(1u << 20));
  return buf;
}

std::string Plan::table() const {
  std::string out;
  for (Tier t : {Tier::Device, Tier::Host, Tier::Disk}) {
    bool any = false;
    for (const PlanItem& i : items) {
      if (i.tier != t) continue;
      if (!any) out += std::string(tier_name(t)) + ":\n";
      any = true;
      out += "  " + mib(i.bytes) + "  " + i.component + (i.transient ? " (transient)" : "") +
             (i.detail.empty() ? "" : "  [" + i.detail + "]") + "\n";
    }
    if (any) out += "  " + mib(peak(t)) + "  peak " + tier_name(t) + "\n";
  }
  return out;
}

}  // namespace tf::offload
