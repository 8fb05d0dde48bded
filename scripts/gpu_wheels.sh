#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (scripts/gpu_wheels.txt) for CPython 3.12 on x86-64 Linux
# into DIR (default .whl, ignored by git). Needs pip and PyPI; the GPU machine needs neither.
#   scripts/gpu_wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
mkdir -p "$dir"
plats=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux_2_5_x86_64 manylinux1_x86_64; do plats+=(--platform "$p"); done
grep -v '^#' scripts/gpu_wheels.txt | sed 's/#.*//' | grep -v '^ *$' | \
  xargs python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plats[@]}" -d "$dir"
du -sh "$dir"
