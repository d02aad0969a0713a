// defines: tf::global_grad_norm, tf::Trainer (one optimizer step: accumulation, the sum over
// data-parallel ranks, skip policy, clipping, AdamW)
#include "src/train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "src/core/error.h"

namespace tf {

// The norm decides clipping and so the update: sum_squares is the same for any thread count.
double global_grad_norm(Backend& be, const float* g, int64_t n) {
  return std::sqrt(be.sum_squares(g, n));
}

Trainer::Trainer(LlamaModel& model, const TrainConfig& cfg, dist::Communicator* comm,
                 dist::DeviceSum* device_sum)
    : model_(model),
      cfg_(cfg),
      own_comm_(comm ? nullptr : dist::single_process()),
      comm_(comm ? comm : own_comm_.get()),
      device_sum_(device_sum) {
  TF_CHECK(cfg.lr.peak_lr > 0 && std::isfinite(cfg.lr.peak_lr), "learning rate must be positive, got ",
           cfg.lr.peak_lr);
  TF_CHECK(cfg.lr.total_steps > 0, "the number of training steps must be positive, got ", cfg.lr.total_steps);
  TF_CHECK(cfg.lr.warmup_steps >= 0, "warmup steps must not be negative, got ", cfg.lr.warmup_steps);
  TF_CHECK(cfg.weight_decay >= 0, "weight decay must not be negative, got ", cfg.weight_decay);
  TF_CHECK(cfg.max_consecutive_skips > 0, "the consecutive-skip limit must be positive");
}

StepStats Trainer::step(std::span<const Batch> micro_batches) {
  TF_CHECK(!micro_batches.empty(), "an optimizer step needs at least one micro-batch");
  StepStats st;
  st.step = state_.step;
  for (const Batch& b : micro_batches) {
    st.tokens += b.n_tokens();
    for (int64_t i = 0; i < b.n_tokens(); ++i) st.target_tokens += b.targets[i] != kIgnoreIndex;
  }
  st.rank_tokens = st.tokens;
  // The loss normaliser is the whole global batch's target count, so that each rank's gradient is
  // its share of the one big batch's mean and the ranks' sum is that mean's gradient.
  int64_t counts[2] = {st.tokens, st.target_tokens};
  comm_->all_reduce_sum(std::span(counts));
  st.tokens = counts[0];
  st.target_tokens = counts[1];
  TF_CHECK(st.target_tokens > 0, "step ", st.step, ": no token of the batch has a training target ",
           "(every position is masked); check the loss mask and sequence length");

  LoraState& lora = model_.lora();
  lora.zero_grads();
  const float grad_scale = 1.0f / float(st.target_tokens);
  double loss_sum = 0;
  const bool overlap = overlapping();
  for (size_t i = 0; i < micro_batches.size(); ++i) {
    // On the last micro-batch a block's gradients are final once its backward is done.
    const bool last = i + 1 == micro_batches.size();
    LlamaModel::BlockGradsDone done;
    if (overlap && last)
      done = [&](int l) {
        const auto [begin, end] = block_grads(l);
        if (end <= begin) return;
        if (device_sum_)
          device_sum_->start_sum(lora.grad_data() + begin, end - begin);
        else
          comm_->start_sum(std::span(lora.grad_data() + begin, size_t(end - begin)));
      };
    loss_sum += model_.forward_backward(micro_batches[i], grad_scale, uint64_t(state_.step), done).sum;
  }
  if (overlap) {
    const auto t0 = std::chrono::steady_clock::now();
    st.sum_work_seconds = device_sum_ ? device_sum_->finish_sums() : comm_->finish_sums();
    st.reduce_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    st.overlapped = true;
  }
  comm_->all_reduce_sum(std::span(&loss_sum, 1));
  if (!overlap) reduce_gradients(st);
  st.loss = loss_sum / double(st.target_tokens);
  st.lr = learning_rate(cfg_.lr, state_.step);
  const double norm = global_grad_norm(lora.backend(), lora.grad_data(), lora.n_params);
  st.grad_norm = float(norm);

  ++state_.step;
  if (!std::isfinite(st.loss) || !std::isfinite(norm)) {
    st.skipped = true;
    ++state_.skipped_total;
    ++state_.consecutive_skips;
    st.skipped_total = state_.skipped_total;
    TF_CHECK(state_.consecutive_skips < cfg_.max_consecutive_skips, "aborting at step ", st.step, ": ",
             state_.consecutive_skips, " consecutive steps had a non-finite loss or gradient (last loss ",
             st.loss, ", gradient norm ", norm, "); lower the learning rate or check the data");
    return st;
  }
  state_.consecutive_skips = 0;
  st.skipped_total = state_.skipped_total;

  if (cfg_.clip > 0 && norm > cfg_.clip) {
    // As torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6).
    lora.backend().scale_inplace(lora.grad_data(), float(cfg_.clip / (norm + 1e-6)), lora.n_params);
  }
  ++state_.adam_steps;
  AdamWParams p;
  p.lr = st.lr;
  p.beta1 = cfg_.beta1;
  p.beta2 = cfg_.beta2;
  p.eps = cfg_.adam_eps;
  p.weight_decay = cfg_.weight_decay;
  p.step = state_.adam_steps;
  lora.backend().adamw_update(lora.param_data(), lora.grad_data(), lora.adam_m.as<float>(),
                              lora.adam_v.as<float>(), lora.n_params, p);
  return st;
}

bool Trainer::overlapping() const {
  if (!cfg_.overlap_grad_sum || comm_->size() == 1) return false;
  // A device's sum runs on the device beside the backward; a host copy of its gradients would
  // wait for the whole backward.
  return device_sum_ || (comm_->overlap() && model_.lora().backend().host_memory());
}

std::pair<int64_t, int64_t> Trainer::block_grads(int layer) const {
  const LoraState& lora = model_.lora();
  const auto begin_of = [&](int l) {
    int64_t b = lora.n_params;
    for (const LoraAdapter& a : lora.layers[size_t(l)])
      if (a.active())
        b = std::min({b, int64_t(a.dA - lora.grads.as<float>()), int64_t(a.dB - lora.grads.as<float>())});
    return b;
  };
  const int64_t begin = begin_of(layer);
  int64_t end = lora.n_params;
  for (int l = layer + 1; l < int(lora.layers.size()) && end == lora.n_params; ++l) end = begin_of(l);
  return {std::min(begin, end), end};
}

void Trainer::reduce_gradients(StepStats& st) {
  if (comm_->size() == 1) return;
  using Clock = std::chrono::steady_clock;
  LoraState& lora = model_.lora();
  Backend& be = lora.backend();
  const size_t n = size_t(lora.n_params);
  // A device's backward may still be running: it is this rank's work, not the wait for the others.
  if (!be.host_memory()) be.synchronize();
  // The barrier separates the wait for the slowest rank from the cost of the sum.
  const auto t0 = Clock::now();
  comm_->barrier();
  const auto t1 = Clock::now();
  if (be.host_memory()) {
    comm_->all_reduce_sum(std::span(lora.grad_data(), n));
  } else if (device_sum_) {
    device_sum_->all_reduce_sum(lora.grad_data(), lora.n_params);
  } else {
    host_grads_.resize(n);
    be.download(host_grads_.data(), lora.grad_data(), n * sizeof(float));
    comm_->all_reduce_sum(std::span(host_grads_));
    be.upload(lora.grad_data(), host_grads_.data(), n * sizeof(float));
  }
  st.wait_seconds = std::chrono::duration<double>(t1 - t0).count();
  st.reduce_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
}

}  // namespace tf
