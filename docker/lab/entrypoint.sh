#!/bin/sh
# Lab machine boot: per-machine host keys, the operator's key, sshd, then the engine.
set -eu
ssh-keygen -A >/dev/null
# Name this machine 127.0.1.1 in /etc/hosts, as Debian and Ubuntu installers do: host-
# networked containers inherit it, and anything that trusts the hostname (gloo does) must
# cope. /etc/hosts is a bind mount here, so it is rewritten in place, not replaced.
name="$(hostname)"
sed "s/^[0-9a-f.:]*[[:space:]]\{1,\}${name}\$/127.0.1.1\t${name}/" /etc/hosts >/tmp/hosts
cat /tmp/hosts >/etc/hosts
rm -f /tmp/hosts
umask 077
printf '%s\n' "${LAB_AUTHORIZED_KEY:?}" >/root/.ssh/authorized_keys
umask 022
/usr/sbin/sshd -e
# Its own cgroup parent keeps this engine's containers apart from the outer engine's.
exec dockerd --cgroup-parent="/${LAB_NODE_NAME:?}" >/var/log/dockerd.log 2>&1
