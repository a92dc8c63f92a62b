"""Fan-out plans (which machines relay, pull, stream or have the image) and relay hops."""

from __future__ import annotations

import io
import shlex
import subprocess

from deepfleet import progress
from deepfleet.images import fanout, relay

REF = "deepfleet/cpu:latest"
ADDR = {"a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3", "d": "10.0.0.4"}


def plan(refs, have, want=None, **kw):
    want = want if want is not None else {ref: "sha256:new" for ref in set(refs.values())}
    return fanout.plan_images(refs, want, have, ADDR, **kw)


def test_fresh_machines_form_one_chain_in_inventory_order():
    p = plan({n: REF for n in "abc"}, {})
    assert [c.nodes for c in p.chains] == [("a", "b", "c")]
    assert p.direct == () and p.present == ()
    assert "relayed once, here -> a -> b -> c" in p.describe()


def test_machines_with_the_image_sit_out_and_one_left_is_streamed():
    p = plan({n: REF for n in "abc"}, {"a": "sha256:new", "b": "sha256:new", "c": "sha256:old"})
    assert p.present == ("a", "b")
    assert p.chains == () and p.direct == ("c",)  # a chain of one is a plain stream


def test_each_image_gets_its_own_chain():
    refs = {"a": REF, "b": "deepfleet/cuda:latest", "c": REF, "d": "deepfleet/cuda:latest"}
    p = plan(refs, {})
    assert sorted(c.nodes for c in p.chains) == [("a", "c"), ("b", "d")]


def test_no_relay_image_here_streams_directly_and_says_so():
    p = plan({n: REF for n in "ab"}, {}, relay_ready=False)
    assert p.chains == () and p.direct == ("a", "b")
    assert "not built" in p.describe() and "make images" in p.describe()


def test_no_relay_asked_streams_directly_without_a_note():
    p = plan({n: REF for n in "ab"}, {}, use_relay=False)
    assert p.chains == () and p.direct == ("a", "b") and p.notes == ()


def test_registry_images_are_pulled_not_relayed():
    ref = "registry.lan:5000/deepfleet/cpu@sha256:" + "ab" * 32
    p = plan({n: ref for n in "ab"}, {})
    assert p.pull == ("a", "b") and p.chains == ()


def test_image_missing_here_is_not_relayed():
    p = plan({n: REF for n in "ab"}, {}, want={REF: None})
    assert p.chains == () and p.direct == ("a", "b")  # ensure_image then names the problem


def _run_line(command: str) -> list[str]:
    """The `docker run` of a hop's host script, as words; and the script is valid sh."""
    words = shlex.split(command)
    assert words[:2] == ["sh", "-c"] and len(words) == 3
    script = words[2]
    assert subprocess.run(["sh", "-n", "-c", script]).returncode == 0, script
    line = next(x for x in script.splitlines() if "docker run" in x)
    return shlex.split(line.strip("(").split(";")[0]), script


def test_hops_dial_the_next_machine_and_the_first_reads_stdin():
    chain = relay.Chain(("a", "b", "c"), ADDR, 29610)
    hops = chain.hops()
    assert [(h.node, h.listen, h.next_address, h.next_port) for h in hops] == [
        ("a", None, "10.0.0.2", 29610),
        ("b", 29610, "10.0.0.3", 29610),
        ("c", 29610, "", 0),
    ]
    run, script = _run_line(hops[0].command())
    assert run[:3] == ["docker", "run", "--rm"]
    assert run[run.index("--network") + 1] == "host"
    assert "RELAY_IN=/io/in" in run and "RELAY_OUT=/io/out" in run
    assert run[-4:] == [relay.RELAY_IMAGE, "-", "10.0.0.2", "29610"]
    assert 'cat > "$d/in"' in script and 'docker load -i "$d/out"' in script
    tail, script = _run_line(hops[2].command())
    assert "RELAY_IN=/io/in" not in tail and tail[-2:] == [relay.RELAY_IMAGE, "29610"]
    assert "cat >" not in script and 'docker load -i "$d/out"' in script


