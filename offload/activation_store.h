// defines: tf::offload::ActivationStore (a model's saved block inputs kept in host memory behind a
// small window of device buffers: each copied out on the Copy stream once written, and brought back
// one block ahead of the backward that reads it)
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include "kernels/backend.h"

namespace tf::offload {

// The residual stream of a model with n_layers blocks: block input r (0..n_layers, the last one the
// final norm's input) of [rows, hidden] f32, held in one of kWindow device buffers the caller carves
// (LlamaModel's saved activations) and, for r < n_layers, saved in host memory when training.
// Buffers are handed out least recently used first, so a buffer is rewritten two blocks after its
// copy out was queued, and the copy of the next block input in overlaps a whole block's backward.
// Events order both directions: a copy out waits for the compute that wrote its buffer; a copy in
// waits for the last compute that used its buffer; the compute that reads a copied-in buffer, or
// writes any buffer a copy still touches, waits for that copy.
class ActivationStore {
 public:
  // The input being read, the output being written, and the one being copied out or in.
  static constexpr int kWindow = 3;
  // Bytes of host memory the saved inputs take.
  static size_t host_bytes(int n_layers, int64_t max_tokens, int64_t hidden);

  // Throws, naming --checkpointing block, when `be`'s memory is host memory (nothing to offload to).
  static void check_backend(const Backend& be);

  // `window`: kWindow device buffers of [max_tokens, hidden] f32 in `be`'s memory; check_backend.
  ActivationStore(Backend& be, int n_layers, int64_t max_tokens, int64_t hidden,
                  const std::array<float*, kWindow>& window);
  ~ActivationStore();
  ActivationStore(const ActivationStore&) = delete;
  ActivationStore& operator=(const ActivationStore&) = delete;

  // Block input r, ready for the compute queued from now on: in the window, or copied back from
  // host memory now. `next` (-1: none) is the input used after it, which starts coming back into
  // another buffer. Valid until release().
  const float* acquire(int r, int next);
  // A buffer for block input r to be written into by the compute queued from now on. Valid until
  // release().
  float* output(int r);
  // The compute queued so far has written `rows` rows of r into its buffer; `save` queues its copy
  // to host memory (r < n_layers), for a later acquire to bring back.
  void written(int r, int64_t rows, bool save);
  // Every op using the buffers acquired or output since the last release has been queued.
  void release();

 private:
  struct Slot {
    float* device = nullptr;
    int held = -1;          // the block input the buffer holds, or -1
    uint64_t last_use = 0;  // release count of its last use, for least recently used
    bool pinned = false, touched = false, incoming = false;
    std::optional<Event> copied, used;
  };
  Slot* find(int r);
  Slot& take(int r);  // the least recently used unpinned buffer, now said to hold r
  void copy_in(int r, Slot& s);
  float* host_input(int r);

  Backend& be_;
  int n_layers_;
  int64_t max_tokens_, hidden_;
  HostMem host_;                // [n_layers][max_tokens][hidden], page-locked
  std::vector<int64_t> saved_;  // rows of each input saved in host memory (0: none)
  std::array<Slot, kWindow> slots_;
  uint64_t releases_ = 0;
};

}  // namespace tf::offload
