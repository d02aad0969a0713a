// defines: tf::io::SpillOptions, tf::io::SpillFile (the per-layer base weights converted at load,
// written one tensor at a time to a file the run creates, mapped back for the disk tier and removed
// with the weights), store_layer_weight, spill_parts, spilled_bytes, spill_bytes,
// default_spill_path, remove_if_stale_spill_file, remove_stale_spill_files, disk_free_bytes
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "src/io/quantize_weights.h"
#include "src/model/weights.h"

namespace tf::io {

// Every part of a spilled weight starts at a multiple of this: the alignment of the disk tier's
// O_DIRECT reads (offload::DirectReader::kAlign, which weight_store.cpp checks against it).
inline constexpr uint64_t kSpillAlign = 4096;

// The free bytes of the file system holding directory `dir` for an unprivileged writer (statvfs's
// f_bavail), or nothing where it cannot be asked.
std::optional<uint64_t> disk_free_bytes(const std::string& dir);

// A spill file begins with this line, in a header of kSpillAlign bytes before the first tensor.
inline constexpr char kSpillMagic[] = "tightfit spill file: base weights converted at load\n";

// Where a loader writes the per-layer tensors it converts (--weights disk with a --quant that
// converts): `path` is created by the loader and must not exist, except, with `replace_stale`, as a
// spill file that a process no longer running left (remove_if_stale_spill_file): the caller holds
// a lock that no other run of that path can hold (finetune's run directory). `free_bytes` is asked
// for the space of its directory before anything converts (tests give their own).
struct SpillOptions {
  std::string path;
  bool replace_stale = false;
  std::function<std::optional<uint64_t>(const std::string& dir)> free_bytes = disk_free_bytes;
};

// A spill file's name in `dir` that no other process of this machine picks:
// "tightfit-spill-<pid>-<n>.bin", n counting this process's spills.
std::string default_spill_path(const std::string& dir);

// Removes the file at `path` when it is provably a spill file left by a process that is gone: a
// regular file (not a link) of this user that begins with kSpillMagic and whose flock can be taken
// (a SpillFile holds its lock from creation to removal, so only a process that ended without
// removing its file leaves one unlocked). Anything else stays. Returns whether it removed the file.
bool remove_if_stale_spill_file(const std::string& path);
// remove_if_stale_spill_file for every file of `dir` named as default_spill_path names them (what
// kill -9 of eval, generate or bench leaves in TMPDIR or --spill-dir); returns the paths removed.
// A SpillFile runs it on its directory before it creates itself.
std::vector<std::string> remove_stale_spill_files(const std::string& dir);

// The bytes of a stored weight's parts (as WeightStore streams them): its codes or elements, then
// for NF4 / INT8 the absmax (f32, or uint8 codes when double-quantized) and the nested f32 scales;
// 0 for a part it does not have. Only dtype, shape and whether `nested` is set are read.
std::array<uint64_t, 3> spill_parts(const WeightRef& stored);
// A weight's bytes in a spill file: each part from an offset aligned to kSpillAlign, so that
// O_DIRECT reads start on one, and padded to the next.
uint64_t spilled_bytes(const WeightRef& stored);
// The size of the spill file a load of `source` (every slot as the model file stores it) under
// `quant` writes: its header, then the per-layer tensors that store_weight converts, as converted
// (NF4 with double-quantized absmax), and those kept as they are that kept_in_memory. 0 when there
// is none.
uint64_t spill_bytes(const LlamaWeights& source, QuantMode quant);

// A spill file being written, then read: created exclusively (a file already at the path is
// refused, never overwritten, but for a stale spill file under SpillOptions::replace_stale), after
// removing the stale spill files of its directory (remove_stale_spill_files) and checking that the
// directory has the bytes free; it holds an flock on the file for as long as the file exists. write()
// appends one converted weight, whose memory the caller may free at once; attach() maps the file
// read-only into `w` as one of its files (LlamaWeights::files) and points each written weight into
// it, so that the disk tier streams them as it streams tensors kept in a model file, and so that
// the file lives as long as the weights. The destructor unmaps and removes the file: at the end of
// the run, or when loading fails.
class SpillFile {
 public:
  SpillFile(const SpillOptions& options, uint64_t bytes);
  ~SpillFile();
  SpillFile(const SpillFile&) = delete;
  SpillFile& operator=(const SpillFile&) = delete;

  const std::string& path() const { return path_; }
  uint64_t bytes() const { return bytes_; }

  // Writes `stored` (slot `slot` of `layer`) at the end of the file and flushes it out of the page
  // cache, so that neither the process nor the kernel's cache holds the converted model. Throws
  // naming the file and the tensor (a full disk, an I/O error).
  void write(WeightSlot slot, int layer, const WeightRef& stored, const std::string& name);
  // Maps the file into `w` and points every written weight there; `self` is this file, kept alive
  // by the weights.
  static void attach(const std::shared_ptr<SpillFile>& self, LlamaWeights& w);

 private:
  void write_at(const void* data, uint64_t bytes, uint64_t offset, const std::string& what);

  struct Written {
    WeightSlot slot;
    int layer;
    WeightRef ref;                      // as stored, without its data
    std::array<uint64_t, 3> offsets{};  // of its parts in the file
  };
  std::string path_;
  uint64_t bytes_ = 0;  // as planned: the file's size once every weight is written
  int fd_ = -1;
  uint64_t end_ = 0;  // where the next weight starts
  void* map_ = nullptr;
  std::vector<Written> written_;
};

// Whether a weight of `source` (the weights as a loader read them) kept as it is still lies partly
// in memory of source's own rather than in a mapped file: absmax decoded at load (bnb4bit_rows).
bool kept_in_memory(const LlamaWeights& source, const WeightRef& src);

// store_weight for a loader: with `spill`, a per-layer weight (slot `slot` of `layer`, src being
// source's) that the mode converts, or that kept_in_memory, is converted into memory of its own,
// written to the spill file and freed at once, so that the disk tier reads every part of it from a
// file; its slot holds no data until SpillFile::attach. Otherwise store_weight into `w`.
WeightRef store_layer_weight(const LlamaWeights& source, const WeightRef& src, QuantMode mode,
                             LlamaWeights& w, const std::string& name, SpillFile* spill, WeightSlot slot,
                             int layer);

}  // namespace tf::io
