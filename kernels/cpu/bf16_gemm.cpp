// defines: tf::cpu::bf16_gemm (oneDNN's matmul primitive, one per shape and thread, cached), the process's
//          matmul precision, resolve_matmul and round_to_bf16
#include "kernels/cpu/bf16_gemm.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <map>
#include <oneapi/dnnl/dnnl.hpp>
#include <tuple>
#include <utility>

#include "kernels/cpu/avx512_blocks.h"
#include "kernels/cpu/isa.h"
#include "src/core/error.h"

// oneDNN's threads must be libgomp's: our loops and OpenBLAS run on that pool, and a second pool
// (TBB, threadpool) would spin against it on a small machine. Debian's libdnnl is built so.
static_assert(DNNL_CPU_RUNTIME == DNNL_RUNTIME_OMP, "tightfit needs a oneDNN built with OpenMP (libgomp)");

namespace tf::cpu {
namespace {

std::atomic<MatmulPrecision> g_precision{MatmulPrecision::F32};

// Everything a primitive is made for: a shape and a thread count give one primitive, whose blocking
// (and so whose sums) oneDNN fixes when it is made.
using PrimitiveKey =
    std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, bool, uint32_t, uint32_t, int>;

uint32_t float_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Primitive {
  dnnl::matmul::primitive_desc pd;
  dnnl::matmul matmul;
};

Primitive make_primitive(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool ta,
                         bool tb, float alpha, float beta) {
  using dims = dnnl::memory::dims;
  using dt = dnnl::memory::data_type;
  // Row-major operands with their leading dimensions; a transposed one is the same storage read with
  // its strides swapped.
  const dnnl::memory::desc a({M, K}, dt::bf16, ta ? dims{1, lda} : dims{lda, 1});
  const dnnl::memory::desc b({K, N}, dt::bf16, tb ? dims{1, ldb} : dims{ldb, 1});
  const dnnl::memory::desc c({M, N}, dt::f32, dims{ldc, 1});
  dnnl::primitive_attr attr;
  if (alpha != 1.0f) attr.set_output_scales(0, {alpha});
  if (beta != 0.0f) {
    dnnl::post_ops ops;
    ops.append_sum(beta);
    attr.set_post_ops(ops);
  }
  dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, c), attr, cpu_engine());
  dnnl::matmul matmul(pd);
  return {std::move(pd), std::move(matmul)};
}

#if defined(TF_HAVE_AVX512_KERNELS)
TF_AVX512_BEGIN
// f32_to_bf16 on 16 lanes: add 0x7fff plus the kept part's lowest bit and truncate; a NaN keeps its
// top half with the quiet bit set.
void avx512_round(uint16_t* dst, const float* src, int64_t n) {
  const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1), quiet = _mm512_set1_epi32(0x40);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = __mmask16((1u << (n - i < 16 ? n - i : 16)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(mask, src + i);
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i top = _mm512_srli_epi32(bits, 16);
    __m512i r =
        _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(bias, _mm512_and_si512(top, one))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_or_si512(top, quiet));
    _mm256_mask_storeu_epi16(dst + i, mask, _mm512_cvtepi32_epi16(r));
  }
}
TF_AVX512_END
#endif

}  // namespace

const char* matmul_precision_name(MatmulPrecision p) {
  return p == MatmulPrecision::BF16 ? "bf16" : "f32";
}

void set_matmul_precision(MatmulPrecision p) {
  TF_CHECK(p == MatmulPrecision::F32 || cpu_has_avx512_bf16(),
           "bf16 matmul needs a CPU with avx512_bf16 (AVX-512 BF16 dot products), which this one lacks");
  g_precision.store(p, std::memory_order_relaxed);
}

MatmulPrecision matmul_precision() {
  return g_precision.load(std::memory_order_relaxed);
}

MatmulChoice parse_matmul_choice(std::string_view name) {
  if (name == "auto") return MatmulChoice::Auto;
  if (name == "f32") return MatmulChoice::F32;
  TF_CHECK(name == "bf16", "--matmul must be auto, f32 or bf16, got '", name, "'");
  return MatmulChoice::BF16;
}

