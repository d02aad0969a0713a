// defines: tf::philox4x32 (counter-based RNG), tf::Philox (keyed stream), uniform/normal helpers
#pragma once

#include <array>
#include <cmath>
#include <cstdint>

#include "src/core/host_device.h"

namespace tf {

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11). A pure
// function of (counter, key): any element of any stream can be drawn in any order, so a resumed
// run, a re-computed block and a CPU/GPU pair all draw the same numbers.
// The rounds on plain words, which CUDA kernels can call (std::array's members are host-only
// there): c holds the counter on entry and the block on return.
TF_HOST_DEVICE inline void philox4x32_words(uint32_t (&c)[4], uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(kM0) * c[0];
    const uint64_t p1 = uint64_t(kM1) * c[2];
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c[1] ^ k0, n2 = uint32_t(p0 >> 32) ^ c[3] ^ k1;
    c[1] = uint32_t(p1);
    c[3] = uint32_t(p0);
    c[0] = n0;
    c[2] = n2;
    k0 += kW0;
    k1 += kW1;
  }
}

inline std::array<uint32_t, 4> philox4x32(std::array<uint32_t, 4> ctr, std::array<uint32_t, 2> key) {
  uint32_t c[4] = {ctr[0], ctr[1], ctr[2], ctr[3]};
  philox4x32_words(c, key[0], key[1]);
  return {c[0], c[1], c[2], c[3]};
}

// Uniform in [0, 1) with 24 random bits, exactly representable in f32.
TF_HOST_DEVICE inline float uint_to_unit_float(uint32_t x) {
  return float(x >> 8) * (1.0f / 16777216.0f);
}

// A stream of numbers identified by (seed, stream); element i of the stream is a pure function of
// (seed, stream, i). Streams are e.g. (purpose, step, layer) packed by the caller.
class Philox {
 public:
  Philox(uint64_t seed, uint64_t stream) : key_{uint32_t(seed), uint32_t(seed >> 32)}, stream_(stream) {}

  // Four 32-bit words for block `index` (elements 4*index .. 4*index+3).
  std::array<uint32_t, 4> block(uint64_t index) const {
    uint32_t w[4];
    block_words(index, w);
    return {w[0], w[1], w[2], w[3]};
  }
  // The same block into plain words: a Philox passed by value to a CUDA kernel draws with this.
  TF_HOST_DEVICE void block_words(uint64_t index, uint32_t (&words)[4]) const {
    words[0] = uint32_t(index);
    words[1] = uint32_t(index >> 32);
    words[2] = uint32_t(stream_);
    words[3] = uint32_t(stream_ >> 32);
    philox4x32_words(words, key_[0], key_[1]);
  }
  // Blocks first .. first + kBatch - 1 at once, words[w][b] = block(first + b)[w]: the same
  // numbers, computed lane-wise so that the compiler runs the kBatch blocks in vector registers.
  static constexpr int kBatch = 16;
  void blocks(uint64_t first, uint32_t (&words)[4][kBatch]) const {
    constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
    constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
    uint32_t c0[kBatch], c1[kBatch], c2[kBatch], c3[kBatch];
    for (int b = 0; b < kBatch; ++b) {
      const uint64_t index = first + uint64_t(b);
      c0[b] = uint32_t(index);
      c1[b] = uint32_t(index >> 32);
      c2[b] = uint32_t(stream_);
      c3[b] = uint32_t(stream_ >> 32);
    }
    uint32_t k0 = key_[0], k1 = key_[1];
    for (int round = 0; round < 10; ++round) {
      for (int b = 0; b < kBatch; ++b) {
        const uint64_t p0 = uint64_t(kM0) * c0[b];
        const uint64_t p1 = uint64_t(kM1) * c2[b];
        const uint32_t n0 = uint32_t(p1 >> 32) ^ c1[b] ^ k0, n2 = uint32_t(p0 >> 32) ^ c3[b] ^ k1;
        c1[b] = uint32_t(p1);
        c3[b] = uint32_t(p0);
        c0[b] = n0;
        c2[b] = n2;
      }
      k0 += kW0;
      k1 += kW1;
    }
    for (int b = 0; b < kBatch; ++b) {
      words[0][b] = c0[b];
      words[1][b] = c1[b];
      words[2][b] = c2[b];
      words[3][b] = c3[b];
    }
  }
  uint32_t u32(uint64_t i) const { return block(i >> 2)[i & 3]; }
  float uniform(uint64_t i) const { return uint_to_unit_float(u32(i)); }
  // Standard normal by Box-Muller from elements 2i and 2i+1.
  float normal(uint64_t i) const {
    const float u1 = (float((u32(2 * i) >> 8)) + 1.0f) * (1.0f / 16777216.0f);  // (0, 1]
    const float u2 = uniform(2 * i + 1);
    return std::sqrt(-2.0f * std::log(u1)) * std::cos(6.283185307179586f * u2);
  }

 private:
  uint32_t key_[2];
  uint64_t stream_;
};

}  // namespace tf
