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
  # ssh sessions (pdsh) start with sshd's bare environment; hand them the image's.
  : >/etc/ssh/deepfleet-env.conf
  for var in PATH TORCH_EXTENSIONS_DIR HF_HOME DEEPFLEET_FLAVOR SSL_CERT_FILE REQUESTS_CA_BUNDLE \
    NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME; do
    val="$(printenv "$var" || true)"
    if [ -n "$val" ]; then
      printf 'SetEnv %s=%s\n' "$var" "$val" >>/etc/ssh/deepfleet-env.conf
    fi
  done
  mkdir -p /run/sshd
  exec /usr/sbin/sshd -D -e
}

if [ "$#" -eq 0 ] || [ "$1" = "sshd" ]; then
  start_sshd
fi
exec "$@"
