// defines: tf::OpId (every op of kernels/op_signatures.inc), op_name, tf::OpWork and the op_work
// estimates (the FLOPs and bytes of one call), tf::OpProfile (the calls, time and work of the ops a
// backend ran while it was attached, per op and role)
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "kernels/ops.h"

namespace tf {

enum class OpId : uint8_t {
#define TF_OP(ret, name, params, args) name,
#include "kernels/op_signatures.inc"
#undef TF_OP
};

// The op's name in the op table ("linear_forward").
const char* op_name(OpId op);

// The useful work of one call: the arithmetic of a GEMM-like op (multiply-adds counted as two
// FLOPs), and the bytes any op reads and writes once each (a weight in its stored form). A rate is
// shown in FLOP/s where there are FLOPs, else in bytes/s.
struct OpWork {
  double flops = 0;
  double bytes = 0;
};

// One estimate per op, with the op's own parameters, so that an op added to the table without one
// does not compile. They read only host values (shapes, dtypes, which outputs are asked for), never
// the arrays, which may be in device memory.
namespace op_work {
#define TF_OP(ret, name, params, args) OpWork name params;
#include "kernels/op_signatures.inc"
#undef TF_OP
}  // namespace op_work

// What a profile holds for one op under one role.
struct OpStats {
  OpId op{};
  std::string role;  // the caller's name for what the op did ("q_proj"); empty for none
  int64_t calls = 0;
  double seconds = 0;
  OpWork work;  // summed over the calls
  // FLOP/s where the op has FLOPs, else bytes/s; 0 when no time was measured.
  double rate() const;
  bool flop_rate() const { return work.flops > 0; }
};

// The ops a backend ran while this profile was attached (Backend::set_profile), each call timed by
// the host clock with the backend synchronised before and after it, and the wall time of the steps
// they ran in (add_step), so that what ran outside the ops is seen too.
class OpProfile {
 public:
  void add(OpId op, const char* role, double seconds, const OpWork& work);
  void add_step(double seconds) {
    ++steps_;
    step_seconds_ += seconds;
  }

  // Every op and role that ran, the longest first.
  std::vector<OpStats> entries() const;
  // The time of all the ops, and of the steps around them.
  double op_seconds() const;
  int64_t steps() const { return steps_; }
  double step_seconds() const { return step_seconds_; }

  // The breakdown as a table: each op and role with its calls, total time, share of the ops' time
  // and rate, then the ops' total against the steps' wall time.
  std::string table() const;
  // The same as a JSON document (written as profile.json).
  std::string json() const;

 private:
  std::map<std::pair<OpId, std::string>, OpStats> stats_;
  int64_t steps_ = 0;
  double step_seconds_ = 0;
};

}  // namespace tf
