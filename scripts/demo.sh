#!/usr/bin/env bash
# make demo: a 2-machine simulated LAN here, the cluster up, a tiny model trained across
# both machines, text generated with it, everything torn down. Nothing stays behind.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEEPFLEET_STATE_DIR="$PWD/.lab-state"
start=$(date +%s)
cleanup() {
  status=$?
  make -s down >/dev/null 2>&1 || true
  make -s lab-down >/dev/null 2>&1 || true
  rm -rf "$DEEPFLEET_STATE_DIR"
  exit "$status"
}
trap cleanup EXIT INT TERM
step() { printf '==> %s\n' "$*"; }

step "building the CPU node image (cached after the first time)"
make -s images
step "starting a simulated LAN of 2 machines"
make -s lab-down >/dev/null
make -s lab-up LAB_NODES=2
step "deepfleet up"
make -s up
step "deepfleet train (tiny Llama-style model, ZeRO-2, gloo, both machines)"
make -s train
step "deepfleet infer (greedy, with the exported model)"
make -s infer PROMPT="${DEMO_PROMPT:-The lighthouse keeper}"
step "deepfleet down"
make -s down
make -s lab-down
echo "demo: finished in $(( $(date +%s) - start ))s"
