#include "src/cli/commands.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>

#include "kernels/cpu/dequant.h"
#include "kernels/cpu/threads.h"
#include "kernels/ops.h"
#include "src/cli/common.h"
#include "src/cli/outputs.h"
#include "src/cli/plan.h"
#include "src/core/error.h"
#include "src/io/durable.h"
#include "src/io/gguf_lora.h"
#include "src/io/hf_model.h"
#include "src/io/merge.h"
#include "src/io/peft.h"
#include "src/io/safetensors.h"
#include "src/train/checkpoint.h"

namespace tf::cli {

namespace fs = std::filesystem;

namespace {

// Evaluation and generation need no training state: a rank-1 adapter with B = 0 leaves the base
// model's outputs exactly unchanged and is replaced by --adapter when one is given. It adapts o_proj,
// a module of its own in every architecture (Phi-3 fuses q with k and v).
LoraConfig inert_lora() {
  LoraConfig l;
  l.rank = 1;
  l.alpha = 1;
  l.targets = parse_lora_targets("o");
  return l;
}

// A forward pass needs no block's activations after the block: one set serves every layer.
CheckpointPolicy per_block(const LlamaConfig&) {
  return CheckpointPolicy::PerBlock;
}

std::string trim(std::string s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return {};
  return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
}

// The record's final response (completion, output or closing assistant turn), or nothing when it
// has none to generate.
std::optional<std::string> final_response(const data::Example& ex) {
  switch (ex.shape) {
    case data::Example::Shape::PromptCompletion: return ex.completion;
    case data::Example::Shape::Instruction: return ex.output;
    case data::Example::Shape::Messages:
      if (!ex.messages.empty() && ex.messages.back().role == "assistant") return ex.messages.back().content;
      return std::nullopt;
    case data::Example::Shape::Text: return std::nullopt;
  }
  return std::nullopt;
}

// The ids that lead up to `ex`'s final response under `tmpl`.
std::vector<int32_t> response_prompt_ids(const data::ChatTemplate& tmpl, const tok::Tokenizer& tok,
                                         const data::Example& ex) {
  std::vector<int32_t> ids;
  std::vector<uint8_t> trainable;
  data::tokenize_segments(data::render_response_prompt(tmpl, ex, tok.adds_bos()), tok, true, SIZE_MAX, ids,
                          trainable);
  return ids;
}

}  // namespace

int run_inspect(const std::string& path, bool all_tensors) {
  // A GGUF file's tensors are described, not dequantized, so a file with types tightfit cannot
  // train on still shows everything else.
  const io::LoadedModel m = io::load_model(path, false);
  const LlamaConfig& c = m.weights.config;
  std::printf("model       %s (%s)\n", path.c_str(),
              m.format == io::ModelFormat::Gguf ? "GGUF" : "HF directory");
  std::printf("arch        %s: %d layers, hidden %d, intermediate %d, heads %d (kv %d, dim %d), vocab %d\n",
              c.architecture.c_str(), c.n_layers, c.hidden, c.intermediate, c.n_heads, c.n_kv_heads,
              c.head_dim, c.vocab);
  char rope_note[96] = "";
  if (c.rope.scaling != RopeScalingType::None)
    std::snprintf(rope_note, sizeof rope_note, " (%s scaling, factor %g)", rope_scaling_name(c.rope.scaling),
                  double(c.rope.factor));
  std::printf(
      "            rms eps %g, rope theta %g%s%s, rope layout %s, tied embeddings %s, attention bias %s, "
      "max positions %d\n",
      double(c.rms_eps), double(c.rope.theta), rope_note,
      c.rope.freq_factors.empty() ? "" : " (per-frequency factors from rope_freqs.weight)",
      c.rope_layout == RopeLayout::Interleaved ? "interleaved (llama GGUF)" : "split-half (HF, qwen2 GGUF)",
      c.tie_embeddings ? "yes" : "no", c.attention_bias ? "yes" : "no", c.max_positions);
  // What Qwen3 and Gemma 3 add to the Llama block, and where the layers slide.
  std::string extras;
  const auto note = [&extras](const std::string& s) { extras += (extras.empty() ? "" : ", ") + s; };
  char buf[128];
  if (c.qk_norm) note("q/k norms per head");
  if (c.sandwich_norms) note("norms on the attention and MLP outputs");
  if (c.activation == MlpActivation::GeluTanh) note("GeGLU (gelu, tanh approximation)");
  if (c.embed_scale != 1.0f) {
    std::snprintf(buf, sizeof buf, "embeddings scaled by %g", double(c.embed_scale));
    note(buf);
  }
  if (c.query_pre_attn_scalar > 0) {
    std::snprintf(buf, sizeof buf, "scores scaled by %g^-0.5", double(c.query_pre_attn_scalar));
    note(buf);
  }
  if (c.sliding_window > 0) {
    int sliding = 0;
    for (int l = 0; l < c.n_layers; ++l) sliding += c.window(l) > 0;
    std::snprintf(buf, sizeof buf, "sliding window %d in %d of %d layers", c.sliding_window, sliding,
                  c.n_layers);
    note(buf);
  }
  if (c.has_local_rope()) {
    std::snprintf(buf, sizeof buf, "sliding layers' rope theta %g", double(c.rope_local.theta));
    note(buf);
  }
  if (!extras.empty()) std::printf("            %s\n", extras.c_str());
  std::printf("parameters  %.1fM\n", double(c.n_params()) / 1e6);
  if (m.format == io::ModelFormat::Gguf) {
    std::map<std::string, std::pair<int, uint64_t>> by_type;
    for (const auto& t : m.gguf->tensors()) {
      auto& e = by_type[ggml_type_info(uint32_t(t.type)).name];
      ++e.first;
      e.second += t.n_bytes;
    }
    std::printf("tensors     %zu:", m.gguf->tensors().size());
    for (const auto& [type, e] : by_type)
      std::printf(" %d %s (%s)", e.first, type.c_str(), format_bytes(double(e.second)).c_str());
    std::printf("\n");
    size_t shown = 0;
    for (const auto& t : m.gguf->tensors()) {
      if (!all_tensors && shown++ >= 12) {
        std::printf("  ... %zu more (--all-tensors lists them)\n", m.gguf->tensors().size() - 12);
        break;
      }
      std::string shape;
      for (int64_t d : t.shape()) shape += (shape.empty() ? "" : " x ") + std::to_string(d);
      std::printf("  %-32s %-6s %-14s %s\n", t.name.c_str(), ggml_type_info(uint32_t(t.type)).name,
                  shape.c_str(), format_bytes(double(t.n_bytes)).c_str());
    }
    std::map<std::string, std::vector<std::string>> unusable;
    for (const auto& t : m.gguf->tensors()) {
      const GgmlTypeInfo info = ggml_type_info(uint32_t(t.type));
      if (!info.supported) unusable[info.name].push_back(t.name);
    }
    if (!unusable.empty()) {
      std::printf("unusable    tensors of these types cannot be used for training (tightfit reads %s):\n",
                  ref::dequantizable_type_names().c_str());
      for (const auto& [type, names] : unusable) {
        std::string list;
        for (size_t i = 0; i < names.size(); ++i) {
          if (!all_tensors && i == 4) {
            list += ", ... " + std::to_string(names.size() - 4) + " more";
            break;
          }
          list += (i ? ", " : "") + names[i];
        }
        std::printf("  %-8s %zu tensor%s: %s\n", type.c_str(), names.size(), names.size() == 1 ? "" : "s",
                    list.c_str());
      }
    }
  } else {
    size_t shown = 0, n = 0;
    LlamaWeights::for_each_slot(c, [&](WeightSlot, int) { ++n; });
    std::printf("tensors     %zu\n", n);
    LlamaWeights::for_each_slot(c, [&](WeightSlot slot, int layer) {
      if (!all_tensors && shown++ >= 12) return;
      const WeightRef& w = m.weights.slot(slot, layer);
      std::printf("  %-48s %-5s %lld x %lld  %s\n", hf_weight_name(slot, layer).c_str(),
                  std::string(dtype_name(w.dtype)).c_str(), (long long)w.rows, (long long)w.cols,
                  format_bytes(double(w.rows * w.cols) * double(dtype_size(w.dtype))).c_str());
    });
    if (!all_tensors && n > 12) std::printf("  ... %zu more (--all-tensors lists them)\n", n - 12);
  }
  if (m.tokenizer) {
    const tok::Tokenizer& t = *m.tokenizer;
    auto piece = [&](int32_t id) {
      return id < 0 ? std::string("none") : "\"" + t.token_to_piece(id) + "\" (" + std::to_string(id) + ")";
    };
    std::printf("tokenizer   %zu tokens (%zu added), bos %s, eos %s, pad %s, adds bos %s\n", t.vocab_size(),
                t.added_tokens().size(), piece(t.bos_id()).c_str(), piece(t.eos_id()).c_str(),
                piece(t.pad_id()).c_str(), t.adds_bos() ? "yes" : "no");
    std::string stops;
    for (int32_t id : m.stop_ids) stops += (stops.empty() ? "" : ", ") + piece(id);
    std::printf("generation  stops at %s\n", stops.empty() ? "max-new-tokens only (no eos)" : stops.c_str());
  } else {
    std::printf("tokenizer   none\n");
  }
  if (m.chat_template.empty()) {
    std::printf("template    none (plain)\n");
  } else {
    const data::ChatTemplate tmpl = data::detect_template(m.chat_template, path);
    std::printf("template    %s%s (%zu characters of Jinja)\n",
                std::string(data::template_name(tmpl.kind)).c_str(),
                tmpl.default_system.empty() ? "" : ", with a default system prompt", m.chat_template.size());
  }
  return 0;
}

int run_generate(const GenerateOptions& o) {
  TF_CHECK(!o.model.empty(), "--model is required");
  TF_CHECK(o.max_new_tokens > 0, "--max-new-tokens must be positive");
  TF_CHECK(o.temperature >= 0, "--temperature must not be negative");
  cpu::set_num_threads(o.threads);
  // A prompt's token covers at least a byte of it, and a chat template adds a few of its own.
  const int64_t kv_tokens = int64_t(o.prompt.size()) + 128 + o.max_new_tokens;
  InferencePlan plan = plan_inference({o.model, o.quant, o.device, o.attention, o.weights, o.max_mem,
                                       o.max_host_mem, "", 1, kGenerateRows, kv_tokens});
  Session s = open_session(o.model, inert_lora(), kGenerateRows, per_block, o.adapter, quant_option(o.quant),
                           o.device, o.attention, std::move(plan.backend), plan.device_note, plan.tier,
                           plan.layout, spill_options(o.spill_dir));
  // The generated text is the output; where the model ran and what the plan chose go to stderr,
  // and only when auto chose a GPU or to stream the weights.
  if (!s.device_note.empty() && s.backend->name() != "cpu")
    std::fprintf(stderr, "device: %s\n", s.device_note.c_str());
  if (s.model->weight_tier() != offload::WeightTier::Resident)
    for (const std::string& choice : plan.choices) std::fprintf(stderr, "plan: %s\n", choice.c_str());
  const tok::Tokenizer& tok = s.tokenizer();
  std::vector<int32_t> ids;
  if (o.chat) {
    // The prompt as the prompt of a {"prompt","completion"} record: a user turn under a chat
    // template, the bare text or the Alpaca instruction under plain and alpaca.
    data::Example ex;
    ex.shape = data::Example::Shape::PromptCompletion;
    ex.prompt = o.prompt;
    ids = response_prompt_ids(choose_template(o.template_name, s.loaded), tok, ex);
  } else {
    ids = tok.encode(o.prompt);
  }
  GenerateStats stats;
  const std::vector<int32_t> out = generate_tokens(*s.model, ids, o.max_new_tokens, s.loaded.stop_ids,
                                                   int64_t(tok.vocab_size()), o.temperature, o.seed, &stats);
  std::printf("%s\n", tok.decode(out, /*skip_special=*/true).c_str());
  if (o.stats) {
    const auto rate = [](int64_t n, double secs) { return secs > 0 ? double(n) / secs : 0.0; };
    std::fprintf(stderr, "threads    %d; %s\n", cpu::num_threads(), cpu::wait_policy().c_str());
    std::fprintf(stderr, "prompt     %lld tokens in %.3f s (%.1f tokens/s)\n", (long long)stats.prompt_tokens,
                 stats.prompt_s, rate(stats.prompt_tokens, stats.prompt_s));
    const int64_t decoded = std::max<int64_t>(stats.new_tokens - 1, 0);
    std::fprintf(stderr, "generated  %lld tokens; the %lld after the first in %.3f s (%.1f tokens/s)\n",
                 (long long)stats.new_tokens, (long long)decoded, stats.decode_s,
                 rate(decoded, stats.decode_s));
  }
  return 0;
}

int run_eval(const EvalOptions& o) {
  TF_CHECK(!o.model.empty() && !o.data.empty(), "--model and --data are required");
  cpu::set_num_threads(o.threads);
  // The exact-match completions decode each example's prompt and max_new_tokens more.
  InferencePlan plan =
      plan_inference({o.model, o.quant, o.device, o.attention, o.weights, o.max_mem, o.max_host_mem, o.data,
                      o.micro_batch, o.seq_len, int64_t(o.seq_len) + o.max_new_tokens});
  Session s = open_session(o.model, inert_lora(), int64_t(o.micro_batch) * o.seq_len, per_block, o.adapter,
                           quant_option(o.quant), o.device, o.attention, std::move(plan.backend),
                           plan.device_note, plan.tier, plan.layout, spill_options(o.spill_dir));
  std::printf("device      %s\n",
              s.device_note.empty() ? s.backend->describe().c_str() : s.device_note.c_str());
  for (const std::string& choice : plan.choices) std::printf("plan        %s\n", choice.c_str());
  if (s.attention != "cpu") std::printf("attention   %s\n", s.attention.c_str());
  if (s.model->weight_tier() != offload::WeightTier::Resident)
    std::printf("weights     streamed from %s, a layer at a time\n",
                s.model->weight_tier() == offload::WeightTier::Disk ? "the model file" : "host memory");
  const tok::Tokenizer& tok = s.tokenizer();
  const data::ChatTemplate tmpl = choose_template(o.template_name, s.loaded);
  const data::Dataset raw = data::load_jsonl(o.data);
  data::TokenizeOptions to;
  to.seq_len = size_t(o.seq_len);
  const data::TokenizedDataset d = data::tokenize_dataset(raw, tmpl, tok, to);
  const int32_t pad = tok.pad_id() >= 0 ? tok.pad_id() : std::max(tok.eos_id(), 0);
  const LossSum loss = evaluate_loss(*s.model, d, o.micro_batch, o.seq_len, pad);
  std::printf("examples    %zu (%lld target tokens)\n", d.size(), (long long)loss.n_valid);
  std::printf("loss        %.6f\nperplexity  %.4f\n", loss.mean(), std::exp(loss.mean()));

  if (!o.logits_out.empty()) {
    std::vector<std::vector<float>> logits;
    std::vector<std::vector<int32_t>> ids;
    const size_t n = std::min(d.size(), size_t(std::max(o.logits_examples, 0)));
    for (size_t i = 0; i < n; ++i) {
      const auto ex = d.example_ids(i);
      ids.emplace_back(ex.begin(), ex.end());
      std::vector<int32_t> pos(ex.size());
      for (size_t t = 0; t < pos.size(); ++t) pos[t] = int32_t(t);
      logits.emplace_back(ex.size() * size_t(s.model->config().vocab));
      s.model->forward_logits(Batch{1, int(ex.size()), ids.back().data(), nullptr, pos.data(), nullptr},
                              logits.back().data());
    }
    std::vector<io::SafetensorsWriteTensor> tensors;
    for (size_t i = 0; i < n; ++i) {
      const auto len = int64_t(ids[i].size());
      tensors.push_back({"logits." + std::to_string(i),
                         io::StDType::F32,
                         {len, s.model->config().vocab},
                         std::as_bytes(std::span(logits[i]))});
      tensors.push_back(
          {"input_ids." + std::to_string(i), io::StDType::I32, {len}, std::as_bytes(std::span(ids[i]))});
    }
    io::write_safetensors(o.logits_out, tensors);
    std::printf("logits      %zu examples written to %s\n", n, o.logits_out.c_str());
  }

  // Exact match: the greedy completion of each prompt equals the reference completion (trimmed).
  size_t total = 0, correct = 0;
  for (const data::Example& ex : raw.examples) {
    const std::optional<std::string> want = final_response(ex);
    if (!want) continue;
    const std::vector<int32_t> prompt = response_prompt_ids(tmpl, tok, ex);
    const std::vector<int32_t> out =
        generate_tokens(*s.model, prompt, o.max_new_tokens, s.loaded.stop_ids, int64_t(tok.vocab_size()));
    const bool ok = trim(tok.decode(out, true)) == trim(*want);
    correct += ok;
    ++total;
  }
  if (total)
    std::printf("exact match %.1f%% (%zu of %zu greedy completions)\n",
                100.0 * double(correct) / double(total), correct, total);
  return 0;
}

namespace {

// How far the merged model's logits are from base + adapter on two fixed sequences of 16 token
// ids spread over the tokenizer's range: a few forward passes, so that every merged export shows
// what merging and rounding the merged weights cost.
std::string probe_merged(const std::string& base_path, const std::string& run, const std::string& merged) {
  constexpr int kSeqs = 2, kLen = 16;
  // One model at a time: base + adapter first, then the merged one, so the probe never holds two
  // copies of the weights.
  const auto logits_of = [&](Session s, int64_t range) {
    const int64_t vocab = s.model->config().vocab;
    std::vector<int32_t> ids(kLen), pos(kLen);
    std::vector<float> out(size_t(kSeqs * kLen * vocab));
    for (int q = 0; q < kSeqs; ++q) {
      for (int t = 0; t < kLen; ++t) {
        ids[size_t(t)] = int32_t((uint64_t(q * kLen + t) * 2654435761u + 12345u) % uint64_t(range));
        pos[size_t(t)] = t;
      }
      s.model->forward_logits(Batch{1, kLen, ids.data(), nullptr, pos.data(), nullptr},
                              out.data() + size_t(q * kLen * vocab));
    }
    return out;
  };
  Session want = open_session(base_path, inert_lora(), kLen, per_block, run);
  const int64_t vocab = want.model->config().vocab;
  const int64_t range =
      want.loaded.tokenizer ? std::min(int64_t(want.loaded.tokenizer->vocab_size()), vocab) : vocab;
  const std::vector<float> a = logits_of(std::move(want), range);
  const std::vector<float> b = logits_of(open_session(merged, inert_lora(), kLen, per_block), range);
  TF_CHECK(a.size() == b.size(), merged, ": the merged model's vocabulary differs from the base's");
  double max_diff = 0, diff2 = 0, ref2 = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = double(b[i]) - double(a[i]);
    max_diff = std::max(max_diff, std::fabs(d));
    diff2 += d * d;
    ref2 += double(a[i]) * double(a[i]);
  }
  char line[160];
  std::snprintf(
      line, sizeof line,
      "merged vs base + adapter on %d sequences of %d tokens: max |dlogit| %.3g, relative error %.3g", kSeqs,
      kLen, max_diff, ref2 > 0 ? std::sqrt(diff2 / ref2) : 0.0);
  return line;
}

}  // namespace

