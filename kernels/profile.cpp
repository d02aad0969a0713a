// defines: op_name, the op_work estimates of every op, tf::OpProfile (its sums, table and JSON)
#include "kernels/profile.h"

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>

namespace tf {

const char* op_name(OpId op) {
  static constexpr const char* kNames[] = {
#define TF_OP(ret, name, params, args) #name,
#include "kernels/op_signatures.inc"
#undef TF_OP
  };
  return kNames[size_t(op)];
}

namespace {

constexpr double kF32 = sizeof(float);

// Bytes of n elements of a weight as stored (for ggml blocks, n a multiple of the block).
double stored(const WeightRef& w, int64_t n) {
  return double(dtype_bytes(w.dtype, n));
}

double operand_bytes(const MatOperand& x, int64_t rows, int64_t cols) {
  return double(rows) * double(cols) * double(dtype_size(x.dtype));
}

// The (query, key) pairs a causal query block attends to: queries at positions first .. first + n - 1
// of one sequence, each seeing the keys at or before it and, with a window W > 0, its W latest.
double attended_pairs(int64_t first, int64_t n, int window) {
  double pairs = 0;
  for (int64_t i = first; i < first + n; ++i)
    pairs += double(window > 0 ? std::min<int64_t>(i + 1, window) : i + 1);
  return pairs;
}

// Scores and the weighted sum of values: two multiply-adds per pair and head dimension. Document
// masks are not seen here (their ids are in the backend's memory): a packed batch counts as one
// document per sequence, so its rate is a lower bound.
double attention_flops(const AttentionShape& s) {
  return 4.0 * attended_pairs(0, s.seq, s.window) * s.head_dim * s.n_heads * s.batch;
}

double attention_bytes(const AttentionShape& s) {
  const double n = double(s.batch) * s.seq;
  return kF32 * n * (2.0 * s.n_heads * s.head_dim + 2.0 * s.n_kv_heads * s.head_dim + s.n_heads);
}

}  // namespace

// Defined by their qualified names, so that one whose parameters no longer match the op table's
// does not compile.
OpWork op_work::embedding_forward(float*, const int32_t*, int64_t n_tokens, WeightRef table) {
  return {0, double(n_tokens) * (stored(table, table.cols) + kF32 * double(table.cols) + sizeof(int32_t))};
}

OpWork op_work::embedding_backward(float*, const float*, const int32_t*, int64_t n_tokens, int64_t,
                                   int64_t dim) {
  return {0, double(n_tokens) * (3 * kF32 * double(dim) + sizeof(int32_t))};
}

OpWork op_work::matmul(float*, int64_t, MatOperand A, MatOperand B, int64_t M, int64_t N, int64_t K, float,
                       float beta) {
  return {2.0 * double(M) * double(N) * double(K), operand_bytes(A, M, K) + operand_bytes(B, K, N) +
                                                       kF32 * double(M) * double(N) * (beta != 0 ? 2 : 1)};
}

OpWork op_work::matmul_backward(float* dA, float* dB, const float*, int64_t, MatOperand A, MatOperand B,
                                int64_t M, int64_t N, int64_t K) {
  const double products = (dA ? 1 : 0) + (dB ? 1 : 0);
  return {
      2.0 * double(M) * double(N) * double(K) * products,
      kF32 * double(M) * double(N) + (operand_bytes(A, M, K) + operand_bytes(B, K, N)) * (1 + 2 * products)};
}

OpWork op_work::linear_forward(float*, const float*, WeightRef W, int64_t n_tokens, float beta) {
  return {2.0 * double(n_tokens) * double(W.rows) * double(W.cols),
          stored(W, W.rows * W.cols) +
              kF32 * double(n_tokens) * (double(W.cols) + double(W.rows) * (beta != 0 ? 2 : 1))};
}

OpWork op_work::linear_backward_input(float*, const float*, WeightRef W, int64_t n_tokens, float beta) {
  return {2.0 * double(n_tokens) * double(W.rows) * double(W.cols),
          stored(W, W.rows * W.cols) +
              kF32 * double(n_tokens) * (double(W.rows) + double(W.cols) * (beta != 0 ? 2 : 1))};
}

OpWork op_work::dequantize_weight_tile(float*, int64_t, WeightRef W, int64_t, int64_t n_rows, int64_t,
                                       int64_t n_cols) {
  return {0, stored(W, n_rows * n_cols) + kF32 * double(n_rows) * double(n_cols)};
}

OpWork op_work::rmsnorm_forward(float*, float*, const float*, WeightRef weight, int64_t rows, int64_t dim,
                                float) {
  return {0, kF32 * double(rows) * (2.0 * double(dim) + 1) + stored(weight, dim)};
}

OpWork op_work::rmsnorm_backward(float*, float* d_weight, const float*, const float*, WeightRef weight,
                                 const float*, int64_t rows, int64_t dim) {
  return {0, kF32 * double(rows) * (4.0 * double(dim) + 1) + stored(weight, dim) +
                 (d_weight ? 2 * kF32 * double(dim) : 0)};
}

OpWork op_work::rope_forward(float*, const int32_t*, const float*, int64_t n_tokens, int n_heads,
                             int head_dim, RopeLayout) {
  return {0, double(n_tokens) * (2 * kF32 * n_heads * head_dim + sizeof(int32_t))};
}

OpWork op_work::rope_backward(float*, const int32_t*, const float*, int64_t n_tokens, int n_heads,
                              int head_dim, RopeLayout) {
  return {0, double(n_tokens) * (2 * kF32 * n_heads * head_dim + sizeof(int32_t))};
}

OpWork op_work::attention_forward(float*, float*, const float*, const float*, const float*, const int32_t*,
                                  const AttentionShape& s) {
  return {attention_flops(s), attention_bytes(s)};
}

// The scores again, then the gradients of the values, the probabilities, the queries and the keys:
// five products where the forward has two.
OpWork op_work::attention_backward(float*, float*, float*, const float*, const float*, const float*,
                                   const float*, const float*, const float*, const int32_t*,
                                   const AttentionShape& s) {
  return {2.5 * attention_flops(s), 2 * attention_bytes(s)};
}

OpWork op_work::attention_cached_forward(float*, const float*, const float*, const float*, int64_t n_past,
                                         int64_t n_new, int n_heads, int n_kv_heads, int head_dim, float,
                                         int window, float) {
  // The keys and values the last query sees are read once for all the queries.
  const double rows = double(window > 0 ? std::min<int64_t>(n_past + n_new, window) : n_past + n_new);
  return {4.0 * attended_pairs(n_past, n_new, window) * head_dim * n_heads,
          kF32 * (2.0 * double(n_new) * n_heads * head_dim + 2.0 * rows * n_kv_heads * head_dim)};
}

OpWork op_work::swiglu_forward(float*, const float*, const float*, int64_t n) {
  return {0, 3 * kF32 * double(n)};
}

OpWork op_work::swiglu_backward(float*, float*, const float*, const float*, const float*, int64_t n) {
  return {0, 7 * kF32 * double(n)};
}

OpWork op_work::geglu_forward(float*, const float*, const float*, int64_t n) {
  return {0, 3 * kF32 * double(n)};
}

OpWork op_work::geglu_backward(float*, float*, const float*, const float*, const float*, int64_t n) {
  return {0, 7 * kF32 * double(n)};
}

OpWork op_work::lm_head_cross_entropy(float* d_h, int64_t*, const float*, WeightRef W, const int32_t*,
                                      int64_t n_tokens, float, float) {
  const double passes = d_h ? 2 : 1;
  return {2.0 * passes * double(n_tokens) * double(W.rows) * double(W.cols),
          passes * stored(W, W.rows * W.cols) + kF32 * double(n_tokens) * double(W.cols) * (d_h ? 3 : 1)};
}

OpWork op_work::add_inplace(float*, const float*, int64_t n) {
  return {0, 3 * kF32 * double(n)};
}

OpWork op_work::add_bias(float*, WeightRef bias, int64_t rows, int64_t width) {
  return {0, 2 * kF32 * double(rows) * double(width) + stored(bias, width)};
}

OpWork op_work::fill(float*, float, int64_t n) {
  return {0, kF32 * double(n)};
}

OpWork op_work::scale_inplace(float*, float, int64_t n) {
  return {0, 2 * kF32 * double(n)};
}

OpWork op_work::copy(float*, const float*, int64_t n) {
  return {0, 2 * kF32 * double(n)};
}

OpWork op_work::sum_squares(const float*, int64_t n) {
  return {0, kF32 * double(n)};
}

OpWork op_work::dropout_forward(float*, const float*, int64_t n, float, uint64_t, uint64_t, uint64_t) {
  return {0, 2 * kF32 * double(n)};
}

// dx and g read and written, x read.
OpWork op_work::dropout_backward(float*, float*, const float*, int64_t n, float, uint64_t, uint64_t,
                                 uint64_t) {
  return {0, 5 * kF32 * double(n)};
}

// Parameter, gradient and both moments read, parameter and moments written.
OpWork op_work::adamw_update(float*, const float*, float*, float*, int64_t n, const AdamWParams&) {
  return {0, 7 * kF32 * double(n)};
}

double OpStats::rate() const {
  if (seconds <= 0) return 0;
  return (flop_rate() ? work.flops : work.bytes) / seconds;
}

void OpProfile::add(OpId op, const char* role, double seconds, const OpWork& work) {
  OpStats& s = stats_[{op, role}];
  s.op = op;
  s.role = role;
  ++s.calls;
  s.seconds += seconds;
  s.work.flops += work.flops;
  s.work.bytes += work.bytes;
}

std::vector<OpStats> OpProfile::entries() const {
  std::vector<OpStats> out;
  for (const auto& [key, s] : stats_) out.push_back(s);
  std::stable_sort(out.begin(), out.end(),
                   [](const OpStats& a, const OpStats& b) { return a.seconds > b.seconds; });
  return out;
}

double OpProfile::op_seconds() const {
  double t = 0;
  for (const auto& [key, s] : stats_) t += s.seconds;
  return t;
}

namespace {

std::string rate_text(const OpStats& s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, s.flop_rate() ? "%.2f GFLOP/s" : "%.2f GB/s", s.rate() / 1e9);
  return buf;
}

}  // namespace

