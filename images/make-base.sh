#!/usr/bin/env bash
# Make a Debian bookworm base image locally when no registry can be reached.
# Usage: images/make-base.sh IMAGE_NAME
# Skips work when IMAGE_NAME already exists in the engine.
set -euo pipefail
name="${1:?usage: make-base.sh IMAGE_NAME}"
if docker image inspect "$name" >/dev/null 2>&1; then
  exit 0  # nothing to say: the usual case after the first build
fi
if ! command -v debootstrap >/dev/null; then
  echo "make-base: debootstrap is missing (apt-get install -y debootstrap)" >&2
  exit 1
fi
dir="$(mktemp -d /tmp/deepfleet-base.XXXXXX)"
trap 'rm -rf "$dir"' EXIT
echo "making base image $name with debootstrap (about 30 s)"
debootstrap --variant=minbase bookworm "$dir" >"$dir.log" 2>&1 || { tail -20 "$dir.log" >&2; rm -f "$dir.log"; exit 1; }
rm -f "$dir.log"
# apt lists and caches are refetched by every Dockerfile; drop them to keep the layer small
rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin
tar -C "$dir" -c . | docker import -c 'CMD ["/bin/bash"]' - "$name"
