"""What both backends share: the Protocols of the interface, name rules, the freeze-kill-thaw loop."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Callable
from typing import Protocol

from .errors import CgroupError, CgroupLimitError
from .limits import CgroupLimits, CgroupUsage

JOB_PREFIX = "jn-"
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_PARENT = re.compile(r"jn[A-Za-z0-9_.-]{0,126}")


class JobCgroup(Protocol):
    job_id: str

    def attach(self, pid: int) -> None: ...
    def procs(self) -> list[int]: ...
    def usage(self) -> CgroupUsage: ...
    def oom_killed(self) -> bool: ...
    def kill_all(self) -> None: ...
    def wait_empty(self, timeout: float) -> bool: ...
    def rename(self, job_id: str) -> None: ...
    def destroy(self) -> None: ...


class CgroupManager(Protocol):
    version: int
    can_rename: bool  # JobCgroup.rename works (v1); v2 raises CgroupUnsupported

    def create(self, job_id: str, limits: CgroupLimits) -> JobCgroup: ...
    def open(self, job_id: str) -> JobCgroup | None: ...
    def list_jobs(self) -> list[str]: ...
    def close(self) -> None: ...


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise CgroupLimitError("job_id", job_id, "must be 1-128 characters of [A-Za-z0-9_.-], not starting with . - _")
    return job_id


def check_parent(parent: str) -> str:
    if not isinstance(parent, str) or not _PARENT.fullmatch(parent):
        raise CgroupLimitError("parent", parent, "must be a single name starting with 'jn' (e.g. 'jn-node1')")
    return parent


def job_dir_name(job_id: str) -> str:
    return JOB_PREFIX + check_job_id(job_id)


def is_dead(pid: int) -> bool:
    """True if the process is gone or a zombie (it holds no resources, only waits to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]
    return state in (b"Z", b"X", b"x")


def kill_loop(name: str, procs: Callable[[], list[int]], freeze: Callable[[], bool] | None,
              thaw: Callable[[], None] | None, timeout: float = 5.0) -> None:
    """SIGKILL every process in a cgroup so that none escapes by forking meanwhile.

    Each round freezes the cgroup (no process can run, so none can fork), SIGKILLs every live pid, thaws (the
    killed processes die on their way back to user space). It ends when a round finds no live process it has
    not killed already. Without a freezer the same loop runs unfrozen (a fork racing the kill is caught by the
    next round). Raises CgroupError if processes still appear after `timeout`.
    """
    killed: set[int] = set()
    end = time.monotonic() + timeout
    while True:
        if freeze is not None:
            freeze()
        try:
            live = [p for p in procs() if p not in killed and not is_dead(p)]
            for p in live:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
                killed.add(p)
        finally:
            if thaw is not None:
                thaw()
        if not live:
            return
        if time.monotonic() > end:
            raise CgroupError(f"cgroup {name}: processes keep appearing after {timeout}s of SIGKILL rounds: {live}")
        if freeze is None:
            time.sleep(0.001)
