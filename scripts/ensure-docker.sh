#!/usr/bin/env bash
# Make sure a Docker engine answers. Uses a running one; otherwise installs Debian's
# docker.io (and debootstrap, used to make local base images) and starts dockerd.
# Also OpenSSH's client, docker-registry and skopeo where they are missing.
set -euo pipefail
need=()
# `deepfleet shell` hands the terminal to OpenSSH's client (its test needs one too)
command -v ssh >/dev/null || need+=(openssh-client)
# the registry path's tests: Debian's registry server and skopeo, which pushes to it
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v skopeo >/dev/null || need+=(skopeo)
if docker info >/dev/null 2>&1 && [ "${#need[@]}" -eq 0 ]; then
  exit 0
fi
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "ensure-docker: no Docker engine answers and installing ${need[*]} needs root" >&2
    exit 1
  fi
  echo "ensure-docker: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  # the package's own service would serve :5000 on every interface; the tests start theirs
  if [[ " ${need[*]} " == *" docker-registry "* ]] && command -v systemctl >/dev/null; then
    systemctl disable --now docker-registry >/dev/null 2>&1 || true
  fi
fi
if ! docker info >/dev/null 2>&1; then
  echo "ensure-docker: starting dockerd"
  mkdir -p /var/log
  nohup dockerd >/var/log/deepfleet-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
fi
if ! docker info >/dev/null 2>&1; then
  echo "ensure-docker: dockerd did not start; last lines of its log:" >&2
  tail -5 /var/log/deepfleet-dockerd.log >&2 || true
  exit 1
fi
command -v debootstrap >/dev/null || {
  [ "$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
} || true
