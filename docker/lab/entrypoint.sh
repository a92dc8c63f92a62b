#!/bin/sh
# Lab machine boot: per-machine host keys, the operator's key, sshd, then the engine.
set -eu
ssh-keygen -A >/dev/null
umask 077
printf '%s\n' "${LAB_AUTHORIZED_KEY:?}" >/root/.ssh/authorized_keys
umask 022
/usr/sbin/sshd -e
# Its own cgroup parent keeps this engine's containers apart from the outer engine's.
exec dockerd --cgroup-parent="/${LAB_NODE_NAME:?}" >/var/log/dockerd.log 2>&1
