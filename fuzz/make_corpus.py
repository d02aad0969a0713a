#!/usr/bin/env python3
"""Writes the fuzz seed corpora, fuzz/corpus/<target>/: a few small valid inputs per target, from the
committed test fixtures and from the format descriptions (safetensors: u64 header length + JSON header
+ data; GGUF v3: see src/io/gguf.h). Run from anywhere: python3 fuzz/make_corpus.py
"""
import json
import shutil
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = ROOT / "fuzz" / "corpus"


def put(target, name, data):
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def safetensors(tensors, metadata=None):
    """tensors: [(name, dtype, shape, bytes)] in data order."""
    header, off = {}, 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
    if metadata is not None:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(t[3] for t in tensors)


def gguf_str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf(kvs, tensors, version=3, alignment=32):
    """kvs: [(key, type id, packed value)]; tensors: [(name, ggml type, ne, bytes)]."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, vtype, val in kvs:
        out += gguf_str(key) + struct.pack("<I", vtype) + val
    off, datas = 0, []
    for name, gtype, ne, data in tensors:
        out += gguf_str(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}q", *ne)
        out += struct.pack("<IQ", gtype, off)
        pad = b"\0" * (-len(data) % alignment)
        datas.append(data + pad)
        off += len(data) + len(pad)
    out += b"\0" * (-len(out) % alignment)
    return out + b"".join(datas)


U32, F32, STRING, ARRAY = 4, 6, 8, 9


def tiny_llama_gguf():
    hidden, vocab, ff = 8, 6, 16
    f32 = lambda n: struct.pack(f"<{n}f", *[0.01 * i for i in range(n)])
    u32 = lambda v: struct.pack("<I", v)
    kvs = [("general.architecture", STRING, gguf_str("llama")),
           ("llama.embedding_length", U32, u32(hidden)),
           ("llama.feed_forward_length", U32, u32(ff)),
           ("llama.block_count", U32, u32(1)),
           ("llama.attention.head_count", U32, u32(2)),
           ("llama.attention.head_count_kv", U32, u32(1)),
           ("llama.attention.layer_norm_rms_epsilon", F32, struct.pack("<f", 1e-5)),
           ("llama.context_length", U32, u32(64)),
           ("tokenizer.ggml.tokens", ARRAY,
            struct.pack("<IQ", STRING, vocab) + b"".join(gguf_str(t) for t in ["a", "b", "c", "ab", "<s>", "</s>"]))]
    kv_dim = hidden // 2
    shapes = [("token_embd.weight", [hidden, vocab]), ("output_norm.weight", [hidden]),
              ("blk.0.attn_norm.weight", [hidden]), ("blk.0.attn_q.weight", [hidden, hidden]),
              ("blk.0.attn_k.weight", [hidden, kv_dim]), ("blk.0.attn_v.weight", [hidden, kv_dim]),
              ("blk.0.attn_output.weight", [hidden, hidden]), ("blk.0.ffn_norm.weight", [hidden]),
              ("blk.0.ffn_gate.weight", [hidden, ff]), ("blk.0.ffn_up.weight", [hidden, ff]),
              ("blk.0.ffn_down.weight", [ff, hidden])]
    tensors = []
    for name, ne in shapes:
        n = 1
        for d in ne:
            n *= d
        tensors.append((name, 0, ne, f32(n)))
    return gguf(kvs, tensors)


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    # safetensors
    put("safetensors", "python_small.safetensors", (FIX / "python_small.safetensors").read_bytes())
    put("safetensors", "f32_bf16_meta.safetensors", safetensors(
        [("w", "F32", [2, 3], struct.pack("<6f", *range(6))), ("b", "BF16", [3], b"\x80\x3f" * 3)],
        {"format": "pt", "note": "seed"}))
    put("safetensors", "i64_bool_scalar.safetensors", safetensors(
        [("ids", "I64", [2], struct.pack("<2q", 7, -1)), ("s", "F16", [], b"\x00\x3c"),
         ("mask", "BOOL", [4], b"\x01\x00\x01\x01")]))
    put("safetensors", "empty_tensor.safetensors", safetensors([("e", "F32", [0, 5], b"")]))
    # gguf
    put("gguf", "dequant.gguf", (FIX / "gguf_dequant.gguf").read_bytes())
    put("gguf", "tiny_llama.gguf", tiny_llama_gguf())
    put("gguf", "v2_empty.gguf", gguf([], [], version=2))
    # tokenizer.json
    for name in ["bpe_smollm.json", "bpe_llama3.json"]:
        put("tokenizer_json", name, (FIX / "tokenizer" / name).read_bytes())
    # tokenizer encode: first byte = tokenizer (mod 3) | 0x10 add_special | 0x20 parse_special
    texts = json.loads((FIX / "tokenizer" / "corpus.json").read_text())
    for i, text in enumerate(texts):
        put("tokenizer_encode", f"text{i:02d}", bytes([(i % 3) | (0x30 if i % 2 else 0)]) + text.encode())
    # jsonl: first byte = 1 skip bad lines | 2 max line 64 bytes
    records = [
        {"text": "The quick brown fox."},
        {"prompt": "2+2=", "completion": " 4"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                      {"role": "assistant", "content": "Bye."}]},
        {"instruction": "Translate", "input": "chat", "output": "cat"},
        {"instruction": "Say yes", "output": "yes"},
    ]
    for i, r in enumerate(records):
        put("jsonl", f"shape{i}.jsonl", b"\0" + json.dumps(r, ensure_ascii=False).encode() + b"\n")
    put("jsonl", "mixed.jsonl", b"\1" + "\n".join(json.dumps(r) for r in records).encode() + b"\n\nnot json\n")


if __name__ == "__main__":
    main()
