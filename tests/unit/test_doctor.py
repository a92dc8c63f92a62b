"""doctor's parsers, verdicts and table, on recorded machine output; the checks that talk to
a machine run here against fakes (tests/integration/test_doctor_checks.py runs them on the
lab's machines)."""

from __future__ import annotations

import io
import subprocess
import time

import pytest

from deepfleet.errors import ConnectError
from deepfleet.health import doctor
from deepfleet.health.doctor import GIB, UNLIMITED, Check
from deepfleet.inventory.nodes import NodeSpec

NODE = NodeSpec("lab2", "172.18.0.3", "root", 22, "/lab/id_ed25519", "/lab/known_hosts")

DF = """Filesystem     1024-blocks     Used Available Capacity Mounted on
/dev/vda         264212084 36717784  69673128      35% /var/lib/docker
"""
DF_BUSYBOX_SPACES = """Filesystem           1024-blocks    Used Available Capacity Mounted on
/dev/sdb1               999320    1000      2048   1% /mnt/big disk
"""
# /proc/PID/limits, as the kernel aligns it
LIMITS_64K = (
    "Limit                     Soft Limit           Hard Limit           Units     \n"
    "Max open files            1048576              1048576              files     \n"
    "Max locked memory         65536                65536                bytes     \n"
)
LIMITS_UNLIMITED = (
    "Max locked memory         unlimited            unlimited            bytes     \n"
)
LIMITS_SOFT_ONLY = (
    "Max locked memory         8388608              unlimited            bytes     \n"
)
# dockerd's CapEff: a root engine, and one without CAP_SYS_RESOURCE (bit 24; the lab's)
CAP_ALL = "000001ffffffffff"
CAP_NO_SYS_RESOURCE = "0000003ffeffffff"


# ---------------------------------------------------------------- Check, table


def test_check_line_is_unchanged_and_fix_is_optional():
    check = Check("lab1", "gpus", "ok", "none; flavor cpu")
    assert check.fix == ""
    assert check.line() == "[lab1] ok   gpus: none; flavor cpu"
    assert Check("lab1", "image", "FAIL", "x", "make images").line() == "[lab1] FAIL image: x"


CHECKS = [
    Check("lab1", "ssh+docker", "ok", "ssh://root@10.0.0.1:22, engine 26.1.5"),
    Check("lab1", "disk", "warn", "only 0.5 GiB free on /var/lib/docker", "docker system prune"),
    Check("lab2", "engine", "FAIL", "engine not running on lab2", "systemctl start docker"),
    Check("lab2", "ports", "ok", "2222, 29500 free", "never shown for ok"),
]


def test_render_marks_each_row_and_puts_the_fix_under_warned_and_failed_ones():
    lines = doctor.render(CHECKS).splitlines()
    assert lines[0].split() == ["MACHINE", "CHECK", "DETAIL"]
    assert lines[1].split(None, 3) == ["lab1", "ssh+docker", "✓", CHECKS[0].detail]
    assert lines[2].split(None, 3) == ["lab1", "disk", "!", CHECKS[1].detail]
    assert lines[3].strip() == "fix: docker system prune"
    assert lines[4].split(None, 3) == ["lab2", "engine", "✗", CHECKS[2].detail]
    assert lines[5].strip() == "fix: systemctl start docker"
    assert lines[6].split(None, 3) == ["lab2", "ports", "✓", "2222, 29500 free"]
    assert len(lines) == 7  # an ok row's fix is not shown


def test_render_aligns_the_columns_and_the_fix_lines_with_detail():
    lines = doctor.render(CHECKS).splitlines()
    column = lines[0].index("DETAIL")
    for line in lines[1:]:
        if line.lstrip().startswith("fix: "):
            assert line.index("fix: ") == column
        else:
            assert line[column - 2 : column] == "  " and line[column] != " "
    assert lines[1].index("✓") == lines[4].index("✗")


def test_render_in_ascii_uses_words_and_only_ascii():
    text = doctor.render(CHECKS, ascii=True)
    text.encode("ascii")
    marks = [line.split(None, 3)[2] for line in text.splitlines()[1:] if line.startswith("lab")]
    assert marks == ["ok", "warn", "FAIL", "ok"]
    assert "fix: systemctl start docker" in text


def test_render_of_nothing_is_the_header():
    assert doctor.render([]).split() == ["MACHINE", "CHECK", "DETAIL"]