int run_export(const ExportOptions& o) {
  TF_CHECK(!o.run.empty() && !o.out.empty(), "--run and --out are required");
  const fs::path run(o.run);
  const std::string config_path = (run / "config.json").string();
  TF_CHECK(fs::exists(config_path), o.run, ": not a run directory (no config.json)");
  std::ifstream in(config_path);
  const nlohmann::json cfg = nlohmann::json::parse(in, nullptr, false);
  TF_CHECK(cfg.is_object() && cfg.contains("model") && cfg["model"].is_string(), config_path,
           ": has no \"model\" entry");
  const std::string base_path = cfg["model"].get<std::string>();
  // Older versions stored the path as given, relative to where the run was started.
  TF_CHECK(fs::path(base_path).is_absolute() || fs::exists(base_path), config_path,
           ": the run's model path '", base_path,
           "' is relative and is not found from here; run export from the directory the run ",
           "was started in");
  const fs::path adapter_dir = run / "adapter";
  TF_CHECK(fs::exists(adapter_dir / "adapter_config.json"), o.run, ": has no adapter/ yet (the run has not ",
           "finished; resume it, or export its latest checkpoint by finishing the run)");

  TF_CHECK(o.format == "peft" || o.format == "gguf" || o.format == "merged",
           "--format must be peft, gguf or merged, got '", o.format, "'");
  // Nothing tightfit did not write is replaced without --force, and the run itself never is.
  std::error_code ec;
  TF_CHECK(!fs::exists(o.out, ec) || !fs::equivalent(o.out, run, ec), o.out,
           ": is the run directory; choose another --out");
  // A merged export onto a GGUF base is a GGUF file only when --out says so; otherwise it is an HF
  // model directory, which transformers loads as it is.
  const bool gguf_base = !fs::is_directory(base_path, ec);
  const bool out_gguf = fs::path(o.out).extension() == ".gguf";
  TF_CHECK(o.format != "merged" || gguf_base || !out_gguf, o.out,
           ": ends in .gguf, but a merged export of a run on an HF directory is an HF directory; ",
           "choose an --out without .gguf");
  // --quant: how a merged export stores its weights; which values apply depends on --out.
  io::MergedGgufOptions gguf_options;
  if (!o.quant.empty()) {
    static const std::map<std::string, GgmlType> kGgufTypes = {
        {"f16", GgmlType::F16},   {"q8_0", GgmlType::Q8_0}, {"q4_0", GgmlType::Q4_0},
        {"q4_1", GgmlType::Q4_1}, {"q5_0", GgmlType::Q5_0}, {"q5_1", GgmlType::Q5_1}};
    const bool gguf_quant = o.quant == "keep" || kGgufTypes.count(o.quant);
    TF_CHECK(o.format == "merged", "--quant applies to --format merged only, not ", o.format);
    TF_CHECK(o.quant == "nf4" || gguf_quant, "--quant must be nf4 (for an HF directory --out) or f16, q8_0, ",
             "q4_0, q4_1, q5_0, q5_1 or keep (for a .gguf --out), got '", o.quant, "'");
    TF_CHECK(o.quant != "nf4" || !out_gguf, o.out, ": ends in .gguf, but --quant nf4 writes a bitsandbytes ",
             "4-bit HF directory; choose an --out without .gguf, or a GGUF --quant (f16, q8_0, q4_0, q4_1, ",
             "q5_0, q5_1 or keep)");
    TF_CHECK(!gguf_quant || out_gguf, "--quant ", o.quant, " is for GGUF files, but --out ", o.out,
             " is an HF directory (it does not end in .gguf); an HF directory takes --quant nf4, or no ",
             "--quant for f16/bf16");
    gguf_options.keep_base_types = o.quant == "keep";
    if (gguf_quant && !gguf_options.keep_base_types) gguf_options.type = kGgufTypes.at(o.quant);
  }
  if (o.format == "gguf" || (o.format == "merged" && out_gguf)) {
    check_export_file_target(o.out, o.force);
  } else {
    const fs::file_status st = fs::symlink_status(o.out, ec);
    TF_CHECK(!fs::exists(st) || fs::is_directory(st), o.out,
             ": exists and is not a directory (a file or a symbolic link), but ", o.format,
             " exports are directories; choose another --out");
    TF_CHECK(o.force || may_replace_export_dir(o.out), o.out,
             ": holds files that are not a tightfit export (", describe_entries(o.out),
             "); choose a new or empty --out, or pass --force to replace the ",
             "directory and everything in it");
  }
  std::string summary;
  {
    // Only a merged HF export reads the base's weights (a merged GGUF reads its tensors from the
    // file); they are kept in their stored types, quantized ones included, and each tensor is
    // dequantized a tile at a time as it is merged.
    const bool merged_hf = o.format == "merged" && !out_gguf;
    io::LoadedModel base = io::load_model(base_path, merged_hf, io::QuantMode::Keep);
    const io::PeftAdapter a = io::import_peft(adapter_dir.string(), base.weights.config);
    if (o.format == "peft") {
      publish_export_dir(o.out, "peft", [&](const std::string& staged) {
        io::export_peft(staged, a.lora, base.weights.config, base_path);
      });
    } else if (o.format == "gguf") {
      io::export_gguf_lora(o.out, a.lora, base.weights.config);
    } else if (out_gguf) {
      summary = io::describe(
          io::export_merged_gguf(o.out, *base.gguf, a.lora, base.weights.config.rope_layout, gguf_options));
    } else {
      io::MergedHfOptions mo;
      mo.nf4 = o.quant == "nf4";
      if (base.format == io::ModelFormat::Gguf) {
        // f16, or bf16 when the base has bf16 tensors, rather than each tensor's own type (f32 for
        // the norms of every GGUF file).
        const auto& ts = base.gguf->tensors();
        const bool bf16 = std::any_of(ts.begin(), ts.end(),
                                      [](const io::GgufTensorInfo& t) { return t.type == GgmlType::BF16; });
        mo.dtype = bf16 ? DType::BF16 : DType::F16;
      } else {
        mo.base_dir = base_path;
      }
      if (mo.nf4)
        summary = std::to_string(7 * base.weights.config.n_layers) +
                  " decoder-layer matrices written as NF4 (bitsandbytes 4-bit, double-quantized absmax)";
      publish_export_dir(o.out, "merged", [&](const std::string& staged) {
        io::export_merged_hf(staged, base.weights, a.lora, mo);
      });
    }
  }
  std::printf("exported %s adapter of %s to %s\n", o.format.c_str(), o.run.c_str(), o.out.c_str());
  if (!summary.empty()) std::printf("%s\n", summary.c_str());
  if (o.format == "merged") std::printf("%s\n", probe_merged(base_path, o.run, o.out).c_str());
  return 0;
}

}  // namespace tf::cli