bool bf16_path_takes(DType weight) {
  return weight == DType::BF16 || is_quantized(weight);
}

MatmulResolution resolve_matmul(MatmulChoice choice, bool cpu_bf16, const std::vector<DType>& weights) {
  std::vector<DType> taken;
  for (const DType d : weights)
    if (bf16_path_takes(d) && std::find(taken.begin(), taken.end(), d) == taken.end()) taken.push_back(d);
  std::string names;
  for (const DType d : taken) names += (names.empty() ? "" : ", ") + std::string(dtype_name(d));
  if (choice == MatmulChoice::F32) return {MatmulPrecision::F32, "f32 (--matmul f32)"};
  if (choice == MatmulChoice::BF16) {
    TF_CHECK(cpu_bf16,
             "--matmul bf16 needs a CPU with avx512_bf16 (AVX-512 BF16 dot products), which this one lacks; "
             "use --matmul f32 or auto");
    return {MatmulPrecision::BF16, taken.empty() ? "bf16 (--matmul bf16; the base's matrices are all f32 or "
                                                   "f16, whose products stay f32)"
                                                 : "bf16 (--matmul bf16; " + names + " weights)"};
  }
  if (!cpu_bf16) return {MatmulPrecision::F32, "f32 (auto: this CPU has no avx512_bf16)"};
  if (taken.empty())
    return {MatmulPrecision::F32,
            "f32 (auto: the base's matrices are all f32 or f16, which bf16 would round)"};
  return {MatmulPrecision::BF16, "bf16 (auto: this CPU has avx512_bf16; " + names +
                                     " weights, activations rounded to bf16, sums in f32)"};
}

void bf16_gemm(float* C, int64_t ldc, MatOperand A, MatOperand B, int64_t M, int64_t N, int64_t K,
               float alpha, float beta) {
  TF_CHECK(A.dtype == DType::BF16 && B.dtype == DType::BF16, "bf16_gemm: operands are ", dtype_name(A.dtype),
           " and ", dtype_name(B.dtype), "; expected bf16");
  TF_CHECK(M > 0 && N > 0 && K > 0 && M <= INT_MAX && N <= INT_MAX && K <= INT_MAX,
           "bf16_gemm: bad shape M=", M, " N=", N, " K=", K);
  TF_CHECK(cpu_has_avx512_bf16(), "bf16_gemm: this CPU has no avx512_bf16");
  thread_local std::map<PrimitiveKey, Primitive> primitives;
  thread_local dnnl::stream stream(cpu_engine());
  const PrimitiveKey key{
      M, N, K, A.ld, B.ld, ldc, A.trans, B.trans, float_bits(alpha), float_bits(beta), omp_get_max_threads()};
  try {
    auto it = primitives.find(key);
    if (it == primitives.end())
      it = primitives.emplace(key, make_primitive(M, N, K, A.ld, B.ld, ldc, A.trans, B.trans, alpha, beta))
               .first;
    const dnnl::matmul::primitive_desc& pd = it->second.pd;
    dnnl::memory a(pd.src_desc(), cpu_engine(), const_cast<void*>(A.data));
    dnnl::memory b(pd.weights_desc(), cpu_engine(), const_cast<void*>(B.data));
    dnnl::memory c(pd.dst_desc(), cpu_engine(), C);
    it->second.matmul.execute(stream, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
    stream.wait();
  } catch (const dnnl::error& e) {
    TF_FAIL("bf16_gemm: oneDNN failed on a ", M, " x ", N, " x ", K, " product (lda ", A.ld, ", ldb ", B.ld,
            ", ldc ", ldc, "): ", e.what());
  }
}

void round_to_bf16(uint16_t* dst, const float* src, int64_t n) {
#if defined(TF_HAVE_AVX512_KERNELS)
  if (use_avx512()) return avx512_round(dst, src, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

}  // namespace tf::cpu
