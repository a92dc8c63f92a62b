#!/bin/sh
# System layer shared by every flavor: Python, compilers for DeepSpeed ops, sshd, pdsh.
# PYTHON_VERSION is a build arg taken from images/versions.env.
set -eu
: "${PYTHON_VERSION:?}"
export DEBIAN_FRONTEND=noninteractive
. /etc/os-release
# The build context's extra CAs (context/ca-certificates) are trusted by update-ca-certificates
apt-get update

# Where the distro's python3 is the manifest's (Debian bookworm), use it as is. Otherwise,
# on Ubuntu (the GPU bases), the deadsnakes PPA builds every Python for every release.
distro_python="$(apt-cache show --no-all-versions python3 2>/dev/null |
  sed -n 's/^Version: \([0-9]*:\)\{0,1\}\([0-9]*\.[0-9]*\).*/\2/p' | head -n 1)"
if [ "$distro_python" = "$PYTHON_VERSION" ]; then
  python_packages="python3 python3-venv python3-dev"
elif [ "${ID:-}" = ubuntu ]; then
  apt-get install -y ca-certificates software-properties-common
  # the PPA is fetched over HTTPS, possibly through the context's extra CAs
  update-ca-certificates
  add-apt-repository -y ppa:deadsnakes/ppa
  apt-get update
  python_packages="python${PYTHON_VERSION} python${PYTHON_VERSION}-venv python${PYTHON_VERSION}-dev"
else
  echo "install-system: ${PRETTY_NAME:-this distro} has python3 ${distro_python:-(none)}," \
    "the manifest wants ${PYTHON_VERSION} and no other source is known here" >&2
  exit 1
fi

# shellcheck disable=SC2086
apt-get install -y --no-install-recommends \
  ca-certificates $python_packages g++ make \
  openssh-server openssh-client pdsh tini iproute2 procps less
command -v "python${PYTHON_VERSION}" >/dev/null || {
  echo "install-system: python${PYTHON_VERSION} is missing after the install" >&2
  exit 1
}
update-ca-certificates
# Host keys must be unique per container: the entrypoint makes them at start.
rm -f /etc/ssh/ssh_host_*
mkdir -p /run/sshd /root/.ssh /workspace
chmod 0700 /root/.ssh
rm -rf /var/lib/apt/lists/*
