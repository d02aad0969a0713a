#include "src/cli/common.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <ctime>
#include <filesystem>

#include "kernels/cpu/bf16_gemm.h"
#include "kernels/cpu/isa.h"
#include "src/core/error.h"
#include "src/core/process_memory.h"
#include "src/data/sampler.h"
#include "src/io/peft.h"

namespace tf::cli {

namespace fs = std::filesystem;

const tok::Tokenizer& Session::tokenizer() const {
  TF_CHECK(loaded.tokenizer, loaded.source, ": the model has no tokenizer (tokenizer.json, tokenizer.model ",
           "or an embedded GGUF vocabulary)");
  return *loaded.tokenizer;
}

Session open_session(const std::string& model_path, LoraConfig lora, int64_t max_tokens,
                     const std::function<CheckpointPolicy(const LlamaConfig&)>& policy,
                     const std::string& adapter, io::QuantMode quant, const std::string& device,
                     const std::string& attention, std::unique_ptr<Backend> backend,
                     const std::string& device_note, offload::WeightTier tier, const ModelLayout& layout,
                     const io::SpillOptions& spill) {
  Session s;
  const AttentionKernel kernel = parse_attention(attention);
  if (!backend) check_device(device, kernel);
  // The disk tier streams converted layers from a spill file; the shard tier copies its shares from
  // one, so that no rank holds a whole converted base in memory.
  const bool spills = tier == offload::WeightTier::Disk || tier == offload::WeightTier::Shard;
  s.loaded = io::load_model(model_path, true, quant, spills ? &spill : nullptr);
  for (const MappedFile& f : s.loaded.weights.files)
    if (f.path == spill.path)
      std::fprintf(
          stderr,
          "note: %s: the layers converted at load (--quant %s) are %s %s (%s), removed when the run ends\n",
          tier == offload::WeightTier::Disk ? "--weights disk" : "--shard-weights",
          std::string(io::quant_mode_name(quant)).c_str(),
          tier == offload::WeightTier::Disk ? "streamed from" : "cut into this rank's shares from",
          f.path.c_str(), format_bytes(double(f.bytes)).c_str());
  // The loader's parse of metadata and vocabulary frees much in small pieces.
  release_free_memory();
  std::optional<io::PeftAdapter> peft;
  if (!adapter.empty()) {
    const fs::path run_adapter = fs::path(adapter) / "adapter";
    const std::string dir = fs::exists(run_adapter / "adapter_config.json") ? run_adapter.string() : adapter;
    peft = io::import_peft(dir, s.loaded.weights.config);
    lora = peft->lora.config;
  }
  const CheckpointPolicy p = policy(s.loaded.weights.config);
  if (backend) {
    s.backend = std::move(backend);
    s.device_note = device_note;
  } else {
    s.backend = make_backend(device, &s.device_note, kernel);
  }
  s.attention = s.backend->attention_kernel(s.loaded.weights.config.head_dim);
  TF_CHECK(s.attention != "cudnn" || s.loaded.weights.config.attn_softcap == 0,
           "--attention cudnn: the cuDNN attention graph has no logit soft-capping, and this model (",
           s.loaded.weights.config.architecture, ") caps its attention scores at ",
           s.loaded.weights.config.attn_softcap, "; --attention auto, flash or plain runs it");
  // The model's memory is one device arena, taken before the model is built; its steps allocate nothing.
  s.backend->reserve(
      LlamaModel::memory_plan(s.loaded.weights, lora, p, max_tokens, *s.backend, tier, layout).total);
  s.model = std::make_unique<LlamaModel>(std::move(s.loaded.weights), lora, p, max_tokens, *s.backend, tier,
                                         layout);
  if (peft) {
    LoraState& dst = s.model->lora();
    TF_CHECK(dst.n_params == peft->lora.n_params, adapter, ": adapter layout does not match the model");
    dst.backend().upload(dst.param_data(), peft->lora.param_data(), size_t(dst.n_params) * sizeof(float));
    dst.backend().synchronize();
  }
  return s;
}

io::SpillOptions spill_options(const std::string& spill_dir, const std::string& run_dir, int rank) {
  io::SpillOptions s;
  if (!spill_dir.empty()) {
    s.path = io::default_spill_path(spill_dir);
  } else if (!run_dir.empty()) {
    s.path = (fs::path(run_dir) /
              (rank < 0 ? "base-spill.bin" : "base-spill-rank" + std::to_string(rank) + ".bin"))
                 .string();
    s.replace_stale = true;
  } else {
    s.path = io::default_spill_path(fs::temp_directory_path().string());
  }
  return s;
}

io::QuantMode quant_option(const std::string& name) {
  const std::optional<io::QuantMode> mode = io::parse_quant_mode(name);
  TF_CHECK(mode, "--quant must be one of ", io::quant_mode_names(), ", got '", name, "'");
  return *mode;
}

offload::WeightTier weight_tier_option(const std::string& name) {
  if (name == "resident") return offload::WeightTier::Resident;
  if (name == "host") return offload::WeightTier::Host;
  TF_CHECK(name == "disk", "--weights must be resident, host or disk, got '", name, "'");
  return offload::WeightTier::Disk;
}

data::ChatTemplate choose_template(const std::string& name, const io::LoadedModel& m,
                                   const std::string& think) {
  if (name != "auto") return data::template_by_name(name);
  if (m.chat_template.empty()) return data::template_by_name("plain");
  const auto token = [&](int32_t id) {
    return m.tokenizer && id >= 0 ? m.tokenizer->token_to_piece(id) : std::string();
  };
  try {
    return data::model_chat_template(
        m.chat_template, m.chat_template_source, token(m.tokenizer ? m.tokenizer->bos_id() : -1),
        token(m.tokenizer ? m.tokenizer->eos_id() : -1), data::think_mode_by_name(think), std::time(nullptr));
  } catch (const Error& e) {
    TF_FAIL(
        e.what(),
        "; choose a built-in format with --template (chatml, llama3, llama2, mistral, gemma, alpaca, plain)");
  }
}

data::TokenizeOptions tokenize_options(int seq_len, const std::string& train_on, bool mask_history,
                                       const std::string& train_on_eos) {
  TF_CHECK(train_on == "completion" || train_on == "all", "--train-on must be completion or all, got '",
           train_on, "'");
  TF_CHECK(!(mask_history && train_on == "all"),
           "--mask-history trains only the last assistant turn and --train-on all every token; choose one");
  data::TokenizeOptions to;
  to.seq_len = size_t(seq_len);
  to.train_on_all = train_on == "all";
  to.mask_history = mask_history;
  to.train_on_eos = data::eos_loss_by_name(train_on_eos);
  return to;
}

Batch batch_view(const data::TokenBatch& b) {
  // Rows of one example each need no document mask; attention without one is cheaper, and is what
  // cuDNN's fused attention runs.
  return Batch{b.batch,
               b.seq,
               b.tokens.data(),
               b.targets.data(),
               b.positions.data(),
               b.packed ? b.doc_ids.data() : nullptr};
}

LossSum evaluate_loss(LlamaModel& model, const data::TokenizedDataset& data, int micro_batch, int seq_len,
                      int32_t pad_id) {
  data::Sampler sampler(data.size(), 0, /*shuffle=*/false, /*epochs=*/1);
  data::BatchOptions opt;
  opt.batch = micro_batch;
  opt.seq = seq_len;
  opt.pack = true;
  opt.pad_id = pad_id;
  data::TokenBatch batch;
  LossSum total;
  while (data::next_batch(data, sampler, opt, batch)) {
    const LossSum l = model.forward_loss(batch_view(batch));
    total.sum += l.sum;
    total.n_valid += l.n_valid;
  }
  return total;
}

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) {
    bytes /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.2f %s", bytes, units[u]);
  return buf;
}

