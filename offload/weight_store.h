// defines: tf::offload::WeightStore (a model's per-layer base weights kept in host memory, in the
// model file or split across data-parallel ranks, and brought a block at a time into one of two
// slots, the next block in use order loading while the current one computes),
// tf::offload::StoreFootprint, tf::offload::BlockExchange
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "offload/direct_reader.h"
#include "offload/plan.h"
#include "src/core/alloc.h"
#include "src/model/weights.h"

namespace tf::offload {

// The ranks of a data-parallel run that split the per-layer weights among themselves
// (WeightTier::Shard), and the all-gather that puts a block back together. Every rank starts the
// same gathers in the same order.
class BlockExchange {
 public:
  virtual ~BlockExchange() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Starts gathering every rank's `mine` (the same size on each) into `all`, rank r's bytes at
  // r x mine.size(), and returns a ticket for wait(); neither buffer may change until then.
  virtual uint64_t start_gather(std::span<const std::byte> mine, std::span<std::byte> all) = 0;
  // Returns once the gather of `ticket` (and every one started before it) is done.
  virtual void wait(uint64_t ticket) = 0;
};

// What a store takes beside the weights where they lie: `backend`, its allocations on the model's
// backend in the order it makes them (the two slots, then on the cpu the shard tier's shares);
// `host`, host memory that is not the backend's (on a device backend, the disk and shard tiers' two
// read buffers, then the shard tier's shares); `streamed_bytes`, the bytes of per-layer weights it
// copies to a device (Host, Shard) or reads from the file (Disk) in one pass over the layers;
// `gathered_bytes`, under Shard, the bytes of the other ranks' shares a rank receives in one pass.
struct StoreFootprint {
  std::vector<PlannedAlloc> backend, host;
  uint64_t streamed_bytes = 0;
  uint64_t gathered_bytes = 0;
};

// The per-layer weights of a model (every slot of BlockWeights) in a lower tier than the backend's
// memory, brought into two slots in turn:
// - Host (device backends): the tensors stay as loaded in host memory; a slot is device memory
//   holding one block as place_weight places it, filled on the Copy stream.
// - Disk: the tensors are read from the model file as stored (quantized blocks as they are), or
//   from the spill file the loader wrote the tensors it converted to (io::SpillFile), with a
//   DirectReader into aligned read buffers, never through the mapping; on the cpu the ops read them
//   there, on a device backend each read buffer is then copied into a device slot as for Host.
// - Shard: each layer's tensors are laid out as one run of bytes, cut into N equal shares (N
//   ranks); this rank keeps share r of every layer in host memory (the backend's on the cpu,
//   page-locked on a device backend) and a block is all-gathered from the ranks into a gather
//   buffer laid out as the Disk tier's read buffer: on the cpu the ops read it there, on a device
//   backend it is copied into a device slot as for Host. The store copies its shares at
//   construction; the caller may then let the full tensors go (release_sources).
// The copy into a slot waits (by event) for the last compute that read the slot; the compute that
// reads a block waits for its copy. Results are those of resident weights, bit for bit: the ops
// read the same bytes.
class WeightStore {
 public:
  // Throws, naming the tensor and the option, unless `tier` (Host or Disk) can stream w's blocks on
  // `be`: Host needs a device backend (the cpu's memory is the host); Disk needs every per-layer
  // tensor in one of w's files (a model file as stored, or a spill file), where a tensor without
  // data (described, io::describe_model, and converted at load) counts as spilled; a device backend
  // streams only what it places as stored. Shard splits the blocks over `ranks` (at least 2).
  static StoreFootprint footprint(const LlamaWeights& w, WeightTier tier, const Backend& be, int ranks = 1);

  // Shard takes the ranks' `exchange`, which must outlive the store.
  WeightStore(const LlamaWeights& w, WeightTier tier, Backend& be, BlockExchange* exchange = nullptr);
  ~WeightStore();
  WeightStore(const WeightStore&) = delete;
  WeightStore& operator=(const WeightStore&) = delete;

  WeightTier tier() const { return tier_; }

