"""The machine around the GPUs: addresses, memory, and the cgroup limits a report carries."""

from detectdata import detect, fixture, run

# ---------------------------------------------------------------- addresses and memory


def test_ips_come_from_ip_json():
    report, _ = run({"ip -j addr": fixture("ip-addr.json")})
    assert report["ips"] == ["192.168.1.20", "fd12:3456::20", "172.17.0.1"]


def test_ips_fall_back_to_hostname_I():
    report, _ = run({"ip -j addr": (1, "", "ip: command failed"), "hostname -I": "10.0.0.5 ::1 \n"})
    assert report["ips"] == ["10.0.0.5"]


def test_ip_addr_json_drops_loopback_and_link_local():
    assert detect.parse_ip_addr_json(fixture("ip-addr.json")) == [
        "192.168.1.20",
        "fd12:3456::20",
        "172.17.0.1",
    ]


def test_meminfo():
    assert detect.parse_meminfo("MemTotal:       16384 kB\nMemFree: 1 kB\n") == 16384 * 1024
    assert detect.parse_meminfo("nothing here") is None


# ---------------------------------------------------------------- cgroup limits


GiB = 1024**3


V1_NONE = "9223372036854771712"  # what cgroup v1 writes for no limit


def cgroup_fs(files):
    """read_text over a fake filesystem: path -> text; anything else is absent."""
    return lambda path: files.get(path)


def v2(path, levels):
    """A v2 container at `path` whose visible levels carry {dir suffix: (memory.max, cpu.max)}."""
    files = {"/proc/self/cgroup": f"0::{path}\n", "/sys/fs/cgroup/cgroup.controllers": "cpu memory"}
    for suffix, (memory, cpu) in levels.items():
        base = "/sys/fs/cgroup" + suffix
        if memory is not None:
            files[f"{base}/memory.max"] = memory + "\n"
        if cpu is not None:
            files[f"{base}/cpu.max"] = cpu + "\n"
    return cgroup_fs(files)


def test_cgroup_no_limits():
    read = v2("/", {"": ("max", "max 100000")})
    assert detect.cgroup_limits(read) == {"memory_limit_bytes": None, "cpu_quota": None}
    # nothing readable at all (no /proc, no cgroup fs)
    assert detect.cgroup_limits(cgroup_fs({})) == {"memory_limit_bytes": None, "cpu_quota": None}


def test_cgroup_own_level_limit():
    # a private cgroup namespace: /proc/self/cgroup says "/", the mount is the own level
    read = v2("/", {"": (str(2 * GiB), "50000 100000")})
    assert detect.cgroup_limits(read) == {"memory_limit_bytes": 2 * GiB, "cpu_quota": 0.5}


def test_cgroup_ancestor_limit_smaller_than_own_wins():
    # the host's cgroup namespace: the container's level and its machine's parent are visible
    read = v2(
        "/deepfleet-lab-3/abc123",
        {
            "/deepfleet-lab-3/abc123": (str(4 * GiB), "max 100000"),
            "/deepfleet-lab-3": (str(2 * GiB), "max 100000"),
            "": (None, None),  # the root cgroup has no memory.max / cpu.max
        },
    )
    assert detect.cgroup_limits(read)["memory_limit_bytes"] == 2 * GiB


def test_cgroup_cpu_quota_on_an_ancestor():
    read = v2(
        "/deepfleet-lab-3/abc123",
        {
            "/deepfleet-lab-3/abc123": ("max", "max 100000"),
            "/deepfleet-lab-3": ("max", "30000 100000"),
        },
    )
    assert detect.cgroup_limits(read) == {"memory_limit_bytes": None, "cpu_quota": 0.3}
    # and the smaller of two quotas on the way up
    read = v2("/a/b", {"/a/b": ("max", "150000 100000"), "/a": ("max", "250000 100000")})
    assert detect.cgroup_limits(read)["cpu_quota"] == 1.5


def test_cgroup_path_outside_the_namespace_reads_the_own_level_only():
    read = v2("/../../other/x", {"": (str(GiB), "max 100000"), "/other/x": ("1", "1000 100000")})
    assert detect.cgroup_limits(read) == {"memory_limit_bytes": GiB, "cpu_quota": None}


