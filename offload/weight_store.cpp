// defines: tf::offload::WeightStore (kernels/backend.h's streams and events order its slots)
#include "offload/weight_store.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>

#include "kernels/quant_blocks.h"
#include "src/core/error.h"
#include "src/io/spill.h"

namespace tf::offload {

static_assert(io::kSpillAlign % DirectReader::kAlign == 0,
              "a spill file's parts must start where O_DIRECT reads may");

namespace {

// The bytes of a stored tensor's parts, where they lie: its data, then for NF4 / INT8 the absmax
// and the nested scales (io::spill_parts).
std::array<std::pair<const void*, uint64_t>, 3> parts_of(const WeightRef& w) {
  const std::array<uint64_t, 3> bytes = io::spill_parts(w);
  return {{{w.data, bytes[0]}, {w.scales.absmax, bytes[1]}, {w.scales.nested, bytes[2]}}};
}

// The file window holding [p, p + bytes), or -1.
int file_of(const LlamaWeights& w, const void* p, uint64_t bytes) {
  const auto at = reinterpret_cast<uintptr_t>(p);
  for (size_t f = 0; f < w.files.size(); ++f) {
    const auto begin = reinterpret_cast<uintptr_t>(w.files[f].begin);
    if (at >= begin && at - begin <= w.files[f].bytes && bytes <= w.files[f].bytes - (at - begin))
      return int(f);
  }
  return -1;
}

// A read buffer is allocated this much larger than its spans, to start them on an aligned address.
size_t read_buffer_bytes(size_t spans) {
  return spans + DirectReader::kAlign;
}

// Shard: each part of a layer's run of bytes, and each rank's share of it, starts on a multiple of
// this (a cache line, as the ops' vector loads like).
constexpr size_t kShardAlign = 64;
size_t shard_round(size_t bytes) {
  return (bytes + kShardAlign - 1) / kShardAlign * kShardAlign;
}

}  // namespace

std::vector<WeightStore::Layer> WeightStore::layout(const LlamaWeights& w, WeightTier tier, const Backend& be,
                                                    int ranks) {
  TF_CHECK(tier != WeightTier::Resident,
           "a weight store streams Host, Disk or Shard weights, not resident ones");
  TF_CHECK(tier != WeightTier::Shard || ranks >= 2,
           "--shard-weights splits the weights across the ranks of a ",
           "data-parallel run (mpirun -np N, N >= 2), but this run has ", ranks,
           " rank: leave --shard-weights out");
  const LlamaConfig& c = w.config;
  TF_CHECK(tier != WeightTier::Host || !be.host_memory(), "--weights host keeps the weights in host memory ",
           "and copies each block to the device, but the ", be.name(),
           " backend's memory is host memory: use --weights resident, or --weights disk to stream them "
           "from the model file");
  std::vector<Layer> layers(size_t(c.n_layers));
  LlamaWeights::for_each_slot(c, [&](WeightSlot s, int layer) {
    if (!is_layer_slot(s)) return;
    Layer& L = layers[size_t(layer)];
    Tensor t;
    t.slot = s;
    t.host = w.slot(s, layer);
    t.name = hf_weight_name(c, s, layer);
    const std::string& name = t.name;
    const auto parts = parts_of(t.host);
    for (size_t i = 0; i < parts.size(); ++i) {
      Part& p = t.parts[i];
      p.host = parts[i].first;
      p.bytes = parts[i].second;
      if (tier == WeightTier::Shard && p.bytes) {
        p.read_at = L.read_bytes;
        L.read_bytes += shard_round(p.bytes);
        continue;
      }
      if (tier != WeightTier::Disk || p.bytes == 0) continue;
      if (t.host.data == nullptr) {
        // A described tensor the loader converts (io::describe_model): it will be read from the
        // spill file, each part from an aligned offset. Sizes only; no store is built from it.
        p.read_at = L.read_bytes;
        L.read_bytes += DirectReader::aligned_span(0, p.bytes);
        L.streamed += p.bytes;
        continue;
      }
      p.file = file_of(w, p.host, p.bytes);
      if (p.file < 0 && t.host.rows == 1 && !w.files.empty()) {
        // A vector the loader made of a file's (Gemma's norms, held as 1 + w) is copied from host
        // memory into the read buffer, on a span of its own.
        p.read_at = L.read_bytes;
        L.read_bytes += DirectReader::aligned_span(0, p.bytes);
        L.streamed += p.bytes;
        continue;
      }
      TF_CHECK(p.file >= 0, "--weights disk reads each block from a file, but tensor ", name, " (",
               dtype_name(t.host.dtype),
               ") lies in memory: the loader converted it without a spill file (io::SpillOptions); load "
               "the model with --quant keep, or with a spill file for the converted tensors");
      const MappedFile& f = w.files[size_t(p.file)];
      p.offset = f.offset + uint64_t(static_cast<const std::byte*>(p.host) - f.begin);
      p.read_at = L.read_bytes;
      L.read_bytes += DirectReader::aligned_span(p.offset, p.bytes);
      L.streamed += p.bytes;
    }
    if (!be.host_memory()) {
      const size_t placed = be.placed_weight_bytes(t.host);
      TF_CHECK(is_quantized(t.host.dtype) || placed == parts[0].second, "the ", be.name(),
               " backend copies streamed blocks as they are stored, but it places tensor ", name, " (",
               dtype_name(t.host.dtype),
               ") in another dtype: load the base as bf16 (--quant bf16) to stream it");
      t.placed_at = L.placed_bytes;
      L.placed_bytes += be.footprint(placed);
      if (tier == WeightTier::Host || tier == WeightTier::Shard) L.streamed += placed;
    }
    L.tensors.push_back(t);
  });
  if (tier == WeightTier::Shard) {
    size_t at = 0;
    for (Layer& L : layers) {
      L.share_bytes = shard_round((L.read_bytes + size_t(ranks) - 1) / size_t(ranks));
      L.share_at = at;
      at += L.share_bytes;
    }
  }
  return layers;
}

StoreFootprint WeightStore::footprint(const LlamaWeights& w, WeightTier tier, const Backend& be, int ranks) {
  const std::vector<Layer> layers = layout(w, tier, be, ranks);
  size_t placed = 0, read = 0, shares = 0;
  StoreFootprint f;
  for (const Layer& L : layers) {
    placed = std::max(placed, L.placed_bytes);
    read = std::max(read, tier == WeightTier::Shard ? L.share_bytes * size_t(ranks) : L.read_bytes);
    shares += L.share_bytes;
    f.streamed_bytes += L.streamed;
    f.gathered_bytes += uint64_t(L.share_bytes) * uint64_t(ranks - 1);
  }
  const bool buffered = tier == WeightTier::Disk || tier == WeightTier::Shard;
  std::vector<PlannedAlloc>& host = be.host_memory() ? f.backend : f.host;
  for (int i = 0; i < 2; ++i) {
    if (!be.host_memory()) f.backend.push_back({"streamed block buffer", MemTag::Weights, placed});
    if (buffered)
      host.push_back({be.host_memory() ? "streamed block buffer" : "streamed block read buffer",
                      MemTag::Weights, read_buffer_bytes(read)});
  }
  if (tier == WeightTier::Shard) host.push_back({"weight shards", MemTag::Weights, shares});
  return f;
}

WeightStore::WeightStore(const LlamaWeights& w, WeightTier tier, Backend& be, BlockExchange* exchange)
    : files_(w.files),
      tier_(tier),
      be_(be),
      layers_(layout(w, tier, be, exchange ? exchange->size() : 1)),
      exchange_(exchange) {
  const StoreFootprint f = footprint(w, tier, be, exchange ? exchange->size() : 1);
  const bool buffered = tier == WeightTier::Disk || tier == WeightTier::Shard;
  for (size_t i = 0; i < slots_.size(); ++i) {
    Slot& s = slots_[i];
    s.device = be.alloc(f.backend[i].bytes, MemTag::Weights, f.backend[i].what);
    if (!buffered) continue;
    if (!be.host_memory()) s.read = be.alloc_host(f.host[i].bytes, MemTag::Weights, f.host[i].what);
    s.read_base = DirectReader::align_buffer(be.host_memory() ? s.device.data() : s.read.data());
  }
  if (tier == WeightTier::Shard) {
    const PlannedAlloc& a = be.host_memory() ? f.backend[2] : f.host[2];
    if (be.host_memory()) {
      shares_ = be.alloc(a.bytes, a.tag, a.what);
      shares_base_ = shares_.as<std::byte>();
    } else {
      host_shares_ = be.alloc_host(a.bytes, a.tag, a.what);
      shares_base_ = static_cast<std::byte*>(host_shares_.data());
    }
    copy_shares();
  }
  if (tier == WeightTier::Disk)
    for (const MappedFile& file : w.files) readers_.push_back(std::make_unique<DirectReader>(file.path));
  if (tier == WeightTier::Host) register_host_tensors();
}

WeightStore::~WeightStore() {
  // Copies into the slots may still be in flight on the Copy stream (the readers, destroyed before
  // the slots, wait out the reads into them), and a gather into a slot's buffer on the exchange.
  for (const Slot& s : slots_)
    if (s.gather) exchange_->wait(*s.gather);
  be_.synchronize();
  for (const void* p : registered_) be_.unregister_host(p);
}

void WeightStore::copy_shares() {
  const size_t rank = size_t(exchange_->rank());
  for (const Layer& L : layers_) {
    std::byte* share = shares_base_ + L.share_at;
    const size_t lo = rank * L.share_bytes, hi = lo + L.share_bytes;
    // The gaps between parts and past the layer's last byte are gathered too: zeros, not garbage.
    std::memset(share, 0, L.share_bytes);
    for (const Tensor& t : L.tensors)
      for (const Part& p : t.parts) {
        if (p.bytes == 0) continue;
        TF_CHECK(p.host, "--shard-weights: tensor ", t.name, " has no data in memory to share out");
        const size_t begin = std::max(lo, p.read_at), end = std::min(hi, p.read_at + size_t(p.bytes));
        if (begin < end)
          std::memcpy(share + (begin - lo), static_cast<const std::byte*>(p.host) + (begin - p.read_at),
                      end - begin);
      }
  }
}

uint64_t WeightStore::release_sources(LlamaWeights& w) const {
  TF_CHECK(tier_ == WeightTier::Shard, "only the shard tier copies the weights it streams");
  const uintptr_t page = uintptr_t(::sysconf(_SC_PAGESIZE));
  uint64_t released = 0;
  for (const Layer& L : layers_)
    for (const Tensor& t : L.tensors)
      for (const Part& p : t.parts) {
        if (p.bytes == 0) continue;
        const auto owned = std::find_if(w.owned.begin(), w.owned.end(),
                                        [&](const tf::Tensor& o) { return o.view.data == p.host; });
        if (owned != w.owned.end()) {
          released += owned->storage.bytes();
          *owned = tf::Tensor();
          continue;
        }
        if (file_of(w, p.host, p.bytes) < 0) continue;
        const uintptr_t begin = (reinterpret_cast<uintptr_t>(p.host) + page - 1) / page * page;
        const uintptr_t end = (reinterpret_cast<uintptr_t>(p.host) + p.bytes) / page * page;
        // Advice only: where the kernel refuses it the pages stay, which costs memory, not results.
        if (end > begin && ::madvise(reinterpret_cast<void*>(begin), size_t(end - begin), MADV_DONTNEED) == 0)
          released += end - begin;
      }
  // Whether a tensor has absmax or nested scales says how it is stored (io::stored_bytes): those
  // pointers keep their presence but point at a zero of the store's own rather than freed memory.
  static const float none = 0.0f;
  for (BlockWeights& b : w.blocks)
    for (int s = 0; s < int(WeightSlot::Embed); ++s) {
      WeightRef& r = b.slot(WeightSlot(s));
      r.data = nullptr;
      if (r.scales.absmax) r.scales.absmax = &none;
      if (r.scales.nested) r.scales.nested = &none;
    }
  return released;
}

void WeightStore::register_host_tensors() {
  // Registered ranges may not overlap, and neighbouring tensors share pages: the tensors' pages are
  // merged into runs first.
  const uintptr_t page = uintptr_t(::sysconf(_SC_PAGESIZE));
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  for (const Layer& L : layers_)
    for (const Tensor& t : L.tensors)
      for (const Part& p : t.parts) {
        if (p.bytes == 0) continue;
        const auto at = reinterpret_cast<uintptr_t>(p.host);
        spans.push_back({at / page * page, (at + p.bytes + page - 1) / page * page});
      }
  std::sort(spans.begin(), spans.end());
  std::vector<std::pair<uintptr_t, uintptr_t>> runs;
  for (const auto& s : spans) {
    if (!runs.empty() && s.first <= runs.back().second)
      runs.back().second = std::max(runs.back().second, s.second);
    else
      runs.push_back(s);
  }
  for (const auto& [begin, end] : runs) {
    std::string why;
    const auto* p = reinterpret_cast<const void*>(begin);
    if (be_.register_host(p, size_t(end - begin), &why)) {
      registered_.push_back(p);
      continue;
    }
    static std::atomic<bool> said{false};
    if (!said.exchange(true))
      std::fprintf(stderr,
                   "note: --weights host: cannot page-lock the weights in host memory (%s); their copies to "
                   "the device go through pageable memory and overlap the compute less\n",
                   why.c_str());
    return;
  }
}

void WeightStore::check_unchanged(const MappedFile& f) const {
  struct stat st {};
  TF_CHECK(::stat(f.path.c_str(), &st) == 0, f.path, ": cannot stat: ", std::strerror(errno));
  const int64_t mtime = int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  TF_CHECK(uint64_t(st.st_size) == f.file_size && mtime == f.mtime_ns, f.path,
           ": the model file changed since it was loaded (", f.file_size, " bytes then, ", st.st_size,
           " now), so its tensors may no longer be what was loaded; load it again");
}

void WeightStore::load(int layer, Slot& s) {
  finish_reads(s);
  const Layer& L = layers_[size_t(layer)];
  const bool device = !be_.host_memory();
  // A device backend's read buffer takes a block only once the copies from it have run.
  if (device && (tier_ == WeightTier::Disk || tier_ == WeightTier::Shard))
    be_.download(nullptr, nullptr, 0, Stream::Copy);
  s.layer = layer;
  s.staged.clear();
  if (tier_ == WeightTier::Shard)
    s.gather = exchange_->start_gather(std::span<const std::byte>(shares_base_ + L.share_at, L.share_bytes),
                                       std::span(s.read_base, L.share_bytes * size_t(exchange_->size())));
  for (const Tensor& t : L.tensors) {
    WeightRef src = t.host;
    if (tier_ == WeightTier::Shard) {
      // The block lies in the gather buffer as laid out: every part at its place in the layer's run.
      const auto at = [&](size_t i) -> const void* {
        return t.parts[i].bytes ? s.read_base + t.parts[i].read_at : nullptr;
      };
      src.data = at(0);
      if (src.scales.absmax) src.scales.absmax = at(1);
      if (src.scales.nested) src.scales.nested = static_cast<const float*>(at(2));
    } else if (tier_ == WeightTier::Disk) {
      std::array<const void*, 3> at{};
      for (size_t i = 0; i < t.parts.size(); ++i) {
        const Part& p = t.parts[i];
        if (p.bytes == 0) continue;
        std::byte* dst = s.read_base + p.read_at;
        if (p.file < 0) {
          std::memcpy(dst, p.host, p.bytes);
          at[i] = dst;
          continue;
        }
        try {
          const uint64_t ticket = readers_[size_t(p.file)]->submit(
              p.offset, p.bytes, dst, DirectReader::aligned_span(p.offset, p.bytes));
          s.reads.push_back({ticket, p.file, &t});
        } catch (const Error& e) {
          s.layer = -1;
          TF_FAIL("reading tensor ", t.name, ": ", e.what());
        }
        at[i] = dst + DirectReader::lead(p.offset);
      }
      src.data = at[0];
      if (src.scales.absmax) src.scales.absmax = at[1];
      if (src.scales.nested) src.scales.nested = static_cast<const float*>(at[2]);
    }
    if (device)
      s.staged.push_back(src);
    else
      s.weights.slot(t.slot) = src;
  }
  // From host memory the copy starts now; from the file, once the reads have landed (copy_in).
  if (device && tier_ == WeightTier::Host) copy_in(s);
}

void WeightStore::copy_in(Slot& s) {
  const Layer& L = layers_[size_t(s.layer)];
  if (s.freed) be_.wait(Stream::Copy, *std::exchange(s.freed, std::nullopt));
  for (size_t i = 0; i < L.tensors.size(); ++i) {
    const Tensor& t = L.tensors[i];
    s.weights.slot(t.slot) =
        be_.place_weight_at(s.staged[i], t.name, s.device.as<std::byte>() + t.placed_at, Stream::Copy);
  }
  s.staged.clear();
  s.copied = be_.record(Stream::Copy);
}

void WeightStore::finish_reads(Slot& s) {
  if (s.gather) exchange_->wait(*std::exchange(s.gather, std::nullopt));
  if (s.reads.empty()) return;
  // The reads stay in the slot's vector (cleared, its capacity kept for the next block). Each file
  // is checked once every read has landed, so a change during the reads is seen too.
  const Tensor* t = nullptr;
  try {
    for (const Read& r : s.reads) {
      t = r.tensor;
      readers_[size_t(r.file)]->wait(r.ticket);
    }
    checked_.assign(files_.size(), false);
    for (const Read& r : s.reads) {
      t = r.tensor;
      if (!checked_[size_t(r.file)]) check_unchanged(files_[size_t(r.file)]);
      checked_[size_t(r.file)] = true;
    }
    s.reads.clear();
  } catch (const Error& e) {
    s.reads.clear();
    // The reads after the failed one must land before the buffer takes another block.
    for (const auto& r : readers_) {
      try {
        r->drain();
      } catch (const Error&) {
        // Those reads' own failures add nothing to the first one's.
      }
    }
    s.layer = -1;
    TF_FAIL("reading tensor ", t->name, ": ", e.what());
  }
}

const BlockWeights& WeightStore::acquire(int layer, int next) {
  TF_CHECK(layer >= 0 && size_t(layer) < layers_.size() && next < int(layers_.size()), "weight store: layer ",
           layer, " then ", next, " of a model of ", layers_.size());
  auto find = [&](int l) -> Slot* {
    for (Slot& s : slots_)
      if (s.layer == l) return &s;
    return nullptr;
  };
  Slot* s = find(layer);
  if (!s) {
    s = &slots_[1 - last_];
    load(layer, *s);
  }
  finish_reads(*s);
  if (!s->staged.empty()) copy_in(*s);
  if (s->copied) be_.wait(Stream::Compute, *std::exchange(s->copied, std::nullopt));
  last_ = size_t(s - slots_.data());
  if (next >= 0 && next != layer && !find(next)) load(next, slots_[1 - last_]);
  return s->weights;
}

void WeightStore::release(int layer) {
  if (be_.host_memory()) return;
  for (Slot& s : slots_) {
    if (s.layer != layer) continue;
    // A newer point of the compute stream supersedes one the copy has not waited for yet.
    if (s.freed) be_.wait(Stream::Copy, *s.freed);
    s.freed = be_.record(Stream::Compute);
  }
}

}  // namespace tf::offload
