#!/usr/bin/env bash
# make test: unit tests, the node workloads' tests inside the CPU image, then the
# integration tests on a simulated LAN. Fails when any stage fails.
set -uo pipefail
cd "$(dirname "$0")/.."
make -s images || exit 1
echo "==> node workload tests (inside deepfleet/cpu:latest)"
docker run --rm --network none \
  -v "$PWD/tests/node:/tests/node:ro" -e DEEPFLEET_IN_IMAGE=1 \
  deepfleet/cpu:latest python -m pytest -q -p no:cacheprovider /tests/node
node_status=$?
echo "==> unit and integration tests"
.venv/bin/pytest -q tests/unit tests/integration "$@"
host_status=$?
if [ "$node_status" -ne 0 ]; then
  echo "test: node workload tests failed (exit $node_status)" >&2
  exit "$node_status"
fi
exit "$host_status"
