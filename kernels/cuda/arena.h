// defines: tf::DeviceArena (one block of device memory carved first-fit into kArenaAlign-aligned
// pieces, freed pieces coalescing with their free neighbours, use counted per MemTag) and
// tf::arena_footprint. Host-only bookkeeping, C++17 so that nvcc compiles it in the CUDA backend.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <iterator>
#include <map>
#include <string>
#include <string_view>

#include "src/core/alloc.h"
#include "src/core/error.h"

namespace tf {

// Pieces start at multiples of this many bytes from the block's start, so that two pieces never
// share a cache line, a 128-byte vector access, or one of the simulator's 64-byte ordering granules.
inline constexpr size_t kArenaAlign = 256;

// Bytes of an arena a request of `bytes` takes. A zero-byte request still takes one unit, so that
// every piece has an address of its own.
inline size_t arena_footprint(size_t bytes) {
  return bytes == 0 ? kArenaAlign : (bytes + kArenaAlign - 1) / kArenaAlign * kArenaAlign;
}

class DeviceArena {
 public:
  // Carves [base, base + bytes); `base` is kArenaAlign-aligned, `bytes` a multiple of kArenaAlign.
  // `name` starts every error message ("simt device arena").
  DeviceArena(void* base, size_t bytes, std::string name)
      : base_(static_cast<std::byte*>(base)), bytes_(bytes), name_(std::move(name)) {
    TF_CHECK(reinterpret_cast<uintptr_t>(base) % kArenaAlign == 0 && bytes % kArenaAlign == 0, name_,
             ": a block at ", base, " of ", bytes, " bytes is not ", kArenaAlign, "-byte aligned");
    if (bytes_) free_[0] = bytes_;
  }

  // The lowest free piece of at least arena_footprint(bytes), or nullptr when none is that large.
  void* try_allocate(size_t bytes, MemTag tag) {
    const size_t need = arena_footprint(bytes);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->second < need) continue;
      const size_t offset = it->first, rest = it->second - need;
      free_.erase(it);
      if (rest) free_[offset + need] = rest;
      used_[offset] = Piece{need, tag};
      tag_use_[size_t(tag)] += need;
      in_use_ += need;
      return base_ + offset;
    }
    return nullptr;
  }

  // As try_allocate; a request that does not fit is an error naming `what`, the arena and its use.
  void* allocate(size_t bytes, MemTag tag, std::string_view what) {
    if (void* p = try_allocate(bytes, tag)) return p;
    TF_FAIL(name_, ": '", what, "' (", bytes, " bytes) does not fit: the arena holds ", size_text(bytes_),
            ", ", usage(), ", largest free piece ", size_text(largest_free()),
            ". The arena is sized once per run, before the model is built, from the model's memory plan");
  }

  // Returns the piece starting at p to the free space, merging it with free neighbours.
  void deallocate(const void* p) {
    const auto* b = static_cast<const std::byte*>(p);
    TF_CHECK(b >= base_ && b < base_ + bytes_, name_, ": free of ", p, ", which is not in the arena (",
             static_cast<const void*>(base_), ", ", bytes_, " bytes)");
    const size_t offset = size_t(b - base_);
    const auto it = used_.find(offset);
    if (it == used_.end()) {
      auto after = used_.upper_bound(offset);
      if (after != used_.begin()) {
        const auto& [start, piece] = *std::prev(after);
        TF_CHECK(offset >= start + piece.bytes, name_, ": free of ", p, ", byte ", offset - start,
                 " of a piece of ", piece.bytes, " bytes, not its start");
      }
      TF_FAIL(name_, ": free of ", p, " (offset ", offset, "), which is not in use (freed twice?)");
    }
    size_t start = offset, len = it->second.bytes;
    tag_use_[size_t(it->second.tag)] -= len;
    in_use_ -= len;
    used_.erase(it);
    auto next = free_.lower_bound(start);
    if (next != free_.end() && next->first == start + len) {
      len += next->second;
      next = free_.erase(next);
    }
    if (next != free_.begin()) {
      const auto prev = std::prev(next);
      if (prev->first + prev->second == start) {
        start = prev->first;
        len += prev->second;
        free_.erase(prev);
      }
    }
    free_[start] = len;
  }

  bool owns(const void* p) const {
    const auto* b = static_cast<const std::byte*>(p);
    return b >= base_ && b < base_ + bytes_;
  }
  void* base() const { return base_; }
  size_t size() const { return bytes_; }
  size_t in_use() const { return in_use_; }
  size_t in_use(MemTag tag) const { return tag_use_[size_t(tag)]; }
  size_t pieces() const { return used_.size(); }
  // Free space comes in this many separate pieces (1 for an empty arena: coalescing leaves no seams).
  size_t free_pieces() const { return free_.size(); }
  size_t largest_free() const {
    size_t best = 0;
    for (const auto& [offset, len] : free_) best = len > best ? len : best;
    return best;
  }
  // "1.50 MiB in use (weights 1.00 MiB, lora 512 KiB)": the tags that hold any of the arena.
  std::string usage() const {
    std::string s = size_text(in_use_) + " in use";
    const char* sep = " (";
    for (size_t t = 0; t < kMemTagCount; ++t) {
      if (!tag_use_[t]) continue;
      s += sep;
      s += mem_tag_name(MemTag(t));
      s += " " + size_text(tag_use_[t]);
      sep = ", ";
    }
    return *sep == ',' ? s + ")" : s;
  }
  static std::string size_text(size_t bytes) {
    char buf[48];
    if (bytes < 1024)
      std::snprintf(buf, sizeof buf, "%zu bytes", bytes);
    else if (bytes < (size_t(1) << 20))
      std::snprintf(buf, sizeof buf, "%.2f KiB", double(bytes) / 1024.0);
    else if (bytes < (size_t(1) << 30))
      std::snprintf(buf, sizeof buf, "%.2f MiB", double(bytes) / double(1 << 20));
    else
      std::snprintf(buf, sizeof buf, "%.2f GiB", double(bytes) / double(1 << 30));
    return buf;
  }

 private:
  struct Piece {
    size_t bytes;
    MemTag tag;
  };
  std::byte* base_;
  size_t bytes_;
  std::string name_;
  std::map<size_t, size_t> free_;  // offset -> bytes; disjoint, and no two adjacent
  std::map<size_t, Piece> used_;   // offset -> piece
  std::array<size_t, kMemTagCount> tag_use_{};
  size_t in_use_ = 0;
};

}  // namespace tf
