#!/usr/bin/env bash
# The test command: installs what the build needs, configures, builds and runs every test.
# Usage: bash tools/test.sh [extra ctest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
build=${TIGHTFIT_BUILD_DIR:-build}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTIGHTFIT_WERROR=ON
cmake --build "$build" -j"$(nproc)"
ctest --test-dir "$build" --output-on-failure -j"$(nproc)" "$@"
