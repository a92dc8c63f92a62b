#!/usr/bin/env bash
# The node image's own tests (tests/node) inside deepfleet/FLAVOR:latest, with no network:
# the workloads, and the image's versions, toolchain and detect against the manifest.
# The orchestrator's source is mounted too: test_memfit checks it against DeepSpeed.
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
echo "==> node image tests (inside $image)"
docker run --rm --network none \
  -v "$PWD/tests:/tests:ro" -v "$PWD/images/versions.env:/manifest/versions.env:ro" \
  -v "$PWD/orchestrator:/orchestrator:ro" \
  -e DEEPFLEET_IN_IMAGE=1 \
  "$image" python -m pytest -q -p no:cacheprovider /tests/node "$@"
