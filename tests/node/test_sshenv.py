"""The node's sshd hands ssh sessions (and so every rank) the container's environment."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from deepfleet_node import sshenv

ENV = {
    "PATH": "/opt/venv/bin:/usr/bin",
    "HSA_OVERRIDE_GFX_VERSION": "10.3.0",
    "GLOO_SOCKET_IFNAME": "eth1",
    "WANDB_PROJECT": 'my "quoted" project with spaces',
    "WANDB_NOTES": "back\\slash # not a comment",
    "HOSTNAME": "lab1",
    "DEEPFLEET_AUTHORIZED_KEY": "ssh-ed25519 AAAA",
    "MULTI": "one\ntwo",
}


def test_one_setenv_line_carries_every_variable_but_the_sessions_own():
    text = sshenv.render(ENV)
    assert text.count("SetEnv") == 1 and text.endswith("\n")
    assert '"HSA_OVERRIDE_GFX_VERSION=10.3.0"' in text
    for skipped in ("HOSTNAME=", "DEEPFLEET_AUTHORIZED_KEY=", "MULTI="):
        assert skipped not in text
    assert sshenv.render({"HOME": "/root"}) == ""


@pytest.mark.skipif(shutil.which("sshd") is None, reason="no sshd here")
def test_sshd_reads_every_value_back_exactly(tmp_path):
    key = tmp_path / "host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    env = tmp_path / "env.conf"
    env.write_text(sshenv.render(ENV))
    config = tmp_path / "sshd_config"
    config.write_text(f"HostKey {key}\nInclude {env}\n")
    out = subprocess.run(
        ["sshd", "-T", "-f", str(config)], capture_output=True, text=True, check=True
    ).stdout
    setenv = {
        line.removeprefix("setenv ") for line in out.splitlines() if line.startswith("setenv ")
    }
    want = {f"{k}={v}" for k, v in ENV.items() if k not in sshenv.SKIP and "\n" not in v}
    assert setenv == want, out
