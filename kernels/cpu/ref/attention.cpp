// defines: the float instantiations of tf::ref's attention ops (kernels/cpu/ref/attention.h)
#include "kernels/cpu/ref/attention.h"

namespace tf::ref {

void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const int32_t* doc_ids, const AttentionShape& s) {
  attention_forward<float>(out, lse, q, k, v, doc_ids, s);
}

void attention_backward(float* dq, float* dk, float* dv, const float* d_out, const float* q, const float* k,
                        const float* v, const float* out, const float* lse, const int32_t* doc_ids,
                        const AttentionShape& s) {
  attention_backward<float>(dq, dk, dv, d_out, q, k, v, doc_ids, s);
}

void attention_cached_forward(float* out, const float* q, const float* k_cache, const float* v_cache,
                              int64_t n_past, int64_t n_new, int n_heads, int n_kv_heads, int head_dim,
                              float scale, int window, float softcap) {
  attention_cached_forward<float>(out, q, k_cache, v_cache, n_past, n_new, n_heads, n_kv_heads, head_dim,
                                  scale, window, softcap);
}

}  // namespace tf::ref
