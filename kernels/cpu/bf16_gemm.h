// defines: tf::cpu::MatmulPrecision and the process's choice of it (set_matmul_precision,
//          matmul_precision, ScopedMatmulPrecision), tf::cpu::MatmulChoice and resolve_matmul (what a
//          --matmul value picks for a CPU and a base), tf::cpu::bf16_gemm (oneDNN's matmul primitive on
//          bf16 operands, f32 accumulation and output) and tf::cpu::round_to_bf16
//
// The precision decides how the products with a frozen bf16 or quantized weight run: F32 widens the
// weight to f32 a tile at a time and calls OpenBLAS's sgemm (the same bits as before there was a
// choice); BF16 rounds the f32 activations to bf16 once per op, dequantizes the weight's tiles to bf16,
// and multiplies with f32 accumulation on the CPU's bf16 dot-product instructions, as PyTorch's bf16
// matmul does. Products of two f32 operands (LoRA, an f32 base) run sgemm under either. The library
// starts in F32; the CLI's --matmul auto picks BF16 where the CPU has avx512_bf16 and the base has
// such weights.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/ops.h"

namespace tf::cpu {

enum class MatmulPrecision : uint8_t { F32, BF16 };
const char* matmul_precision_name(MatmulPrecision p);  // "f32", "bf16"

// The process's precision, read by every cpu matmul and linear op. BF16 needs a CPU with avx512_bf16
// (cpu_has_avx512_bf16): set_matmul_precision refuses it elsewhere.
void set_matmul_precision(MatmulPrecision p);
MatmulPrecision matmul_precision();

// Sets the precision for its lifetime and restores the previous one (for tests).
class ScopedMatmulPrecision {
 public:
  explicit ScopedMatmulPrecision(MatmulPrecision p) : previous_(matmul_precision()) {
    set_matmul_precision(p);
  }
  ~ScopedMatmulPrecision() { set_matmul_precision(previous_); }
  ScopedMatmulPrecision(const ScopedMatmulPrecision&) = delete;
  ScopedMatmulPrecision& operator=(const ScopedMatmulPrecision&) = delete;

 private:
  MatmulPrecision previous_;
};

// A --matmul value: auto, f32 or bf16; parse_matmul_choice throws naming --matmul for anything else.
enum class MatmulChoice : uint8_t { Auto, F32, BF16 };
MatmulChoice parse_matmul_choice(std::string_view name);

// Whether the BF16 path multiplies a weight of this storage dtype (bf16 and every quantized dtype; f32
// and f16 weights are widened to f32 under either precision).
bool bf16_path_takes(DType weight);

struct MatmulResolution {
  MatmulPrecision precision = MatmulPrecision::F32;
  std::string why;  // one line for the run's log: "bf16 (auto: this CPU has avx512_bf16; q4_1, q8_0 weights)"
};
// What `choice` runs on a CPU that has avx512_bf16 or not (cpu_has_avx512_bf16, passed in so that a
// test can give either) for a base whose projection matrices are stored as `weights`: auto is BF16 when
// the CPU has it and some weight is one bf16_path_takes. BF16 on a CPU without avx512_bf16 is refused.
MatmulResolution resolve_matmul(MatmulChoice choice, bool cpu_bf16, const std::vector<DType>& weights);

// C[M, N] (leading dimension ldc) = alpha * op(A) op(B) + beta * C, with A and B bf16 operands
// (MatOperand dtype BF16), products summed in f32 (beta 0 overwrites C, NaNs included). A shape,
// its leading dimensions and the thread count always give the same bits. Needs avx512_bf16.
void bf16_gemm(float* C, int64_t ldc, MatOperand A, MatOperand B, int64_t M, int64_t N, int64_t K,
               float alpha, float beta);

// dst[i] = src[i] rounded to the nearest bf16, ties to even (tf::f32_to_bf16's bits, NaNs included).
void round_to_bf16(uint16_t* dst, const float* src, int64_t n);

// As dequantize_weight_tile, into bf16: dst[r, c] (leading dimension ld_dst) = W[r0 + r, c0 + c] rounded
// to bf16 (a bf16 weight's own bits). Rows in parallel outside a parallel region.
void dequantize_weight_tile_bf16(uint16_t* dst, int64_t ld_dst, WeightRef W, int64_t r0, int64_t n_rows,
                                 int64_t c0, int64_t n_cols);

}  // namespace tf::cpu
