// defines: tf::cuda::blas::gemm on cuBLASLt (row-major operands handled by swapping them for
// column-major cuBLASLt), TF_CUBLAS_CHECK. Built by nvcc only: the simulator has its own stand-in
// (kernels/sim/blas.cpp), so this file does not include kernels/cuda/port.h.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "kernels/cuda/blas.h"
#include "kernels/cuda/blas_check.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/runtime.h"
#include "src/core/error.h"

// TF_CUBLAS_CHECK(call): throws tf::Error "<call>: <status name>: <status string> (file:line)"
// unless the cuBLAS call returns CUBLAS_STATUS_SUCCESS.
#define TF_CUBLAS_CHECK(call)                                                                               \
  do {                                                                                                      \
    const cublasStatus_t tf_cublas_status_ = (call);                                                        \
    if (tf_cublas_status_ != CUBLAS_STATUS_SUCCESS)                                                         \
      ::tf::detail::throw_error(__FILE__, __LINE__,                                                         \
                                ::tf::detail::concat(#call, ": ", cublasLtGetStatusName(tf_cublas_status_), \
                                                     ": ", cublasLtGetStatusString(tf_cublas_status_)));    \
  } while (0)

namespace tf::cuda::blas {
namespace {

// Scratch slot of the cuBLASLt workspace, and its size: NVIDIA's guidance for Hopper is 32 MiB,
// which lets the heuristic pick split-k and stream-k kernels for skinny products.
constexpr int kWorkspaceSlot = 10;
constexpr size_t kWorkspaceBytes = size_t(32) << 20;

int current_device() {
  int device = 0;
  TF_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

// One handle per device, made on first use and kept for the life of the process: destroying it
// from a static destructor could run after the CUDA runtime has torn the context down.
cublasLtHandle_t handle(int device) {
  static std::mutex m;
  static std::map<int, cublasLtHandle_t> handles;
  std::lock_guard<std::mutex> lock(m);
  cublasLtHandle_t& h = handles[device];
  if (!h) TF_CUBLAS_CHECK(cublasLtCreate(&h));
  return h;
}

// Everything the heuristic's choice depends on: a training step repeats a few dozen product
// shapes hundreds of times, and querying the heuristic costs host time on every call otherwise.
struct AlgoKey {
  int device;
  int type;
  bool trans_a, trans_b;
  int64_t m, n, k, lda, ldb, ldc, batch, stride_a, stride_b, stride_c;
  uint32_t align_a, align_b, align_c;
  auto tied() const {
    return std::tie(device, type, trans_a, trans_b, m, n, k, lda, ldb, ldc, batch, stride_a, stride_b,
                    stride_c, align_a, align_b, align_c);
  }
  bool operator<(const AlgoKey& o) const { return tied() < o.tied(); }
};

std::mutex& algo_mutex() {
  static std::mutex m;
  return m;
}
std::map<AlgoKey, cublasLtMatmulAlgo_t>& algos() {
  static std::map<AlgoKey, cublasLtMatmulAlgo_t> cache;
  return cache;
}

cudaDataType_t cuda_type(ElemType t) {
  switch (t) {
    case ElemType::F32: return CUDA_R_32F;
    case ElemType::BF16: return CUDA_R_16BF;
    case ElemType::F16: return CUDA_R_16F;
  }
  TF_FAIL("blas::gemm: element type ", int(t), " is not f32, bf16 or f16");
}

// The descriptors of one call, destroyed when it returns or throws. Destroying one only frees host
// memory and a destructor cannot throw, so their statuses are not checked.
struct Descriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  Descriptors() = default;
  Descriptors(const Descriptors&) = delete;
  Descriptors& operator=(const Descriptors&) = delete;
  ~Descriptors() {
    if (pref) (void)cublasLtMatmulPreferenceDestroy(pref);
    if (c) (void)cublasLtMatrixLayoutDestroy(c);
    if (b) (void)cublasLtMatrixLayoutDestroy(b);
    if (a) (void)cublasLtMatrixLayoutDestroy(a);
    if (op) (void)cublasLtMatmulDescDestroy(op);
  }
};

// A row-major stored matrix (rows x width, leading dimension ld) is, read column-major, its
// transpose: `width` rows and `rows` columns with the same leading dimension.
void make_layout(cublasLtMatrixLayout_t* layout, cudaDataType_t type, const blas_check::Extent& x) {
  TF_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(layout, type, uint64_t(x.width), uint64_t(x.rows), x.ld));
  if (x.batch > 1) {
    const int32_t count = int32_t(x.batch);
    const int64_t stride = x.stride;
    TF_CUBLAS_CHECK(
        cublasLtMatrixLayoutSetAttribute(*layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
    TF_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(*layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                     &stride, sizeof(stride)));
  }
}

// The alignment every matrix of the batch has (a power of two up to cuBLASLt's default of 256):
// the heuristic otherwise assumes 256-byte aligned operands and may pick a kernel that faults on
// an offset pointer such as a chunk of rows.
uint32_t alignment(const blas_check::Extent& x) {
  uint64_t bits = reinterpret_cast<uintptr_t>(x.base) | 256u;
  if (x.batch > 1) bits |= uint64_t(x.stride) * x.elem;
  return uint32_t(bits & (~bits + 1));
}

void set_alignment(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr,
                   uint32_t bytes) {
  TF_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &bytes, sizeof(bytes)));
}

