// defines: tf::sim::mma_a_coord, mma_b_coord, mma_c_coord, mma_m16n8k8_{a,b}_coord,
// mma_m16n8k32_s8_{a,b}_coord, mma_m16n8k16_s8_{a,b}_coord, ldmatrix_coord (per-lane fragment
// layouts of mma.m16n8k16 and .m16n8k8 with .bf16/.f16 inputs, of mma.m16n8k32 and .m16n8k16 with
// .s8 inputs, and of ldmatrix .m8n8 .b16, from the PTX ISA)
#pragma once

namespace tf::sim {

// Row and column, inside one operand tile, of the element a lane holds.
struct FragCoord {
  int row;
  int col;
};

// The PTX ISA numbers the elements a lane holds "low to high": element i sits in register i / 2,
// in its low half when i is even. groupID = lane / 4 and threadID_in_group = lane % 4.

// A is 16x16 (row-major operand), elements a0..a7 in four .b32 registers.
constexpr FragCoord mma_a_coord(int lane, int i) {
  const int group = lane >> 2, in_group = lane & 3;
  const bool upper_rows = (i & 2) != 0;  // a2, a3, a6, a7 hold rows groupID + 8
  const bool upper_cols = i >= 4;        // a4..a7 hold columns 8..15
  return {group + (upper_rows ? 8 : 0), in_group * 2 + (i & 1) + (upper_cols ? 8 : 0)};
}

// B is 16x8 (k x n, "col" operand), elements b0..b3 in two .b32 registers.
constexpr FragCoord mma_b_coord(int lane, int i) {
  const int group = lane >> 2, in_group = lane & 3;
  return {in_group * 2 + (i & 1) + (i >= 2 ? 8 : 0), group};
}

// C and D are 16x8 f32, elements c0..c3 in four registers.
constexpr FragCoord mma_c_coord(int lane, int i) {
  const int group = lane >> 2, in_group = lane & 3;
  return {group + (i >= 2 ? 8 : 0), in_group * 2 + (i & 1)};
}

// m16n8k8 with .bf16/.f16: A is 16x8, elements a0..a3 in two .b32 registers (a2, a3 hold rows
// groupID + 8); B is 8x8, b0 and b1 in one register; C and D are those of m16n8k16.
constexpr FragCoord mma_m16n8k8_a_coord(int lane, int i) {
  const int group = lane >> 2, in_group = lane & 3;
  return {group + (i >= 2 ? 8 : 0), in_group * 2 + (i & 1)};
}
constexpr FragCoord mma_m16n8k8_b_coord(int lane, int i) {
  const int group = lane >> 2, in_group = lane & 3;
  return {in_group * 2 + i, group};
}

// With .s8 inputs a .b32 register holds four elements, element i in byte i % 4 of register i / 4.
// C and D are 16x8 .s32 in the layout of mma_c_coord.

// m16n8k32: A is 16x32, a0..a15 in four registers: registers 0 and 2 hold row groupID, 1 and 3 row
// groupID + 8; registers 2 and 3 hold columns 16..31. B is 32x8, b0..b7 in two registers, b4..b7
// holding rows 16..31.
constexpr FragCoord mma_m16n8k32_s8_a_coord(int lane, int i) {
  const int group = lane >> 2, in_group = lane & 3;
  return {group + ((i >> 2) & 1 ? 8 : 0), in_group * 4 + (i & 3) + (i >= 8 ? 16 : 0)};
}
constexpr FragCoord mma_m16n8k32_s8_b_coord(int lane, int i) {
  const int group = lane >> 2, in_group = lane & 3;
  return {in_group * 4 + (i & 3) + (i >= 4 ? 16 : 0), group};
}

// m16n8k16: A is 16x16, a0..a7 in two registers (a4..a7 hold row groupID + 8); B is 16x8, b0..b3
// in one register.
constexpr FragCoord mma_m16n8k16_s8_a_coord(int lane, int i) {
  const int group = lane >> 2, in_group = lane & 3;
  return {group + (i >= 4 ? 8 : 0), in_group * 4 + (i & 3)};
}
constexpr FragCoord mma_m16n8k16_s8_b_coord(int lane, int i) {
  const int group = lane >> 2, in_group = lane & 3;
  return {in_group * 4 + i, group};
}

// ldmatrix .m8n8 .b16: the rows of matrix j come from the addresses of lanes 8j..8j+7; a lane's
// register j holds two consecutive elements (low half first). Without .trans lane l receives row
// l / 4, columns 2(l % 4) and 2(l % 4) + 1; with .trans the matrix is transposed on the way, so
// element h of lane l comes from stored row 2(l % 4) + h, column l / 4.
constexpr FragCoord ldmatrix_coord(int lane, int half, bool trans) {
  return trans ? FragCoord{(lane & 3) * 2 + half, lane >> 2} : FragCoord{lane >> 2, (lane & 3) * 2 + half};
}

}  // namespace tf::sim
