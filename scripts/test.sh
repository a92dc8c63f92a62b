#!/usr/bin/env bash
# make test: the layers (import-linter's contracts), the node workloads' tests inside the
# CPU image, the GPU check script in its CPU mode inside that image, then the unit and
# integration tests on a simulated LAN, less those marked slow (`make test-slow`, to keep
# CI within its time). Fails when any stage fails.
set -uo pipefail
cd "$(dirname "$0")/.."
make -s images || exit 1
echo "==> the layers (lint-imports: pyproject.toml's [tool.importlinter])"
if ! lint_out=$(.venv/bin/lint-imports --no-cache 2>&1); then
  echo "$lint_out" | sed -n '/^Contracts:/,$p' >&2
  echo "test: an import crosses a layer (make lint shows it)" >&2
  exit 1
fi
echo "$lint_out" | grep '^Contracts:'
scripts/test-node.sh cpu
node_status=$?
echo "==> scripts/gpu-check.sh --cpu (the GPU checks' script, run on the CPU image)"
docker run --rm --network none -v "$PWD:/src:ro" -w /src deepfleet/cpu:latest \
  bash scripts/gpu-check.sh --cpu
gpu_check_status=$?
echo "==> unit and integration tests (make test-slow runs the cases marked slow)"
.venv/bin/pytest -q -m "not slow" tests/unit tests/integration "$@"
host_status=$?
if [ "$gpu_check_status" -ne 0 ]; then
  echo "test: scripts/gpu-check.sh --cpu failed (exit $gpu_check_status)" >&2
  exit "$gpu_check_status"
fi
if [ "$node_status" -ne 0 ]; then
  echo "test: node workload tests failed (exit $node_status)" >&2
  exit "$node_status"
fi
exit "$host_status"
