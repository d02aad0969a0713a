// defines: tf::data::Sampler (deterministic, resumable order of examples over epochs),
// tf::data::SamplerCursor
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace tf::data {

// Where a sampler stands: the next example is position `index` of epoch `epoch`'s order. Saving it
// and restoring it into a sampler built with the same size, seed and shuffle flag continues the
// exact same sequence.
struct SamplerCursor {
  uint64_t epoch = 0;
  uint64_t index = 0;
  bool operator==(const SamplerCursor&) const = default;
};

// The order of example indices: each epoch a Fisher-Yates shuffle drawn from Philox keyed by
// (seed, epoch), so an epoch's order is a pure function of those two and of the dataset size, and
// a resumed run needs only the cursor. `epochs` == 0: no end.
class Sampler {
 public:
  Sampler(size_t size, uint64_t seed, bool shuffle = true, uint64_t epochs = 0);

  bool done() const { return epochs_ != 0 && cur_.epoch >= epochs_; }
  // The example at the cursor (the sampler must not be done).
  size_t peek();
  void advance();

  SamplerCursor cursor() const { return cur_; }
  // Refuses a cursor that cannot belong to this sampler (index past the dataset's end).
  void restore(const SamplerCursor& c);
  size_t size() const { return size_; }

  // The whole order of one epoch (for tests and inspection).
  std::vector<uint32_t> epoch_order(uint64_t epoch) const;

 private:
  size_t size_;
  uint64_t seed_;
  bool shuffle_;
  uint64_t epochs_;
  SamplerCursor cur_;
  std::vector<uint32_t> order_;
  uint64_t order_epoch_ = UINT64_MAX;  // the epoch order_ holds
};

}  // namespace tf::data
