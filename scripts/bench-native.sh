#!/usr/bin/env bash
# The bench's native side: torch, DeepSpeed and transformers from images/versions.env in
# a venv on this machine (.bench-native), so container_vs_native compares the same train
# module in a node container and in plain processes. Made once; kept while the manifest
# is unchanged. Needs a CPython matching the manifest's PYTHON_VERSION.
set -euo pipefail
cd "$(dirname "$0")/.."
v() { sed -n "s/^$1=//p" images/versions.env; }  # not sourced: some values hold ';'
PYTHON_VERSION=$(v PYTHON_VERSION) TORCH_VERSION=$(v TORCH_VERSION)
DEEPSPEED_VERSION=$(v DEEPSPEED_VERSION) TRANSFORMERS_VERSION=$(v TRANSFORMERS_VERSION)
TOKENIZERS_VERSION=$(v TOKENIZERS_VERSION) SAFETENSORS_VERSION=$(v SAFETENSORS_VERSION)
ACCELERATE_VERSION=$(v ACCELERATE_VERSION)
venv=.bench-native
stamp="$(sha256sum images/versions.env | cut -c1-16)"
if [ -f "$venv/.stamp" ] && [ "$(cat "$venv/.stamp")" = "$stamp" ]; then
  exit 0
fi
python="python${PYTHON_VERSION}"
command -v "$python" >/dev/null || { echo "bench-native: $python is missing" >&2; exit 1; }
rm -rf "$venv"
"$python" -m venv "$venv"
pip=("$venv/bin/pip" install -q --disable-pip-version-check)
wheels=()
[ -d /opt/wheels ] && wheels=(--find-links /opt/wheels)
"${pip[@]}" "${wheels[@]}" "torch==${TORCH_VERSION}" setuptools wheel
"${pip[@]}" "${wheels[@]}" --no-build-isolation "torch==${TORCH_VERSION}" \
  "deepspeed==${DEEPSPEED_VERSION}" "transformers==${TRANSFORMERS_VERSION}" \
  "tokenizers==${TOKENIZERS_VERSION}" "safetensors==${SAFETENSORS_VERSION}" \
  "accelerate==${ACCELERATE_VERSION}"
echo "$stamp" >"$venv/.stamp"
