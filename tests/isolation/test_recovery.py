"""Agent SIGKILL in the middle of concurrent launches, restart, recover: nothing leaks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]


def _crash(workdir: Path, parent: str, netns: Path, n: int, kill_after: int) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-m", "tests.isolation.crash_harness", "harness", str(workdir), parent,
                          str(netns), str(n), str(kill_after)], cwd=ROOT, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr
    res: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return res


def _check(res: dict[str, object]) -> None:
    left = res["left"]
    assert isinstance(left, dict)
    assert all(v == [] for v in left.values()), left
    assert res["children"] == [], "processes the runtime started outlived cleanup"
    ends = res["ends"]
    assert isinstance(ends, dict)
    assert set(ends.values()) <= {"stopped", "setup-failed", "exited", "signalled"}, ends
    assert res["adopted"], "no running job was adopted"
    assert isinstance(res["job_namespaces_at_kill"], int) and res["job_namespaces_at_kill"] >= 2, res
    assert all(ends[j] == "stopped" for j in res["adopted"] if isinstance(j, str)), ends


def test_agent_sigkill_during_20_concurrent_launches_then_recover(workdir: Path, parent: str, netns: Path) -> None:
    res = _crash(workdir, parent, netns, n=20, kill_after=8)
    _check(res)


@pytest.mark.slow
def test_agent_sigkill_during_50_concurrent_launches_then_recover(workdir: Path, parent: str, netns: Path) -> None:
    res = _crash(workdir, parent, netns, n=50, kill_after=20)
    _check(res)


def test_restart_adopts_running_and_reports_jobs_that_ended_meanwhile(
        workdir: Path, parent: str, netns: Path) -> None:
    from nodeagent.isolation import JobRuntime, LaunchRequest

    from .conftest import make_cgroups, make_settings, wait_exit

    settings = make_settings(workdir, parent)
    mgr = make_cgroups(parent)
    rt1 = JobRuntime(settings, cgroups=mgr)
    rt1.start(LaunchRequest("quick", ("sh", "-c", "exit 5"), netns))
    rt1.start(LaunchRequest("slow", ("sh", "-c", "sleep 2; echo done; exit 6"), netns))
    rt1.start(LaunchRequest("timed", ("sleep", "30"), netns, _spec(wall_time_s=1.0)))
    pid_slow = rt1.running()["slow"]
    rt1.close()  # the agent goes away; jobs keep running
    time.sleep(0.3)
    mgr2 = make_cgroups(parent)
    rt2 = JobRuntime(settings, cgroups=mgr2)
    try:
        dead = {e.job_id: e for e in rt2.recover()}
        assert set(dead) == {"quick"} and (dead["quick"].end_reason, dead["quick"].exit_code) == ("exited", 5)
        assert rt2.running() == {"slow": pid_slow, "timed": rt2.running()["timed"]}
        slow = wait_exit(rt2, "slow", timeout=5)
        assert (slow.end_reason, slow.exit_code) == ("exited", 6)
        assert (settings.scratch_root / "slow" / "stdout").read_text() == "done\n"
        timed = wait_exit(rt2, "timed", timeout=5)  # the wall time is enforced without the first agent
        assert timed.end_reason == "timeout"
    finally:
        for j in ("quick", "slow", "timed"):
            rt2.cleanup(j)
        rt2.close()
        mgr2.close()
        mgr.close()
    assert not list((settings.state_dir).iterdir()) and not list(settings.scratch_root.iterdir())


def _spec(**kw: object) -> object:
    from nodeagent.isolation import IsolationSpec

    return IsolationSpec(**kw)  # type: ignore[arg-type]


class _ListsLate:
    """The real cgroup manager, except that list_jobs() first lets a warm slot be made (what the runtime's
    warm thread does right after an agent starts, while the agent runs recover()), then lists."""

    def __init__(self, mgr: object) -> None:
        self.mgr = mgr
        self.rt: object = None
        self.made: list[int] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.mgr, name)

    def list_jobs(self) -> list[str]:
        rt = self.rt
        w = rt._make_warm()  # type: ignore[attr-defined]  # the warm thread's step, at the worst moment
        with rt._lock:  # type: ignore[attr-defined]
            rt._warm.append(w)  # type: ignore[attr-defined]
        self.made.append(w.pid)
        return self.mgr.list_jobs()  # type: ignore[attr-defined, no-any-return]


def test_recover_keeps_a_warm_slot_made_while_it_runs(workdir: Path, parent: str, netns: Path) -> None:
    """An agent calls recover() while its runtime's warm thread makes the first launch slots. A slot whose cgroup
    appeared between recover() deciding what to keep and listing the cgroups was taken for an orphan: its init
    was killed and the node's first job failed with 'setup-failed: spawn: Broken pipe' (CI, 2026-12-02)."""
    from nodeagent.isolation import JobRuntime

    from .conftest import make_cgroups, make_settings, run

    mgr = _ListsLate(make_cgroups(parent))
    rt = JobRuntime(make_settings(workdir, parent, warm_slots=0), cgroups=mgr)  # type: ignore[arg-type]
    mgr.rt = rt
    try:
        assert rt.recover() == []
        assert len(mgr.made) == 1
        slot = mgr.made[0]
        assert Path(f"/proc/{slot}").exists() and Path(f"/proc/{slot}/stat").read_text().split(") ")[1][0] != "Z", \
            "recover() killed the warm slot's init"
        ex, out, _ = run(rt, netns, ("sh", "-c", "echo $$; exit 4"))
        assert (ex.end_reason, ex.exit_code, out) == ("exited", 4, "2\n"), ex
    finally:
        for j in rt.running():
            rt.cleanup(j)
        rt.close()
        mgr.mgr.close()  # type: ignore[attr-defined]


def test_a_dead_warm_slot_is_skipped_not_fatal(workdir: Path, parent: str, netns: Path) -> None:
    """A warm slot's idle init killed from outside (an administrator, the OOM killer): the next job with the
    default limits does not fail on it, it runs (through the other slot or the cold path)."""
    import os
    import signal

    from nodeagent.isolation import JobRuntime

    from .conftest import cgroup_procs_of, make_cgroups, make_settings, run

    mgr = make_cgroups(parent)
    rt = JobRuntime(make_settings(workdir, parent, warm_slots=1), cgroups=mgr)
    try:
        assert rt.wait_warm(10.0) == 1
        idle = cgroup_procs_of(parent, warm=True)
        assert len(idle) == 1, idle
        os.kill(int(idle[0]), signal.SIGKILL)  # the warm slot's init: a child of our runtime's zygote
        deadline = time.monotonic() + 5
        while Path(f"/proc/{idle[0]}").exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # the zygote reaps it
        ex, out, err = run(rt, netns, ("sh", "-c", "echo ran"))
        assert (ex.end_reason, ex.exit_code, out) == ("exited", 0, "ran\n"), (ex, err)
    finally:
        for j in rt.running():
            rt.cleanup(j)
        rt.close()
        mgr.close()
