"""cgroup v2 on the real kernel as far as this machine allows.

This VM is cgroup v1 hybrid: its cgroup2 hierarchy (/sys/fs/cgroup/unified) offers no cpu/memory/io/pids
controller (they are bound to the v1 hierarchies and cannot be moved while those are in use). What works there
and is tested here on the real kernel: cgroup.procs (attach, procs), cgroup.kill, cgroup.freeze, cgroup.events
(`populated` + POLLPRI in wait_empty), cpu.stat usage_usec (present without the cpu controller), rmdir, adoption,
and that limits needing an absent controller are refused with CgroupUnsupported. The controller files
(memory.max, cpu.weight, io.max, pids.max, ...) are covered by the labelled fake-fs test in test_unit.py; the
enforcement tests (OOM, pids, cpu weight) run against v2 only on a machine whose /sys/fs/cgroup is cgroup2
(the same tests below then run with the controllers present).
"""

from __future__ import annotations

import os
import time

import pytest

from nodeagent.isolation.cgroups import CgroupLimits, CgroupUnsupported, V2Manager
from nodeagent.isolation.cgroups.base import is_dead, kill_loop

from .conftest import DAEMON, FORK_CHAIN

pytestmark = [pytest.mark.root, pytest.mark.cgroups_v2]


def test_attach_procs_events_kill_destroy(v2: V2Manager, spawn) -> None:  # type: ignore[no-untyped-def]
    cg = v2.create("a", CgroupLimits())
    assert (v2.parent_dir / "jn-a").is_dir()
    c = spawn("import time; time.sleep(600)")
    assert "populated 0" in (cg.path / "cgroup.events").read_text()
    cg.attach(c.pid)
    assert cg.procs() == [c.pid]
    assert "populated 1" in (cg.path / "cgroup.events").read_text()
    assert not cg.wait_empty(0.05)
    cg.kill_all()
    assert cg.wait_empty(2.0)  # the killed child is not reaped yet: v2 counts it out when it exits
    assert c.proc.wait(timeout=5) == -9
    cg.destroy()
    cg.destroy()
    assert not cg.path.exists() and v2.list_jobs() == []


def test_kill_all_kills_double_forked_grandchild(v2: V2Manager, spawn) -> None:  # type: ignore[no-untyped-def]
    cg = v2.create("dbl", CgroupLimits())
    c = spawn(DAEMON)
    cg.attach(c.pid)
    c.go()
    grandchild = int(c.line())
    assert grandchild in cg.procs()
    cg.kill_all()
    assert cg.wait_empty(5.0), cg.procs()
    assert is_dead(grandchild)


@pytest.mark.parametrize("how", ["cgroup.kill", "freeze-kill-thaw"])
def test_kill_all_catches_a_fork_chain(v2: V2Manager, spawn, how: str) -> None:  # type: ignore[no-untyped-def]
    """A process that forks and exits in a tight loop (its pid changes all the time) is caught either way."""
    cg = v2.create("chain", CgroupLimits())
    c = spawn(FORK_CHAIN)
    cg.attach(c.pid)
    c.go()
    time.sleep(0.3)
    assert cg.procs(), "the chain should be running"
    if how == "cgroup.kill":
        cg.kill_all()
    else:
        kill_loop(cg.name, cg.procs, cg._freeze, cg._thaw)
    assert cg.wait_empty(5.0), cg.procs()
    assert (cg.path / "cgroup.freeze").read_text().strip() == "0"  # never left frozen


def test_usage_cpu_seconds_from_cpu_stat(v2: V2Manager, spawn) -> None:  # type: ignore[no-untyped-def]
    cg = v2.create("use", CgroupLimits())
    c = spawn("import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
              "print('done', flush=True)\ntime.sleep(60)")
    cg.attach(c.pid)
    c.go()
    assert c.line() == "done"
    u = cg.usage()
    assert 0.25 <= u.cpu_seconds < 5, u
    if "memory" not in v2.controllers:  # no memory.peak/current/events without the memory controller
        assert u.memory_peak_bytes == 0 and u.oom_kills == 0
    if "pids" not in v2.controllers:
        assert u.pids_peak == 0


def test_limits_without_their_controller_are_refused(v2: V2Manager) -> None:
    if "memory" in v2.controllers:
        pytest.skip("this cgroup2 hierarchy has the memory controller")
    with pytest.raises(CgroupUnsupported, match="memory_max"):
        v2.create("nomem", CgroupLimits(memory_max=64 << 20))
    assert v2.open("nomem") is None  # rolled back
    with pytest.raises(CgroupUnsupported, match="swap_max"):
        v2.create("swap", CgroupLimits(swap_max=1 << 20))
    v2.create("dflt", CgroupLimits())  # the default swap_max 0 alone is skipped, not an error
    assert any(d.startswith("memory") for d in v2.degraded)


def test_adopt_with_a_new_manager(v2: V2Manager, spawn) -> None:  # type: ignore[no-untyped-def]
    cg = v2.create("adopt", CgroupLimits())
    c = spawn("import time; time.sleep(600)")
    cg.attach(c.pid)
    again = V2Manager(v2.root, v2.parent)
    got = again.open("adopt")
    assert got is not None and got.procs() == [c.pid] and again.list_jobs() == ["adopt"]
    got.kill_all()
    assert got.wait_empty(2.0)
    got.destroy()
    again.close()
    assert not v2.parent_dir.exists()
    assert not os.path.exists(f"/proc/{c.pid}") or is_dead(c.pid)


def test_rename_is_refused(v2: V2Manager) -> None:
    assert not v2.can_rename
    cg = v2.create("wslot", CgroupLimits())
    with pytest.raises(CgroupUnsupported, match="rename"):
        cg.rename("job1")
    assert v2.list_jobs() == ["wslot"]
