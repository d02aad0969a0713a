// defines: tf::cuda::cudnn_attention_available / cudnn_attention_forward / cudnn_attention_backward,
// cuDNN's fused flash attention (the baseline --attention cudnn runs), and TF_CUDNN_CHECK. Built by
// nvcc only (it does not include kernels/cuda/port.h: the simulator has no cuDNN).
//
// cuDNN recognises scaled dot-product attention as an operation graph of its backend API (matmul,
// pointwise and reduction nodes over virtual tensors) and runs it as one fused kernel: the graphs
// below are the causal forward (Q K^T, scale, causal mask, softmax with its statistics, P V) and its
// backward (the dO.O row sums, P recomputed from the statistics, dV = P^T dO, dS = P (dP - sum),
// dK = dS^T Q, dQ = dS K through an f32 accumulator). Grouped-query attention is a K / V with fewer
// heads than Q, and dK / dV reduce over the query heads of their group. Tensors keep our
// [tokens, heads, head_dim] layout through strides; q, k, v, out and d_out are rounded to bf16 in
// scratch, and cuDNN's bf16 out, dq, dk, dv are widened back (the gradients added, as the op's
// contract says). cuDNN's statistics are the natural-log log-sum-exp of the scaled scores, our lse,
// in [batch, heads, seq] order, so they are only transposed. Each shape's graph and execution plan
// are built once and kept.
#include <cstdint>
#include <string>

#include "kernels/cuda/cudnn_attention.h"
#include "src/core/error.h"

#if TIGHTFIT_HAVE_CUDNN
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/cuda/check.h"
#include "kernels/cuda/runtime.h"
#endif

