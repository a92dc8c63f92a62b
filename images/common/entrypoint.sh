#!/bin/sh
# deepfleet node entrypoint.
#   sshd (default): make per-container host keys, install the authorized key from
#                   DEEPFLEET_AUTHORIZED_KEY, run sshd on 2222 in the foreground.
#   anything else:  run it (e.g. `detect --json`).
set -eu

start_sshd() {
  ssh-keygen -A >/dev/null
  if [ -n "${DEEPFLEET_AUTHORIZED_KEY:-}" ]; then
    umask 077
    mkdir -p /root/.ssh
    printf '%s\n' "$DEEPFLEET_AUTHORIZED_KEY" >/root/.ssh/authorized_keys
  fi
  # ssh sessions (pdsh) start with sshd's bare environment; hand them the container's
  # whole environment (image ENV, compose environment:) on sshd's one SetEnv line.
  /opt/venv/bin/python -m deepfleet_node.sshenv >/etc/ssh/deepfleet-env.conf
  mkdir -p /run/sshd
  exec /usr/sbin/sshd -D -e
}

if [ "$#" -eq 0 ] || [ "$1" = "sshd" ]; then
  start_sshd
fi
exec "$@"
