// defines: tf::simt::blas::gemm, the simulator's stand-in for the cuBLASLt GEMM of
// kernels/cuda/blas.cu: the same arguments and checks, every operand range checked against
// simulated device memory like a kernel access, the product computed on the host
#include "kernels/cuda/blas.h"

#include <cstring>
#include <vector>

#include "kernels/cuda/blas_check.h"
#include "kernels/sim/runtime.h"
#include "kernels/sim/sim.h"
#include "src/core/dtype.h"
#include "src/core/error.h"

namespace tf::simt::blas {
namespace {

// Records the bytes a product reads or writes of one operand on rt::current_stream(), checked like
// a kernel's accesses (bounds, liveness, ordering with other streams): whole matrices when their
// rows are contiguous, else row by row, so the gaps of a padded leading dimension are not touched.
void record(const char* what, const blas_check::Extent& x, sim::AccessKind kind) {
  if (x.rows == 0 || x.width == 0) return;
  const auto* base = static_cast<const std::byte*>(x.base);
  if (x.ld == x.width && (x.batch == 1 || x.stride == x.rows * x.ld)) {
    sim::host_access(base, x.span_bytes(), kind, what);
    return;
  }
  for (int64_t b = 0; b < x.batch; ++b) {
    const std::byte* matrix = base + size_t(b * x.stride) * x.elem;
    if (x.ld == x.width) {
      sim::host_access(matrix, x.matrix_bytes(), kind, what);
      continue;
    }
    for (int64_t r = 0; r < x.rows; ++r)
      sim::host_access(matrix + size_t(r * x.ld) * x.elem, size_t(x.width) * x.elem, kind, what);
  }
}

float load(const void* base, ElemType type, int64_t i) {
  switch (type) {
    case ElemType::F32: return static_cast<const float*>(base)[i];
    case ElemType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
    case ElemType::F16: return f16_to_f32(static_cast<const uint16_t*>(base)[i]);
  }
  TF_FAIL("blas::gemm: element type ", int(type), " is not f32, bf16 or f16");
}

// op(X) of one batch widened to f32 as `outer` rows of k: A as [m, k], B transposed as [n, k], so
// that every dot product below runs over two contiguous rows.
void widen(std::vector<float>& dst, const void* base, ElemType type, int64_t ld, bool outer_major,
           int64_t outer, int64_t k) {
  dst.resize(size_t(outer * k));
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t p = 0; p < k; ++p)
      dst[size_t(o * k + p)] = load(base, type, outer_major ? o * ld + p : p * ld + o);
  }
}

}  // namespace

// Each dot product is summed in double and rounded to f32 once with alpha and beta applied. The
// products of widened bf16 / f16 / f32 values are exact in double, so the sums are exact up to
// double's rounding, far below the f32 accumulation error cuBLASLt's CUBLAS_COMPUTE_32F allows
// (k * 2^-24 relative to the sum of |a||b|): tests whose tolerances cover that f32 bound hold on a
// GPU too, and the stand-in's result does not depend on an accumulation order cuBLASLt does not
// promise either.
void gemm(const Gemm& g) {
  blas_check::check_gemm(g);
  const blas_check::Extent a = blas_check::extent_a(g), b = blas_check::extent_b(g),
                           c = blas_check::extent_c(g);
  if (g.m == 0 || g.n == 0) return;
  if (g.k > 0) {
    record("operand A of blas::gemm", a, sim::AccessKind::Read);
    record("operand B of blas::gemm", b, sim::AccessKind::Read);
  }
  if (g.beta != 0.0f) record("operand C of blas::gemm", c, sim::AccessKind::Read);
  record("operand C of blas::gemm", c, sim::AccessKind::Write);
  const size_t elem = blas_check::elem_bytes(g.type);
  std::vector<float> wa, wb;
  for (int64_t batch = 0; batch < g.batch; ++batch) {
    const auto* a_base = static_cast<const std::byte*>(g.a) + size_t(batch * g.stride_a) * elem;
    const auto* b_base = static_cast<const std::byte*>(g.b) + size_t(batch * g.stride_b) * elem;
    float* c_base = g.c + batch * g.stride_c;
    if (g.k > 0) {
      widen(wa, a_base, g.type, g.lda, !g.trans_a, g.m, g.k);
      widen(wb, b_base, g.type, g.ldb, g.trans_b, g.n, g.k);
    }
    for (int64_t i = 0; i < g.m; ++i) {
      for (int64_t j = 0; j < g.n; ++j) {
        double acc = 0;
        const float* ai = wa.data() + i * g.k;
        const float* bj = wb.data() + j * g.k;
        for (int64_t p = 0; p < g.k; ++p) acc += double(ai[p]) * double(bj[p]);
        float& out = c_base[i * g.ldc + j];
        // As in BLAS, beta 0 does not read C, so NaNs there are overwritten.
        out = g.beta == 0.0f ? float(double(g.alpha) * acc)
                             : float(double(g.alpha) * acc + double(g.beta) * out);
      }
    }
  }
}

// The stand-in needs no workspace.
void gemm_scratch(ScratchNeeds& s) {
  (void)s;
}

}  // namespace tf::simt::blas
