// The planner: the Plan's arithmetic, size options, describe_model against what load_model stores,
// the choices of auto options and the refusals, `tightfit plan` on the configs in examples/configs,
// and finetune's plan.json, refusal and measured peaks.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "offload/plan.h"
#include "src/core/error.h"
#include "src/io/describe.h"
#include "src/io/model_loader.h"
#include "src/io/spill.h"
#include "tests/cli_test_util.h"
#include "tests/gguf_test_util.h"
#include "tests/model_test_util.h"
#include "tests/plan_test_util.h"

namespace tf {
namespace {

using offload::PlanItem;
using offload::Tier;

TEST(Plan, PeakSumsSteadyItemsAndTheLargestTransientOne) {
  offload::Plan p;
  p.items = {{"a", "", Tier::Host, 100, false},       {"b", "", Tier::Host, 50, false},
             {"parse", "", Tier::Host, 30, true},     {"export", "", Tier::Host, 70, true},
             {"slots", "", Tier::Device, 400, false}, {"streamed", "", Tier::Disk, 1000, false}};
  EXPECT_EQ(p.peak(Tier::Host), 100u + 50u + 70u);
  EXPECT_EQ(p.peak(Tier::Device), 400u);
  EXPECT_EQ(p.peak(Tier::Disk), 1000u);
  EXPECT_TRUE(p.fits({400, 220}));
  EXPECT_FALSE(p.fits({399, 220}));
  EXPECT_FALSE(p.fits({400, 219}));
  // Disk is not a budget, and a tier without a budget always fits.
  EXPECT_TRUE(p.fits({std::nullopt, std::nullopt}));
  const std::vector<PlanItem> over = p.largest_over({std::nullopt, 200}, 2);
  ASSERT_EQ(over.size(), 2u);
  EXPECT_EQ(over[0].component, "a");
  EXPECT_EQ(over[1].component, "export");
  const nlohmann::json j = p.to_json();
  EXPECT_EQ(j["peak"]["host"], 220u);
  EXPECT_EQ(j["items"].size(), 6u);
  EXPECT_NE(p.table().find("(transient)"), std::string::npos);
}

// describe_model says what load_model stores, slot by slot, without converting anything.
TEST(Plan, DescriptionMatchesTheLoadedModelUnderEveryMode) {
  const std::string path =
      (std::filesystem::temp_directory_path() / ("tightfit-plan-" + std::to_string(getpid()) + ".gguf"))
          .string();
  LlamaConfig cfg = test::tiny_config();
  cfg.tie_embeddings = false;
  const test::GgufBase base(cfg, path);
  for (io::QuantMode mode : {io::QuantMode::Keep, io::QuantMode::None, io::QuantMode::Bf16,
                             io::QuantMode::Int8, io::QuantMode::Nf4}) {
    const io::ModelDescription d = io::describe_model(path, mode);
    const io::LoadedModel m = io::load_model(path, true, mode);
    SCOPED_TRACE(std::string(io::quant_mode_name(mode)));
    EXPECT_FALSE(d.config_only);
    EXPECT_EQ(d.file_bytes, std::filesystem::file_size(path));
    uint64_t kept = 0, stored = 0;
    LlamaWeights::for_each_slot(cfg, [&](WeightSlot s, int layer) {
      const WeightRef& want = m.weights.slot(s, layer);
      const WeightRef& got = d.weights.slot(s, layer);
      EXPECT_EQ(got.dtype, want.dtype) << hf_weight_name(s, layer);
      EXPECT_EQ(got.rows, want.rows);
      EXPECT_EQ(got.cols, want.cols);
      EXPECT_EQ(io::stored_bytes(got), io::stored_bytes(want)) << hf_weight_name(s, layer);
      (got.data ? kept : stored) += uint64_t(io::stored_bytes(want));
    });
    EXPECT_EQ(d.kept_bytes, kept);
    EXPECT_EQ(d.stored_bytes, stored);
    EXPECT_EQ(d.gguf_metadata_bytes, m.gguf->data_offset());
  }
  std::filesystem::remove(path);
}

using test::PlanCli;

// Sizes take binary and decimal units; anything else is refused naming the option.
TEST_F(PlanCli, BudgetsParseWithBinaryAndDecimalUnits) {
  const std::string model = config("Mistral-7B-v0.3.json");
  const std::pair<const char*, uint64_t> good[] = {{"8GiB", uint64_t(8) << 30},
                                                   {"8G", uint64_t(8) << 30},
                                                   {"2.5GB", 2'500'000'000},
                                                   {"512MiB", uint64_t(512) << 20},
                                                   {"4096", 4096},
                                                   {"1 TiB", uint64_t(1) << 40}};
  for (const auto& [text, bytes] : good) {
    const nlohmann::json j = plan_json({"--model", model, "--device", "cpu", "--max-mem", text}, -1);
    EXPECT_EQ(j["budget"]["host"], bytes) << text;
  }
  for (const char* bad : {"", "GiB", "-1GiB", "0", "8 gallons", "1e30", "nan", "inf", "8GiBs", "0.1B"}) {
    const test::Result r = run({"plan", "--model", model, "--max-host-mem", bad});
    EXPECT_EQ(r.status, 1) << bad;
    EXPECT_NE(r.err.find("--max-host-mem"), std::string::npos) << bad << ": " << r.err;
  }
}

// Llama-3.1-8B from its config alone, as NF4 on a GPU: the weights' bytes against an independent
// count of its parameters, and the device peak falling as checkpointing and streaming take over.
TEST_F(PlanCli, LlamaEightBillionFromItsConfigAlone) {
  const nlohmann::json j = plan_json({"--model", config("Llama-3.1-8B.json"), "--device", "cuda", "--quant",
                                      "nf4", "--seq-len", "2048", "--micro-batch", "1", "--max-mem", "1TiB"});
  // 32 layers of q, k, v, o (4096 x 4096, 2 x 1024 x 4096, 4096 x 4096), gate, up, down (3 x 14336 x
  // 4096), embedding and lm_head (128256 x 4096): NF4 codes at 4 bits, an absmax code per 64 and an
  // f32 scale per 256 of those; norms in the config's torch_dtype, bf16. The device pads each
  // tensor's parts to 16 bytes.
  const double layer = 2.0 * 4096 * 4096 + 2.0 * 1024 * 4096 + 3.0 * 14336 * 4096;
  const double matrices = 32 * layer + 2.0 * 128256 * 4096;
  const double nf4 = matrices * (0.5 + 1.0 / 64 + 4.0 / (64 * 256));
  const double norms = (2.0 * 32 + 1) * 4096 * 2;
  const double weights = double(item(j, "base weights"));
  EXPECT_GE(weights, nf4 + norms);
  EXPECT_LT(weights, (nf4 + norms) * 1.001);
  EXPECT_EQ(j["weights"], "resident");
  EXPECT_EQ(j["checkpointing"], "none");
  EXPECT_EQ(j["fits"], true);
  const uint64_t none = alternative(j, "resident", "none")["device"];
  const uint64_t block = alternative(j, "resident", "block")["device"];
  const uint64_t host_block = alternative(j, "host", "block")["device"];
  // The budget leaves the MLP whole and the table on the device; the alternatives are each at its
  // smallest layout, the MLP in chunks of 256 rows and the table in host memory.
  EXPECT_EQ(j["mlp_chunk"], 0);
  EXPECT_EQ(j["embedding"], "device");
  EXPECT_LT(none, j["peak"]["device"].get<uint64_t>());
  EXPECT_LT(block, none);
  // The goals: 5 GiB with the weights resident, 2.5 GiB streamed from host memory.
  EXPECT_LE(alternative(j, "resident", "offload")["device"].get<uint64_t>(), uint64_t(5) << 30);
  EXPECT_LE(alternative(j, "host", "offload")["device"].get<uint64_t>(), uint64_t(5) << 29);
  // In 5 GiB resident, auto moves the table to host memory and chunks the MLP, and says so.
  const nlohmann::json tight = plan_json(
      {"--model", config("Llama-3.1-8B.json"), "--device", "cuda", "--quant", "nf4", "--seq-len", "2048",
       "--micro-batch", "1", "--weights", "resident", "--checkpointing", "offload", "--max-mem", "5GiB"});
  EXPECT_EQ(tight["fits"], true);
  EXPECT_EQ(tight["embedding"], "host");
  EXPECT_GT(tight["mlp_chunk"].get<int64_t>(), 0);
  EXPECT_LT(tight["mlp_chunk"].get<int64_t>(), 2048);
  EXPECT_GT(item(tight, "MLP chunk"), 0u);
  EXPECT_EQ(item(tight, "embedding rows"), uint64_t(2048) * 4096 * sizeof(float));
  const std::string choices = tight["choices"].dump();
  EXPECT_NE(choices.find("MLP in chunks of"), std::string::npos) << choices;
  EXPECT_NE(choices.find("embedding table in host memory"), std::string::npos) << choices;
  // Streaming keeps two layers' blocks on the device instead of 32.
  EXPECT_LT(double(host_block), double(block) - 28 * layer * 0.5);
  // A config alone cannot stream from a file.
  for (const auto& a : j["alternatives"]) EXPECT_NE(a["weights"], "disk");
}

// Under a budget the run does not fit resident, auto streams, and a budget nothing fits is refused
// with the changes that would fit.
TEST_F(PlanCli, AutoStreamsUnderABudgetAndRefusalsNameWhatWouldFit) {
  const std::vector<std::string> base = {"--model",        config("Llama-3.1-70B.json"),
                                         "--device",       "cuda",
                                         "--quant",        "nf4",
                                         "--seq-len",      "2048",
                                         "--micro-batch",  "1",
                                         "--max-host-mem", "1TiB"};
  nlohmann::json j = plan_json(base);
  const uint64_t host_block = alternative(j, "host", "block")["device"];
  const uint64_t resident_block = alternative(j, "resident", "block")["device"];
  ASSERT_LT(host_block, resident_block);
  std::vector<std::string> args = base;
  args.insert(args.end(), {"--max-mem", std::to_string(host_block)});
  const double host_block_step = alternative(j, "host", "block")["step_s"];
  j = plan_json(args);
  // Per-block recomputation fits at its smallest layout; the block inputs in host memory fit with a
  // larger one, whose MLP runs whole: the plan takes whichever it predicts faster.
  EXPECT_EQ(j["weights"], "host");
  EXPECT_NE(j["checkpointing"], "none");
  EXPECT_LE(j["peak"]["device"].get<uint64_t>(), host_block);
  EXPECT_LE(j["predicted_step"]["total_s"].get<double>(), host_block_step);

  // Below that, the block inputs go to host memory too.
  const uint64_t host_offload = alternative(j, "host", "offload")["device"];
  ASSERT_LT(host_offload, host_block);
  args = base;
  args.insert(args.end(), {"--max-mem", std::to_string(host_block - 1)});
  j = plan_json(args);
  EXPECT_EQ(j["weights"], "host");
  EXPECT_EQ(j["checkpointing"], "offload");
  // Its largest layout that fits: at least the smallest's peak, within the budget.
  EXPECT_GE(j["peak"]["device"].get<uint64_t>(), host_offload);
  EXPECT_LT(j["peak"]["device"].get<uint64_t>(), host_block);

  args = base;
  args.insert(args.end(), {"--max-mem", std::to_string(host_offload - 1)});
  const test::Result r = run([&] {
    std::vector<std::string> a = args;
    a.insert(a.begin(), "plan");
    return a;
  }());
  EXPECT_EQ(r.status, 2) << r.out << r.err;
  EXPECT_NE(r.out.find("does not fit"), std::string::npos) << r.out;
  // Nothing streams further than host on this budget; a smaller micro-batch, rank or sequence does.
  const bool named = r.out.find("fits with --micro-batch") != std::string::npos ||
                     r.out.find("fits with --lora-rank") != std::string::npos ||
                     r.out.find("fits with --seq-len") != std::string::npos;
  EXPECT_TRUE(named) << r.out;
}

// Llama-3.1-70B as NF4 streamed from host memory at 2048 tokens: with the block inputs in host memory
// the device holds 3 of the 81 [2048, 8192] f32 inputs, and host memory the 80 the backward reads.
TEST_F(PlanCli, OffloadedBlockInputsLeaveTheDeviceForTheHost) {
  const std::vector<std::string> base = {"--model",        config("Llama-3.1-70B.json"),
                                         "--device",       "cuda",
                                         "--quant",        "nf4",
                                         "--seq-len",      "2048",
                                         "--micro-batch",  "1",
                                         "--weights",      "host",
                                         "--max-host-mem", "1TiB",
                                         "--max-mem",      "1TiB"};
  std::vector<std::string> args = base;
  args.insert(args.end(), {"--checkpointing", "block"});
  const nlohmann::json block = plan_json(args);
  args = base;
  args.insert(args.end(), {"--checkpointing", "offload"});
  const nlohmann::json off = plan_json(args);
  EXPECT_EQ(off["checkpointing"], "offload");
  const uint64_t input = uint64_t(2048) * 8192 * sizeof(float);
  EXPECT_LE(off["peak"]["device"].get<uint64_t>() + (81 - 3) * input,
            block["peak"]["device"].get<uint64_t>());
  EXPECT_EQ(item(off, "saved block inputs"), 80 * input);
  EXPECT_EQ(item(block, "saved activations") - item(off, "saved activations"), (81 - 3) * input);
}

// On the cpu, whose memory is the host, the inputs have nowhere to go.
TEST_F(PlanCli, OffloadedBlockInputsAreRefusedOnTheCpu) {
  make_model_and_data();
  const test::Result r =
      run({"plan", "--model", (dir_ / "model").string(), "--device", "cpu", "--checkpointing", "offload"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("use --checkpointing block"), std::string::npos) << r.err;
  const nlohmann::json j = plan_json({"--model", (dir_ / "model").string(), "--device", "cpu"});
  for (const auto& a : j["alternatives"]) EXPECT_NE(a["checkpointing"], "offload");
}

TEST_F(PlanCli, StreamingChoicesTheModelOrBackendCannotTakeAreRefused) {
  make_model_and_data();
  const std::string model = (dir_ / "model").string();
  test::Result r = run({"plan", "--model", model, "--device", "cpu", "--weights", "host"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("--weights host keeps the weights in host memory"), std::string::npos) << r.err;
  r = run({"plan", "--model", config("Qwen2.5-7B.json"), "--device", "cpu", "--weights", "disk", "--quant",
           "nf4"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("--weights disk streams the model file"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("is a config alone"), std::string::npos) << r.err;
  r = run({"plan", "--model", model, "--weights", "nvme"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("--weights must be auto, resident, host or disk, got 'nvme'"), std::string::npos)
      << r.err;
  r = run({"plan", "--model", model, "--max-mem", "lots"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("--max-mem must be a size"), std::string::npos) << r.err;
}

// A base converted at load streams under --weights disk from the spill file the load writes: the
// plan streams the converted bytes, sizes the file as the loader will (io::spill_bytes) and counts
// the conversion of one layer's tensor at a time in host memory; a base kept as stored has no
// spill file.
TEST_F(PlanCli, AConvertedBaseOnDiskStreamsFromTheSpillFileThePlanSizes) {
  make_model_and_data();
  const std::string model = (dir_ / "model").string();
  const io::ModelDescription d = io::describe_model(model, io::QuantMode::Nf4);
  uint64_t streamed = 0;
  LlamaWeights::for_each_slot(d.weights.config, [&](WeightSlot s, int layer) {
    if (is_layer_slot(s)) streamed += uint64_t(io::stored_bytes(d.weights.slot(s, layer)));
  });
  const nlohmann::json j =
      plan_json({"--model", model, "--device", "cpu", "--quant", "nf4", "--weights", "disk"});
  EXPECT_EQ(j["weights"], "disk");
  const uint64_t spill = io::spill_bytes(d.source, io::QuantMode::Nf4);
  EXPECT_GT(spill, 0u);
  EXPECT_EQ(j["spill_file_bytes"].get<uint64_t>(), spill);
  EXPECT_EQ(item(j, "spill file of the converted layers"), spill);
  EXPECT_EQ(item(j, "base weights streamed per pass"), streamed);
  EXPECT_GT(item(j, "converting a layer's tensor to the spill file"), 0u);
  const nlohmann::json kept = plan_json({"--model", model, "--device", "cpu", "--weights", "disk"});
  EXPECT_EQ(kept["spill_file_bytes"].get<uint64_t>(), 0u);
  for (const auto& i : kept["items"]) EXPECT_NE(i["component"], "spill file of the converted layers");
  const test::Result r = run({"plan", "--model", model, "--device", "cpu", "--quant", "nf4"});
  EXPECT_NE(r.out.find("weights disk      checkpointing none"), std::string::npos) << r.out;
}

// With host memory short, --weights auto streams a base converted to NF4 at load from its spill
// file, which the run removes, with the losses of the same run resident.
TEST_F(PlanCli, AutoStreamsAConvertedBaseFromItsSpillFileWhenHostMemoryIsShort) {
  make_model_and_data();
  // 6 layers of 4 x 512^2 + 3 x 512 x 1536 f32 weights, 11 MiB as NF4: enough for the resident
  // and streamed peaks to lie apart by more than what the startup measurement varies.
  std::ofstream(dir_ / "config.json") << nlohmann::json{{"architectures", {"LlamaForCausalLM"}},
                                                        {"hidden_size", 512},
                                                        {"intermediate_size", 1536},
                                                        {"num_hidden_layers", 6},
                                                        {"num_attention_heads", 8},
                                                        {"num_key_value_heads", 8},
                                                        {"vocab_size", 320},
                                                        {"tie_word_embeddings", true},
                                                        {"torch_dtype", "float32"}};
  ASSERT_EQ(
      run({"init", "--config", (dir_ / "config.json").string(), "--out", (dir_ / "big").string()}).status, 0);
  std::vector<std::string> args = finetune_args("streamed", 2);
  set_option(args, "--model", (dir_ / "big").string());
  set_option(args, "--device", "cpu");
  set_option(args, "--quant", "nf4");
  set_option(args, "--seq-len", "32");
  set_option(args, "--micro-batch", "1");
  set_option(args, "--checkpointing", "block");
  // The plan of the same options (plan takes finetune's), its alternatives at each tier.
  const nlohmann::json probe = plan_json(std::vector<std::string>(args.begin() + 1, args.end()));
  const uint64_t resident = alternative(probe, "resident", "block")["host"].get<uint64_t>();
  const uint64_t disk = alternative(probe, "disk", "block")["host"].get<uint64_t>();
  ASSERT_GT(resident, disk + (uint64_t(4) << 20));
  set_option(args, "--max-host-mem", std::to_string((resident + disk) / 2));
  test::Result r = run(args);
  ASSERT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("plan: weights disk"), std::string::npos) << r.out << probe.dump();
  const std::string spill = (dir_ / "streamed" / "base-spill.bin").string();
  EXPECT_NE(r.err.find("streamed from " + spill), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(spill));
  std::ifstream in(dir_ / "streamed" / "plan.json");
  const nlohmann::json plan = nlohmann::json::parse(in, nullptr, false);
  EXPECT_EQ(plan["spill_file_bytes"].get<uint64_t>(),
            io::spill_bytes(io::describe_model((dir_ / "big").string(), io::QuantMode::Nf4).source,
                            io::QuantMode::Nf4));
  const std::vector<double> streamed = losses(dir_ / "streamed" / "metrics.jsonl");

  set_option(args, "--out", (dir_ / "resident").string());
  set_option(args, "--max-host-mem", "auto");
  set_option(args, "--weights", "resident");
  r = run(args);
  ASSERT_EQ(r.status, 0) << r.err;
  ASSERT_EQ(streamed.size(), 2u);
  EXPECT_EQ(streamed, losses(dir_ / "resident" / "metrics.jsonl"));
}

// A run killed while it streamed a converted base leaves its spill file behind; the resumed run
// replaces it (it is the run directory's own, under the run's lock), rebuilds it with the same
// bytes and gives the losses of the uninterrupted run, and removes it at the end.
TEST_F(PlanCli, AKilledRunOfAConvertedBaseOnDiskResumesBitForBit) {
  make_model_and_data();
  const test::Result r =
      expect_killed_run_resumes_bit_for_bit(10, "1", "cpu", {"--quant", "nf4", "--weights", "disk"});
  EXPECT_NE(r.err.find("removing the spill file a run that did not finish left behind"), std::string::npos)
      << r.err;
  EXPECT_FALSE(std::filesystem::exists(dir_ / "killed" / "base-spill.bin"));
  EXPECT_FALSE(std::filesystem::exists(dir_ / "straight" / "base-spill.bin"));
}

// finetune plans before it loads: a budget the run cannot fit is refused naming its largest parts
// and what would fit, and leaves no run behind; a run that fits writes plan.json and the measured
// peaks beside it.
TEST_F(PlanCli, FinetuneRefusesARunOverBudgetAndRecordsThePlanOfOneThatFits) {
  make_model_and_data();
  std::vector<std::string> args = finetune_args("run", 2);
  set_option(args, "--device", "cpu");
  set_option(args, "--max-mem", "64KiB");
  test::Result r = run(args);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("the run does not fit its memory budget"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("largest:"), std::string::npos) << r.err;
  EXPECT_EQ(r.out.find("loading " + (dir_ / "model").string()), std::string::npos) << r.out;
  EXPECT_FALSE(std::filesystem::exists(dir_ / "run" / "config.json"));

  set_option(args, "--max-mem", "auto");
  r = run(args);
  ASSERT_EQ(r.status, 0) << r.err;
  std::ifstream in(dir_ / "run" / "plan.json");
  const nlohmann::json plan = nlohmann::json::parse(in, nullptr, false);
  ASSERT_TRUE(plan.is_object());
  EXPECT_EQ(plan["fits"], true);
  EXPECT_EQ(plan["backend"], "cpu");
  EXPECT_EQ(plan["weights"], "resident");
  EXPECT_GT(plan["peak"]["host"].get<uint64_t>(), 0u);
  std::ifstream metrics(dir_ / "run" / "metrics.jsonl");
  std::string line;
  int steps = 0;
  while (std::getline(metrics, line)) {
    const nlohmann::json m = nlohmann::json::parse(line);
    if (!m.contains("step")) continue;
    ++steps;
    EXPECT_GT(m["rss_peak_bytes"].get<int64_t>(), m["peak_mem_bytes"].get<int64_t>()) << line;
  }
  EXPECT_EQ(steps, 2);
  EXPECT_NE(r.out.find("peak process memory"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("predicted host peak"), std::string::npos) << r.out;
}

// The acceptance of disk streaming: a model whose weights are over four times --max-host-mem (less
// the process's own startup memory) trains with --weights auto, which streams it from disk, within
// the budget (the process's peak RSS, measured), and gives the losses of the same run with its
// weights resident.
TEST_F(PlanCli, AModelFourTimesTheHostBudgetTrainsFromDiskWithinIt) {
  make_model_and_data();
  // 20 layers of 4 x 512^2 + 3 x 512 x 1536 f32 weights: 272 MB, 13.6 MB a layer.
  std::ofstream(dir_ / "config.json") << nlohmann::json{{"architectures", {"LlamaForCausalLM"}},
                                                        {"hidden_size", 512},
                                                        {"intermediate_size", 1536},
                                                        {"num_hidden_layers", 20},
                                                        {"num_attention_heads", 8},
                                                        {"num_key_value_heads", 8},
                                                        {"vocab_size", 320},
                                                        {"tie_word_embeddings", true},
                                                        {"torch_dtype", "float32"}};
  ASSERT_EQ(
      run({"init", "--config", (dir_ / "config.json").string(), "--out", (dir_ / "big").string()}).status, 0);
  uint64_t weights = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir_ / "big"))
    if (e.path().extension() == ".safetensors") weights += std::filesystem::file_size(e.path());
  // The stated margin: the process as it starts (the binary and its libraries, measured by the plan
  // of the same binary; a build with CUDA's libraries linked starts at well over 100 MiB). The rest
  // of the budget is a quarter of the weights or less.
  const nlohmann::json probe = plan_json({"--model", (dir_ / "big").string(), "--device", "cpu"}, -1);
  const uint64_t startup = item(probe, "process at startup");
  const uint64_t working = uint64_t(62) << 20;
  ASSERT_GE(weights, 4 * working);
  const uint64_t budget = startup + working;
  std::vector<std::string> args = finetune_args("streamed", 2);
  set_option(args, "--model", (dir_ / "big").string());
  set_option(args, "--device", "cpu");
  set_option(args, "--max-host-mem", std::to_string(budget));
  set_option(args, "--seq-len", "32");
  set_option(args, "--micro-batch", "1");
  test::Result r = run(args);
  ASSERT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("plan: weights disk"), std::string::npos) << r.out;
  const std::vector<double> streamed = losses(dir_ / "streamed" / "metrics.jsonl");
  std::ifstream metrics(dir_ / "streamed" / "metrics.jsonl");
  std::string line, last;
  while (std::getline(metrics, line))
    if (line.find("rss_peak_bytes") != std::string::npos) last = line;
  const uint64_t rss = nlohmann::json::parse(last)["rss_peak_bytes"].get<uint64_t>();
  EXPECT_LE(rss, budget) << r.out;

  set_option(args, "--out", (dir_ / "resident").string());
  set_option(args, "--max-host-mem", "auto");
  set_option(args, "--weights", "resident");
  r = run(args);
  ASSERT_EQ(r.status, 0) << r.err;
  const std::vector<double> resident = losses(dir_ / "resident" / "metrics.jsonl");
  ASSERT_EQ(streamed.size(), 2u);
  EXPECT_EQ(streamed, resident);
}

}  // namespace
}  // namespace tf
