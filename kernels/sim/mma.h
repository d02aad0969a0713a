// defines: tf::sim::MmaShape, MmaType, MmaOperands, mma (one lane's mma.sync, a warp collective)
// and mma_execute (the warp's multiply once every lane has arrived)
#pragma once

#include <cstdint>
#include <source_location>

namespace tf::sim {

// The mma.sync.aligned.*.row.col shapes the simulator runs: m16n8k16 and m16n8k8 with .bf16 or
// .f16 inputs and .f32 accumulators, m16n8k32 and m16n8k16 with .s8 inputs and .s32 accumulators
// (no .satfinite: the sum wraps like the hardware's).
enum class MmaShape : uint8_t { M16N8K16, M16N8K8, M16N8K32 };
enum class MmaType : uint8_t { BF16, F16, S8 };

// One lane's registers: a and b hold packed inputs (fragments.h gives their layouts), c and d the
// four f32 or s32 accumulators of mma_c_coord. d may alias c, as in the PTX instruction.
struct MmaOperands {
  MmaShape shape;
  MmaType type;
  const uint32_t* a;
  const uint32_t* b;
  const void* c;
  void* d;
};

// Called by every lane of the warp (the full warp, as mma.sync requires); defined in sim.cpp with
// the other warp collectives.
void mma(const MmaOperands& lane, std::source_location loc);

// Computes every lane's d from the operands of all 32 lanes, which share one shape and type.
void mma_execute(MmaOperands* const (&lanes)[32]);

}  // namespace tf::sim
