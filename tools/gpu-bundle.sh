#!/usr/bin/env bash
# Packs what tools/gpu-check.sh needs on a GPU machine that has only the CUDA toolkit, CMake, ninja, a
# C++ compiler and Python (no -dev packages, no network) into .gpu-bundle/bundle.tar.xz, taken from
# this machine's Debian packages (tools/install-deps.sh installs them): the headers of CLI11,
# nlohmann-json (with its CMake package), OpenBLAS's OpenMP build, oneDNN, PCRE2, sentencepiece and utf8proc;
# GoogleTest's sources; and the shared objects the build links, with every library they need that a
# C++ toolchain and glibc do not provide (OpenBLAS's libgfortran and libquadmath). .gpu-bundle/ is
# ignored by git and travels with the working tree when named (tools/gpu-check.sh unpacks it).
# Usage: tools/gpu-bundle.sh [OUT_DIR]   (default .gpu-bundle)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.gpu-bundle}
multiarch=$(gcc -print-multiarch)
usrlib=/usr/lib/$multiarch

need() { [[ -e $1 ]] || { echo "gpu-bundle: $1 is missing: run tools/install-deps.sh first" >&2; exit 1; }; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/bundle
mkdir -p "$root"/{include,lib,share/cmake,src}

# Headers: CLI11 and nlohmann-json are header-only; OpenBLAS's cblas.h is the OpenMP build's, which
# declares openblas_set_num_threads.
for d in /usr/include/CLI /usr/include/nlohmann /usr/include/oneapi /usr/share/cmake/nlohmann_json; do need "$d"; done
cp -a /usr/include/CLI /usr/include/nlohmann /usr/include/oneapi "$root/include/"
cp -a /usr/share/cmake/nlohmann_json "$root/share/cmake/"
for h in /usr/include/$multiarch/openblas-openmp/{cblas.h,openblas_config.h,f77blas.h} /usr/include/pcre2.h \
  /usr/include/sentencepiece_processor.h /usr/include/utf8proc.h; do
  need "$h"
  cp "$h" "$root/include/"
done
need /usr/src/googletest/CMakeLists.txt
cp -a /usr/src/googletest "$root/src/googletest"

# Shared objects under their sonames, plus the link-time name (libX.so) the build's find_library
# looks for. Toolchain and glibc libraries stay out: a newer machine's own must be the ones loaded.
toolchain='^(libc|libm|libdl|librt|libpthread|ld-linux-x86-64|libstdc\+\+|libgcc_s|libgomp)\.so'
declare -A packed=()
pack() { # pack PATH: copies the library and, recursively, what it needs beyond the toolchain
  local path=$1 soname dep
  soname=$(objdump -p "$path" | awk '$1 == "SONAME" { print $2 }')
  [[ -n ${packed[$soname]:-} ]] && return
  packed[$soname]=1
  cp -L "$path" "$root/lib/$soname"
  for dep in $(objdump -p "$path" | awk '$1 == "NEEDED" { print $2 }'); do
    [[ $dep =~ $toolchain ]] && continue
    pack "$(ldd "$path" | awk -v n="$dep" '$1 == n { print $3 }')"
  done
}
for lib in $usrlib/openblas-openmp/libopenblas.so.0 $usrlib/libdnnl.so.2 $usrlib/libpcre2-8.so.0 $usrlib/libsentencepiece.so.0 \
  $usrlib/libutf8proc.so.2; do
  need "$lib"
  pack "$lib"
done
ln -s libopenblas.so.0 "$root/lib/libopenblas.so"
ln -s libdnnl.so.2 "$root/lib/libdnnl.so"
ln -s libpcre2-8.so.0 "$root/lib/libpcre2-8.so"
ln -s libsentencepiece.so.0 "$root/lib/libsentencepiece.so"
ln -s libutf8proc.so.2 "$root/lib/libutf8proc.so"

# What the shared objects need from the machine that loads them: the newest glibc and libstdc++
# symbol versions they reference (tools/gpu-check.sh compares these with the machine's own).
versions() { objdump -T "$root"/lib/*.so.* | grep -oE "\b$1_[0-9.]+\b" | sort -uV | tail -1; }
{
  echo "glibc $(versions GLIBC | sed 's/GLIBC_//')"
  echo "libstdc++ $(versions GLIBCXX)"
} >"$root/NEEDS"
{
  echo "tightfit GPU bundle, packed $(date -u +%Y-%m-%dT%H:%MZ) on $(. /etc/os-release && echo "$PRETTY_NAME")"
  dpkg-query -W -f='${Package} ${Version}\n' libcli11-dev nlohmann-json3-dev libopenblas0-openmp \
    libopenblas-openmp-dev libdnnl2 libdnnl-dev libpcre2-8-0 libpcre2-dev libsentencepiece0 libsentencepiece-dev libutf8proc2 libutf8proc-dev googletest \
    libgfortran5 libquadmath0
  (cd "$root" && find . -type f -path './lib/*' -printf '%p %s bytes\n' | sort)
} >"$root/MANIFEST"

mkdir -p "$out"
XZ_OPT=-T2 tar -C "$stage" --sort=name --owner=0 --group=0 --numeric-owner -cJf "$out/bundle.tar.xz.part" bundle
mv "$out/bundle.tar.xz.part" "$out/bundle.tar.xz"
cp "$root/MANIFEST" "$out/MANIFEST"
echo "gpu-bundle: $out/bundle.tar.xz, $(du -h "$out/bundle.tar.xz" | cut -f1) ($(du -sh "$root" | cut -f1) unpacked)"
