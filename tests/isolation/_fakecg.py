"""A stand-in for nodeagent.isolation.cgroups used only until that package exists: cgroup v1 pids + memory +
cpuacct, enough for the runtime's tests (attach, kill_all, usage, oom)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

CONTROLLERS = ("pids", "memory", "cpuacct")


@dataclass(frozen=True)
class CgroupLimits:
    memory_max: int | None = None
    pids_max: int | None = None


@dataclass(frozen=True)
class CgroupUsage:
    cpu_seconds: float
    memory_peak_bytes: int
    pids_peak: int
    oom_kills: int


class FakeJobCgroup:
    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = dirs

    def attach(self, pid: int) -> None:
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(pid))

    def procs(self) -> list[int]:
        try:
            return [int(x) for x in (self.dirs[0] / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def _read(self, ctrl: str, name: str) -> str:
        for d in self.dirs:
            if d.parent.parent.name == ctrl:
                try:
                    return (d / name).read_text()
                except OSError:
                    return ""
        return ""

    def usage(self) -> CgroupUsage:
        cpu = self._read("cpuacct", "cpuacct.usage").strip()
        mem = self._read("memory", "memory.max_usage_in_bytes").strip()
        return CgroupUsage(int(cpu or 0) / 1e9, int(mem or 0), 0, self._oom_kills())

    def _oom_kills(self) -> int:
        for line in self._read("memory", "memory.oom_control").splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v)
        return 0

    def oom_killed(self) -> bool:
        return self._oom_kills() > 0

    def kill_all(self) -> None:
        for _ in range(20):
            pids = self.procs()
            if not pids:
                return
            for p in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            time.sleep(0.005)

    def wait_empty(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while self.procs():
            if time.monotonic() > end:
                return False
            time.sleep(0.005)
        return True

    def destroy(self) -> None:
        for d in self.dirs:
            with contextlib.suppress(FileNotFoundError):
                d.rmdir()


class FakeCgroupManager:
    version = 1

    def __init__(self, parent: str, root: Path = Path("/sys/fs/cgroup")) -> None:
        self.parents = [root / c / parent for c in CONTROLLERS]
        for p in self.parents:
            p.mkdir(exist_ok=True)

    def create(self, job_id: str, limits: CgroupLimits) -> FakeJobCgroup:
        dirs = [p / job_id for p in self.parents]
        for d in dirs:
            d.mkdir()
        if limits.memory_max:
            (self.parents[1] / job_id / "memory.limit_in_bytes").write_text(str(limits.memory_max))
            with contextlib.suppress(OSError):
                (self.parents[1] / job_id / "memory.memsw.limit_in_bytes").write_text(str(limits.memory_max))
        if limits.pids_max:
            (self.parents[0] / job_id / "pids.max").write_text(str(limits.pids_max))
        return FakeJobCgroup(dirs)

    def open(self, job_id: str) -> FakeJobCgroup:
        dirs = [p / job_id for p in self.parents]
        if not dirs[0].is_dir():
            raise FileNotFoundError(str(dirs[0]))
        return FakeJobCgroup(dirs)

    def list_jobs(self) -> list[str]:
        return sorted(p.name for p in self.parents[0].iterdir() if p.is_dir())

    def close(self) -> None:
        for p in self.parents:
            with contextlib.suppress(OSError):
                p.rmdir()
