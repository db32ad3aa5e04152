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
