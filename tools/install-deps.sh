#!/usr/bin/env bash
# Installs the Debian packages tightfit builds against (docs/DESIGN.md, "Dependencies"). Idempotent; needs root.
set -euo pipefail
packages=(build-essential cmake ninja-build ccache pkg-config libopenblas-openmp-dev libdnnl-dev nlohmann-json3-dev libcli11-dev
  libgtest-dev libsentencepiece-dev libpcre2-dev libutf8proc-dev libboost-context-dev liburing-dev clang clang-format python3
  openmpi-bin libopenmpi-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
