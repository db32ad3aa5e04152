"""Fixtures for the cgroup tests: a manager under a throwaway parent `jn-test-<rand>` (v1 on /sys/fs/cgroup,
v2 on the hybrid's cgroup2 mount /sys/fs/cgroup/unified), children that wait at a barrier until attached, and
finalizers that kill what is left, remove every job cgroup and the parent, then check nothing is left."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.isolation.cgroups import V1Manager, V2Manager, detect

ROOT = Path("/sys/fs/cgroup")
UNIFIED = ROOT / "unified"
PY = sys.executable
CREATED_PARENTS: set[str] = set()

# prints the pid of a daemonized grandchild (double fork + setsid), then sleeps
DAEMON = (
    "import os, time\n"
    "r, w = os.pipe()\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        os.write(w, str(os.getpid()).encode()); time.sleep(600); os._exit(0)\n"
    "    os._exit(0)\n"
    "os.wait()\nos.close(w)\nprint(os.read(r, 32).decode(), flush=True)\ntime.sleep(600)\n"
)
# forks a child and exits, over and over (the running pid keeps changing); stops by itself after 10 s
FORK_CHAIN = (
    "import os, time\n"
    "end = time.monotonic() + 10\n"
    "while time.monotonic() < end:\n"
    "    if os.fork() != 0:\n"
    "        os._exit(0)\n"
)


def new_parent() -> str:
    name = f"jn-test-{uuid.uuid4().hex[:8]}"
    CREATED_PARENTS.add(name)
    return name


def leftovers(parent: str) -> list[str]:
    """Every directory named `parent` in any hierarchy under /sys/fs/cgroup (and in the unified one)."""
    hiers = [p for p in ROOT.iterdir() if p.is_dir()]
    return [str(h / parent) for h in hiers if (h / parent).exists()]


def _teardown(mgr: Any) -> None:
    for job in mgr.list_jobs():
        cg = mgr.open(job)
        if cg is None:
            continue
        with contextlib.suppress(Exception):
            cg.kill_all()
        cg.wait_empty(5.0)
        cg.destroy()
    mgr.close()


@pytest.fixture
def v1() -> Iterator[V1Manager]:
    if (ROOT / "cgroup.controllers").exists():
        pytest.skip("this machine runs cgroup v2 at /sys/fs/cgroup: no v1 hierarchies")
    parent = new_parent()
    mgr = detect(parent=parent)
    assert isinstance(mgr, V1Manager) and mgr.version == 1
    try:
        yield mgr
    finally:
        _teardown(mgr)
        assert leftovers(parent) == []


@pytest.fixture
def v2() -> Iterator[V2Manager]:
    root = ROOT if (ROOT / "cgroup.controllers").exists() else UNIFIED
    if not (root / "cgroup.controllers").exists():
        pytest.skip("no cgroup2 hierarchy mounted (neither /sys/fs/cgroup nor /sys/fs/cgroup/unified)")
    parent = new_parent()
    mgr = detect(root=root, parent=parent)
    assert isinstance(mgr, V2Manager) and mgr.version == 2
    try:
        yield mgr
    finally:
        _teardown(mgr)
        assert not (root / parent).exists()


class Child:
    """A Python child that blocks at a barrier (reading one byte from stdin) until released, then runs `code`."""

    def __init__(self, code: str, cpu: int | None = None) -> None:
        pin = f"import os; os.sched_setaffinity(0, {{{cpu}}}); " if cpu is not None else ""
        self.proc = subprocess.Popen([PY, "-S", "-c", f"import sys; {pin}sys.stdin.buffer.read(1)\n{code}"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pid = self.proc.pid

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"g")
        self.proc.stdin.flush()

    def line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().decode().strip()

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def children() -> Iterator[list[Child]]:
    made: list[Child] = []
    try:
        yield made
    finally:
        for c in made:
            c.close()


@pytest.fixture
def spawn(children: list[Child]) -> Any:
    def _spawn(code: str, cpu: int | None = None) -> Child:
        c = Child(code, cpu)
        children.append(c)
        return c
    return _spawn
