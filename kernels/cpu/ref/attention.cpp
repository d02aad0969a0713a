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

}  // namespace tf::ref
