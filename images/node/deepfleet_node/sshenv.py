"""The node container's environment, as the one sshd `SetEnv` line its ssh sessions get.

The ranks start in ssh sessions (pdsh from the master), and sshd gives a session only
its own bare environment plus what `SetEnv` names. sshd keeps just the first `SetEnv`
directive it reads, so every variable goes on one line: whatever the image, the compose
file's `environment:` or an override set (HSA_OVERRIDE_GFX_VERSION, GLOO_SOCKET_IFNAME,
WANDB_*) reaches every rank on that machine.

    python -m deepfleet_node.sshenv > /etc/ssh/deepfleet-env.conf
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# sshd sets these for the session itself, or they describe this one process.
SKIP = frozenset(
    {"HOME", "HOSTNAME", "PWD", "OLDPWD", "SHLVL", "_", "TERM", "USER", "LOGNAME", "SHELL",
     "MAIL", "DEEPFLEET_AUTHORIZED_KEY"}
)  # fmt: skip


def _quoted(name: str, value: str) -> str:
    # sshd splits the line like a shell word list: double quotes group, and a backslash
    # escapes a quote or a backslash inside them
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{name}={escaped}"'


def render(environ: Mapping[str, str]) -> str:
    """sshd_config text: one SetEnv line (or nothing) carrying every passable variable."""
    items = [
        _quoted(name, value)
        for name, value in sorted(environ.items())
        if name not in SKIP and name.isidentifier() and "\n" not in value and "\r" not in value
    ]
    return f"SetEnv {' '.join(items)}\n" if items else ""


def main() -> None:
    sys.stdout.write(render(os.environ))


if __name__ == "__main__":
    main()