def test_each_listening_hop_gets_its_own_secret_and_its_neighbour_sends_it():
    hops = relay.Chain(("a", "b", "c"), ADDR).hops()
    keys = relay.make_secrets(hops)
    assert keys["a"][0] == ""  # fed from here over SSH: no port, no secret
    assert keys["a"][1] == keys["b"][0] and keys["b"][1] == keys["c"][0] and keys["c"][1] == ""
    assert len({keys["b"][0], keys["c"][0]}) == 2 and all(len(keys[n][0]) == 32 for n in "bc")
    again = relay.make_secrets(hops)
    assert again["b"][0] != keys["b"][0]  # made anew for every transfer
    for hop in hops:  # the secrets travel on stdin, never on the command line
        run, _ = _run_line(hop.command())
        assert "RELAY_SECRET" in run and "RELAY_NEXT_SECRET" in run
        assert not any(k and k in hop.command() for k in keys[hop.node])


def test_a_hop_script_reads_its_secrets_then_passes_the_rest_of_stdin_on(tmp_path):
    """The first hop's host script with a stand-in `docker`: the relay container sees
    the secrets in its environment, and `docker load` gets exactly the image bytes."""
    fake = tmp_path / "docker"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = run ]; then\n'
        '  for a; do case "$a" in *:/io) d=${a%:/io};; esac; done\n'
        '  echo "env $RELAY_SECRET/$RELAY_NEXT_SECRET" >&2\n'
        '  exec cat "$d/in" > "$d/out"\n'
        "fi\n"
        f'exec cat "$3" > {tmp_path}/loaded\n'
    )
    fake.chmod(0o755)
    hop = relay.Chain(("a", "b"), ADDR).hops()[0]
    image = bytes(range(256)) * 4000 + b"\nnot a secret\n"
    done = subprocess.run(
        ["sh", "-c", shlex.split(hop.command())[2]],
        input=relay.secret_lines("", "s" * 32) + image,
        capture_output=True,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.decode().strip() == "env /" + "s" * 32
    assert (tmp_path / "loaded").read_bytes() == image


def test_a_refused_connection_is_one_line_naming_the_machine_and_the_address():
    said = []
    run = relay._HopRun.__new__(relay._HopRun)
    run.hop, run.bar, run.say, run.refused, run.other = (
        relay.Hop("b", 29610),
        None,
        said.append,
        [],
        [],
    )
    run._line("refused 10.0.0.9:40522: no secret")
    assert run.refused == ["10.0.0.9:40522"] and not run.other
    assert said == [
        "[b] relay: refused a connection from 10.0.0.9:40522 (no secret): "
        "not this transfer's neighbour, nothing of it loaded"
    ]
    for port in range(5):
        run._line(f"refused 10.0.0.9:{port}: wrong secret")
    assert len(run.refused) == 6 and len(said) == relay.SHOW_REFUSED
    assert said[-1].endswith("further ones not shown")


def test_a_chain_without_a_machine_rewires_around_it():
    chain = relay.Chain(("a", "b", "c"), ADDR).without("b")
    assert [(h.node, h.next_address) for h in chain.hops()] == [("a", "10.0.0.3"), ("c", "")]


def test_log_progress_prints_a_meter_line_at_most_every_interval(monkeypatch):
    out = io.StringIO()
    board = progress.Board(out, tty=False)
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    bar = board.bar("[a] image", 2_000_000_000)
    for step in range(1, 41):  # 40 s at 25 MB/s
        clock[0] += 1.0
        bar.update_to(step * 25_000_000)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # at 15 s and 30 s
    assert lines[0].startswith("[a] image") and "375M/2.00G" in lines[0]
    assert "25.0MB/s" in lines[0]
