"""cgroup v1 on this machine's real kernel (hybrid: one hierarchy per controller): limits land in the kernel
files, the kernel enforces memory and pids limits, kill_all catches double-forked processes, CPU weights
share a contended CPU 1:2, usage is plausible, nothing is left behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from nodeagent.isolation.cgroups import (
    CgroupIOError,
    CgroupLimits,
    IoDeviceLimit,
    V1Manager,
)
from nodeagent.isolation.cgroups.base import is_dead

from .conftest import DAEMON, leftovers

pytestmark = [pytest.mark.root, pytest.mark.cgroups_v1]


def _read(mgr: V1Manager, job: str, ctrl: str, name: str) -> str:
    return (mgr.parent_dirs[ctrl] / f"jn-{job}" / name).read_text().strip()


def _root_disk() -> IoDeviceLimit:
    st = os.stat("/")
    return IoDeviceLimit(os.major(st.st_dev), 0, rbps=10 << 20, wiops=500)


def test_limits_land_in_the_kernel_files(v1: V1Manager) -> None:
    dev = _root_disk()
    lim = CgroupLimits(memory_max=256 << 20, memory_high=128 << 20, swap_max=0, cpu_weight=200, cpu_quota_us=50_000,
                       cpu_period_us=100_000, io_weight=300, io_limits=(dev,), pids_max=77)
    v1.create("lim", lim)
    assert _read(v1, "lim", "memory", "memory.limit_in_bytes") == str(256 << 20)
    assert _read(v1, "lim", "memory", "memory.soft_limit_in_bytes") == str(128 << 20)
    assert _read(v1, "lim", "memory", "memory.swappiness") == "0"
    if v1.has_memsw:  # swap off: memory+swap == memory
        assert _read(v1, "lim", "memory", "memory.memsw.limit_in_bytes") == str(256 << 20)
    assert _read(v1, "lim", "cpu", "cpu.shares") == "2048"
    assert _read(v1, "lim", "cpu", "cpu.cfs_quota_us") == "50000"
    assert _read(v1, "lim", "cpu", "cpu.cfs_period_us") == "100000"
    assert _read(v1, "lim", "blkio", "blkio.bfq.weight") == "300"
    assert _read(v1, "lim", "blkio", "blkio.throttle.read_bps_device") == f"{dev.device} {10 << 20}"
    assert _read(v1, "lim", "blkio", "blkio.throttle.write_iops_device") == f"{dev.device} 500"
    assert _read(v1, "lim", "pids", "pids.max") == "77"
    # idempotent create: same cgroup, new limits applied (raising memory_max over the old memsw works)
    v1.create("lim", CgroupLimits(memory_max=512 << 20))
    assert _read(v1, "lim", "memory", "memory.limit_in_bytes") == str(512 << 20)
    assert v1.list_jobs() == ["lim"]


def test_failed_create_rolls_back(v1: V1Manager) -> None:
    bad = CgroupLimits(io_limits=(IoDeviceLimit(4095, 4095, rbps=1),))  # no such block device
    with pytest.raises(CgroupIOError) as e:
        v1.create("bad", bad)
    assert "blkio.throttle.read_bps_device" in str(e.value)
    assert v1.list_jobs() == [] and v1.open("bad") is None


def test_memory_hog_is_oom_killed(v1: V1Manager, spawn) -> None:  # type: ignore[no-untyped-def]
    cg = v1.create("hog", CgroupLimits(memory_max=64 << 20))
    c = spawn("b = bytearray(200 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('survived')")
    cg.attach(c.pid)
    c.go()
    rc = c.proc.wait(timeout=30)
    assert rc == -9, f"expected SIGKILL by the OOM killer, got {rc} {c.proc.stdout.read() if c.proc.stdout else ''}"
    assert cg.oom_killed()
    u = cg.usage()
    assert u.oom_kills >= 1
    assert 60 << 20 <= u.memory_peak_bytes <= 64 << 20


def test_fork_bomb_stops_at_pids_max(v1: V1Manager, spawn) -> None:  # type: ignore[no-untyped-def]
    cg = v1.create("bomb", CgroupLimits(pids_max=20))
    bomb = (
        "import os, time\n"
        "made = failed = 0\nend = time.monotonic() + 3\n"
        "while time.monotonic() < end and failed < 50:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60); os._exit(0)\n"
        "        made += 1\n"
        "    except BlockingIOError:\n"
        "        failed += 1\n"
        "print(made, failed, flush=True)\ntime.sleep(60)\n"
    )
    c = spawn(bomb)
    cg.attach(c.pid)
    c.go()
    made, failed = map(int, c.line().split())
    assert made == 19 and failed == 50  # 20 = the bomb itself + 19 children; every further fork: EAGAIN
    assert len(cg.procs()) == 20
    assert cg.usage().pids_peak == 20
    assert _read(v1, "bomb", "pids", "pids.events") == "max 50"
    t = time.monotonic()
    cg.kill_all()
    c.proc.wait(timeout=5)
    assert cg.wait_empty(5.0), cg.procs()
    assert time.monotonic() - t < 5


def test_kill_all_kills_double_forked_grandchild(v1: V1Manager, spawn) -> None:  # type: ignore[no-untyped-def]
    cg = v1.create("dbl", CgroupLimits())
    c = spawn(DAEMON)
    cg.attach(c.pid)
    c.go()
    grandchild = int(c.line())
    assert grandchild in cg.procs()
    assert Path(f"/proc/{grandchild}/stat").read_text().split()[3] != str(c.pid)  # reparented (daemonized)
    cg.kill_all()
    assert cg.wait_empty(5.0), cg.procs()
    c.proc.wait(timeout=5)
    assert is_dead(grandchild), f"grandchild {grandchild} survived kill_all"


def test_cpu_weight_shares_a_contended_cpu_1_to_2(v1: V1Manager, spawn) -> None:  # type: ignore[no-untyped-def]
    cpu = sorted(os.sched_getaffinity(0))[0]
    loop = "import time\nend = time.monotonic() + 10\nwhile time.monotonic() < end: pass\n"
    cgs = [v1.create("w100", CgroupLimits(cpu_weight=100)), v1.create("w200", CgroupLimits(cpu_weight=200))]
    kids = [spawn(loop, cpu=cpu), spawn(loop, cpu=cpu)]
    for cg, k in zip(cgs, kids, strict=True):
        cg.attach(k.pid)
    before = [cg.usage().cpu_seconds for cg in cgs]
    for k in kids:
        k.go()
    time.sleep(3.0)
    used = [cg.usage().cpu_seconds - b for cg, b in zip(cgs, before, strict=True)]
    for cg in cgs:
        cg.kill_all()
    ratio = used[1] / max(used[0], 1e-6)
    print(f"cpu seconds 100: {used[0]:.3f} 200: {used[1]:.3f} ratio {ratio:.3f}")
    assert used[0] + used[1] > 1.0, used  # they did run (one CPU for 3 s, shared with the rest of the machine)
    assert 1.5 <= ratio <= 2.6, f"cpu seconds weight 100: {used[0]:.2f}, weight 200: {used[1]:.2f}, ratio {ratio:.2f}"


def test_usage_reports_cpu_memory_and_io(v1: V1Manager, spawn, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("jnio")
    work = (
        "import os, mmap, time\n"
        "end = time.process_time() + 0.3\n"
        "while time.process_time() < end: pass\n"
        "b = bytearray(50 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
        f"fd = os.open({str(d / 'f')!r}, os.O_CREAT | os.O_WRONLY | os.O_DIRECT)\n"
        "m = mmap.mmap(-1, 1 << 20); m.write(b'x' * (1 << 20))\n"
        "for _ in range(8): os.write(fd, m)\n"
        "os.close(fd)\n"
        f"fd = os.open({str(d / 'f')!r}, os.O_RDONLY | os.O_DIRECT)\n"
        "for _ in range(8): os.readv(fd, [m])\n"
        "print('done', flush=True)\ntime.sleep(60)\n"
    )
    cg = v1.create("use", CgroupLimits())
    c = spawn(work)
    cg.attach(c.pid)
    c.go()
    assert c.line() == "done"
    u = cg.usage()
    assert 0.25 <= u.cpu_seconds < 5, u
    assert 50 << 20 <= u.memory_peak_bytes < 200 << 20, u
    assert u.io_write_bytes >= 8 << 20 and u.io_read_bytes >= 8 << 20, u
    assert u.pids_peak == 1 and u.oom_kills == 0 and not cg.oom_killed()


def test_adopt_after_restart_and_destroy_leaves_nothing(v1: V1Manager, spawn) -> None:  # type: ignore[no-untyped-def]
    cg = v1.create("adopt", CgroupLimits(pids_max=10))
    c = spawn("import time; time.sleep(600)")
    cg.attach(c.pid)
    again = V1Manager(v1.parent, v1.mounts)  # a restarted agent: a new manager over the same parent
    assert again.list_jobs() == ["adopt"]
    assert again.open("nope") is None
    got = again.open("adopt")
    assert got is not None and got.procs() == [c.pid]
    got.kill_all()
    c.proc.wait(timeout=5)
    assert got.wait_empty(2.0)
    got.destroy()
    got.destroy()  # gone already: fine
    assert not any((d / "jn-adopt").exists() for d in v1.parent_dirs.values())
    assert again.list_jobs() == []
    again.close()
    assert leftovers(v1.parent) == []


def test_close_keeps_a_parent_with_running_jobs(v1: V1Manager) -> None:
    v1.create("keep", CgroupLimits())
    v1.close()  # jobs outlive the agent: the parent stays
    assert v1.list_jobs() == ["keep"]


def test_rename_keeps_processes_and_limits(v1: V1Manager, spawn) -> None:  # type: ignore[no-untyped-def]
    assert v1.can_rename
    cg = v1.create("wslot", CgroupLimits(pids_max=33))
    c = spawn("import time; time.sleep(600)")
    cg.attach(c.pid)
    cg.rename("job1")
    assert cg.job_id == "job1" and v1.list_jobs() == ["job1"] and v1.open("wslot") is None
    assert all(d.name == "jn-job1" and d.is_dir() for d in cg.dirs.values())
    assert cg.procs() == [c.pid] and _read(v1, "job1", "pids", "pids.max") == "33"
    text = Path(f"/proc/{c.pid}/cgroup").read_text()
    assert f"/{v1.parent}/jn-job1" in text and "wslot" not in text
    v1.create("taken", CgroupLimits())
    with pytest.raises(CgroupIOError, match="rename"):  # never replaces another job's cgroup
        cg.rename("taken")
    assert cg.procs() == [c.pid]
    cg.kill_all()
    assert cg.wait_empty(5.0)
    cg.destroy()
    assert v1.list_jobs() == ["taken"]
