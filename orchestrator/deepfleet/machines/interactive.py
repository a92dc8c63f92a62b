"""`deepfleet exec` and `deepfleet shell`: a command, or a terminal, in a machine's node
container.

exec goes through the machine's engine as every other command does and passes the
command's output and exit status through. shell needs a real terminal (line editing,
Ctrl-C to the remote program, window size), which OpenSSH already gives: the operator's
`ssh -t` to the machine, with the same host, user, port, key and pinned host keys as
deepfleet's own connection, running `docker exec -it` there.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

from deepfleet.errors import DeepfleetError
from deepfleet.machines.execstream import STDERR, ExecStream
from deepfleet.machines.state import ClusterState
from deepfleet.planning.plan import WORKDIR


def _node(state: ClusterState, machine: str):
    for node in state.nodes:
        if node.spec.name == machine:
            return node
    names = ", ".join(n.spec.name for n in state.nodes)
    raise DeepfleetError(f"no machine {machine!r} in this cluster ({names})")


def exec_argv(command: list[str]) -> list[str]:
    """Through sh, so a missing program is sh's one line and exit 127, not the runtime's."""
    return ["sh", "-c", 'exec "$@"', "sh", *command]


def run(session, machine: str, command: list[str], out=None, err=None) -> int:
    """Run command in the machine's container, its output streamed; its exit status."""
    node = _node(session.state, machine)
    out = out or sys.stdout.buffer
    err = err or sys.stderr.buffer
    stream = ExecStream(
        session.clients[machine], node.container_id, exec_argv(command), workdir=WORKDIR
    )
    try:
        for frame in stream.frames(poll=1.0):
            if frame is None:
                continue
            target = err if frame.stream == STDERR else out
            target.write(frame.data)
            target.flush()
        return stream.exit_code()
    finally:
        stream.close()


def shell_argv(state: ClusterState, machine: str, command: str = "bash") -> list[str]:
    """The ssh command line that opens `command` on a terminal in the machine's container."""
    node = _node(state, machine)
    ssh = shutil.which("ssh")
    if ssh is None:
        raise DeepfleetError(
            "shell needs OpenSSH's ssh client on this machine (apt install openssh-client)"
        )
    spec = node.spec
    argv = [ssh, "-t", "-p", str(spec.port), "-l", spec.user]
    if state.ssh_config and Path(state.ssh_config).is_file():
        argv += ["-F", state.ssh_config]
    if spec.identity_file:
        argv += ["-i", spec.identity_file, "-o", "IdentitiesOnly=yes"]
    argv += [
        "-o", f"UserKnownHostsFile={spec.known_hosts}",
        "-o", f"HostName={spec.host}",
        spec.name, "--",
        f"docker exec -it -w {WORKDIR} {shlex.quote(node.container_name)} {command}",
    ]  # fmt: skip
    return argv
