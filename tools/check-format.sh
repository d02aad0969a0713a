#!/usr/bin/env bash
# Fails when a C++ or CUDA source of the project differs from what the committed .clang-format makes
# of it, and names each such file. Run by CTest (Format.SourcesMatchClangFormat); fix with
#   clang-format -i FILE
set -euo pipefail
cd "$(dirname "$0")/.."
command -v clang-format >/dev/null || { echo "error: clang-format is not installed (tools/install-deps.sh installs it)" >&2; exit 1; }
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  mapfile -t files < <(git ls-files --cached --others --exclude-standard -- '*.cpp' '*.h' '*.cu' '*.cuh' '*.inc')
else
  mapfile -t files < <(find src kernels tokenizer tests fuzz benchmarks -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.inc')
fi
bad=()
for f in "${files[@]}"; do
  [[ -f $f ]] || continue
  clang-format --dry-run -Werror "$f" >/dev/null 2>&1 || bad+=("$f")
done
if ((${#bad[@]})); then
  echo "not formatted with .clang-format (clang-format -i FILE fixes each):"
  printf '  %s\n' "${bad[@]}"
  exit 1
fi
echo "${#files[@]} files match .clang-format"
