#!/usr/bin/env python3
"""Checks that tightfit decodes every tensor of GGUF files exactly as gguf-py does, and that
`tightfit inspect` lists every tensor's type.

Run by hand (needs numpy and the gguf package, and a build with the tightfit and
test_gguf_real_quants targets), typically on the files tools/make_smollm2_quants.sh makes:
    python tools/check_gguf_decode.py --build build .cache/models/smollm2-quants/*.gguf

For each file it
  1. prints the tensor types the file holds (per-type counts, read with gguf-py);
  2. writes gguf.quants.dequantize of every tensor as little-endian f32, in the file's tensor order,
     to a temporary file and runs tests/test_gguf_real_quants.cpp on the pair, which loads the file
     with load_model and compares, bit for bit, every f32 weight of QuantMode::None and every block
     QuantMode::Keep keeps as decoded by tf::cpu (AVX-512 and portable paths); it prints, per type
     and decoding, how many values differ and the largest |difference|;
  3. runs `tightfit inspect --all-tensors FILE` and checks that its per-type summary has the
     file's counts and that each tensor's line names the tensor's type.
It exits 1 when any check fails.
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def type_counts(reader):
    return collections.Counter(t.tensor_type.name for t in reader.tensors)


def write_reference(reader, path):
    with open(path, "wb") as out:
        for t in reader.tensors:
            values = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype="<f4")
            if values.size != t.n_elements:
                sys.exit(f"error: gguf-py decoded {values.size} values of {t.name}, expected {t.n_elements}")
            values.tofile(out)


def check_decode(test_binary, model, reference):
    env = dict(os.environ, TIGHTFIT_GGUF_DECODE_MODEL=model, TIGHTFIT_GGUF_DECODE_REFERENCE=reference)
    run = subprocess.run([test_binary], env=env, capture_output=True, text=True)
    out = run.stdout + run.stderr
    diffs = []
    for line in out.splitlines():
        if "differing from gguf-py" in line:
            diffs += [float(d) for _, d in re.findall(r"(\d+) \(([^)]+)\)", line.split(":", 1)[1])]
        if any(k in line for k in ("differing from gguf-py", "tf::cpu decodes", "Failure", "error")):
            print("   ", line.strip())
    if run.returncode != 0 or "[  PASSED  ] 1 test" not in out or not diffs:
        print(out)
        return False, None
    return True, max(diffs)


def check_inspect(tightfit, model, reader):
    run = subprocess.run([tightfit, "inspect", "--all-tensors", model], capture_output=True, text=True)
    if run.returncode != 0:
        print(f"    inspect failed: {run.stderr.strip()}")
        return False
    ok = True
    summary = next((l for l in run.stdout.splitlines() if l.startswith("tensors ")), "")
    listed = dict((t, int(n)) for n, t in re.findall(r" (\d+) (\S+) \(", summary))
    if listed != dict(type_counts(reader)):
        print(f"    inspect's summary {listed} differs from the file's {dict(type_counts(reader))}")
        ok = False
    per_tensor = {}
    for line in run.stdout.splitlines():
        fields = line.split()
        if line.startswith("  ") and len(fields) >= 2:
            per_tensor[fields[0]] = fields[1]
    for t in reader.tensors:
        if per_tensor.get(t.name) != t.tensor_type.name:
            print(f"    inspect lists {t.name} as {per_tensor.get(t.name)}, the file has {t.tensor_type.name}")
            ok = False
    print(f"    inspect: {summary.strip()}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="GGUF files")
    ap.add_argument("--build", default="build", help="build directory with tightfit and tests/test_gguf_real_quants")
    args = ap.parse_args()
    tightfit = os.path.join(args.build, "tightfit")
    test_binary = os.path.join(args.build, "tests", "test_gguf_real_quants")
    for exe in (tightfit, test_binary):
        if not os.access(exe, os.X_OK):
            sys.exit(f"error: {exe} is not built (cmake --build {args.build} --target tightfit test_gguf_real_quants)")

    failed = []
    summary = []
    for model in args.files:
        reader = GGUFReader(model)
        counts = type_counts(reader)
        size = os.path.getsize(model)
        print(f"{model}: {size} bytes, {len(reader.tensors)} tensors: "
              + ", ".join(f"{n} {t}" for t, n in sorted(counts.items())))
        with tempfile.TemporaryDirectory() as tmp:
            reference = os.path.join(tmp, "gguf-py.f32")
            write_reference(reader, reference)
            decoded, max_diff = check_decode(test_binary, model, reference)
        listed = check_inspect(tightfit, model, reader)
        if not (decoded and listed):
            failed.append(model)
        summary.append((os.path.basename(model), size, max_diff, decoded and listed))
    print("\nfile | bytes | max |tightfit - gguf-py| | checks")
    for name, size, max_diff, ok in summary:
        print(f"{name} | {size} | {max_diff if max_diff is not None else '-'} | {'pass' if ok else 'FAIL'}")
    if failed:
        sys.exit(f"error: {len(failed)} file(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
