#!/usr/bin/env python3
"""Writes tiny HF model directories saved by transformers, with the logits and greedy tokens
transformers produces for them, for tests/test_hf_model.cpp. Run by hand, never by CI:

    python -m venv /opt/tfref && /opt/tfref/bin/pip install torch transformers safetensors
    /opt/tfref/bin/python tools/make_hf_fixture.py

Output under tests/fixtures/:
    hf_tiny_llama/   LlamaForCausalLM, bf16 weights, tied embeddings (save_pretrained)
    hf_tiny_qwen2/   Qwen2ForCausalLM, f32 weights, q/k/v biases, untied
    hf_tiny_<name>_expected.safetensors:
        input_ids [12] int32    the prompt
        logits    [12, 256] f32 transformers' logits for the prompt, computed in float32
        greedy    [16] int32    model.generate(do_sample=False, max_new_tokens=16) continuation
Weights are drawn normal(0, 0.1) (norms 1 + 0.1 normal, biases 0.1 normal) from a fixed seed, so
attention is far from uniform and greedy tokens are not decided by near-ties.
"""
import os

import safetensors.torch
import torch
import transformers

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)


def randomise(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def build(name, model, dtype, seed):
    randomise(model, seed)
    model = model.to(dtype)
    out_dir = os.path.join(OUT, f"hf_tiny_{name}")
    model.save_pretrained(out_dir, safe_serialization=True)
    # Reload in f32 rather than calling model.float(): casting the model to bf16 also rounded its
    # rotary inv_freq buffer, which a fresh f32 load recomputes exactly (as tightfit does).
    ref = type(model).from_pretrained(out_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 256, (1, 12), generator=gen)
    with torch.no_grad():
        logits = ref(ids).logits[0]
        greedy = ref.generate(ids, do_sample=False, max_new_tokens=16, min_new_tokens=16,
                              pad_token_id=0, eos_token_id=None)[0, 12:]
    safetensors.torch.save_file({"input_ids": ids[0].to(torch.int32), "logits": logits.contiguous(),
                                 "greedy": greedy.to(torch.int32)},
                                os.path.join(OUT, f"hf_tiny_{name}_expected.safetensors"))


def main():
    torch.manual_seed(0)
    llama = transformers.LlamaConfig(**COMMON, tie_word_embeddings=True, rope_theta=10000.0)
    build("llama", transformers.LlamaForCausalLM(llama), torch.bfloat16, 11)
    qwen = transformers.Qwen2Config(**COMMON, tie_word_embeddings=False, rope_theta=1000000.0)
    build("qwen2", transformers.Qwen2ForCausalLM(qwen), torch.float32, 22)


if __name__ == "__main__":
    main()