std::string OpProfile::table() const {
  const double total = op_seconds();
  std::string out;
  char line[256];
  std::snprintf(line, sizeof line, "%-26s %-16s %8s %12s %7s %16s\n", "op", "role", "calls", "time", "share",
                "rate");
  out += line;
  for (const OpStats& s : entries()) {
    std::snprintf(line, sizeof line, "%-26s %-16s %8lld %9.2f ms %6.1f%% %16s\n", op_name(s.op),
                  s.role.empty() ? "-" : s.role.c_str(), (long long)s.calls, s.seconds * 1e3,
                  total > 0 ? 100 * s.seconds / total : 0.0, rate_text(s).c_str());
    out += line;
  }
  std::snprintf(line, sizeof line,
                "ops %.3f s of the %lld steps' %.3f s (%.1f%%; the rest ran between the ops)\n", total,
                (long long)steps_, step_seconds_, step_seconds_ > 0 ? 100 * total / step_seconds_ : 0.0);
  out += line;
  return out;
}

std::string OpProfile::json() const {
  const double total = op_seconds();
  nlohmann::json ops = nlohmann::json::array();
  for (const OpStats& s : entries())
    ops.push_back({{"op", op_name(s.op)},
                   {"role", s.role},
                   {"calls", s.calls},
                   {"seconds", s.seconds},
                   {"share", total > 0 ? s.seconds / total : 0.0},
                   {"flops", s.work.flops},
                   {"bytes", s.work.bytes},
                   {"rate", s.rate()},
                   {"unit", s.flop_rate() ? "FLOP/s" : "B/s"}});
  const nlohmann::json doc = {
      {"steps", steps_}, {"step_seconds", step_seconds_}, {"op_seconds", total}, {"ops", ops}};
  return doc.dump(2) + "\n";
}

}  // namespace tf
