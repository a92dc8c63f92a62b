"""`up`'s plan: what every machine gets, decided before anything changes there.

Pure, as torchx's schedulers keep `_submit_dryrun` (the printable request) apart from
`schedule` (which runs it): from what was probed on each machine (its flavor, the image it
holds) it builds, per machine, the image action, the exact container request docker-py is
given (containers.run_kwargs) and the files written into the container afterwards.
`up --dry-run` prints this plan; `up` executes this same plan object (cluster.execute_up).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from deepfleet.images.fanout import ImagePlan
from deepfleet.layout import CLUSTER_KEY, RUN_DIR, SSH_DIR
from deepfleet.machines.containers import run_kwargs
from deepfleet.planning.compose import ContainerSpec

# What _wire_ssh writes once the containers' host keys are known: (path, mode, who gets it)
WIRED_FILES = (
    (f"{SSH_DIR}/known_hosts", 0o644, "every machine"),
    (f"{SSH_DIR}/config", 0o600, "every machine"),
    (CLUSTER_KEY, 0o600, "the master"),
    (f"{RUN_DIR}/hostfile", 0o644, "every machine"),
    ("/root/.deepspeed_env", 0o644, "every machine"),
)
# Stand-ins a dry run prints for what `up` makes fresh when it runs
NEW_CLUSTER = "<new cluster id>"
NEW_KEY = "<new cluster public key>"


@dataclass(frozen=True)
class MachineUp:
    name: str
    docker_url: str
    flavor: str
    image_action: str  # present | pull | relay | stream
    container: ContainerSpec
    master: bool = False

    def request(self) -> dict:
        """The docker-py containers.create arguments `up` sends (JSON-ready)."""
        return json.loads(json.dumps(run_kwargs(self.container)))

    def files(self) -> list[str]:
        return [path for path, _, who in WIRED_FILES if self.master or who != "the master"]


@dataclass(frozen=True)
class UpPlan:
    cluster: str
    machines: tuple[MachineUp, ...]
    images: ImagePlan

    def machine(self, name: str) -> MachineUp:
        return next(m for m in self.machines if m.name == name)

    def as_dict(self) -> dict:
        return {
            "cluster": self.cluster,
            "machines": [
                {
                    "name": m.name,
                    "docker": m.docker_url,
                    "flavor": m.flavor,
                    "image": m.container.image,
                    "image_action": m.image_action,
                    "container": m.request(),
                    "files": m.files(),
                }
                for m in self.machines
            ],
        }

    def describe(self) -> str:
        lines = [f"up: cluster {self.cluster}, {len(self.machines)} machine(s)"]
        for m in self.machines:
            lines.append(
                f"{m.name} ({m.docker_url}): flavor {m.flavor}, image {m.container.image}"
                f" {m.image_action}{', master' if m.master else ''}"
            )
            lines.append(f"  container: {json.dumps(m.request(), sort_keys=True)}")
            lines.append(f"  then writes: {', '.join(m.files())}")
        if self.images.describe():
            lines.append(self.images.describe())
        return "\n".join(lines)


def image_action(images: ImagePlan, name: str) -> str:
    if name in images.present:
        return "present"
    if name in images.pull:
        return "pull"
    if any(name in chain.nodes for chain in images.chains):
        return "relay"
    return "stream"


def plan_up(
    nodes, flavors: dict[str, str], specs: dict[str, ContainerSpec], images: ImagePlan,
    cluster: str,
) -> UpPlan:  # fmt: skip
    """`nodes`: the inventory's, in order (the first is the master); `specs`: each one's
    container spec (cluster.container_spec, from compose and the options)."""
    machines = tuple(
        MachineUp(
            n.name,
            n.docker_url,
            flavors[n.name],
            image_action(images, n.name),
            specs[n.name],
            master=index == 0,
        )  # fmt: skip
        for index, n in enumerate(nodes)
    )
    return UpPlan(cluster, machines, images)
