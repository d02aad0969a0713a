// defines: tf::CheckpointMeta, CheckpointInfo, save_checkpoint, latest_checkpoint, list_checkpoints,
//          load_checkpoint, checkpoint_fault_hook (crash-safe, rotated checkpoints of a run in
//          RUN/checkpoints/step-N/)
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "src/model/lora.h"
#include "src/train/trainer.h"

namespace tf {

// A checkpoint at optimizer step N (N steps taken, TrainerState::step == N) is the directory
// RUN/checkpoints/step-N/ holding
//   lora.safetensors  every adapter's A and B, and its AdamW first and second moments, as f32
//                     tensors "param|adam_m|adam_v.layers.L.<q_proj..down_proj>.A|B"
//   state.json        the trainer counters, the seed, the data cursor, the config hash and
//                     config, the LoRA layout, and the size and FNV-1a 64 checksum of
//                     lora.safetensors.
//
// Completeness: the directory is filled under checkpoints/.tmp-step-N-<pid>/, every file and the
// directory are fsync'ed, and only then is it renamed to step-N (and checkpoints/ fsync'ed). So the
// rename is the commit point, and a step-N directory that exists was complete when written. Files
// can still be damaged afterwards (a disk fault, a copy cut short, a filesystem that reorders
// writes despite fsync), so a checkpoint is also *verified* before it is picked: state.json must
// parse and name step N, and lora.safetensors must have the recorded size and checksum. A
// directory failing either is never picked.
//
// Only one process writes a run's checkpoints at a time (the CLI holds a lock on the run): a save
// removes every .tmp-step-N-PID directory it finds, which can only be left over from a crashed save.
//
// Ownership: a save replaces, rotates away and removes only checkpoints of its own run, those whose
// state.json names the same config hash. Anything else in checkpoints/ (a user's step-3 folder, a
// checkpoint another configuration wrote) is left alone, and a save whose step-N name is taken by
// such a directory is refused.

// What the caller (the CLI) provides besides the weights and the trainer counters.
struct CheckpointMeta {
  std::string config_hash;  // resume refuses when it differs
  // JSON object of the options that matter to a resume ("" if none): stored so that a mismatch
  // can name which options changed.
  std::string config_json;
  std::string data_cursor = "null";  // JSON text: the data sampler's resumable position
  // Every random draw (LoRA init, dropout, data order) is Philox keyed by (seed, step, ...), so
  // the seed and the step are the whole RNG state.
  uint64_t seed = 0;
};

struct CheckpointInfo {
  int64_t step = 0;
  std::string path;
};

// Checkpoint directory names in RUN/checkpoints/, by step, ascending; names only, nothing verified.
std::vector<CheckpointInfo> list_checkpoints(const std::string& run_dir);

// The newest checkpoint that verifies (see above); nullopt when there is none. When `rejected` is
// given, each newer directory that was passed over is appended as "<path>: <reason>".
std::optional<CheckpointInfo> latest_checkpoint(const std::string& run_dir,
                                                std::vector<std::string>* rejected = nullptr);

// Writes the checkpoint for step `trainer.step` and returns its path. After it is complete: removes
// the run's checkpoints numbered above that step (left by a continuation that was abandoned when an
// older checkpoint was resumed), then all but the run's newest `keep` (>= 1).
std::string save_checkpoint(const std::string& run_dir, const LoraState& lora, const TrainerState& trainer,
                            const CheckpointMeta& meta, int keep);

// Fault injection for tests. When set, save_checkpoint calls it with the name of each point between
// its steps where a crash would leave a distinct state on disk ("tensors written", "state written",
// "committed", and "retired" when an old checkpoint has been renamed for removal); a test throws from it to
// leave the run directory as that crash would (a throw skips the rest of the save just as a crash does:
// nothing is cleaned up on the way out). Null outside tests, where it costs one untaken branch per point of a
// save.
extern void (*checkpoint_fault_hook)(const char* stage);

struct LoadedCheckpoint {
  TrainerState trainer;
  std::string data_cursor;  // JSON text as it was saved
  uint64_t seed = 0;
};

// Verifies the checkpoint in `dir` against this run and copies its parameters and AdamW moments
// into `lora`, which must be laid out for the current model and LoRA config. Refuses (tf::Error,
// `lora` untouched) when the checksum fails, when `config_hash` differs from the saved one
// (naming the changed options when both sides have a config JSON), or when the LoRA layout
// (rank, targets, layers, tensor shapes) differs.
LoadedCheckpoint load_checkpoint(const std::string& dir, const std::string& config_hash,
                                 const std::string& config_json, LoraState& lora);

}  // namespace tf
