#!/usr/bin/env bash
# Every GPU check in one run (see scripts/gpu_check.py): detect, the DeepSpeed stack, a bf16
# ZeRO-2 step of a ~1B Llama (tokens/s, MFU), the bridge with a CUDA and a CPU rank.
#   scripts/gpu-check.sh          on an NVIDIA machine (no network or Docker needed; DeepSpeed
#                                 comes from .whl/, see scripts/gpu-wheels.sh, when python lacks it)
#   scripts/gpu-check.sh --cpu    the same checks on CPU, small (CI, in the cpu image)
# The python is $PYTHON, else the first of python3, python that has torch.
# Results: one JSON on stdout and in $OUT/gpu-check.json (else a new temp dir; path printed).
# Exit 1 when a check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for cand in python3 python; do
    command -v "$cand" >/dev/null 2>&1 || continue
    [ -n "$py" ] || py="$cand"
    if "$cand" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)' 2>/dev/null; then
      py="$cand"
      break
    fi
  done
fi
if [ -z "$py" ]; then
  echo "gpu-check: no python3 or python on PATH (set PYTHON)" >&2
  exit 2
fi
exec "$py" scripts/gpu_check.py "$@"
