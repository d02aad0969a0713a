// defines: tf::offload::ActivationStore (kernels/backend.h's streams and events order its copies)
#include "offload/activation_store.h"

#include <utility>

#include "src/core/error.h"

namespace tf::offload {

size_t ActivationStore::host_bytes(int n_layers, int64_t max_tokens, int64_t hidden) {
  return size_t(n_layers) * size_t(max_tokens) * size_t(hidden) * sizeof(float);
}

void ActivationStore::check_backend(const Backend& be) {
  TF_CHECK(!be.host_memory(), "--checkpointing offload keeps the saved block inputs in host memory and ",
           "copies them to and from the device, but the ", be.name(),
           " backend's memory is host memory already: use --checkpointing block");
}

ActivationStore::ActivationStore(Backend& be, int n_layers, int64_t max_tokens, int64_t hidden,
                                 const std::array<float*, kWindow>& window)
    : be_(be), n_layers_(n_layers), max_tokens_(max_tokens), hidden_(hidden), saved_(size_t(n_layers), 0) {
  check_backend(be);
  host_ = be.alloc_host(host_bytes(n_layers, max_tokens, hidden), MemTag::Activations, "saved block inputs");
  for (size_t i = 0; i < slots_.size(); ++i) slots_[i].device = window[i];
}

ActivationStore::~ActivationStore() {
  // Copies out of or into the window may still be in flight on the Copy stream.
  be_.synchronize();
}

float* ActivationStore::host_input(int r) {
  return host_.as<float>() + size_t(r) * size_t(max_tokens_) * size_t(hidden_);
}

ActivationStore::Slot* ActivationStore::find(int r) {
  for (Slot& s : slots_)
    if (s.held == r) return &s;
  return nullptr;
}

ActivationStore::Slot& ActivationStore::take(int r) {
  Slot* best = nullptr;
  for (Slot& s : slots_)
    if (!s.pinned && (!best || s.last_use < best->last_use)) best = &s;
  TF_CHECK(best, "activation store: no buffer of the window is free for block input ", r);
  best->held = r;
  best->pinned = true;
  return *best;
}

void ActivationStore::copy_in(int r, Slot& s) {
  TF_CHECK(r >= 0 && r < n_layers_ && saved_[size_t(r)] > 0, "activation store: block input ", r,
           " is neither in the window nor saved in host memory");
  // The copy overwrites the buffer only after the compute that used it last, and after any copy
  // out of it (the same stream).
  if (s.used) be_.wait(Stream::Copy, *std::exchange(s.used, std::nullopt));
  if (s.copied) be_.wait(Stream::Copy, *std::exchange(s.copied, std::nullopt));
  const size_t n = size_t(saved_[size_t(r)] * hidden_);
  be_.upload(s.device, host_input(r), n * sizeof(float), Stream::Copy);
  s.copied = be_.record(Stream::Copy);
  s.incoming = true;
}

const float* ActivationStore::acquire(int r, int next) {
  TF_CHECK(r >= 0 && r <= n_layers_ && next < n_layers_, "activation store: block input ", r, " then ", next,
           " of a model of ", n_layers_, " blocks");
  Slot* s = find(r);
  if (!s) {
    s = &take(r);
    copy_in(r, *s);
  }
  s->pinned = s->touched = true;
  if (s->incoming) {
    be_.wait(Stream::Compute, *std::exchange(s->copied, std::nullopt));
    s->incoming = false;
  }
  if (next >= 0 && next != r) {
    if (Slot* n = find(next))
      n->pinned = true;
    else
      copy_in(next, take(next));
  }
  return s->device;
}

float* ActivationStore::output(int r) {
  Slot* s = find(r);
  TF_CHECK(!s || !s->pinned, "activation store: block input ", r, " is written while it is in use");
  if (!s) s = &take(r);
  s->pinned = s->touched = true;
  s->incoming = false;
  // Nothing may overwrite a buffer that a copy out still reads or a copy in still writes.
  if (s->copied) be_.wait(Stream::Compute, *std::exchange(s->copied, std::nullopt));
  return s->device;
}

void ActivationStore::written(int r, int64_t rows, bool save) {
  Slot* s = find(r);
  TF_CHECK(s && s->touched, "activation store: block input ", r, " was written outside its buffer");
  if (!save) return;
  TF_CHECK(r < n_layers_, "activation store: block input ", r, " of ", n_layers_, " blocks is never saved");
  be_.wait(Stream::Copy, be_.record(Stream::Compute));
  be_.download_async(host_input(r), s->device, size_t(rows * hidden_) * sizeof(float), Stream::Copy);
  saved_[size_t(r)] = rows;
  s->copied = be_.record(Stream::Copy);
}

void ActivationStore::release() {
  ++releases_;
  for (Slot& s : slots_) {
    if (s.touched) {
      // A newer point of the compute stream supersedes one no copy has waited for yet.
      if (s.used) be_.wait(Stream::Copy, *s.used);
      s.used = be_.record(Stream::Compute);
      s.last_use = releases_;
    }
    s.pinned = s.touched = false;
  }
}

}  // namespace tf::offload
