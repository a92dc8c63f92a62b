"""Where things are in a node container, and the ports deepfleet uses: one home each.

The image (images/common/sshd_config, Dockerfile.<flavor>) and the node service
(compose/node.yml) state the same facts for the container's side;
tests/unit/test_layout.py fails when they drift apart from these.
"""

from __future__ import annotations

CONTAINER_NAME = "deepfleet-node"  # the node container on every machine
SSH_PORT = 2222  # the container's sshd, on the machine's network (pdsh's hop between nodes)
MASTER_PORT = 29500  # torch.distributed's rendezvous on the master
WORKDIR = "/workspace"
RUN_DIR = f"{WORKDIR}/.deepfleet"  # the launch's files: hostfile, heartbeats, lease
HOSTFILE = f"{RUN_DIR}/hostfile"
HF_HOME = f"{WORKDIR}/hf-cache"  # every node container's Hugging Face cache
MODELS = f"{WORKDIR}/models"
DATA = f"{WORKDIR}/data"
CHECKPOINTS = f"{WORKDIR}/checkpoints"
LOGS = f"{WORKDIR}/logs"
SSH_DIR = "/root/.ssh"  # the cluster key, the ssh config and known_hosts
CLUSTER_KEY = f"{SSH_DIR}/deepfleet_cluster"
TORCH_EXTENSIONS_DIR = "/opt/deepfleet/torch_extensions"  # DeepSpeed's ops, built in the image
RELAY_PORT = 29610  # each machine but the first takes the image on it from the one before
