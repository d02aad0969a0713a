// defines: tf::LoraAdapter (one A/B pair), tf::LoraState (all adapters in flat f32 buffers),
// lora_forward / lora_backward (the low-rank branch added to a frozen projection)
#pragma once

#include <array>
#include <vector>

#include "kernels/backend.h"
#include "src/model/config.h"

namespace tf {

// One adapted projection y = x W^T + scale * dropout(x) A^T B^T. A is [rank, in], B is [out, rank]
// (PEFT's lora_A / lora_B layout). Pointers index into LoraState's flat buffers, in the memory of
// its backend. The projections of a fused module (LoraModule) share the module's A and dA, and
// their B and dB are consecutive row ranges of the module's.
struct LoraAdapter {
  float* A = nullptr;
  float* B = nullptr;
  float* dA = nullptr;
  float* dB = nullptr;
  int in = 0;
  int out = 0;
  int rank = 0;
  // The first projection of this one's module: its adapter forms the module's dropout(x) A^T, which
  // the module's other projections read (and its dropout mask is the module's).
  LoraTarget first = LoraTarget::Q;
  bool active() const { return A != nullptr; }
};

// All LoRA parameters, their gradients and AdamW moments, each one contiguous buffer in the memory
// of a backend, so the optimizer and gradient clipping see a single flat vector.
struct LoraState {
  LoraConfig config;
  LlamaConfig model;
  int64_t n_params = 0;
  DeviceMem params, grads, adam_m, adam_v;
  std::vector<std::array<LoraAdapter, kLoraTargetCount>> layers;

  LoraState() = default;
  // Lays out adapters for every targeted projection of every layer in `backend`'s memory; A is
  // initialised like PEFT (kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))) from
  // Philox keyed by (config.seed, layer, target); B, the gradients and the moments are zero.
  LoraState(const LlamaConfig& model, const LoraConfig& config, Backend& backend = cpu_backend());
  // The four buffers the constructor allocates (parameters, gradients, both moments), in order.
  static std::array<PlannedAlloc, 4> memory_plan(const LlamaConfig& model, const LoraConfig& config);
  LoraAdapter& at(int layer, LoraTarget t) { return layers[size_t(layer)][size_t(t)]; }
  const LoraAdapter& at(int layer, LoraTarget t) const { return layers[size_t(layer)][size_t(t)]; }
  // The adapter of a whole module (the first projection's A, its B over all of the module's rows),
  // as exports and checkpoints store it; inactive when the module is not targeted.
  LoraAdapter module(int layer, const LoraModule& m) const;
  float* param_data() { return params.as<float>(); }
  float* grad_data() { return grads.as<float>(); }
  Backend& backend() const { return *backend_; }
  void zero_grads();
  // A copy in host memory (the cpu backend) of the parameters and moments, for checkpoints and
  // exports; gradients are not copied.
  LoraState host_copy() const;
  // Takes the parameters and moments of `other`, a state of the same layout on any backend (itself
  // included, which changes nothing).
  void copy_from(const LoraState& other);

 private:
  struct Uninitialised {};
  // Allocates and lays out the buffers; their contents are left to the caller.
  LoraState(const LlamaConfig& model, const LoraConfig& config, Backend& backend, Uninitialised);

  Backend* backend_ = &cpu_backend();
};

// Input and output sizes of a projection.
std::pair<int, int> lora_target_dims(const LlamaConfig& cfg, LoraTarget t);
// A module's input size and its projections' output sizes summed (its B's rows).
std::pair<int, int> lora_module_dims(const LlamaConfig& cfg, const LoraModule& m);

// Dropout on the LoRA input: element i of the [n_tokens, in] input is kept with probability 1-p and
// scaled by 1/(1-p). The mask is a pure function of (seed, step, layer, target, i), so backward and
// recomputation regenerate it instead of storing it.
struct LoraDropout {
  float p = 0.0f;
  uint64_t seed = 0;
  uint64_t step = 0;
  int layer = 0;
  LoraTarget target = LoraTarget::Q;
  // The row of the micro-batch's input that x's first row is: a chunk of rows draws its rows' part
  // of the whole input's mask.
  int64_t row0 = 0;
  // Writes dropout(x) into out ([n, in]) on `be`: element i is dropped when
  // Philox(seed, stream_id()).uniform(row0 * in + i) < p.
  void apply(Backend& be, float* out, const float* x, int64_t n, int in) const;
  // Its backward from the same mask (dropout_backward): dx += dropout(g), then g = dropout(x).
  void apply_backward(Backend& be, float* dx, float* g, const float* x, int64_t n, int in) const;
  // The Philox stream of this (step, layer, target) under the seed.
  uint64_t stream_id() const;
};

// t[n, rank] = dropout(x) A^T on `be`: lora_forward's intermediate alone.
void lora_intermediate(Backend& be, float* t, float* xd, const float* x, const LoraAdapter& a,
                       const LoraDropout& drop, int64_t n);
// y[n, out] += scale * dropout(x) A^T B^T on `be`. `t` ([n, rank]) receives dropout(x) A^T, kept
// for backward; `xd` is scratch of [n, in] used only when dropout is on.
void lora_forward(Backend& be, float* y, float* t, float* xd, const float* x, const LoraAdapter& a,
                  float scale, const LoraDropout& drop, int64_t n);
// y[n, out] += scale * t B^T from the intermediate t [n, rank]: lora_forward's second half, which
// the later projections of a fused module run on the intermediate the first one formed.
void lora_output(Backend& be, float* y, const float* t, const LoraAdapter& a, float scale, int64_t n);
// Given dy [n, out]: dB += scale dy^T t; dA += (scale dy B)^T dropout(x); dx += dropout'(scale dy B A).
// `dt` ([n, rank]) and `xd` ([n, in]) are scratch.
void lora_backward(Backend& be, float* dx, const float* dy, const float* x, const float* t, LoraAdapter& a,
                   float scale, const LoraDropout& drop, int64_t n, float* dt, float* xd);

}  // namespace tf
