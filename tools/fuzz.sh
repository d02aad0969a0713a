#!/usr/bin/env bash
# Builds one libFuzzer target (fuzz/<name>_fuzz.cpp) with clang, ASan and UBSan in build-fuzz/ and
# runs it from its seed corpus.
#
#   tools/fuzz.sh <name> [seconds] [extra libFuzzer flags...]
#   names: safetensors gguf tokenizer_json tokenizer_encode jsonl jinja
#
# New corpus entries go to build-fuzz/corpus/<name>/ (the committed seeds in fuzz/corpus/<name>/ are
# only read); a crash, leak, timeout or OOM input is written to build-fuzz/artifacts/<name>/. To
# keep one as a regression, minimise it (add -minimize_crash=1 -runs=10000 and the file), copy it to
# fuzz/regressions/<name>/, and tests/test_fuzz_regressions replays it.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,12p' "$0"
  exit 2
fi
name=$1
seconds=${2:-300}
shift $(( $# >= 2 ? 2 : 1 ))

root=$(cd "$(dirname "$0")/.." && pwd)
build=${TIGHTFIT_FUZZ_BUILD:-$root/build-fuzz}
[[ -f $root/fuzz/${name}_fuzz.cpp ]] || { echo "error: no fuzz target fuzz/${name}_fuzz.cpp" >&2; exit 2; }

# Runs of several targets side by side share one build tree: build under a lock, fuzz without it.
mkdir -p "$build"
(
  flock 9
  cmake -S "$root" -B "$build" -G Ninja -DTIGHTFIT_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ >/dev/null
  cmake --build "$build" --target "${name}_fuzz" -j"${TIGHTFIT_FUZZ_JOBS:-2}"
) 9>"$build/.build-lock"

mkdir -p "$build/corpus/$name" "$build/artifacts/$name"
# A fault inside a parser must stop the run with its input saved, whichever sanitizer saw it.
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
exec "$build/fuzz/${name}_fuzz" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
  -print_final_stats=1 -artifact_prefix="$build/artifacts/$name/" "$@" \
  "$build/corpus/$name" "$root/fuzz/corpus/$name"
