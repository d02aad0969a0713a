#include "src/data/sampler.h"

#include <numeric>

#include "src/core/error.h"
#include "src/core/rng.h"

namespace tf::data {
namespace {

// Philox stream ids are (purpose << 48 | detail); this purpose is the data order.
constexpr uint64_t kDataOrderStream = uint64_t(0xDA7A) << 48;

}  // namespace

Sampler::Sampler(size_t size, uint64_t seed, bool shuffle, uint64_t epochs)
    : size_(size), seed_(seed), shuffle_(shuffle), epochs_(epochs) {
  TF_CHECK(size > 0, "the sampler needs at least one example");
  TF_CHECK(size <= UINT32_MAX, "the sampler holds at most 2^32-1 examples, not ", size);
}

std::vector<uint32_t> Sampler::epoch_order(uint64_t epoch) const {
  std::vector<uint32_t> order(size_);
  std::iota(order.begin(), order.end(), 0u);
  if (!shuffle_) return order;
  TF_CHECK(epoch < (uint64_t(1) << 48), "epoch ", epoch, " is past the sampler's range");
  const Philox rng(seed_, kDataOrderStream | epoch);
  for (size_t i = size_ - 1; i > 0; --i) {
    // 64 random bits reduced modulo i+1: the bias, below (i+1) / 2^64, is far under anything
    // measurable, and the draw count per step stays fixed (no rejection loop).
    const uint64_t r = (uint64_t(rng.u32(2 * i)) << 32) | rng.u32(2 * i + 1);
    std::swap(order[i], order[r % (i + 1)]);
  }
  return order;
}

size_t Sampler::peek() {
  TF_CHECK(!done(), "the sampler is past its last epoch (", epochs_, ")");
  if (order_epoch_ != cur_.epoch) {
    order_ = epoch_order(cur_.epoch);
    order_epoch_ = cur_.epoch;
  }
  return order_[cur_.index];
}

void Sampler::advance() {
  if (++cur_.index == size_) {
    cur_.index = 0;
    ++cur_.epoch;
  }
}

void Sampler::restore(const SamplerCursor& c) {
  TF_CHECK(c.index < size_, "data cursor (epoch ", c.epoch, ", index ", c.index,
           ") does not fit a dataset of ", size_, " examples: was the dataset or seq_len changed?");
  cur_ = c;
}

}  // namespace tf::data
