// defines: the CUDA backend's embedding, tf::cuda:: and tf::simt:: embedding_forward (f32 / bf16 / f16
// tables; quantized ones decoded by kernels/cuda/dequant.cu) and embedding_backward (one thread per column
// adding the tokens in order: deterministic, no atomics); embedding_forward_scratch, the rt::scratch of
// the forward's token check
#include <cstdint>

#include "kernels/cuda/dequant.h"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/kernel_common.h"
#include "kernels/cuda/port.h"
#include "kernels/cuda/quant_decode.h"
#include "kernels/cuda/scratch_plan.h"
#include "src/core/error.h"

namespace tf::TF_PORT_BACKEND {

namespace {

// rt::scratch slot of the first bad token position, and its bytes.
constexpr int kBadTokenSlot = 21;
constexpr size_t kBadTokenBytes = sizeof(unsigned long long);
constexpr unsigned long long kNoBadToken = ~0ull;

__global__ void find_bad_token_kernel(port::gptr<unsigned long long> first_bad,
                                      port::gptr<const int32_t> tokens, int64_t n_tokens, int64_t vocab) {
  for (int64_t n = grid_first(); n < n_tokens; n += grid_stride()) {
    const int32_t t = tokens[n];
    if (t < 0 || t >= vocab) atomicMin(first_bad, static_cast<unsigned long long>(n));
  }
}

// Block b copies rows b, b + gridDim.x, ...; its threads stride through the row.
template <typename W>
__global__ void embedding_forward_kernel(port::gptr<float> out, port::gptr<const int32_t> tokens,
                                         int64_t n_tokens, port::gptr<const typename W::Storage> table,
                                         int64_t dim) {
  for (int64_t n = blockIdx.x; n < n_tokens; n += gridDim.x) {
    const int64_t row = tokens[n];
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      const typename W::Storage v = table[row * dim + d];
      out[n * dim + d] = W::widen(v);
    }
  }
}

// Repeated tokens add into one row, so threads own columns, not tokens: each element adds its
// tokens' gradients in token order, the CPU's order, without atomics.
__global__ void embedding_backward_kernel(port::gptr<float> d_table, port::gptr<const float> d_out,
                                          port::gptr<const int32_t> tokens, int64_t n_tokens, int64_t dim) {
  for (int64_t d = grid_first(); d < dim; d += grid_stride()) {
    for (int64_t n = 0; n < n_tokens; ++n) {
      const int64_t row = tokens[n];
      const float g = d_out[n * dim + d], acc = d_table[row * dim + d];
      d_table[row * dim + d] = acc + g;
    }
  }
}

// The tokens live in device memory, so they are checked there; the first bad position (and then
// its id) comes back to the host, which throws the CPU's message before anything is written.
void check_tokens(const char* op, const int32_t* tokens, int64_t n_tokens, int64_t vocab) {
  const rt::StreamHandle stream = rt::current_stream();
  auto* first_bad = static_cast<unsigned long long*>(rt::scratch(kBadTokenSlot, kBadTokenBytes));
  rt::memset_async(first_bad, 0xff, sizeof(unsigned long long), stream);
  port::launch(find_bad_token_kernel,
               on_current_stream("embedding_check_tokens", element_blocks(n_tokens), kElementThreads),
               first_bad, tokens, n_tokens, vocab);
  unsigned long long bad = kNoBadToken;
  rt::memcpy_d2h(&bad, first_bad, sizeof(bad), stream);
  rt::stream_synchronize(stream);
  if (bad == kNoBadToken) return;
  int32_t id = 0;
  rt::memcpy_d2h(&id, tokens + bad, sizeof(id), stream);
  rt::stream_synchronize(stream);
  TF_FAIL(op, ": token id ", id, " at position ", bad, " is outside the vocabulary [0, ", vocab, ")");
}

}  // namespace

void embedding_forward_scratch(ScratchNeeds& s) {
  s.need(kBadTokenSlot, "the embedding's first bad token", kBadTokenBytes);
}

void embedding_forward(float* out, const int32_t* tokens, int64_t n_tokens, WeightRef table) {
  if (is_quantized(table.dtype)) {
    quant_weight(table, "embedding_forward: table");
    if (n_tokens <= 0) return;
    check_tokens("embedding_forward", tokens, n_tokens, table.rows);
    return quant_embedding_forward(out, tokens, n_tokens, table);
  }
  with_stored_weight("embedding_forward: table", table, [&](auto w) {
    using W = decltype(w);
    if (n_tokens <= 0) return;
    check_tokens("embedding_forward", tokens, n_tokens, table.rows);
    port::launch(
        embedding_forward_kernel<W>,
        on_current_stream("embedding_forward", std::min(n_tokens, kMaxElementBlocks), kElementThreads), out,
        tokens, n_tokens, static_cast<const typename W::Storage*>(table.data), table.cols);
  });
}

void embedding_backward(float* d_table, const float* d_out, const int32_t* tokens, int64_t n_tokens,
                        int64_t vocab, int64_t dim) {
  if (n_tokens <= 0) return;
  check_tokens("embedding_backward", tokens, n_tokens, vocab);
  if (dim <= 0) return;
  port::launch(embedding_backward_kernel,
               on_current_stream("embedding_backward", element_blocks(dim), kElementThreads), d_table, d_out,
               tokens, n_tokens, dim);
}

}  // namespace tf::TF_PORT_BACKEND
