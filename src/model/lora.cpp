// defines: LoraState (the adapters' layout in flat buffers, PEFT-style init, host copies), LoRA dropout,
// lora_forward / lora_output / lora_backward
#include "src/model/lora.h"

#include <cmath>
#include <utility>
#include <vector>

#include "kernels/ops.h"
#include "src/core/error.h"
#include "src/core/rng.h"

namespace tf {

std::pair<int, int> lora_target_dims(const LlamaConfig& c, LoraTarget t) {
  switch (t) {
    case LoraTarget::Q: return {c.hidden, c.q_dim()};
    case LoraTarget::K:
    case LoraTarget::V: return {c.hidden, c.kv_dim()};
    case LoraTarget::O: return {c.q_dim(), c.hidden};
    case LoraTarget::Gate:
    case LoraTarget::Up: return {c.hidden, c.intermediate};
    case LoraTarget::Down: return {c.intermediate, c.hidden};
    case LoraTarget::Count: break;
  }
  return {0, 0};
}

// Philox streams are keyed by purpose so that LoRA init, dropout and data order never collide.
constexpr uint64_t kStreamLoraInit = 1ull << 56;
constexpr uint64_t kStreamDropout = 2ull << 56;

std::pair<int, int> lora_module_dims(const LlamaConfig& model, const LoraModule& m) {
  int out = 0;
  for (int i = 0; i < m.count; ++i) out += lora_target_dims(model, LoraTarget(int(m.first) + i)).second;
  return {lora_target_dims(model, m.first).first, out};
}

std::array<PlannedAlloc, 4> LoraState::memory_plan(const LlamaConfig& model, const LoraConfig& cfg) {
  check_lora_targets(model, cfg.targets);
  int64_t n = 0;
  for (int l = 0; l < model.n_layers; ++l) {
    for (const LoraModule& m : lora_modules(model)) {
      if (!cfg.has(m.first)) continue;
      const auto [in, out] = lora_module_dims(model, m);
      n += int64_t(cfg.rank) * (in + out);
    }
  }
  const size_t bytes = size_t(n) * sizeof(float);
  return {PlannedAlloc{"LoRA parameters", MemTag::Lora, bytes},
          PlannedAlloc{"LoRA gradients", MemTag::Grads, bytes},
          PlannedAlloc{"AdamW first moments", MemTag::Optimizer, bytes},
          PlannedAlloc{"AdamW second moments", MemTag::Optimizer, bytes}};
}

LoraState::LoraState(const LlamaConfig& model_cfg, const LoraConfig& cfg, Backend& backend, Uninitialised)
    : config(cfg), model(model_cfg), backend_(&backend) {
  TF_CHECK(cfg.rank > 0 && cfg.rank <= 4096, "LoRA rank must be in [1, 4096], got ", cfg.rank);
  TF_CHECK(cfg.alpha > 0 && std::isfinite(cfg.alpha), "LoRA alpha must be positive, got ", cfg.alpha);
  TF_CHECK(cfg.dropout >= 0 && cfg.dropout < 1, "LoRA dropout must be in [0, 1), got ", cfg.dropout);
  TF_CHECK(cfg.targets != 0, "LoRA needs at least one target projection");
  const std::array<PlannedAlloc, 4> plan = memory_plan(model, cfg);
  n_params = int64_t(plan[0].bytes / sizeof(float));
  DeviceMem* const bufs[4] = {&params, &grads, &adam_m, &adam_v};
  for (size_t i = 0; i < plan.size(); ++i) *bufs[i] = backend.alloc(plan[i].bytes, plan[i].tag, plan[i].what);
  layers.resize(size_t(model.n_layers));
  int64_t offset = 0;
  for (int l = 0; l < model.n_layers; ++l) {
    for (const LoraModule& m : lora_modules(model)) {
      if (!cfg.has(m.first)) continue;
      const int64_t a_offset = offset;
      offset += int64_t(cfg.rank) * lora_target_dims(model, m.first).first;
      for (int i = 0; i < m.count; ++i) {
        const auto t = LoraTarget(int(m.first) + i);
        const auto [in, out] = lora_target_dims(model, t);
        LoraAdapter& a = layers[size_t(l)][size_t(t)];
        a.in = in;
        a.out = out;
        a.rank = cfg.rank;
        a.first = m.first;
        a.A = param_data() + a_offset;
        a.dA = grad_data() + a_offset;
        a.B = param_data() + offset;
        a.dB = grad_data() + offset;
        offset += int64_t(cfg.rank) * out;
      }
    }
  }
}

LoraAdapter LoraState::module(int layer, const LoraModule& m) const {
  LoraAdapter a = at(layer, m.first);
  if (a.active()) a.out = lora_module_dims(model, m).second;
  return a;
}

LoraState::LoraState(const LlamaConfig& model_cfg, const LoraConfig& cfg, Backend& backend)
    : LoraState(model_cfg, cfg, backend, Uninitialised{}) {
  for (DeviceMem* m : {&params, &grads, &adam_m, &adam_v}) backend.fill(m->as<float>(), 0.0f, n_params);
  // A is drawn on the host (Philox is a host function of the index) and uploaded.
  std::vector<float> host_a;
  for (int l = 0; l < model.n_layers; ++l) {
    for (int t = 0; t < kLoraTargetCount; ++t) {
      const LoraAdapter& a = at(l, LoraTarget(t));
      if (!a.active() || a.first != LoraTarget(t)) continue;
      const float bound = 1.0f / std::sqrt(float(a.in));
      const Philox rng(cfg.seed, kStreamLoraInit | (uint64_t(l) << 8) | uint64_t(t));
      host_a.resize(size_t(a.rank) * size_t(a.in));
      for (size_t i = 0; i < host_a.size(); ++i) host_a[i] = (2.0f * rng.uniform(uint64_t(i)) - 1.0f) * bound;
      backend.upload_n(a.A, host_a.data(), host_a.size());
    }
  }
  backend.synchronize();
}

void LoraState::zero_grads() {
  backend_->fill(grad_data(), 0.0f, n_params);
}

LoraState LoraState::host_copy() const {
  LoraState host(model, config, cpu_backend(), Uninitialised{});
  cpu_backend().fill(host.grad_data(), 0.0f, n_params);
  host.copy_from(*this);
  return host;
}

// A copy between two backends goes through the host once: straight into or out of whichever side's
// memory is host memory, else through a staging buffer.
void LoraState::copy_from(const LoraState& other) {
  if (&other == this) return;
  TF_CHECK(other.n_params == n_params && other.layers.size() == layers.size() &&
               other.config.rank == config.rank && other.config.targets == config.targets,
           "LoRA states of different layouts: ", other.n_params, " and ", n_params, " parameters");
  std::vector<float> staging;
  const std::pair<const DeviceMem*, DeviceMem*> parts[3] = {
      {&other.params, &params}, {&other.adam_m, &adam_m}, {&other.adam_v, &adam_v}};
  for (const auto& [src, dst] : parts) {
    if (backend_->host_memory()) {
      other.backend().download(dst->data(), src->data(), src->bytes());
      continue;
    }
    const void* from = src->data();
    if (!other.backend().host_memory()) {
      staging.resize(size_t(n_params));
      other.backend().download(staging.data(), src->data(), src->bytes());
      from = staging.data();
    }
    backend_->upload(dst->data(), from, dst->bytes());
    backend_->synchronize();
  }
}

uint64_t LoraDropout::stream_id() const {
  return kStreamDropout | (step << 16) | (uint64_t(layer) << 3) | uint64_t(target);
}

void LoraDropout::apply(Backend& be, float* out, const float* x, int64_t n, int in) const {
  be.dropout_forward(out, x, n * in, p, seed, stream_id(), uint64_t(row0) * uint64_t(in));
}

void LoraDropout::apply_backward(Backend& be, float* dx, float* g, const float* x, int64_t n, int in) const {
  be.dropout_backward(dx, g, x, n * in, p, seed, stream_id(), uint64_t(row0) * uint64_t(in));
}

static MatOperand f32_operand(const float* data, int64_t ld, bool trans = false) {
  return MatOperand{data, DType::F32, ld, trans};
}

void lora_intermediate(Backend& be, float* t, float* xd, const float* x, const LoraAdapter& a,
                       const LoraDropout& drop, int64_t n) {
  const float* input = x;
  if (drop.p > 0) {
    drop.apply(be, xd, x, n, a.in);
    input = xd;
  }
  be.matmul(t, a.rank, f32_operand(input, a.in), f32_operand(a.A, a.in, true), n, a.rank, a.in, 1.0f, 0.0f);
}

void lora_forward(Backend& be, float* y, float* t, float* xd, const float* x, const LoraAdapter& a,
                  float scale, const LoraDropout& drop, int64_t n) {
  lora_intermediate(be, t, xd, x, a, drop, n);
  lora_output(be, y, t, a, scale, n);
}

void lora_output(Backend& be, float* y, const float* t, const LoraAdapter& a, float scale, int64_t n) {
  be.matmul(y, a.out, f32_operand(t, a.rank), f32_operand(a.B, a.rank, true), n, a.out, a.rank, scale, 1.0f);
}

void lora_backward(Backend& be, float* dx, const float* dy, const float* x, const float* t, LoraAdapter& a,
                   float scale, const LoraDropout& drop, int64_t n, float* dt, float* xd) {
  // dB[out, r] += scale * dy^T t
  be.matmul(a.dB, a.rank, f32_operand(dy, a.out, true), f32_operand(t, a.rank), a.out, a.rank, n, scale,
            1.0f);
  // dt[n, r] = scale * dy B
  be.matmul(dt, a.rank, f32_operand(dy, a.out), f32_operand(a.B, a.rank), n, a.rank, a.out, scale, 0.0f);
  if (drop.p == 0) {
    // dA[r, in] += dt^T x; dx += dt A
    be.matmul(a.dA, a.in, f32_operand(dt, a.rank, true), f32_operand(x, a.in), a.rank, a.in, n, 1.0f, 1.0f);
    be.matmul(dx, a.in, f32_operand(dt, a.rank), f32_operand(a.A, a.in), n, a.in, a.rank, 1.0f, 1.0f);
    return;
  }
  // dropout is x * mask / (1-p), so its Jacobian applies the same mask and scale to the incoming
  // gradient dt A. That product goes into xd, and one regeneration of the mask adds it, masked, to
  // dx and leaves dropout(x) in xd for dA[r, in] += dt^T dropout(x).
  be.matmul(xd, a.in, f32_operand(dt, a.rank), f32_operand(a.A, a.in), n, a.in, a.rank, 1.0f, 0.0f);
  drop.apply_backward(be, dx, xd, x, n, a.in);
  be.matmul(a.dA, a.in, f32_operand(dt, a.rank, true), f32_operand(xd, a.in), a.rank, a.in, n, 1.0f, 1.0f);
}

}  // namespace tf