// C = beta * C for a product over an empty inner dimension, which cuBLASLt does not take.
__global__ void scale_c(float* c, int64_t ldc, int64_t m, int64_t n, int64_t batch, int64_t stride_c,
                        float beta) {
  const int64_t total = batch * m * n;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t bi = i / (m * n), r = i / n % m, col = i % n;
    float& out = c[bi * stride_c + r * ldc + col];
    out = beta == 0.0f ? 0.0f : beta * out;
  }
}

}  // namespace

void gemm(const Gemm& g) {
  blas_check::check_gemm(g);
  if (g.m == 0 || g.n == 0) return;
  const cudaStream_t stream = static_cast<cudaStream_t>(rt::current_stream());
  if (g.k == 0) {
    const int64_t total = g.batch * g.m * g.n;
    const int64_t blocks = (total + 255) / 256;
    scale_c<<<unsigned(blocks < 1024 ? blocks : 1024), 256, 0, stream>>>(g.c, g.ldc, g.m, g.n, g.batch,
                                                                         g.stride_c, g.beta);
    TF_CUDA_CHECK(cudaGetLastError());
    if (rt::sync_after_launch()) TF_CUDA_CHECK(cudaStreamSynchronize(stream));
    return;
  }
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T, and each row-major operand
  // read column-major is already its transpose: cuBLASLt's A is our B and its B our A, with the
  // same transpose flags, and its m and n are our n and m.
  const blas_check::Extent a = blas_check::extent_a(g), b = blas_check::extent_b(g),
                           c = blas_check::extent_c(g);
  const cudaDataType_t type = cuda_type(g.type);
  Descriptors d;
  TF_CUBLAS_CHECK(cublasLtMatmulDescCreate(&d.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_a = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  TF_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  TF_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  make_layout(&d.a, type, b);
  make_layout(&d.b, type, a);
  make_layout(&d.c, CUDA_R_32F, c);

  const int device = current_device();
  const cublasLtHandle_t h = handle(device);
  const AlgoKey key{device,     int(g.type), g.trans_a,    g.trans_b,    g.m,         g.n,
                    g.k,        g.lda,       g.ldb,        g.ldc,        g.batch,     g.stride_a,
                    g.stride_b, g.stride_c,  alignment(a), alignment(b), alignment(c)};
  cublasLtMatmulAlgo_t algo;
  bool cached = false;
  {
    std::lock_guard<std::mutex> lock(algo_mutex());
    const auto it = algos().find(key);
    if (it != algos().end()) {
      algo = it->second;
      cached = true;
    }
  }
  if (!cached) {
    TF_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&d.pref));
    const uint64_t workspace_bytes = kWorkspaceBytes;
    TF_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                         &workspace_bytes, sizeof(workspace_bytes)));
    set_alignment(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_b);
    set_alignment(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_a);
    set_alignment(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_c);
    set_alignment(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_c);
    cublasLtMatmulHeuristicResult_t result = {};
    int found = 0;
    TF_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(h, d.op, d.a, d.b, d.c, d.c, d.pref, 1, &result, &found));
    TF_CHECK(found > 0, "blas::gemm: cuBLASLt has no algorithm for m=", g.m, " n=", g.n, " k=", g.k,
             " batch=", g.batch, " lda=", g.lda, " ldb=", g.ldb, " ldc=", g.ldc, " trans_a=", g.trans_a,
             " trans_b=", g.trans_b, " type=", int(g.type));
    algo = result.algo;
    std::lock_guard<std::mutex> lock(algo_mutex());
    algos().emplace(key, algo);
  }
  void* workspace = rt::scratch(kWorkspaceSlot, kWorkspaceBytes);
  TF_CUBLAS_CHECK(cublasLtMatmul(h, d.op, &g.alpha, g.b, d.a, g.a, d.b, &g.beta, g.c, d.c, g.c, d.c, &algo,
                                 workspace, kWorkspaceBytes, stream));
  if (rt::sync_after_launch()) TF_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void gemm_scratch(ScratchNeeds& s) {
  s.need(kWorkspaceSlot, "cuBLASLt workspace", kWorkspaceBytes);
}

}  // namespace tf::cuda::blas
