#!/usr/bin/env bash
# make bench: the figures of scripts/bench.py (ratios measured side by side in one run),
# printed as a table with their goals and saved to bench/results/bench-<time>.json.
# IMAGE=deepfleet/cuda:latest benches another node image on the same (GPU-less) machines.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEEPFLEET_STATE_DIR="$PWD/.bench-state"
cleanup() {
  status=$?
  .venv/bin/deepfleet down >/dev/null 2>&1 || true
  .venv/bin/python docker/lab.py down >/dev/null 2>&1 || true
  rm -rf "$DEEPFLEET_STATE_DIR"
  exit "$status"
}
trap cleanup EXIT INT TERM
[ -n "${IMAGE:-}" ] || make -s images >/dev/null
scripts/bench-native.sh
.venv/bin/python scripts/bench.py --image "${IMAGE:-deepfleet/cpu:latest}"
