"""Agent SIGKILL in the middle of concurrent launches, restart, recover: nothing leaks."""

from __future__ import annotations

import json
import subprocess
import sys
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
    assert all(ends[j] == "stopped" for j in res["adopted"] if isinstance(j, str)), ends


def test_agent_sigkill_during_20_concurrent_launches_then_recover(workdir: Path, parent: str, netns: Path) -> None:
    res = _crash(workdir, parent, netns, n=20, kill_after=8)
    _check(res)


@pytest.mark.slow
def test_agent_sigkill_during_50_concurrent_launches_then_recover(workdir: Path, parent: str, netns: Path) -> None:
    res = _crash(workdir, parent, netns, n=50, kill_after=20)
    _check(res)