def test_cgroup_v1_own_level():
    # v1, own-level mounts (the container's path does not exist inside them)
    files = {
        "/proc/self/cgroup": (
            "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"
        ),
        "/sys/fs/cgroup/memory/memory.limit_in_bytes": f"{3 * GiB}\n",
        "/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "150000\n",
        "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
    }
    assert detect.cgroup_limits(cgroup_fs(files)) == {
        "memory_limit_bytes": 3 * GiB,
        "cpu_quota": 1.5,
    }
    files["/sys/fs/cgroup/memory/memory.limit_in_bytes"] = V1_NONE
    files["/sys/fs/cgroup/cpu/cpu.cfs_quota_us"] = "-1"
    assert detect.cgroup_limits(cgroup_fs(files)) == {"memory_limit_bytes": None, "cpu_quota": None}


def test_cgroup_v1_machine_limit_from_memory_stat_and_the_cpu_hierarchy():
    # v1 lab machine: the parent's memory limit shows in memory.stat's hierarchical limit;
    # its cpu quota where the whole cpu hierarchy is mounted (docker/lab.py does so)
    files = {
        "/proc/self/cgroup": "4:memory:/deepfleet-lab-2/abc\n1:cpu:/deepfleet-lab-2/abc\n",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes": V1_NONE,
        "/sys/fs/cgroup/memory/memory.stat": (
            f"cache 0\nhierarchical_memory_limit {3 * GiB}\nhierarchical_memsw_limit {GiB}\n"
        ),
        "/sys/fs/cgroup/cpu/deepfleet-lab-2/abc/cpu.cfs_quota_us": "-1",
        "/sys/fs/cgroup/cpu/deepfleet-lab-2/abc/cpu.cfs_period_us": "100000",
        "/sys/fs/cgroup/cpu/deepfleet-lab-2/cpu.cfs_quota_us": "50000",
        "/sys/fs/cgroup/cpu/deepfleet-lab-2/cpu.cfs_period_us": "100000",
        "/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1",
        "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000",
    }
    assert detect.cgroup_limits(cgroup_fs(files)) == {
        "memory_limit_bytes": 3 * GiB,
        "cpu_quota": 0.5,
    }


def test_cgroup_garbage_values_are_no_limit():
    for memory, cpu in [
        ("lots", "fast 100000"),
        ("-5", "30000 0"),
        ("0", "-1 100000"),
        ("", "30000"),
        ("1.5e9", "30000 100000 7"),
    ]:
        read = v2("/x", {"/x": (memory, cpu), "": ("max", "max 100000")})
        assert detect.cgroup_limits(read) == {"memory_limit_bytes": None, "cpu_quota": None}
    garbage = cgroup_fs({"/proc/self/cgroup": "not a cgroup line\n::\n"})
    assert detect.cgroup_limits(garbage) == {"memory_limit_bytes": None, "cpu_quota": None}


def test_report_carries_the_limits_and_cpu_count_follows_the_quota():
    files = {
        "/proc/self/cgroup": "0::/deepfleet-lab-3/abc\n",
        "/proc/meminfo": "MemTotal:       16384000 kB\n",
        "/sys/fs/cgroup/cgroup.controllers": "cpu memory",
        "/sys/fs/cgroup/deepfleet-lab-3/memory.max": f"{2 * GiB}\n",
        "/sys/fs/cgroup/deepfleet-lab-3/cpu.max": "30000 100000\n",
    }
    report, _ = run(read_text=cgroup_fs(files))
    assert report["memory_limit_bytes"] == 2 * GiB and report["cpu_quota"] == 0.3
    assert report["cpu_count"] == 1  # min(affinity, ceil(0.3))
    summary = detect.format_summary(report)
    assert "1 cores (quota 0.30 cores)" in summary and "memory (limit 2.0 GiB)" in summary
    report, _ = run(read_text=cgroup_fs({}))
    assert report["memory_limit_bytes"] is None and report["cpu_quota"] is None
    assert "quota" not in detect.format_summary(report)
    assert "limit" not in detect.format_summary(report)
