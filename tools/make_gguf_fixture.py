#!/usr/bin/env python3
"""Writes tests/fixtures/gguf_dequant.gguf: tensors of every GGUF type tightfit reads, each beside
an F32 tensor "<name>.expected" holding its dequantized values, plus metadata of every value type.

The file is written by gguf-py's GGUFWriter (the reference writer) and the expected values come
from gguf-py's numpy dequantizers. For the k-quants, which gguf-py cannot quantize, blocks are made
of explicit random bytes and the expected values are also recomputed here element by element from
the documented formulas; the two must agree bit for bit or the script stops.

Run by hand (needs `pip install gguf numpy`):
    python3 tools/make_gguf_fixture.py [--out tests/fixtures/gguf_dequant.gguf]
"""
import argparse
import struct

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

QK_K = 256


def f16(bits):
    return np.float32(np.frombuffer(struct.pack("<H", bits), dtype=np.float16)[0])


def random_f16_bits(rng, n):
    """Finite f16 bit patterns of every kind (normal, subnormal, zero, both signs), no inf/NaN."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint32)
    exp = (bits >> 10) & 0x1F
    # Exponent 31 is inf/NaN; move those to a modest exponent so values stay finite.
    bits = np.where(exp == 0x1F, (bits & ~np.uint32(0x7C00)) | np.uint32(0x3C00), bits)
    return bits.astype(np.uint16)


def k_scale_min(scales, j):
    if j < 4:
        return scales[j] & 63, scales[j + 4] & 63
    sc = (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4)
    mn = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)
    return sc, mn


def formula_q4_k(block):
    block = [int(b) for b in block]
    d, dmin = f16(block[0] | block[1] << 8), f16(block[2] | block[3] << 8)
    scales, qs = block[4:16], block[16:144]
    out = []
    for chunk in range(4):
        q = qs[32 * chunk: 32 * chunk + 32]
        for half, shift in ((0, 0), (1, 4)):
            sc, mn = k_scale_min(scales, 2 * chunk + half)
            dl, ml = np.float32(d * np.float32(sc)), np.float32(dmin * np.float32(mn))
            out += [np.float32(dl * np.float32((q[l] >> shift) & 0xF)) - ml for l in range(32)]
    return out


def formula_q5_k(block):
    block = [int(b) for b in block]
    d, dmin = f16(block[0] | block[1] << 8), f16(block[2] | block[3] << 8)
    scales, qh, qs = block[4:16], block[16:48], block[48:176]
    out = []
    for chunk in range(4):
        q = qs[32 * chunk: 32 * chunk + 32]
        for half, shift in ((0, 0), (1, 4)):
            sub = 2 * chunk + half
            sc, mn = k_scale_min(scales, sub)
            dl, ml = np.float32(d * np.float32(sc)), np.float32(dmin * np.float32(mn))
            for l in range(32):
                v = ((q[l] >> shift) & 0xF) + (16 if (qh[l] >> sub) & 1 else 0)
                out.append(np.float32(dl * np.float32(v)) - ml)
    return out


def formula_q6_k(block):
    sc = block[192:208].view(np.int8)
    block = [int(b) for b in block]
    ql, qh = block[0:128], block[128:192]
    d = f16(block[208] | block[209] << 8)
    out = [None] * QK_K
    for half in range(2):
        l0, h0, s0, y0 = 64 * half, 32 * half, 8 * half, 128 * half
        for l in range(32):
            h = qh[h0 + l]
            q = [(ql[l0 + l] & 0xF) | ((h >> 0) & 3) << 4, (ql[l0 + l + 32] & 0xF) | ((h >> 2) & 3) << 4,
                 (ql[l0 + l] >> 4) | ((h >> 4) & 3) << 4, (ql[l0 + l + 32] >> 4) | ((h >> 6) & 3) << 4]
            for k in range(4):
                scale = np.float32(d * np.float32(sc[s0 + l // 16 + 2 * k]))
                out[y0 + l + 32 * k] = np.float32(scale * np.float32(int(q[k]) - 32))
    return out


def formula_q2_k(block):
    block = [int(b) for b in block]
    scales, qs = block[0:16], block[16:80]
    d, dmin = f16(block[80] | block[81] << 8), f16(block[82] | block[83] << 8)
    out = []
    for e in range(QK_K):
        sc = scales[e // 16]
        dl, ml = np.float32(d * np.float32(sc & 0xF)), np.float32(dmin * np.float32(sc >> 4))
        q = (qs[32 * (e // 128) + e % 32] >> (2 * (e % 128 // 32))) & 3
        out.append(np.float32(dl * np.float32(q)) - ml)
    return out


def formula_q3_k(block):
    block = [int(b) for b in block]
    hmask, qs, scales = block[0:32], block[32:96], block[96:108]
    d = f16(block[108] | block[109] << 8)
    out = []
    for e in range(QK_K):
        s = e // 16
        sc = ((scales[s % 8] >> (4 * (s // 8))) & 0xF) | ((scales[8 + s % 4] >> (2 * (s // 4))) & 3) << 4
        dl = np.float32(d * np.float32(sc - 32))
        q = ((qs[32 * (e // 128) + e % 32] >> (2 * (e % 128 // 32))) & 3) - (0 if (hmask[e % 32] >> (e // 32)) & 1 else 4)
        out.append(np.float32(dl * np.float32(q)))
    return out


def random_k_blocks(rng, qtype, rows, cols):
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    n_blocks = rows * cols // QK_K
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    d_pos = {T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}[qtype]
    for p in d_pos:
        blocks[:, p:p + 2] = random_f16_bits(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return blocks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/gguf_dequant.gguf")
    args = ap.parse_args()
    rng = np.random.default_rng(20240531)

    w = gguf.GGUFWriter(args.out, arch="llama")
    # One key of every value type, read back and checked by tests/test_gguf.cpp.
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_float32("test.f32", 0.15625)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "héllo gguf")
    w.add_uint64("test.u64", 18000000000000000000)
    w.add_int64("test.i64", -9000000000000000000)
    w.add_float64("test.f64", -2.5e-300)
    w.add_array("test.array_i32", [1, -2, 3])
    w.add_array("test.array_string", ["a", "", "ccc"])
    w.add_array("test.array_nested", [[1, 2], [3]])

    def add(name, qtype, raw, expected):
        w.add_tensor(name, raw, raw_dtype=qtype)
        w.add_tensor(name + ".expected", expected.astype(np.float32))

    # Values spanning several magnitudes so scales differ per block.
    def values(rows, cols):
        return (rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-4, 4, (rows, 1)))).astype(np.float32)

    x = values(3, 64)
    add("t.F32", T.F32, x, x)
    add("t.F16", T.F16, x.astype(np.float16), x.astype(np.float16).astype(np.float32))
    bf = gguf.quants.quantize(x, T.BF16)
    add("t.BF16", T.BF16, bf, gguf.quants.dequantize(bf, T.BF16))
    for qtype in (T.Q8_0, T.Q4_0, T.Q4_1):
        q = gguf.quants.quantize(values(3, 96), qtype)
        add("t." + qtype.name, qtype, q, gguf.quants.dequantize(q, qtype))

    def add_random_k(qtype, formula, rows, cols):
        blocks = random_k_blocks(rng, qtype, rows, cols)
        ref = gguf.quants.dequantize(blocks.reshape(rows, -1), qtype).reshape(-1)
        mine = np.array([v for b in blocks for v in formula(b)], dtype=np.float32)
        if not np.array_equal(ref.view(np.uint32), mine.view(np.uint32)):
            raise SystemExit(f"{qtype.name}: gguf-py and the documented formula disagree")
        add("t." + qtype.name, qtype, blocks.reshape(rows, -1), ref.reshape(rows, cols))

    for qtype, formula in ((T.Q4_K, formula_q4_k), (T.Q5_K, formula_q5_k), (T.Q6_K, formula_q6_k)):
        add_random_k(qtype, formula, 3, 2 * QK_K)
    # Drawn after the types above so that their tensors keep the bytes they had before these.
    for qtype in (T.Q5_0, T.Q5_1):
        q = gguf.quants.quantize(values(3, 96), qtype)
        add("t." + qtype.name, qtype, q, gguf.quants.dequantize(q, qtype))
    add_random_k(T.Q2_K, formula_q2_k, 2, QK_K)
    add_random_k(T.Q3_K, formula_q3_k, 2, QK_K)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
