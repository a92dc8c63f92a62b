"""State: what `up` made, saved so later commands need no NODES and `down` finds it all.

One directory (default ./.deepfleet, or $DEEPFLEET_STATE_DIR) holding cluster.json and
the cluster keypair. Writes are atomic: a crash never leaves half a state file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deepfleet.errors import StateError
from deepfleet.inventory.nodes import Inventory, NodeSpec
from deepfleet.planning.reports import NodeReport, parse

STATE_FILE = "cluster.json"
KEY_FILE = "cluster_ed25519"
VERSION = 1


def default_dir() -> Path:
    return Path(os.environ.get("DEEPFLEET_STATE_DIR", ".deepfleet"))


@dataclass
class NodeState:
    spec: NodeSpec
    flavor: str
    container_id: str = ""
    container_name: str = ""
    image_id: str = ""
    host_key: str = ""  # the container sshd's public host key, pinned in known_hosts
    report: dict = field(default_factory=dict)  # detect's JSON as printed

    def parsed_report(self) -> NodeReport:
        return parse(json.dumps(self.report), self.spec.name)


@dataclass
class ClusterState:
    cluster: str
    image: str
    nodes: list[NodeState]
    ssh_config: str | None = None
    cpu_slots: int = 1
    slots: dict[str, int] = field(default_factory=dict)
    compose_overrides: list[str] = field(default_factory=list)
    # the last link measurement (machines/links.py): one record per link, {"a", "b",
    # "a_to_b_bps", "b_to_a_bps", "rtt_s", "measured_at"} (bytes/s, seconds, Unix time);
    # the lines of the links it could not measure; when it ran (None: never)
    links: list[dict] = field(default_factory=list)
    link_failures: list[str] = field(default_factory=list)
    links_measured_at: float | None = None
    version: int = VERSION

    @property
    def inventory(self) -> Inventory:
        return Inventory(nodes=tuple(n.spec for n in self.nodes), ssh_config=self.ssh_config)

    def reports(self) -> dict[str, NodeReport]:
        return {n.spec.name: n.parsed_report() for n in self.nodes if n.report}

    def record_links(self, links: list[dict], failures: list[str], measured_at: float) -> None:
        self.links = [dict(r) for r in links]
        self.link_failures = list(failures)
        self.links_measured_at = measured_at

    def links_age(self, now: float) -> float | None:
        """Seconds since the links were measured; None if they never were."""
        if self.links_measured_at is None:
            return None
        return max(0.0, now - self.links_measured_at)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClusterState:
        raw = json.loads(text)
        if raw.get("version") != VERSION:
            raise StateError(f"state version {raw.get('version')!r} is not {VERSION}")
        nodes = [NodeState(**{**n, "spec": NodeSpec(**n["spec"])}) for n in raw.pop("nodes")]
        return cls(nodes=nodes, **raw)


class StateStore:
    def __init__(self, directory: Path | None = None):
        self.dir = (directory or default_dir()).resolve()

    @property
    def key_path(self) -> Path:
        return self.dir / KEY_FILE

    def exists(self) -> bool:
        return (self.dir / STATE_FILE).exists()

    def load(self) -> ClusterState:
        path = self.dir / STATE_FILE
        if not path.exists():
            raise StateError(f"no cluster is up (no {path}); run `deepfleet up` first")
        try:
            return ClusterState.from_json(path.read_text())
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise StateError(f"cannot read {path}: {exc}") from exc

    def save(self, state: ClusterState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".cluster.", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            fh.write(state.to_json())
        os.replace(tmp, self.dir / STATE_FILE)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
