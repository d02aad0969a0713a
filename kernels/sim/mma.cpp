// defines: tf::sim::mma_execute, the arithmetic of the simulated mma.sync shapes: gathers the
// warp's fragments into whole tiles with the PTX ISA layouts of fragments.h and multiplies them
#include "kernels/sim/mma.h"

#include <cstring>

#include "kernels/sim/fragments.h"
#include "src/core/dtype.h"

namespace tf::sim {
namespace {

constexpr int kM = 16, kN = 8, kMaxK = 32;

int depth(MmaShape s) {
  switch (s) {
    case MmaShape::M16N8K16: return 16;
    case MmaShape::M16N8K8: return 8;
    case MmaShape::M16N8K32: return 32;
  }
  return 0;
}

FragCoord a_coord(MmaShape s, MmaType t, int lane, int i) {
  if (t == MmaType::S8)
    return s == MmaShape::M16N8K32 ? mma_m16n8k32_s8_a_coord(lane, i) : mma_m16n8k16_s8_a_coord(lane, i);
  return s == MmaShape::M16N8K16 ? mma_a_coord(lane, i) : mma_m16n8k8_a_coord(lane, i);
}

FragCoord b_coord(MmaShape s, MmaType t, int lane, int i) {
  if (t == MmaType::S8)
    return s == MmaShape::M16N8K32 ? mma_m16n8k32_s8_b_coord(lane, i) : mma_m16n8k16_s8_b_coord(lane, i);
  return s == MmaShape::M16N8K16 ? mma_b_coord(lane, i) : mma_m16n8k8_b_coord(lane, i);
}

// Element i of a packed fragment: 16-bit elements two to a register, 8-bit four, low bits first.
float float_elem(MmaType t, const uint32_t* regs, int i) {
  const auto bits = uint16_t(regs[i / 2] >> (16 * (i % 2)));
  return t == MmaType::BF16 ? bf16_to_f32(bits) : f16_to_f32(bits);
}
int int_elem(const uint32_t* regs, int i) {
  return int(int8_t(uint8_t(regs[i / 4] >> (8 * (i % 4)))));
}

}  // namespace

void mma_execute(MmaOperands* const (&lanes)[32]) {
  const MmaShape shape = lanes[0]->shape;
  const MmaType type = lanes[0]->type;
  const int k = depth(shape), a_per_lane = kM * k / 32, b_per_lane = k * kN / 32;
  // All inputs are read before any d is written, since a lane's d may be its own c.
  if (type == MmaType::S8) {
    int a[kM][kMaxK], b[kMaxK][kN];
    uint32_t c[kM][kN];
    for (int j = 0; j < 32; ++j) {
      const MmaOperands& op = *lanes[j];
      for (int i = 0; i < a_per_lane; ++i) {
        const FragCoord p = a_coord(shape, type, j, i);
        a[p.row][p.col] = int_elem(op.a, i);
      }
      for (int i = 0; i < b_per_lane; ++i) {
        const FragCoord p = b_coord(shape, type, j, i);
        b[p.row][p.col] = int_elem(op.b, i);
      }
      uint32_t acc[4];
      std::memcpy(acc, op.c, sizeof(acc));
      for (int i = 0; i < 4; ++i) c[mma_c_coord(j, i).row][mma_c_coord(j, i).col] = acc[i];
    }
    for (int j = 0; j < 32; ++j) {
      uint32_t out[4];
      for (int i = 0; i < 4; ++i) {
        const FragCoord q = mma_c_coord(j, i);
        uint32_t acc = c[q.row][q.col];  // unsigned: the .s32 sum wraps modulo 2^32
        for (int p = 0; p < k; ++p) acc += uint32_t(a[q.row][p] * b[p][q.col]);
        out[i] = acc;
      }
      std::memcpy(lanes[j]->d, out, sizeof(out));
    }
    return;
  }
  float a[kM][kMaxK], b[kMaxK][kN], c[kM][kN];
  for (int j = 0; j < 32; ++j) {
    const MmaOperands& op = *lanes[j];
    for (int i = 0; i < a_per_lane; ++i) {
      const FragCoord p = a_coord(shape, type, j, i);
      a[p.row][p.col] = float_elem(type, op.a, i);
    }
    for (int i = 0; i < b_per_lane; ++i) {
      const FragCoord p = b_coord(shape, type, j, i);
      b[p.row][p.col] = float_elem(type, op.b, i);
    }
    float acc[4];
    std::memcpy(acc, op.c, sizeof(acc));
    for (int i = 0; i < 4; ++i) c[mma_c_coord(j, i).row][mma_c_coord(j, i).col] = acc[i];
  }
  for (int j = 0; j < 32; ++j) {
    float out[4];
    for (int i = 0; i < 4; ++i) {
      const FragCoord q = mma_c_coord(j, i);
      // Products of 16-bit floats are exact in f32; the hardware's order and intermediate width
      // are unspecified, so tests bound the result by k + 1 f32 roundings of the sum.
      float acc = c[q.row][q.col];
      for (int p = 0; p < k; ++p) acc += a[q.row][p] * b[p][q.col];
      out[i] = acc;
    }
    std::memcpy(lanes[j]->d, out, sizeof(out));
  }
}

}  // namespace tf::sim
