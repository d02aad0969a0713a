// defines: tf::model_scratch_shape, the ScratchShape of a LlamaModel's run (what
// Backend::scratch_plan sizes the device launchers' scratch by), from the weights as loaded
#pragma once

#include "kernels/scratch_shape.h"
#include "src/model/llama.h"

namespace tf {

// A run of the model `w` with adapters `lora` on micro-batches of at most `batch` rows of `seq`
// tokens, packed (rows of several documents), training steps or forward passes alone (eval), its
// memory laid out as `layout` says (the rows of the MLP's chunks and of the loss's calls).
ScratchShape model_scratch_shape(const LlamaWeights& w, const LoraConfig& lora, int batch, int seq,
                                 bool train, const ModelLayout& layout = {});

}  // namespace tf
