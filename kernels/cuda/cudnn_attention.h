// defines: cuDNN's fused attention as a baseline of the CUDA backend (--attention cudnn), built by
// nvcc only: tf::cuda::cudnn_attention_available and cudnn_attention_forward / _backward, with the
// contracts of attention_forward / attention_backward (kernels/op_signatures.inc). The inputs are
// rounded to bf16 for cuDNN's flash attention graph; the build has it when cuDNN was found
// (TIGHTFIT_HAVE_CUDNN), and says so otherwise.
#pragma once

#include <cstdint>
#include <string>

#include "kernels/ops.h"

namespace tf::cuda {

// Whether cuDNN's fused attention can run here: false, with the reason in *why, in a build without
// cuDNN, when the cuDNN library cannot be loaded or is older than the graph needs, or when the
// current device cannot run it (cuDNN's fused flash attention needs sm_80 or newer).
bool cudnn_attention_available(std::string* why);

// Builds the operation graph of the forward (backward false) or the backward for shape s and
// finalizes it without a device, so that every tensor and operation and the graph pass cuDNN's
// checks where no GPU is (the tests do this); *operations receives its size. With device_json, cuDNN's
// JSON description of a device (what a GPU's CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION serializes
// to), it returns how many engine configurations cuDNN's heuristics propose for the graph on that
// device, which need not be present (0 when no engine takes the graph's pattern); -1 without.
// Throws tf::Error naming the descriptor cuDNN refused, or saying the build has no cuDNN.
int64_t cudnn_attention_offline_engines(const AttentionShape& s, bool backward,
                                        const std::string& device_json, int* operations);

// attention_forward's contract: q, k, v [n_tokens, heads, head_dim] f32 in device memory, rounded
// to bf16; out f32, lse [n_tokens, n_heads] the natural-log log-sum-exp of the scaled scores.
// doc_ids must be null: cuDNN's graph has no per-token document mask, and packed documents are
// refused with a tf::Error saying so.
void cudnn_attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                             const int32_t* doc_ids, const AttentionShape& s);
// attention_backward's contract: dq, dk, dv += the gradients, from the saved out and lse.
void cudnn_attention_backward(float* dq, float* dk, float* dv, const float* d_out, const float* q,
                              const float* k, const float* v, const float* out, const float* lse,
                              const int32_t* doc_ids, const AttentionShape& s);

}  // namespace tf::cuda
