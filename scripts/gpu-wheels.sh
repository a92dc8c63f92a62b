#!/usr/bin/env bash
# Build .whl/ for scripts/gpu-check.sh on a GPU machine whose python has torch but no
# DeepSpeed and no network: DeepSpeed at the manifest's version (images/versions.env) as a
# wheel with no ops prebuilt (its ops JIT-compile on first use, and gpu-check needs none),
# plus the small dependencies DeepSpeed imports that such a python may lack, for CPython
# 3.10-3.13 on x86_64 Linux (PYVERS="3.12" ARCH=aarch64 to change). gpu-check installs
# only what python lacks, into a temp dir. .whl/ is git-ignored; the device run tool
# carries it (its limit is 64 MiB; this stays under MAX_MB, default 48).
# Needs pip and a package index here. Usage: scripts/gpu-wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
PYVERS="${PYVERS:-3.10 3.11 3.12 3.13}"
ARCH="${ARCH:-x86_64}"
MAX_MB="${MAX_MB:-48}"
DEEPSPEED_VERSION="$(sed -n 's/^DEEPSPEED_VERSION=//p' images/versions.env)"
[ -n "$DEEPSPEED_VERSION" ] || { echo "gpu-wheels: no DEEPSPEED_VERSION in images/versions.env" >&2; exit 1; }
# What DeepSpeed's install_requires names, less torch, numpy and packaging's peers that
# transformers and accelerate already bring; nvidia-ml-py is what its setup.py adds on CUDA.
DEPS=(hjson msgpack ninja py-cpuinfo einops pydantic psutil tqdm packaging nvidia-ml-py)

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
pip=("$PYTHON" -m pip)

echo "gpu-wheels: deepspeed==$DEEPSPEED_VERSION (DS_BUILD_OPS=0)"
# Build isolation keeps torch out of the build: setup.py then prebuilds no op at all.
DS_BUILD_OPS=0 "${pip[@]}" wheel --quiet --no-deps "deepspeed==$DEEPSPEED_VERSION" -w "$tmp"

for v in $PYVERS; do
  echo "gpu-wheels: dependencies for CPython $v $ARCH"
  "${pip[@]}" download --quiet --only-binary=:all: --python-version "$v" --implementation cp \
    --platform "manylinux_2_28_$ARCH" --platform "manylinux_2_17_$ARCH" \
    --platform "manylinux2014_$ARCH" --platform "linux_$ARCH" \
    -d "$tmp" "${DEPS[@]}"
done

size_mb=$(( $(du -sk "$tmp" | cut -f1) / 1024 ))
if [ "$size_mb" -gt "$MAX_MB" ]; then
  echo "gpu-wheels: $size_mb MiB of wheels, over MAX_MB=$MAX_MB (the run tool carries 64 MiB)" >&2
  exit 1
fi
rm -rf .whl
mkdir .whl
mv "$tmp"/*.whl .whl/
ls -1 .whl
echo "gpu-wheels: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
