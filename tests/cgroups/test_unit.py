"""No kernel needed: limit validation, the site policy, mountinfo parsing (co-mounted cpu,cpuacct), and the
file writes of both backends on a FAKE cgroupfs (plain files in a tmp dir).

The fake-fs tests check only which values land in which file: the real kernel paths for the v2 controller
files (memory.max, memory.high, memory.swap.max, cpu.weight, cpu.max, io.weight, io.max, pids.max) cannot run
on this cgroup v1 hybrid VM, and cpu,cpuacct co-mounted cannot be mounted here (they are mounted separately).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.isolation.cgroups import (
    CgroupLimitError,
    CgroupLimits,
    IoDeviceLimit,
    SiteLimitExceeded,
    V1Manager,
    V2Manager,
    clamp_or_reject,
    v1_mounts,
)
from nodeagent.isolation.cgroups.base import check_job_id


@pytest.mark.parametrize(("kw", "field"), [
    ({"cpu_weight": 0}, "cpu_weight"),
    ({"cpu_weight": 10_001}, "cpu_weight"),
    ({"io_weight": 0}, "io_weight"),
    ({"memory_max": 1000}, "memory_max"),
    ({"memory_high": -1}, "memory_high"),
    ({"swap_max": -1}, "swap_max"),
    ({"pids_max": 0}, "pids_max"),
    ({"cpu_quota_us": 10}, "cpu_quota_us"),
    ({"cpu_period_us": 10}, "cpu_period_us"),
    ({"pids_max": True}, "pids_max"),
    ({"memory_max": 1.5e9}, "memory_max"),
    ({"io_limits": [IoDeviceLimit(8, 0, rbps=1)]}, "io_limits"),
    ({"io_limits": (IoDeviceLimit(8, 0, rbps=1), IoDeviceLimit(8, 0, wbps=1))}, "io_limits"),
])
def test_bad_limits_are_rejected_with_the_field_named(kw: dict[str, object], field: str) -> None:
    with pytest.raises(CgroupLimitError) as e:
        CgroupLimits(**kw)  # type: ignore[arg-type]
    assert isinstance(e.value, ValueError)
    assert e.value.field == field and str(e.value).startswith(f"{field}=")


def test_bad_device_limit_and_names() -> None:
    with pytest.raises(CgroupLimitError, match=r"io_limits\[8:0\].rbps=0"):
        IoDeviceLimit(8, 0, rbps=0)
    for bad in ("", "../x", "a/b", ".hidden", "x" * 200):
        with pytest.raises(CgroupLimitError):
            check_job_id(bad)
    with pytest.raises(CgroupLimitError, match="start"):
        V2Manager(Path("/nonexistent"), "node1")  # the parent must carry the jn prefix


def test_defaults_and_cpus() -> None:
    lim = CgroupLimits()
    assert lim.swap_max == 0 and lim.cpu_period_us == 100_000 and lim.cpus is None
    assert CgroupLimits(cpu_quota_us=150_000).cpus == 1.5


def test_clamp_or_reject() -> None:
    site = CgroupLimits(memory_max=1 << 30, swap_max=0, cpu_weight=500, cpu_quota_us=200_000, pids_max=1000,
                        io_limits=(IoDeviceLimit(8, 0, wbps=100 << 20),))
    got = clamp_or_reject(CgroupLimits(cpu_weight=200), site)
    assert got.memory_max == 1 << 30 and got.pids_max == 1000 and got.cpu_quota_us == 200_000  # open -> clamped
    assert got.cpu_weight == 200 and got.io_weight is None  # weights stay: None means default, not unlimited
    assert got.io_limits == (IoDeviceLimit(8, 0, wbps=100 << 20),)
    ok = clamp_or_reject(CgroupLimits(memory_max=1 << 20, cpu_quota_us=100_000, cpu_period_us=50_000), site)
    assert ok.memory_max == 1 << 20 and ok.cpu_quota_us == 100_000  # 2 CPUs == 2 CPUs with another period
    with pytest.raises(SiteLimitExceeded) as e:
        clamp_or_reject(CgroupLimits(memory_max=2 << 30), site)
    assert e.value.field == "memory_max" and str(e.value) == (
        f"memory_max: the job asks for {2 << 30} bytes, the site allows at most {1 << 30} bytes")
    with pytest.raises(SiteLimitExceeded, match="cpu_weight: the job asks for 1000, the site allows at most 500"):
        clamp_or_reject(CgroupLimits(cpu_weight=1000), site)
    with pytest.raises(SiteLimitExceeded, match=r"3 CPUs.*2 CPUs"):
        clamp_or_reject(CgroupLimits(cpu_quota_us=300_000), site)
    assert clamp_or_reject(CgroupLimits(swap_max=None), site).swap_max == 0  # open -> the site's "no swap"
    with pytest.raises(SiteLimitExceeded, match="swap_max: the job asks for 1 bytes, the site allows at most 0"):
        clamp_or_reject(CgroupLimits(swap_max=1), site)
    with pytest.raises(SiteLimitExceeded, match=r"io_limits\[8:0\].wbps"):
        clamp_or_reject(CgroupLimits(io_limits=(IoDeviceLimit(8, 0, wbps=200 << 20),)), site)
    assert clamp_or_reject(CgroupLimits(pids_max=5), CgroupLimits(swap_max=None)).pids_max == 5  # no bounds


def test_swap_none_is_clamped_not_rejected_when_the_site_bounds_it() -> None:
    site = CgroupLimits(swap_max=1 << 30)
    assert clamp_or_reject(CgroupLimits(swap_max=None), site).swap_max == 1 << 30


MOUNTINFO = """\
25 30 0:23 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw
33 25 0:30 / /sys/fs/cgroup/cpu,cpuacct rw shared:15 - cgroup cgroup rw,cpu,cpuacct
34 25 0:31 / /sys/fs/cgroup/memory rw shared:16 - cgroup cgroup rw,memory
35 25 0:32 / /sys/fs/cgroup/pids rw shared:17 - cgroup cgroup rw,pids
36 25 0:33 / /sys/fs/cgroup/systemd rw shared:18 - cgroup cgroup rw,xattr,name=systemd
37 99 0:33 / /elsewhere/memory rw - cgroup cgroup rw,freezer
"""


def test_v1_mounts_from_mountinfo_with_co_mounted_cpu_cpuacct() -> None:
    got = v1_mounts(Path("/sys/fs/cgroup"), MOUNTINFO)
    cc = Path("/sys/fs/cgroup/cpu,cpuacct")
    assert got == {"cpu": cc, "cpuacct": cc, "memory": Path("/sys/fs/cgroup/memory"),
                   "pids": Path("/sys/fs/cgroup/pids")}


def _fake_job(parent_dir: Path, files: list[str]) -> Path:
    d = parent_dir / "jn-j1"
    d.mkdir(parents=True, exist_ok=True)
    for f in files:
        (d / f).touch()
    return d


def test_fake_fs_v1_co_mounted_writes(tmp_path: Path) -> None:
    """FAKE cgroupfs (this VM mounts cpu and cpuacct separately): with cpu,cpuacct co-mounted the job has one
    directory for both, cpu.shares/cfs land there, attach writes cgroup.procs once per distinct hierarchy."""
    cc, mem, pids = tmp_path / "cpu,cpuacct", tmp_path / "memory", tmp_path / "pids"
    for d in (cc, mem, pids):
        d.mkdir()
    mgr = V1Manager("jn-x", {"cpu": cc, "cpuacct": cc, "memory": mem, "pids": pids})
    assert not mgr.has_memsw and any("swap" in r for r in mgr.degraded)  # no memsw file in the fake parent
    _fake_job(cc / "jn-x", ["cpu.shares", "cpu.cfs_period_us", "cpu.cfs_quota_us", "cgroup.procs"])
    _fake_job(mem / "jn-x", ["memory.limit_in_bytes", "memory.soft_limit_in_bytes", "memory.swappiness",
                             "cgroup.procs"])
    _fake_job(pids / "jn-x", ["pids.max", "cgroup.procs"])
    cg = mgr.create("j1", CgroupLimits(memory_max=64 << 20, memory_high=32 << 20, cpu_weight=50,
                                       cpu_quota_us=20_000, cpu_period_us=10_000, pids_max=9))
    job = cc / "jn-x" / "jn-j1"
    assert (job / "cpu.shares").read_text() == "512"
    assert (job / "cpu.cfs_period_us").read_text() == "10000"
    assert (job / "cpu.cfs_quota_us").read_text() == "20000"
    assert (mem / "jn-x/jn-j1/memory.limit_in_bytes").read_text() == str(64 << 20)
    assert (mem / "jn-x/jn-j1/memory.swappiness").read_text() == "0"
    assert (pids / "jn-x/jn-j1/pids.max").read_text() == "9"
    cg.attach(4242)
    assert [(d / "cgroup.procs").read_text() for d in (job, mem / "jn-x/jn-j1", pids / "jn-x/jn-j1")] == ["4242"] * 3
    assert mgr.list_jobs() == ["j1"]


def test_fake_fs_v2_controller_files(tmp_path: Path) -> None:
    """FAKE cgroupfs: the v2 controller files cannot be exercised on this VM (its cgroup2 mount has no cpu,
    memory, io or pids controller). Checks what create() writes where and that it enables the controllers."""
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    (tmp_path / "cgroup.subtree_control").touch()
    (tmp_path / "jn-x").mkdir()
    (tmp_path / "jn-x" / "cgroup.subtree_control").touch()
    mgr = V2Manager(tmp_path, "jn-x")
    assert mgr.controllers == {"cpu", "memory", "io", "pids"} and mgr.degraded == []
    files = ["memory.max", "memory.high", "memory.swap.max", "cpu.weight", "cpu.max", "io.weight", "io.max",
             "pids.max"]
    job = _fake_job(tmp_path / "jn-x", files)
    mgr.create("j1", CgroupLimits(memory_max=64 << 20, memory_high=48 << 20, cpu_weight=250, cpu_quota_us=50_000,
                                  io_weight=300, io_limits=(IoDeviceLimit(254, 0, rbps=1 << 20, wiops=100),),
                                  pids_max=64))
    got = {f: (job / f).read_text() for f in files}
    assert got == {"memory.max": str(64 << 20), "memory.high": str(48 << 20), "memory.swap.max": "0",
                   "cpu.weight": "250", "cpu.max": "50000 100000", "io.weight": "default 300",
                   "io.max": f"254:0 rbps={1 << 20} wiops=100", "pids.max": "64"}