  // Shard: lets go of the memory of the per-layer tensors of `w` the shares were copied from (w is
  // the weights the store was built from): tensors w owns are freed, pages of file mappings wholly
  // inside a tensor are dropped (madvise), and the slots keep their dtype and shape but no data.
  // Returns the bytes freed or dropped.
  uint64_t release_sources(LlamaWeights& w) const;

  // `layer`'s block, ready for the ops queued on the Compute stream from now on; the block of
  // `next` (the layer used after it; -1 for none) starts loading into the other slot. The weights
  // stay valid until a later acquire loads another block into their slot.
  const BlockWeights& acquire(int layer, int next);
  // Every op that reads `layer`'s block has been queued: its slot may take another block once they
  // have run.
  void release(int layer);

 private:
  // One stretch of a tensor's bytes (its data, or an NF4 / INT8 absmax or nested absmax).
  struct Part {
    const void* host = nullptr;  // where it lies in host memory (the mapping, for Disk)
    uint64_t bytes = 0;
    int file = -1;        // index into LlamaWeights::files; Disk only (-1: a vector copied from host memory)
    uint64_t offset = 0;  // in that file
    size_t read_at = 0;   // where its aligned span starts in a read (or gather) buffer
  };
  struct Tensor {
    WeightSlot slot = WeightSlot::AttnNorm;
    std::string name;  // for errors, made once rather than per block loaded
    WeightRef host;
    std::array<Part, 3> parts;  // data, absmax, nested
    size_t placed_at = 0;       // where it starts in a device slot
  };
  struct Layer {
    std::vector<Tensor> tensors;
    size_t placed_bytes = 0, read_bytes = 0;
    uint64_t streamed = 0;
    size_t share_at = 0, share_bytes = 0;  // Shard: this rank's share of the layer, in shares_
  };
  struct Read {
    uint64_t ticket = 0;
    int file = -1;
    const Tensor* tensor = nullptr;
  };
  struct Slot {
    int layer = -1;
    BlockWeights weights;
    DeviceMem device;                // the device slot, or on the cpu the read buffer itself
    HostMem read;                    // a device backend's read buffer (Disk), page-locked
    std::byte* read_base = nullptr;  // the read buffer, aligned to DirectReader::kAlign
    std::optional<Event> copied, freed;
    std::vector<Read> reads;         // in flight (Disk)
    std::vector<WeightRef> staged;   // a device backend's block in host memory, not yet copied in
    std::optional<uint64_t> gather;  // the all-gather into the read buffer in flight (Shard)
  };

  static std::vector<Layer> layout(const LlamaWeights& w, WeightTier tier, const Backend& be, int ranks);
  // Shard: copies this rank's share of every layer's bytes from where the tensors lie.
  void copy_shares();
  // Host: page-locks the pages of the per-layer tensors where they lie, so that their copies
  // overlap the compute; where the system refuses, the copies stay pageable (said once a process).
  void register_host_tensors();
  void load(int layer, Slot& s);
  // Copies the staged block into the slot's device memory on the Copy stream.
  void copy_in(Slot& s);
  void finish_reads(Slot& s);
  // Refuses a file whose size or modification time is not what it was at load.
  void check_unchanged(const MappedFile& f) const;

  std::vector<MappedFile> files_;
  std::vector<bool> checked_;  // per file, within one finish_reads
  WeightTier tier_;
  Backend& be_;
  std::vector<Layer> layers_;
  BlockExchange* exchange_ = nullptr;
  DeviceMem shares_;     // Shard on the cpu: this rank's shares of every layer
  HostMem host_shares_;  // Shard on a device backend: the same, page-locked
  std::byte* shares_base_ = nullptr;
  std::array<Slot, 2> slots_;
  // One per file, Disk only; after the slots, so that reads still in flight land before they go.
  std::vector<std::unique_ptr<DirectReader>> readers_;
  size_t last_ = 0;                      // the slot acquired last
  std::vector<const void*> registered_;  // page ranges register_host_tensors locked
};

}  // namespace tf::offload
