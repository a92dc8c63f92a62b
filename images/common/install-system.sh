#!/bin/sh
# System layer shared by every flavor: Python, compilers for DeepSpeed ops, sshd, pdsh.
set -eu
export DEBIAN_FRONTEND=noninteractive
# The build context's extra CAs (context/ca-certificates) are trusted by update-ca-certificates
apt-get update
apt-get install -y --no-install-recommends \
  ca-certificates python3 python3-venv python3-dev g++ make \
  openssh-server openssh-client pdsh tini iproute2 procps less
update-ca-certificates
# Host keys must be unique per container: the entrypoint makes them at start.
rm -f /etc/ssh/ssh_host_*
mkdir -p /run/sshd /root/.ssh /workspace
chmod 0700 /root/.ssh
rm -rf /var/lib/apt/lists/*