bool stdout_is_terminal() {
  return isatty(STDOUT_FILENO) == 1;
}

void check_matmul_option(const std::string& option, const std::string& device) {
  const cpu::MatmulChoice choice = cpu::parse_matmul_choice(option);
  TF_CHECK(choice == cpu::MatmulChoice::Auto || device == "cpu" || device == "auto", "--matmul ", option,
           " applies to the cpu; --device ", device, " multiplies the base's matrices in bf16 already");
  if (choice == cpu::MatmulChoice::BF16) cpu::resolve_matmul(choice, cpu::cpu_has_avx512_bf16(), {});
}

std::string apply_matmul_option(const std::string& option, const Backend& be, const LlamaWeights& w) {
  const cpu::MatmulChoice choice = cpu::parse_matmul_choice(option);
  if (be.name() != "cpu") {
    TF_CHECK(choice == cpu::MatmulChoice::Auto, "--matmul ", option, " applies to the cpu; ", be.name(),
             " multiplies the base's matrices in bf16 already");
    cpu::set_matmul_precision(cpu::MatmulPrecision::F32);
    return {};
  }
  // The loss's products with a bf16 or quantized lm_head take the bf16 path too.
  std::vector<DType> dtypes;
  if (cpu::bf16_path_takes(w.lm_head.dtype)) dtypes.push_back(w.lm_head.dtype);
  for (const BlockWeights& b : w.blocks)
    for (const WeightRef* m : {&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down})
      if (m->rows > 0) dtypes.push_back(m->dtype);
  const cpu::MatmulResolution r = cpu::resolve_matmul(choice, cpu::cpu_has_avx512_bf16(), dtypes);
  cpu::set_matmul_precision(r.precision);
  return r.why;
}

}  // namespace tf::cli
