#!/usr/bin/env python3
"""Writes tests/fixtures/ggml_quant.safetensors: input vectors and what gguf-py quantizes them to.

Run by hand (needs numpy, safetensors and the gguf package):
    python tools/make_ggml_quant_fixture.py

gguf-py's quants.quantize reimplements ggml's quantize_row_*_ref (what llama-quantize writes
without an importance matrix) in numpy. For each case C the file holds
    C.input  f32 [n]   the vector (n a multiple of 32)
    C.q8_0, C.q4_0, C.q4_1, C.q5_0, C.q5_1
             u8  [n / 32 * block bytes]   gguf.quants.quantize(C.input, type), as stored in a GGUF file
"""
import importlib.metadata
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "ggml_quant.safetensors")
TYPES = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1}


def edges():
    """One block per edge of the formulas: ties for the value of largest magnitude (the first
    wins, so the sign of d differs between the two orders), values whose scaled code lands exactly
    on a rounding or truncation boundary of each type (and the float just below it), a constant
    block (d = 0 for the offset types), zeros, and a block small enough for d to be an f16
    subnormal."""
    blocks = []
    b = np.linspace(-0.5, 0.5, 32, dtype=np.float32)
    b[3], b[20] = -2.0, 2.0
    blocks.append(b)
    b = b.copy()
    b[3], b[20] = 2.0, -2.0
    blocks.append(b)
    # Q8_0: amax 127 makes d = 1, so k + 0.5 are roundf's halfway cases.
    b = np.array([127.0] + [k + 0.5 for k in range(-15, 16)], dtype=np.float32)
    blocks.append(b)
    # Q4_0 (max -8, d = 1) and Q5_0 (max -16, d = 1): x + 8.5 and x + 16.5 integers are where
    # truncation steps; the value just below each steps one code lower.
    b = np.array([-8.0] + [k - 8.5 for k in range(1, 17)] + [k - 8.5 for k in range(1, 16)],
                 dtype=np.float32)
    b[17:] = np.nextafter(b[17:], np.float32(-np.inf))
    blocks.append(b)
    b = np.array([-16.0] + [k - 16.5 for k in range(1, 32)], dtype=np.float32)
    blocks.append(b)
    # Q4_1 (min 0, max 15, d = 1) and Q5_1 (min 0, max 31): x + 0.5 integers.
    below = [np.nextafter(np.float32(k + 0.5), np.float32(0)) for k in range(15)]
    b = np.array([0.0, 15.0] + [k + 0.5 for k in range(15)] + below, dtype=np.float32)
    blocks.append(b)
    b = np.array([0.0, 31.0] + [k + 0.5 for k in range(30)], dtype=np.float32)
    blocks.append(b)
    blocks.append(np.full(32, 0.37, dtype=np.float32))
    blocks.append(np.zeros(32, dtype=np.float32))
    rng = np.random.default_rng(7)
    blocks.append((rng.standard_normal(32) * 1e-6).astype(np.float32))
    return np.concatenate(blocks).astype(np.float32)


def contracted(rng, half_range):
    """A block of Q4_0 (half_range 8) or Q5_0 (16) values whose code depends on whether x * (1 / d)
    is rounded to f32 before the + 8.5 (16.5) is added, as ggml's reference does, or fused with it
    into one rounding (what a compiler contracting a * b + c into an FMA computes). That happens
    only for codes k whose k - 8.5 lies in a coarser binade than k, so the small codes of negative
    values. (For Q4_1 / Q5_1, (x - min) / d + 0.5 >= 0.5 never is.)"""
    f32 = np.float32
    while True:
        top = f32(-rng.uniform(1.0, 2.0))
        d = f32(top / f32(-half_range))
        inv = f32(f32(1) / d)
        add = f32(half_range + 0.5)
        found = []
        for k in range(1, half_range // 2):
            # The floats around the boundary x * (1 / d) = k - 8.5 (16.5).
            x = f32((k - float(add)) / float(inv))
            for _ in range(64):
                x = np.nextafter(x, f32(-np.inf))
            for _ in range(128):
                if np.trunc(f32(f32(x * inv) + add)) != np.trunc(f32(float(x) * float(inv) + float(add))):
                    found.append(x)
                x = np.nextafter(x, f32(np.inf))
        if found:
            return np.array([top] + [found[i % len(found)] for i in range(31)], dtype=np.float32)

def cases():
    rng = np.random.default_rng(20261201)
    yield "normal", (rng.standard_normal(32 * 24) * 0.02).astype(np.float32)
    yield "heavy", rng.standard_t(2.0, 32 * 24).astype(np.float32)
    yield "edges", edges()
    contraction = np.random.default_rng(3)
    yield "contraction", np.concatenate([contracted(contraction, 8), contracted(contraction, 16)])


def main():
    tensors = {}
    for name, x in cases():
        assert x.size % 32 == 0
        tensors[name + ".input"] = x
        for suffix, qtype in TYPES.items():
            tensors[name + "." + suffix] = np.ascontiguousarray(gguf.quants.quantize(x, qtype)).reshape(-1)
    save_file(tensors, OUT, metadata={"gguf": importlib.metadata.version("gguf")})
    print("wrote", os.path.normpath(OUT))


if __name__ == "__main__":
    main()
