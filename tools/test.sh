#!/usr/bin/env bash
# The test command: installs what the build needs, configures, builds and runs every test.
# Usage: bash tools/test.sh [extra ctest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
build=${TIGHTFIT_BUILD_DIR:-build}
# Warnings are errors in CI (CI=true), plain warnings elsewhere.
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTIGHTFIT_WERROR=$([ "${CI:-}" = true ] && echo ON || echo OFF)
cmake --build "$build" -j"$(nproc)"
ctest --test-dir "$build" --output-on-failure -j"$(nproc)" "$@"