def test_wants_ascii_when_the_terminal_cannot_print_the_marks():
    assert doctor.wants_ascii(io.TextIOWrapper(io.BytesIO(), encoding="latin-1"))
    assert not doctor.wants_ascii(io.TextIOWrapper(io.BytesIO(), encoding="utf-8"))
    assert doctor.wants_ascii(object())  # no encoding at all


def test_blocks_up_for_every_fail_but_the_clock_and_the_network():
    assert doctor.blocks_up(CHECKS)
    assert not doctor.blocks_up([c for c in CHECKS if c.level != "FAIL"])
    assert not doctor.blocks_up(
        [Check("lab1", "clock", "FAIL", "42 s ahead"), Check("lab1", "network", "FAIL", "x")]
    )
    assert doctor.blocks_up([Check("lab1", "disk", "FAIL", "needs 8 GiB")])
    assert not doctor.blocks_up([])


def test_summary_counts_checks_failures_and_warnings():
    assert doctor.summary(CHECKS) == "doctor: 4 checks, 1 failed, 1 warnings"
    assert doctor.summary([]) == "doctor: 0 checks, 0 failed, 0 warnings"
    assert doctor.summary(iter(CHECKS[:1])) == "doctor: 1 checks, 0 failed, 0 warnings"


def test_the_no_local_engine_row_is_a_warning_with_a_fix():
    check = doctor.no_local_engine()
    assert (check.node, check.level) == ("local", "warn") and check.fix


# ---------------------------------------------------------------- disk


def test_df_gives_the_free_bytes_and_the_mount_point():
    assert doctor.parse_df(DF) == (69673128 * 1024, "/var/lib/docker")
    assert doctor.parse_df(DF_BUSYBOX_SPACES) == (2048 * 1024, "/mnt/big disk")
    assert doctor.parse_df("") is None
    assert doctor.parse_df("df: /nope: No such file or directory\n") is None
    assert doctor.parse_df(DF.splitlines()[0]) is None  # the header alone


def test_the_image_store_is_the_data_root_and_containerds_when_it_holds_the_layers():
    assert doctor.image_store_dirs({"DockerRootDir": "/srv/docker"}) == ["/srv/docker"]
    assert doctor.image_store_dirs({}) == ["/var/lib/docker"]
    snapshotter = {
        "DockerRootDir": "/var/lib/docker",
        "DriverStatus": [["driver-type", "io.containerd.snapshotter.v1"]],
    }
    assert doctor.image_store_dirs(snapshotter) == ["/var/lib/docker", "/var/lib/containerd"]
    overlay2 = {"DriverStatus": [["Backing Filesystem", "extfs"], ["Supports d_type", "true"]]}
    assert doctor.image_store_dirs(overlay2) == ["/var/lib/docker"]


def test_layer_sizes_from_history_bottom_first_or_none_when_ambiguous():
    history = [  # docker history: the top first; ENV/CMD make no layer
        {"CreatedBy": "CMD", "Size": 0},
        {"CreatedBy": "RUN pip install", "Size": 3000},
        {"CreatedBy": "ENV", "Size": 0},
        {"CreatedBy": "ADD rootfs", "Size": 1000},
    ]
    assert doctor.layer_sizes(history, 2) == [1000, 3000]
    assert doctor.layer_sizes(history, 3) is None  # an empty layer hides among the zeros


def test_missing_bytes_counts_only_the_layers_the_machine_lacks():
    chains = ["sha256:a", "sha256:ab", "sha256:abc"]
    assert doctor.missing_bytes([10, 20, 30], chains, set()) == 60
    assert doctor.missing_bytes([10, 20, 30], chains, {"sha256:a", "sha256:ab"}) == 30
    assert doctor.missing_bytes([10, 20, 30], chains, set(chains)) == 0


def test_disk_need_is_twice_what_is_missing_and_nothing_when_present():
    assert doctor.disk_need(4 * GIB, present=False) == 8 * GIB
    assert doctor.disk_need(4 * GIB, present=False, missing=GIB) == 2 * GIB
    assert doctor.disk_need(4 * GIB, present=True) == 0


REF = "deepfleet/cpu:latest"


def test_disk_fails_naming_the_machine_the_need_and_the_room():
    level, detail, fix = doctor.disk_verdict(
        "lab2", "/var/lib/docker", 3 * GIB, REF, 4 * GIB, False, 8 * GIB
    )
    assert level == "FAIL"
    assert detail.startswith("lab2 needs ~8.0 GiB free on /var/lib/docker for " + REF)
    assert "has 3.0 GiB" in detail and "4.0 GiB of layers it lacks" in detail
    assert "docker system prune" in fix and "/var/lib/docker" in fix and "lab2" in fix