namespace tf::cuda {

namespace {

// What the launchers check before they touch the device, in every build: the message names
// --attention cudnn, since that is how a user reaches them.
void check_shape(const int32_t* doc_ids, const AttentionShape& s, const char* direction) {
  TF_CHECK(doc_ids == nullptr,
           "--attention cudnn does not take packed documents (per-token document ids): cuDNN's fused "
           "attention has no per-token document mask; train with --no-pack or another --attention");
  TF_CHECK(s.batch >= 0 && s.seq >= 0 && s.n_heads > 0 && s.n_kv_heads > 0 && s.n_heads % s.n_kv_heads == 0,
           "--attention cudnn (", direction, "): ", s.n_heads, " query heads are not a multiple of ",
           s.n_kv_heads, " kv heads (batch ", s.batch, ", seq ", s.seq, ")");
  TF_CHECK(s.head_dim > 0 && s.head_dim % 8 == 0 && s.head_dim <= 128,
           "--attention cudnn: cuDNN's fused attention takes head dimensions that are multiples of 8 up to "
           "128, not ",
           s.head_dim);
  TF_CHECK(s.seq != 1, "--attention cudnn: cuDNN's fused attention does not take sequences of one token");
  TF_CHECK(s.window == 0, "--attention cudnn: the cuDNN attention graph here is causal only and takes no ",
           "sliding window (this call's is ", s.window, "); sliding-window layers run on flash or plain");
  TF_CHECK(s.softcap == 0,
           "--attention cudnn: the cuDNN attention graph here has no logit soft-capping (this ",
           "model caps its attention scores at ", s.softcap, "); --attention auto, flash or plain runs it");
}

}  // namespace

#if !TIGHTFIT_HAVE_CUDNN

namespace {
constexpr const char* kNoCudnn =
    "this tightfit was built without cuDNN (cudnn.h and libcudnn were not found when it was configured; "
    "install cuDNN, or point CUDNN_PATH at it, and configure with -DTIGHTFIT_CUDNN=ON)";
}  // namespace

bool cudnn_attention_available(std::string* why) {
  *why = kNoCudnn;
  return false;
}

int64_t cudnn_attention_offline_engines(const AttentionShape& s, bool backward, const std::string&, int*) {
  check_shape(nullptr, s, backward ? "backward" : "forward");
  TF_FAIL("--attention cudnn: ", kNoCudnn);
}

void cudnn_attention_forward(float*, float*, const float*, const float*, const float*, const int32_t* doc_ids,
                             const AttentionShape& s) {
  check_shape(doc_ids, s, "forward");
  TF_FAIL("--attention cudnn: ", kNoCudnn);
}

void cudnn_attention_backward(float*, float*, float*, const float*, const float*, const float*, const float*,
                              const float*, const float*, const int32_t* doc_ids, const AttentionShape& s) {
  check_shape(doc_ids, s, "backward");
  TF_FAIL("--attention cudnn: ", kNoCudnn);
}

#else

namespace {

// cuDNN's message for the failing call: the status and, where the library recorded one, its last
// error text (which names the attribute or engine constraint that failed).
std::string cudnn_error(cudnnStatus_t status) {
  char last[1024] = {};
  cudnnGetLastErrorString(last, sizeof(last));
  std::string msg = cudnnGetErrorString(status);
  if (last[0]) msg += std::string(" (") + last + ")";
  return msg;
}

}  // namespace

// TF_CUDNN_CHECK(call): throws tf::Error "<call>: <cuDNN status> (<cuDNN's last error>) (file:line)"
// unless the call returns CUDNN_STATUS_SUCCESS.
#define TF_CUDNN_CHECK(call)                                                                       \
  do {                                                                                             \
    const cudnnStatus_t tf_cudnn_status_ = (call);                                                 \
    if (tf_cudnn_status_ != CUDNN_STATUS_SUCCESS)                                                  \
      ::tf::detail::throw_error(__FILE__, __LINE__,                                                \
                                ::tf::detail::concat(#call, ": ", cudnn_error(tf_cudnn_status_))); \
  } while (0)

namespace {

// Scratch slots of these launchers (60-64 are theirs): the bf16 inputs, the f32 statistics and row
// sums, cuDNN's workspace, and the backward's f32 dQ accumulator with the bf16 gradients.
constexpr int kSlotInputs = 60;
constexpr int kSlotStats = 61;
constexpr int kSlotWorkspace = 62;
constexpr int kSlotGrads = 63;
// The first cuDNN whose fused flash attention runs this graph without the frontend's workarounds for
// sequence lengths that are not a multiple of 64 (forward) or 128 (backward, fixed after 9.15).
constexpr size_t kMinVersion = 90000;
constexpr size_t kBackwardAnySeqVersion = 91600;

// Sub-buffers carved from one scratch slot start at 256 bytes, the alignment cuDNN's engines assume.
size_t padded(size_t bytes) {
  return (bytes + 255) / 256 * 256;
}

// One backend descriptor, destroyed with the object. `what` names it in error messages.
class Desc {
 public:
  Desc(cudnnBackendDescriptorType_t type, std::string what) : what_(std::move(what)) {
    TF_CUDNN_CHECK(cudnnBackendCreateDescriptor(type, &d_));
  }
  ~Desc() {
    if (d_) (void)cudnnBackendDestroyDescriptor(d_);
  }
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;

  cudnnBackendDescriptor_t get() const { return d_; }
  void set(cudnnBackendAttributeName_t name, const char* name_text, cudnnBackendAttributeType_t type,
           int64_t n, const void* values) {
    const cudnnStatus_t st = cudnnBackendSetAttribute(d_, name, type, n, values);
    TF_CHECK(st == CUDNN_STATUS_SUCCESS, "cudnnBackendSetAttribute(", name_text, ") of ", what_, ": ",
             cudnn_error(st));
  }
  void set_desc(cudnnBackendAttributeName_t name, const char* name_text, const Desc& d) {
    cudnnBackendDescriptor_t raw = d.get();
    set(name, name_text, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &raw);
  }
  void finalize() {
    const cudnnStatus_t st = cudnnBackendFinalize(d_);
    TF_CHECK(st == CUDNN_STATUS_SUCCESS, "cudnnBackendFinalize(", what_, "): ", cudnn_error(st));
  }

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
  std::string what_;
};

#define TF_SET(desc, attr, type, n, values) (desc).set(attr, #attr, type, n, values)
#define TF_SET_DESC(desc, attr, other) (desc).set_desc(attr, #attr, other)

// The unique ids of the graphs' real tensors (the variant pack's keys); virtual ones count from 100.
enum Uid : int64_t {
  kQ = 1,
  kK,
  kV,
  kO,
  kStats,
  kScale,
  kNegInf,
  kOne,
  kDO,
  kDQ,
  kDK,
  kDV,
  kSoftmaxSum,
  kDQAccum,
  kFirstVirtual = 100,
};

struct Dims {
  int64_t d[4];
};

// An operation graph under construction: it owns every descriptor it made (a graph's operations
// refer to their tensors until the graph is finalized, and the plan keeps the graph).
class GraphBuilder {
 public:
  explicit GraphBuilder(std::string what) : what_(std::move(what)) {}

  const Desc& tensor(const char* name, cudnnDataType_t type, Dims dims, Dims strides, int64_t uid,
                     bool is_virtual = false, bool by_value = false) {
    Desc& t = own(CUDNN_BACKEND_TENSOR_DESCRIPTOR, std::string("tensor '") + name + "' of " + what_);
    const int64_t alignment = 16;
    TF_SET(t, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &type);
    TF_SET(t, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims.d);
    TF_SET(t, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides.d);
    TF_SET(t, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid);
    TF_SET(t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &alignment);
    TF_SET(t, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &is_virtual);
    if (by_value) TF_SET(t, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &by_value);
    t.finalize();
    return t;
  }
  const Desc& virt(const char* name, cudnnDataType_t type, Dims dims, Dims strides) {
    return tensor(name, type, dims, strides, next_virtual_++, true);
  }
  // A scalar passed by value at execution (its host address goes into the variant pack).
  const Desc& scalar(const char* name, int64_t uid) {
    return tensor(name, CUDNN_DATA_FLOAT, Dims{{1, 1, 1, 1}}, Dims{{1, 1, 1, 1}}, uid, false, true);
  }

  // y = mode(x, b, t); b and t may be null. GEN_INDEX takes `axis`; comparisons compute in
  // `math` (BOOLEAN for the mask), the rest in f32.
  void pointwise(const char* name, cudnnPointwiseMode_t mode, const Desc& x, const Desc* b, const Desc* t,
                 const Desc& y, cudnnDataType_t math = CUDNN_DATA_FLOAT, int64_t axis = -1) {
    Desc& pw = own(CUDNN_BACKEND_POINTWISE_DESCRIPTOR, std::string("pointwise '") + name + "' of " + what_);
    TF_SET(pw, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
    TF_SET(pw, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &math);
    if (axis >= 0) TF_SET(pw, CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, 1, &axis);
    pw.finalize();
    Desc& op = own(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR,
                   std::string("operation '") + name + "' of " + what_);
    TF_SET_DESC(op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw);
    TF_SET_DESC(op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x);
    if (b) TF_SET_DESC(op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, *b);
    if (t) TF_SET_DESC(op, CUDNN_ATTR_OPERATION_POINTWISE_TDESC, *t);
    TF_SET_DESC(op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y);
    add(op);
  }
  // c = a b over the last two dimensions, batched over the first two (a head count of b that
  // divides a's is shared by the group of a's heads), f32 accumulation.
  void matmul(const char* name, const Desc& a, const Desc& b, const Desc& c) {
    Desc& mm = own(CUDNN_BACKEND_MATMUL_DESCRIPTOR, std::string("matmul '") + name + "' of " + what_);
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    TF_SET(mm, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp);
    mm.finalize();
    Desc& op =
        own(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, std::string("operation '") + name + "' of " + what_);
    TF_SET_DESC(op, CUDNN_ATTR_OPERATION_MATMUL_ADESC, a);
    TF_SET_DESC(op, CUDNN_ATTR_OPERATION_MATMUL_BDESC, b);
    TF_SET_DESC(op, CUDNN_ATTR_OPERATION_MATMUL_CDESC, c);
    TF_SET_DESC(op, CUDNN_ATTR_OPERATION_MATMUL_DESC, mm);
    add(op);
  }
  // y = reduce(x) over the dimensions where y is smaller (1, or a head count dividing x's).
  void reduction(const char* name, cudnnReduceTensorOp_t mode, const Desc& x, const Desc& y) {
    Desc& rd = own(CUDNN_BACKEND_REDUCTION_DESCRIPTOR, std::string("reduction '") + name + "' of " + what_);
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    TF_SET(rd, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &mode);
    TF_SET(rd, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp);
    rd.finalize();
    Desc& op = own(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR,
                   std::string("operation '") + name + "' of " + what_);
    TF_SET_DESC(op, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x);
    TF_SET_DESC(op, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y);
    TF_SET_DESC(op, CUDNN_ATTR_OPERATION_REDUCTION_DESC, rd);
    add(op);
  }
  // y is x seen through other dimensions and strides (a transpose of the last two).
  void reshape(const char* name, const Desc& x, const Desc& y) {
    Desc& op =
        own(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR, std::string("operation '") + name + "' of " + what_);
    TF_SET_DESC(op, CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x);
    TF_SET_DESC(op, CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y);
    add(op);
  }

  int64_t size() const { return int64_t(ops_.size()); }

  // The finalized operation graph, for the device of `handle` (null: for none, which cuDNN checks
  // as far as it can without one); the builder's descriptors move into `keep`.
  std::unique_ptr<Desc> finish(cudnnHandle_t handle, std::vector<std::unique_ptr<Desc>>& keep) {
    auto graph =
        std::make_unique<Desc>(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, "operation graph of " + what_);
    TF_SET(*graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, int64_t(ops_.size()),
           ops_.data());
    if (handle) TF_SET(*graph, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
    graph->finalize();
    for (auto& d : owned_) keep.push_back(std::move(d));
    return graph;
  }

 private:
  Desc& own(cudnnBackendDescriptorType_t type, std::string what) {
    owned_.push_back(std::make_unique<Desc>(type, std::move(what)));
    return *owned_.back();
  }
  void add(Desc& op) {
    op.finalize();
    ops_.push_back(op.get());
  }

  std::string what_;
  std::vector<std::unique_ptr<Desc>> owned_;
  std::vector<cudnnBackendDescriptor_t> ops_;
  int64_t next_virtual_ = kFirstVirtual;
};

// A built graph with its execution plan, kept for the life of the process (plans refer to the
// handle, which is never destroyed, as cuBLASLt's is not: a static destructor could run after the
// CUDA runtime has gone). The by-value scalars live here, where the variant pack points.
struct Plan {
  cudnnHandle_t handle = nullptr;
  std::vector<std::unique_ptr<Desc>> keep;
  std::unique_ptr<Desc> graph, plan;
  int64_t workspace = 0;
  float scale = 0.0f, neg_inf = 0.0f, one = 1.0f;
};

std::mutex& cudnn_mutex() {
  static std::mutex m;
  return m;
}

int current_device() {
  int device = 0;
  TF_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

cudnnHandle_t handle(int device) {
  static auto* handles = new std::map<int, cudnnHandle_t>();
  cudnnHandle_t& h = (*handles)[device];
  if (!h) TF_CUDNN_CHECK(cudnnCreate(&h));
  return h;
}

// The masked-out score: cuDNN before 9.10 wants the lowest float, later ones minus infinity (as its
// frontend passes them).
float masked_score() {
  return cudnnGetVersion() < 91000 ? std::numeric_limits<float>::lowest()
                                   : -std::numeric_limits<float>::infinity();
}

// The strides of a [batch, heads, seq, head_dim] view of our [batch * seq, heads, head_dim] layout,
// and of its transpose [batch, heads, head_dim, seq].
Dims bshd(const AttentionShape& s, int64_t heads) {
  return Dims{{int64_t(s.seq) * heads * s.head_dim, s.head_dim, heads * s.head_dim, 1}};
}
Dims bshd_t(const AttentionShape& s, int64_t heads) {
  return Dims{{int64_t(s.seq) * heads * s.head_dim, s.head_dim, 1, heads * s.head_dim}};
}

// Q K^T times `scale`, causally masked: row index >= column index keeps a score, others become the
// masked score; `stats` (backward) is subtracted before the mask, as cuDNN's pattern has it.
const Desc& masked_scores(GraphBuilder& g, const AttentionShape& s, const Desc& q, const Desc& kt,
                          const Desc& scale, const Desc* stats) {
  const int64_t B = s.batch, H = s.n_heads, S = s.seq;
  const Dims sd{{B, H, S, S}}, ss{{H * S * S, S * S, S, 1}};
  const Desc& scores = g.virt("scores", CUDNN_DATA_FLOAT, sd, ss);
  g.matmul("q_kt", q, kt, scores);
  const Desc& scaled = g.virt("scaled scores", CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise("scale", CUDNN_POINTWISE_MUL, scores, &scale, nullptr, scaled);
  const Desc* before_mask = &scaled;
  if (stats) {
    const Desc& shifted = g.virt("scores - stats", CUDNN_DATA_FLOAT, sd, ss);
    g.pointwise("sub_stats", CUDNN_POINTWISE_SUB, scaled, stats, nullptr, shifted);
    before_mask = &shifted;
  }
  const Desc& row = g.virt("row index", CUDNN_DATA_INT32, sd, ss);
  g.pointwise("row_index", CUDNN_POINTWISE_GEN_INDEX, *before_mask, nullptr, nullptr, row, CUDNN_DATA_FLOAT,
              2);
  const Desc& col = g.virt("column index", CUDNN_DATA_INT32, sd, ss);
  g.pointwise("col_index", CUDNN_POINTWISE_GEN_INDEX, *before_mask, nullptr, nullptr, col, CUDNN_DATA_FLOAT,
              3);
  const Desc& keep = g.virt("causal mask", CUDNN_DATA_BOOLEAN, sd, ss);
  g.pointwise("row_ge_col", CUDNN_POINTWISE_CMP_GE, row, &col, nullptr, keep, CUDNN_DATA_BOOLEAN);
  const Desc& neg_inf = g.scalar("masked score", kNegInf);
  const Desc& masked = g.virt("masked scores", CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise("causal_select", CUDNN_POINTWISE_BINARY_SELECT, *before_mask, &neg_inf, &keep, masked);
  return masked;
}

void build_forward(GraphBuilder& g, const AttentionShape& s) {
  const int64_t B = s.batch, H = s.n_heads, KV = s.n_kv_heads, S = s.seq, D = s.head_dim;
  const Desc& q = g.tensor("Q", CUDNN_DATA_BFLOAT16, Dims{{B, H, S, D}}, bshd(s, H), kQ);
  const Desc& kt = g.tensor("K^T", CUDNN_DATA_BFLOAT16, Dims{{B, KV, D, S}}, bshd_t(s, KV), kK);
  const Desc& v = g.tensor("V", CUDNN_DATA_BFLOAT16, Dims{{B, KV, S, D}}, bshd(s, KV), kV);
  const Desc& o = g.tensor("O", CUDNN_DATA_BFLOAT16, Dims{{B, H, S, D}}, bshd(s, H), kO);
  const Dims sd{{B, H, S, S}}, ss{{H * S * S, S * S, S, 1}};
  const Dims rd{{B, H, S, 1}}, rs{{H * S, S, 1, 1}};

  const Desc& scale = g.scalar("scale", kScale);
  const Desc& masked = masked_scores(g, s, q, kt, scale, nullptr);
  const Desc& row_max = g.virt("row max", CUDNN_DATA_FLOAT, rd, rs);
  g.reduction("max", CUDNN_REDUCE_TENSOR_MAX, masked, row_max);
  const Desc& centred = g.virt("scores - max", CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise("sub_max", CUDNN_POINTWISE_SUB, masked, &row_max, nullptr, centred);
  const Desc& e = g.virt("exp", CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise("exp", CUDNN_POINTWISE_EXP, centred, nullptr, nullptr, e);
  const Desc& sum = g.virt("row sum", CUDNN_DATA_FLOAT, rd, rs);
  g.reduction("sum", CUDNN_REDUCE_TENSOR_ADD, e, sum);
  const Desc& log_sum = g.virt("log row sum", CUDNN_DATA_FLOAT, rd, rs);
  g.pointwise("log", CUDNN_POINTWISE_LOG, sum, nullptr, nullptr, log_sum);
  const Desc& stats = g.tensor("stats", CUDNN_DATA_FLOAT, rd, rs, kStats);
  g.pointwise("max_plus_log", CUDNN_POINTWISE_ADD, row_max, &log_sum, nullptr, stats);
  // The probabilities enter the second matmul in the inputs' type, as cuDNN requires.
  const Desc& p = g.virt("probabilities", CUDNN_DATA_BFLOAT16, sd, ss);
  g.pointwise("div_sum", CUDNN_POINTWISE_DIV, e, &sum, nullptr, p);
  g.matmul("p_v", p, v, o);
}

// The group of query heads sharing a kv head contributes to its dK / dV: the product is formed per
// query head and reduced over the group (a plain product when there is no grouping).
void grad_per_kv_head(GraphBuilder& g, const char* name, const AttentionShape& s, const Desc& a_t,
                      const Desc& b, const Desc& out) {
  const int64_t B = s.batch, H = s.n_heads, S = s.seq, D = s.head_dim;
  if (s.n_heads == s.n_kv_heads) {
    g.matmul(name, a_t, b, out);
    return;
  }
  const Desc& full = g.virt(name, CUDNN_DATA_BFLOAT16, Dims{{B, H, S, D}}, Dims{{H * S * D, S * D, D, 1}});
  g.matmul(name, a_t, b, full);
  g.reduction(name, CUDNN_REDUCE_TENSOR_ADD, full, out);
}

void build_backward(GraphBuilder& g, const AttentionShape& s) {
  const int64_t B = s.batch, H = s.n_heads, KV = s.n_kv_heads, S = s.seq, D = s.head_dim;
  const Desc& q = g.tensor("Q", CUDNN_DATA_BFLOAT16, Dims{{B, H, S, D}}, bshd(s, H), kQ);
  const Desc& kt = g.tensor("K^T", CUDNN_DATA_BFLOAT16, Dims{{B, KV, D, S}}, bshd_t(s, KV), kK);
  const Desc& vt = g.tensor("V^T", CUDNN_DATA_BFLOAT16, Dims{{B, KV, D, S}}, bshd_t(s, KV), kV);
  const Desc& o = g.tensor("O", CUDNN_DATA_BFLOAT16, Dims{{B, H, S, D}}, bshd(s, H), kO);
  const Desc& d_o = g.tensor("dO", CUDNN_DATA_BFLOAT16, Dims{{B, H, S, D}}, bshd(s, H), kDO);
  const Dims sd{{B, H, S, S}}, ss{{H * S * S, S * S, S, 1}};
  const Dims td{{B, H, S, S}}, ts{{H * S * S, S * S, 1, S}};  // a score-shaped tensor read transposed
  const Dims rd{{B, H, S, 1}}, rs{{H * S, S, 1, 1}};
  const Desc& stats = g.tensor("stats", CUDNN_DATA_FLOAT, rd, rs, kStats);
  const Desc& scale = g.scalar("scale", kScale);

  // sum_d dO * O per row (the softmax backward's row term), kept in device memory by cuDNN.
  const Desc& do_o = g.virt("dO * O", CUDNN_DATA_FLOAT, Dims{{B, H, S, D}}, bshd(s, H));
  g.pointwise("mul_do_o", CUDNN_POINTWISE_MUL, d_o, &o, nullptr, do_o);
  const Desc& row_dot = g.virt("row sum of dO * O", CUDNN_DATA_FLOAT, rd, rs);
  g.reduction("sum_do_o", CUDNN_REDUCE_TENSOR_ADD, do_o, row_dot);
  const Desc& one = g.scalar("one", kOne);
  const Desc& softmax_sum = g.tensor("softmax sum", CUDNN_DATA_FLOAT, rd, rs, kSoftmaxSum);
  g.pointwise("softmax_sum", CUDNN_POINTWISE_MUL, row_dot, &one, nullptr, softmax_sum);

  // P from the saved statistics, then dV = P^T dO.
  const Desc& masked = masked_scores(g, s, q, kt, scale, &stats);
  const Desc& p = g.virt("probabilities", CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise("exp", CUDNN_POINTWISE_EXP, masked, nullptr, nullptr, p);
  const Desc& p_t = g.virt("P^T", CUDNN_DATA_BFLOAT16, td, ts);
  g.reshape("transpose_p", p, p_t);
  const Desc& dv = g.tensor("dV", CUDNN_DATA_BFLOAT16, Dims{{B, KV, S, D}}, bshd(s, KV), kDV);
  grad_per_kv_head(g, "p_t_do", s, p_t, d_o, dv);

  // dS = scale * P * (dO V^T - softmax sum), then dK = dS^T Q.
  const Desc& dp = g.virt("dP", CUDNN_DATA_FLOAT, sd, ss);
  g.matmul("do_vt", d_o, vt, dp);
  const Desc& dp_centred = g.virt("dP - softmax sum", CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise("sub_softmax_sum", CUDNN_POINTWISE_SUB, dp, &softmax_sum, nullptr, dp_centred);
  const Desc& ds_unscaled = g.virt("P * (dP - sum)", CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise("mul_p", CUDNN_POINTWISE_MUL, dp_centred, &p, nullptr, ds_unscaled);
  const Desc& ds = g.virt("dS", CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise("mul_scale", CUDNN_POINTWISE_MUL, ds_unscaled, &scale, nullptr, ds);
  const Desc& ds_t = g.virt("dS^T", CUDNN_DATA_BFLOAT16, td, ts);
  g.reshape("transpose_ds", ds, ds_t);
  const Desc& dk = g.tensor("dK", CUDNN_DATA_BFLOAT16, Dims{{B, KV, S, D}}, bshd(s, KV), kDK);
  grad_per_kv_head(g, "ds_t_q", s, ds_t, q, dk);

  // dQ = dS K, accumulated in f32 by cuDNN and written out in bf16.
  const Desc& k = g.virt("K", CUDNN_DATA_BFLOAT16, Dims{{B, KV, S, D}}, bshd(s, KV));
  g.reshape("transpose_kt", kt, k);
  const Desc& dq_accum = g.tensor("dQ accumulator", CUDNN_DATA_FLOAT, Dims{{B, H, S, D}},
                                  Dims{{H * S * D, S * D, D, 1}}, kDQAccum);
  g.matmul("ds_k", ds, k, dq_accum);
  const Desc& dq = g.tensor("dQ", CUDNN_DATA_BFLOAT16, Dims{{B, H, S, D}}, bshd(s, H), kDQ);
  g.pointwise("dq", CUDNN_POINTWISE_IDENTITY, dq_accum, nullptr, nullptr, dq);
}

std::string describe(const AttentionShape& s, bool backward) {
  return detail::concat("cuDNN fused attention ", backward ? "backward" : "forward", " (batch ", s.batch,
                        ", seq ", s.seq, ", heads ", s.n_heads, "/", s.n_kv_heads, ", head_dim ", s.head_dim,
                        ")");
}

// The first engine configuration cuDNN's heuristics rank for the graph that it can build a plan for.
// cuDNN's heuristics for a graph: for the device of the graph's handle, or for the device that
// device_prop describes (which need not be present) when it is given.
std::unique_ptr<Desc> heuristics(const Desc& graph, const Desc* device_prop, const std::string& what) {
  auto heur = std::make_unique<Desc>(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, "engine heuristics of " + what);
  TF_SET_DESC(*heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph);
  if (device_prop) TF_SET_DESC(*heur, CUDNN_ATTR_ENGINEHEUR_DEVICEPROP, *device_prop);
  const cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
  TF_SET(*heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
  heur->finalize();
  return heur;
}

// The number of engine configurations the heuristics rank, before each is checked against what
// this machine has (a driver to load kernels with, among others).
int64_t candidates(const Desc& heur) {
  int64_t count = 0;
  TF_CUDNN_CHECK(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                          CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr));
  return count;
}

void make_plan(Plan& p, cudnnHandle_t h, const std::string& what) {
  const std::unique_ptr<Desc> heur_desc = heuristics(*p.graph, nullptr, what);
  const Desc& heur = *heur_desc;
  const int64_t count = candidates(heur);
  std::vector<std::unique_ptr<Desc>> configs;
  std::vector<cudnnBackendDescriptor_t> raw;
  for (int64_t i = 0; i < count; ++i) {
    configs.push_back(std::make_unique<Desc>(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR,
                                             "engine configuration " + std::to_string(i)));
    raw.push_back(configs.back()->get());
  }
  int64_t got = 0;
  if (count > 0)
    TF_CUDNN_CHECK(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                            CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &got, raw.data()));
  std::string last = "the heuristics returned no engine configuration";
  for (int64_t i = 0; i < got; ++i) {
    auto plan = std::make_unique<Desc>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, "execution plan of " + what);
    TF_SET(*plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &h);
    TF_SET_DESC(*plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, *configs[size_t(i)]);
    // An engine that cannot take this graph refuses at finalization; the next one is tried.
    const cudnnStatus_t st = cudnnBackendFinalize(plan->get());
    if (st != CUDNN_STATUS_SUCCESS) {
      last = "engine configuration " + std::to_string(i) + ": " + cudnn_error(st);
      continue;
    }
    int64_t n = 0;
    TF_CUDNN_CHECK(cudnnBackendGetAttribute(plan->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                            CUDNN_TYPE_INT64, 1, &n, &p.workspace));
    p.plan = std::move(plan);
    for (auto& c : configs) p.keep.push_back(std::move(c));
    return;
  }
  TF_FAIL(what, ": cuDNN has no engine for this graph on this device (", got, " configurations tried; ", last,
          ")");
}

// The plan of one direction and shape on the current device, built on first use.
Plan& plan_for(const AttentionShape& s, bool backward) {
  using Key = std::tuple<int, bool, int, int, int, int, int, uint32_t>;
  static auto* plans = new std::map<Key, std::unique_ptr<Plan>>();
  const int device = current_device();
  uint32_t scale_bits = 0;
  std::memcpy(&scale_bits, &s.scale, sizeof(scale_bits));
  const Key key{device, backward, s.batch, s.seq, s.n_heads, s.n_kv_heads, s.head_dim, scale_bits};
  std::lock_guard<std::mutex> lock(cudnn_mutex());
  std::unique_ptr<Plan>& p = (*plans)[key];
  if (p) return *p;
  auto built = std::make_unique<Plan>();
  const cudnnHandle_t h = handle(device);
  const std::string what = describe(s, backward);
  GraphBuilder g(what);
  if (backward)
    build_backward(g, s);
  else
    build_forward(g, s);
  built->graph = g.finish(h, built->keep);
  make_plan(*built, h, what);
  built->handle = h;
  built->scale = s.scale;
  built->neg_inf = masked_score();
  p = std::move(built);
  return *p;
}

void execute(Plan& p, const std::vector<std::pair<int64_t, void*>>& tensors, const std::string& what) {
  std::vector<int64_t> uids;
  std::vector<void*> ptrs;
  for (const auto& [uid, ptr] : tensors) {
    uids.push_back(uid);
    ptrs.push_back(ptr);
  }
  uids.insert(uids.end(), {kScale, kNegInf});
  ptrs.insert(ptrs.end(), {&p.scale, &p.neg_inf});
  void* workspace = p.workspace > 0 ? rt::scratch(kSlotWorkspace, size_t(p.workspace)) : nullptr;
  Desc pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, "variant pack of " + what);
  TF_SET(pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, int64_t(uids.size()), uids.data());
  TF_SET(pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, int64_t(ptrs.size()), ptrs.data());
  TF_SET(pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &workspace);
  pack.finalize();
  const cudaStream_t stream = static_cast<cudaStream_t>(rt::current_stream());
  TF_CUDNN_CHECK(cudnnSetStream(p.handle, stream));
  const cudnnStatus_t st = cudnnBackendExecute(p.handle, p.plan->get(), pack.get());
  TF_CHECK(st == CUDNN_STATUS_SUCCESS, "cudnnBackendExecute(", what, "): ", cudnn_error(st));
  if (rt::sync_after_launch()) TF_CUDA_CHECK(cudaStreamSynchronize(stream));
}

// ---- the conversions around the graph ------------------------------------------------------------

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return unsigned(b < 4096 ? b : 4096);
}

__global__ void to_bf16_kernel(__nv_bfloat16* dst, const float* src, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = __float2bfloat16_rn(src[i]);
}

// dst = src (accumulate false) or dst += src.
__global__ void from_bf16_kernel(float* dst, const __nv_bfloat16* src, int64_t n, bool accumulate) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float x = __bfloat162float(src[i]);
    dst[i] = accumulate ? dst[i] + x : x;
  }
}

// Between our lse [batch * seq, heads] and cuDNN's statistics [batch, heads, seq]: to_stats true
// reads lse from src and writes statistics to dst, false the other way round.
__global__ void transpose_stats_kernel(float* dst, const float* src, int64_t batch, int64_t seq,
                                       int64_t heads, bool to_stats) {
  const int64_t n = batch * seq * heads;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t h = i % heads, t = i / heads, b = t / seq, pos = t % seq;
    const int64_t stats_at = (b * heads + h) * seq + pos;
    if (to_stats)
      dst[stats_at] = src[i];
    else
      dst[i] = src[stats_at];
  }
}

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  TF_CHECK(err == cudaSuccess, "cudnn attention: launching ", kernel, ": ", cudaGetErrorString(err));
  if (rt::sync_after_launch())
    TF_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(rt::current_stream())));
}

__nv_bfloat16* to_bf16(__nv_bfloat16* dst, const float* src, int64_t n) {
  to_bf16_kernel<<<blocks_for(n), kThreads, 0, static_cast<cudaStream_t>(rt::current_stream())>>>(dst, src,
                                                                                                  n);
  check_launch("to_bf16_kernel");
  return dst;
}

void from_bf16(float* dst, const __nv_bfloat16* src, int64_t n, bool accumulate) {
  from_bf16_kernel<<<blocks_for(n), kThreads, 0, static_cast<cudaStream_t>(rt::current_stream())>>>(
      dst, src, n, accumulate);
  check_launch("from_bf16_kernel");
}

void transpose_stats(float* dst, const float* src, const AttentionShape& s, bool to_stats) {
  const int64_t n = int64_t(s.batch) * s.seq * s.n_heads;
  transpose_stats_kernel<<<blocks_for(n), kThreads, 0, static_cast<cudaStream_t>(rt::current_stream())>>>(
      dst, src, s.batch, s.seq, s.n_heads, to_stats);
  check_launch("transpose_stats_kernel");
}

// Consecutive 256-byte aligned pieces of one scratch slot.
class Carve {
 public:
  Carve(int slot, const std::vector<size_t>& bytes) {
    size_t total = 0;
    for (const size_t b : bytes) total += padded(b);
    char* base = static_cast<char*>(rt::scratch(slot, total));
    for (const size_t b : bytes) {
      pieces_.push_back(base);
      base += padded(b);
    }
  }
  template <typename T>
  T* at(size_t i) const {
    return reinterpret_cast<T*>(pieces_[i]);
  }

 private:
  std::vector<char*> pieces_;
};

}  // namespace

int64_t cudnn_attention_offline_engines(const AttentionShape& s, bool backward,
                                        const std::string& device_json, int* operations) {
  check_shape(nullptr, s, backward ? "backward" : "forward");
  const std::string what = describe(s, backward);
  GraphBuilder g(what);
  if (backward)
    build_backward(g, s);
  else
    build_forward(g, s);
  std::vector<std::unique_ptr<Desc>> keep;
  const std::unique_ptr<Desc> graph = g.finish(nullptr, keep);
  *operations = int(g.size());
  if (device_json.empty()) return -1;
  Desc device(CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR, "device properties for " + what);
  TF_SET(device, CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION, CUDNN_TYPE_CHAR, int64_t(device_json.size()),
         device_json.data());
  device.finalize();
  return candidates(*heuristics(*graph, &device, what));
}

bool cudnn_attention_available(std::string* why) {
  const size_t version = cudnnGetVersion();
  if (version < kMinVersion) {
    *why =
        detail::concat("cuDNN ", version, " is loaded; its fused attention graph needs cuDNN 9.0 or newer");
    return false;
  }
  try {
    const int device = current_device();
    cudaDeviceProp prop;
    TF_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    if (prop.major < 8) {
      *why = detail::concat("device ", device, " (", prop.name, ") is sm_", prop.major, prop.minor,
                            "; cuDNN's fused flash attention needs sm_80 or newer");
      return false;
    }
    std::lock_guard<std::mutex> lock(cudnn_mutex());
    handle(device);
  } catch (const Error& e) {
    *why = e.what();
    return false;
  }
  return true;
}

void cudnn_attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                             const int32_t* doc_ids, const AttentionShape& s) {
  check_shape(doc_ids, s, "forward");
  const int64_t q_elems = int64_t(s.batch) * s.seq * s.n_heads * s.head_dim;
  const int64_t kv_elems = int64_t(s.batch) * s.seq * s.n_kv_heads * s.head_dim;
  if (q_elems == 0) return;
  Plan& p = plan_for(s, false);
  const size_t b16 = sizeof(__nv_bfloat16);
  const Carve in(kSlotInputs, {size_t(q_elems) * b16, size_t(kv_elems) * b16, size_t(kv_elems) * b16,
                               size_t(q_elems) * b16});
  const Carve st(kSlotStats, {size_t(s.batch) * s.seq * s.n_heads * sizeof(float)});
  __nv_bfloat16* o = in.at<__nv_bfloat16>(3);
  execute(p,
          {{kQ, to_bf16(in.at<__nv_bfloat16>(0), q, q_elems)},
           {kK, to_bf16(in.at<__nv_bfloat16>(1), k, kv_elems)},
           {kV, to_bf16(in.at<__nv_bfloat16>(2), v, kv_elems)},
           {kO, o},
           {kStats, st.at<float>(0)}},
          describe(s, false));
  from_bf16(out, o, q_elems, false);
  transpose_stats(lse, st.at<float>(0), s, false);
}

void cudnn_attention_backward(float* dq, float* dk, float* dv, const float* d_out, const float* q,
                              const float* k, const float* v, const float* out, const float* lse,
                              const int32_t* doc_ids, const AttentionShape& s) {
  check_shape(doc_ids, s, "backward");
  TF_CHECK(s.seq % 128 == 0 || cudnnGetVersion() >= kBackwardAnySeqVersion, "--attention cudnn: cuDNN ",
           cudnnGetVersion(),
           "'s fused attention backward takes sequence lengths that are multiples of 128 (", s.seq,
           " is not); cuDNN 9.16 or newer takes any");
  const int64_t q_elems = int64_t(s.batch) * s.seq * s.n_heads * s.head_dim;
  const int64_t kv_elems = int64_t(s.batch) * s.seq * s.n_kv_heads * s.head_dim;
  if (q_elems == 0) return;
  Plan& p = plan_for(s, true);
  const size_t b16 = sizeof(__nv_bfloat16), rows = size_t(s.batch) * s.seq * s.n_heads;
  const Carve in(kSlotInputs, {size_t(q_elems) * b16, size_t(kv_elems) * b16, size_t(kv_elems) * b16,
                               size_t(q_elems) * b16, size_t(q_elems) * b16});
  const Carve st(kSlotStats, {rows * sizeof(float), rows * sizeof(float)});
  const Carve gr(kSlotGrads, {size_t(q_elems) * sizeof(float), size_t(q_elems) * b16, size_t(kv_elems) * b16,
                              size_t(kv_elems) * b16});
  transpose_stats(st.at<float>(0), lse, s, true);
  // cuDNN before 9.6 adds into the accumulator rather than writing it.
  rt::memset_async(gr.at<float>(0), 0, size_t(q_elems) * sizeof(float), rt::current_stream());
  std::vector<std::pair<int64_t, void*>> tensors = {{kQ, to_bf16(in.at<__nv_bfloat16>(0), q, q_elems)},
                                                    {kK, to_bf16(in.at<__nv_bfloat16>(1), k, kv_elems)},
                                                    {kV, to_bf16(in.at<__nv_bfloat16>(2), v, kv_elems)},
                                                    {kO, to_bf16(in.at<__nv_bfloat16>(3), out, q_elems)},
                                                    {kDO, to_bf16(in.at<__nv_bfloat16>(4), d_out, q_elems)},
                                                    {kStats, st.at<float>(0)},
                                                    {kSoftmaxSum, st.at<float>(1)},
                                                    {kDQAccum, gr.at<float>(0)},
                                                    {kDQ, gr.at<__nv_bfloat16>(1)},
                                                    {kDK, gr.at<__nv_bfloat16>(2)},
                                                    {kDV, gr.at<__nv_bfloat16>(3)},
                                                    {kOne, &p.one}};
  execute(p, tensors, describe(s, true));
  from_bf16(dq, gr.at<__nv_bfloat16>(1), q_elems, true);
  from_bf16(dk, gr.at<__nv_bfloat16>(2), kv_elems, true);
  from_bf16(dv, gr.at<__nv_bfloat16>(3), kv_elems, true);
}

#endif  // TIGHTFIT_HAVE_CUDNN

}  // namespace tf::cuda
