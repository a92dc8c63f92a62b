#!/usr/bin/env bash
# The node image's own tests (tests/node) inside deepfleet/FLAVOR:latest, with no network:
# the workloads, and the image's versions, toolchain and detect against the manifest.
# The orchestrator's source is mounted too: test_memfit checks it against DeepSpeed.
# DEEPFLEET_IN_IMAGE=1 makes a missing or broken package a failure, not a skip, and any
# skip not listed in tests/node/conftest.py EXPECTED_SKIPS a failure too (-rs lists them).
# Usage: scripts/test-node.sh [cpu|cuda|rocm] [pytest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
flavor="${1:-cpu}"
shift || true
image="deepfleet/${flavor}:latest"
if ! docker image inspect "$image" >/dev/null 2>&1; then
  echo "test-node: $image is not built (make images FLAVOR=$flavor)" >&2
  exit 1
fi
# The recorded GPU tools' outputs (../shared beside the clone), where they are: under CI
# (CI passed in) a test that needs them fails without them (tests/sharedata.py).
shared=()
if [ -d "$PWD/../shared" ]; then
  shared=(-v "$(cd "$PWD/../shared" && pwd):/shared:ro" -e DEEPFLEET_SHARED_DIR=/shared)
fi
echo "==> node image tests (inside $image)"
docker run --rm --network none \
  -v "$PWD/tests:/tests:ro" -v "$PWD/images/versions.env:/manifest/versions.env:ro" \
  -v "$PWD/orchestrator:/orchestrator:ro" "${shared[@]}" \
  -e DEEPFLEET_IN_IMAGE=1 -e CI \
  "$image" python -m pytest -q -rs -p no:cacheprovider /tests/node "$@"