def test_disk_warns_when_little_would_be_left_and_passes_with_room():
    level, detail, _ = doctor.disk_verdict(
        "lab2", "/d", 8 * GIB + GIB // 2, REF, 4 * GIB, False, 8 * GIB
    )
    assert level == "warn" and "leaving 0.5 GiB" in detail
    level, detail, fix = doctor.disk_verdict("lab2", "/d", 50 * GIB, REF, 4 * GIB, False, 8 * GIB)
    assert (level, fix) == ("ok", "") and detail == f"50.0 GiB free on /d, {REF} needs ~8.0 GiB"


def test_disk_with_every_layer_there_needs_nothing():
    level, detail, _ = doctor.disk_verdict("lab2", "/d", 2 * GIB, REF, 4 * GIB, False, 0)
    assert level == "ok" and "layers are all there already" in detail


def test_disk_with_the_image_present_only_warns_below_a_gib():
    assert doctor.disk_verdict("lab1", "/d", 2 * GIB, REF, None, True, 0)[0] == "ok"
    level, detail, fix = doctor.disk_verdict("lab1", "/d", GIB // 4, REF, None, True, 0)
    assert level == "warn" and "only 0.2 GiB free on /d" in detail and fix


def test_disk_without_the_images_size_is_not_compared():
    level, detail, _ = doctor.disk_verdict("lab1", "/d", 20 * GIB, REF, None, False, 0)
    assert level == "ok" and "not compared" in detail
    assert doctor.disk_verdict("lab1", "/d", GIB // 2, REF, None, False, 0)[0] == "warn"


# ---------------------------------------------------------------- memlock


@pytest.mark.parametrize(
    ("text", "limits"),
    [
        (LIMITS_64K, (65536, 65536)),
        (LIMITS_UNLIMITED, (UNLIMITED, UNLIMITED)),
        (LIMITS_SOFT_ONLY, (8388608, UNLIMITED)),
        (LIMITS_64K + f"capeff={CAP_ALL}\n", (65536, 65536)),
        ("LimitMEMLOCK=infinity\n", (UNLIMITED, UNLIMITED)),
        ("LimitMEMLOCK=8388608\n", (8388608, 8388608)),
        ("LimitMEMLOCK=infinity\nLimitMEMLOCKSoft=65536\n", (65536, UNLIMITED)),
        ("", None),
        ("Max locked memory         lots                 lots                 bytes\n", None),
        ("LimitMEMLOCKSoft=65536\n", None),
    ],
)
def test_memlock_from_proc_limits_or_systemd(text, limits):
    assert doctor.parse_memlock(text) == limits


def test_capabilities_from_capeff():
    assert doctor.has_capability(CAP_ALL, doctor.CAP_SYS_RESOURCE) is True
    assert doctor.has_capability(CAP_NO_SYS_RESOURCE, doctor.CAP_SYS_RESOURCE) is False
    assert doctor.has_capability("zz", doctor.CAP_SYS_RESOURCE) is None


def test_memlock_unlimited_is_ok():
    level, detail, fix = doctor.memlock_verdict((UNLIMITED, UNLIMITED), None)
    assert (level, fix) == ("ok", "") and detail.startswith("unlimited")


def test_a_limited_engine_that_can_raise_gives_the_node_container_unlimited():
    level, detail, _ = doctor.memlock_verdict((65536, 65536), True)
    assert level == "ok" and "64 KiB" in detail and "compose/node.yml" in detail
    assert doctor.memlock_verdict((8388608, UNLIMITED), False)[0] == "ok"  # the hard is open


def test_a_limited_engine_that_cannot_raise_warns_with_the_fix():
    level, detail, fix = doctor.memlock_verdict((8388608, 8388608), False)
    assert level == "warn" and "8 MiB" in detail and "CAP_SYS_RESOURCE" in detail
    assert "LimitMEMLOCK=infinity" in fix and "systemctl edit docker" in fix
    level, detail, fix = doctor.memlock_verdict((65536, 65536), None)  # capabilities unknown
    assert level == "warn" and "runs as root" in detail and "LimitMEMLOCK=infinity" in fix


# ---------------------------------------------------------------- clock


def test_epoch_from_date_with_and_without_nanoseconds():
    assert doctor.parse_epoch("1700000000.250000000\n") == (1700000000.25, 0.0)
    assert doctor.parse_epoch("1700000000.%N\n") == (1700000000.5, 0.5)  # busybox
    assert doctor.parse_epoch("1700000000\n") == (1700000000.5, 0.5)
    assert doctor.parse_epoch("date: illegal option\n") is None
    assert doctor.parse_epoch("") is None


def test_this_machines_date_parses_to_now():
    out = subprocess.run(["date", "+%s.%N"], capture_output=True, text=True).stdout
    seconds, unsure = doctor.parse_epoch(out)
    assert abs(seconds - time.time()) < 5 + unsure


def test_skew_is_the_remote_reading_minus_the_round_trips_midpoint():
    assert doctor.clock_skew(100.0, 100.5, 101.0) == 0.0
    assert doctor.clock_skew(100.0, 142.5, 101.0) == 42.0
    assert doctor.clock_skew(100.0, 90.0, 100.2) == pytest.approx(-10.1)


def test_best_skew_takes_the_quickest_reading_and_bounds_its_error():
    readings = [(0.0, 50.0, 0.0, 2.0), (10.0, 60.2, 0.0, 10.2), (20.0, 70.0, 0.5, 21.0)]
    skew, bound = doctor.best_skew(readings)
    assert skew == pytest.approx(50.1) and bound == pytest.approx(0.1)
    assert doctor.best_skew([(0.0, 5.5, 0.5, 1.0)]) == (5.0, 1.0)


def test_clock_levels():
    level, detail, fix = doctor.clock_verdict("lab2", 0.2, 0.01)
    assert (level, fix) == ("ok", "") and "within 0.20 s" in detail
    level, detail, fix = doctor.clock_verdict("lab2", -5.0, 0.01)
    assert level == "warn" and "5.00 s behind" in detail and "timedatectl set-ntp true" in fix
    level, detail, fix = doctor.clock_verdict("lab2", 42.0, 0.01)
    assert level == "FAIL" and "42.00 s ahead" in detail and "TLS" in detail
    assert "timedatectl set-ntp true" in fix


def test_the_clock_is_judged_on_what_the_skew_is_at_least():
    # 1.5 s off, but a 2 s round trip: it may be 0.5 s off, no warning
    assert doctor.clock_verdict("lab2", 1.5, 1.0)[0] == "ok"
    assert doctor.clock_verdict("lab2", 30.5, 1.0)[0] == "warn"
    assert doctor.clock_verdict("lab2", -31.5, 1.0)[0] == "FAIL"


# ---------------------------------------------------------------- engine


ENGINE_STOPPED = """said=Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?
sock=/var/run/docker.sock
sock_present=1
unit=inactive
"""  # noqa: E501


def test_facts_are_key_value_lines_a_repeated_key_joined():
    facts = doctor.parse_facts("a=1\nsaid=one\nsaid=two\nnot a fact\n=x\nb=\n")
    assert facts == {"a": "1", "said": "one two", "b": ""}


def test_a_stopped_engine_is_named_with_the_fix():
    detail, fix = doctor.engine_cause(doctor.parse_facts(ENGINE_STOPPED), "lab2", "root")
    assert detail == (
        "engine not running on lab2 (ssh works; /var/run/docker.sock refuses, no dockerd process)"
    )
    assert "sudo systemctl start docker" in fix and "journalctl -u docker" in fix


def test_a_failed_unit_says_so():
    facts = doctor.parse_facts(ENGINE_STOPPED.replace("inactive", "failed"))
    assert doctor.engine_cause(facts, "lab2", "root")[0].endswith("(the docker unit failed)")


def test_engine_causes_by_what_the_machine_says():
    cause = lambda text: doctor.engine_cause(doctor.parse_facts(text), "lab2", "ann")  # noqa: E731
    detail, fix = cause("cli=missing\n")
    assert detail.startswith("docker is not installed on lab2") and "docs.docker.com" in fix
    detail, fix = cause(
        "said=permission denied while trying to connect to the Docker daemon socket\npid=7\n"
        "sock=/var/run/docker.sock\nsock_present=1\n"
    )
    assert (
        detail.startswith("ann may not use the engine on lab2") and "usermod -aG docker ann" in fix
    )
    detail, fix = cause("pid=7\nstate=T\nsock=/var/run/docker.sock\nsock_present=1\n")
    assert detail.startswith("engine frozen on lab2") and "kill -CONT 7" in fix
    detail, fix = cause("pid=7\nstate=S\nsock=/var/run/docker.sock\n")
    assert detail == (
        "engine not reachable on lab2 (ssh works; /var/run/docker.sock is missing, "
        "though dockerd runs as pid 7)"
    )
    assert "systemctl restart docker" in fix and "DOCKER_HOST" in fix
    detail, fix = cause("pid=7\nstate=S\nsock=/run/user/1000/docker.sock\nsock_present=1\n")
    assert (
        detail.startswith("engine not answering on lab2") and "/run/user/1000/docker.sock" in detail
    )


@pytest.mark.parametrize("name", ["ENGINE_SH", "MEMLOCK_SH", "hostprobe"])
def test_the_machine_scripts_are_posix_sh(name):
    script = doctor.hostprobe.PROBE if name == "hostprobe" else getattr(doctor, name)
    assert subprocess.run(["sh", "-n", "-c", script], capture_output=True).returncode == 0


# ---------------------------------------------------------------- checks, against fakes


def fake_run(answers: dict[str, tuple[int, str, str]], seen: list | None = None):
    """run(cmd) answering by the first key the command contains."""

    def run(cmd: str):
        if seen is not None:
            seen.append(cmd)
        for key, answer in answers.items():
            if key in cmd:
                return answer
        return 127, "", "sh: not found"

    return run


class FakeImage:
    def __init__(self, size, layers, history):
        self.attrs = {"Size": size, "RootFS": {"Layers": layers}}
        self._history = history

    def history(self):
        return self._history


class FakeImages:
    def __init__(self, images):
        self._images = images

    def get(self, ref):
        from docker.errors import ImageNotFound

        if ref not in self._images:
            raise ImageNotFound(ref)
        return self._images[ref]

    def list(self, all=False):
        return list(self._images.values())


class FakeEngine:
    def __init__(self, images=None):
        self.images = FakeImages(images or {})


LAYERS = ["sha256:" + "1" * 64, "sha256:" + "2" * 64]
HISTORY = [{"Size": 3 * GIB}, {"Size": 0}, {"Size": GIB}]
INFO = {"DockerRootDir": "/var/lib/docker"}


def df_answer(available_kib: int, mount="/var/lib/docker"):
    header = "Filesystem     1024-blocks     Used Available Capacity Mounted on\n"
    return 0, f"{header}/dev/vda 999999999 1 {available_kib} 1% {mount}\n", ""


def test_check_disk_fails_when_the_load_cannot_fit():
    local = FakeEngine({REF: FakeImage(4 * GIB, LAYERS, HISTORY)})
    seen = []
    run = fake_run({"df -Pk": df_answer(3 * GIB // 1024)}, seen)
    check = doctor.check_disk("lab2", FakeEngine(), run, INFO, local, REF, present=False)
    assert check.level == "FAIL" and check.name == "disk"
    assert check.detail.startswith("lab2 needs ~8.0 GiB free on /var/lib/docker")
    assert seen == ["df -Pk -- /var/lib/docker"]


def test_check_disk_counts_the_layers_the_machine_already_has():
    local = FakeEngine({REF: FakeImage(4 * GIB, LAYERS, HISTORY)})
    from deepfleet.images import delivery

    bottom = delivery.chain_ids(LAYERS)[:1]
    older = FakeImage(1, LAYERS[:1], [])  # an older build: the same base layer
    machine = FakeEngine({"deepfleet/cpu:old": older})
    assert delivery.node_chains(machine) == set(bottom)
    run = fake_run({"df -Pk": df_answer(7 * GIB // 1024)})
    check = doctor.check_disk("lab2", machine, run, INFO, local, REF, present=False)
    assert check.level == "ok" and "needs ~6.0 GiB" in check.detail  # 2 x the 3 GiB top layer


def test_check_disk_takes_the_tightest_store_and_warns_when_df_says_nothing():
    info = {**INFO, "DriverStatus": [["driver-type", "io.containerd.snapshotter.v1"]]}
    run = fake_run(
        {
            "/var/lib/containerd": df_answer(GIB // 2048, "/var/lib/containerd"),
            "/var/lib/docker": df_answer(100 * GIB // 1024),
        }
    )
    check = doctor.check_disk("lab1", FakeEngine(), run, info, None, REF, present=True)
    assert check.level == "warn" and "on /var/lib/containerd" in check.detail
    check = doctor.check_disk("lab1", FakeEngine(), fake_run({}), INFO, None, REF, present=True)
    assert check.level == "warn" and "could not read the free space" in check.detail
    assert check.fix


def test_check_memlock_reads_the_engines_limit_and_capabilities():
    run = fake_run({"Max locked memory": (0, LIMITS_64K + f"capeff={CAP_NO_SYS_RESOURCE}\n", "")})
    check = doctor.check_memlock("lab1", run, {})
    assert check.level == "warn" and "CAP_SYS_RESOURCE" in check.detail
    run = fake_run({"Max locked memory": (0, LIMITS_64K + f"capeff={CAP_ALL}\n", "")})
    assert doctor.check_memlock("lab1", run, {}).level == "ok"
    rootless = {"SecurityOptions": ["name=seccomp,profile=builtin", "name=rootless"]}
    assert doctor.check_memlock("lab1", run, rootless).level == "warn"
    check = doctor.check_memlock("lab1", fake_run({"Max locked memory": (0, "", "")}), {})
    assert check.level == "warn" and "could not read" in check.detail and check.fix


def test_check_clock_from_the_quickest_of_three_readings():
    ticks = iter([100.0, 100.4, 200.0, 200.2, 300.0, 301.0])  # t0, t1 per reading
    answers = iter(["142.2\n", "242.1\n", "345.0\n"])

    def run(cmd):
        assert cmd == "date +%s.%N"
        return 0, next(answers), ""

    check = doctor.check_clock("lab2", run, clock=lambda: next(ticks))
    assert check.level == "FAIL" and "42.00 s ahead" in check.detail  # 242.1 - 200.1
    check = doctor.check_clock("lab2", fake_run({}), clock=time.time)
    assert check.level == "warn" and "could not read" in check.detail


def test_check_node_reports_engine_down_separately_from_ssh(monkeypatch):
    said = {"cmd": None}

    class FakeAdapter:
        def __init__(self, node, timeout):
            assert node is NODE

        def run_host(self, command, timeout):
            said["cmd"] = command
            return 0, ENGINE_STOPPED, ""

        def close(self):
            said["closed"] = True

    def engine_down(node, timeout):
        raise ConnectError(
            "SSH works but the Docker engine did not answer (is docker installed and running, "
            "and may root use it?): Connection aborted.",
            node.name,
        )

    monkeypatch.setattr(doctor, "connect", engine_down)
    monkeypatch.setattr(doctor, "PinnedSSHAdapter", FakeAdapter)
    (check,) = doctor.check_node(NODE, None, None, False, 5.0)
    assert (check.node, check.name, check.level) == ("lab2", "engine", "FAIL")
    assert check.detail.startswith("engine not running on lab2 (ssh works;")
    assert "systemctl start docker" in check.fix
    assert said["cmd"] == doctor.ENGINE_SH and said["closed"]
    assert doctor.blocks_up([check])


def test_check_node_keeps_an_ssh_failure_as_ssh_with_how_to_check_it(monkeypatch):
    def no_ssh(node, timeout):
        raise ConnectError("timed out connecting to root@172.18.0.3:22", node.name)

    def never(*_):
        raise AssertionError("SSH failed: no second try")

    monkeypatch.setattr(doctor, "connect", no_ssh)
    monkeypatch.setattr(doctor, "PinnedSSHAdapter", never)
    (check,) = doctor.check_node(NODE, None, None, False, 5.0)
    assert (check.name, check.level) == ("ssh+docker", "FAIL")
    assert check.detail == "timed out connecting to root@172.18.0.3:22"
    assert "ssh -p 22 -i /lab/id_ed25519 root@172.18.0.3 docker version" in check.fix


def test_an_engine_whose_machine_then_drops_ssh_keeps_connects_words(monkeypatch):
    def refuses(node, timeout):
        raise OSError("connection refused")

    error = ConnectError("SSH works but the Docker engine did not answer: x", "lab2")
    monkeypatch.setattr(doctor, "PinnedSSHAdapter", refuses)
    check = doctor.check_engine(NODE, 5.0, error)
    assert (check.name, check.level, check.detail) == ("engine", "FAIL", str(error))


def test_a_check_that_raises_is_a_warning_not_the_end_of_the_machines_checks():
    def boom():
        raise OSError("Socket is closed")

    check = doctor._guarded("lab1", "clock", boom)
    assert (check.level, check.detail) == ("warn", "not checked: Socket is closed")
    assert check.fix


def test_fixes_for_the_older_checks():
    assert "ss -ltnp" in doctor.ports_fix("lab1", [2222, 29500])
    assert "sport = :29500" in doctor.ports_fix("lab1", [29500])
    toolkit = "NVIDIA GPUs need the NVIDIA container toolkit on the host (install ...)"
    assert "nvidia-ctk runtime configure" in doctor.passthrough_fix(toolkit, "lab1")
    flavor = "flavor cuda asked for, but the machine shows no /dev/nvidia* GPU"
    assert "lab1=cpu" in doctor.passthrough_fix(flavor, "lab1")
    blocked = "lab2 cannot reach lab1 (172.18.0.2) on port 29500, the rendezvous port: x"
    assert "firewall" in doctor.network_fix(blocked)
    assert "deepfleet stop" in doctor.network_fix("port 29500, ..., is already in use on lab1")


class FakeClient:
    """A machine's engine as check_node uses it: version, info, one image, close."""

    def __init__(self, image_id="sha256:abc"):
        self.images = FakeImages({REF: type("Img", (), {"id": image_id})()})
        self.closed = False

    def version(self):
        return {"Version": "26.1.5"}

    def info(self):
        return {"DockerRootDir": "/var/lib/docker", "Runtimes": {"runc": {}}}

    def close(self):
        self.closed = True


def test_check_node_runs_every_check_in_order_on_a_healthy_machine(monkeypatch):
    client = FakeClient()
    answers = {
        "nvidia-smi": (0, "arch=x86_64\n", ""),  # the host probe
        "df -Pk": df_answer(50 * GIB // 1024),
        "Max locked memory": (0, LIMITS_UNLIMITED, ""),
        "date +%s": (0, f"{time.time():.9f}\n", ""),
        "ss -ltnH": (0, "LISTEN 0 128 0.0.0.0:22 0.0.0.0:*\n", ""),
    }
    run = fake_run(answers)
    monkeypatch.setattr(doctor, "connect", lambda node, timeout: client)
    monkeypatch.setattr(doctor, "run_host", lambda c, cmd, timeout=20.0: run(cmd))
    checks = doctor.check_node(NODE, None, None, False, 5.0)
    assert [c.name for c in checks] == [
        "ssh+docker", "gpus", "image", "disk", "memlock", "clock", "ports"
    ]  # fmt: skip
    assert [c.level for c in checks] == ["ok"] * 7, checks
    assert client.closed
    assert not doctor.blocks_up(checks)


def test_check_node_keeps_going_when_a_new_check_cannot_be_made(monkeypatch):
    client = FakeClient()

    def run(cmd):
        if "nvidia-smi" in cmd:
            return 0, "arch=x86_64\n", ""
        if "ss -ltnH" in cmd:
            return 0, "LISTEN 0 128 0.0.0.0:2222 0.0.0.0:*\n", ""
        raise OSError("Socket is closed")

    monkeypatch.setattr(doctor, "connect", lambda node, timeout: client)
    monkeypatch.setattr(doctor, "run_host", lambda c, cmd, timeout=20.0: run(cmd))
    checks = {c.name: c for c in doctor.check_node(NODE, None, None, False, 5.0)}
    for name in ("disk", "memlock", "clock"):
        assert checks[name].level == "warn" and "Socket is closed" in checks[name].detail
    assert checks["ports"].level == "FAIL" and "sport = :2222" in checks["ports"].fix


def test_an_image_built_nowhere_fails_with_the_make_line(monkeypatch):
    client = FakeClient()
    client.images = FakeImages({})
    run = fake_run({"nvidia-smi": (0, "arch=x86_64\n", "")})
    monkeypatch.setattr(doctor, "connect", lambda node, timeout: client)
    monkeypatch.setattr(doctor, "run_host", lambda c, cmd, timeout=20.0: run(cmd))
    checks = {c.name: c for c in doctor.check_node(NODE, None, None, False, 5.0)}
    image = checks["image"]
    assert image.level == "FAIL" and image.detail == f"{REF} is not built here, nor on lab2"
    assert image.fix.startswith("`make images FLAVOR=cpu`")
    assert doctor.blocks_up(checks.values())
    assert "fix: `make images FLAVOR=cpu`" in doctor.render(checks.values())
