#!/usr/bin/env bash
# make test: unit tests, the node workloads' tests inside the CPU image, then the
# integration tests on a simulated LAN, less those marked slow (`make test-slow`, to keep
# CI within its time). Fails when any stage fails.
set -uo pipefail
cd "$(dirname "$0")/.."
make -s images || exit 1
scripts/test-node.sh cpu
node_status=$?
echo "==> unit and integration tests (make test-slow runs the cases marked slow)"
.venv/bin/pytest -q -m "not slow" tests/unit tests/integration "$@"
host_status=$?
if [ "$node_status" -ne 0 ]; then
  echo "test: node workload tests failed (exit $node_status)" >&2
  exit "$node_status"
fi
exit "$host_status"
