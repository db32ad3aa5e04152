"""cgroup v2 (unified): one directory per job, `<root>/<parent>/jn-<job_id>`.

The parent enables the controllers it needs (cpu, memory, io, pids, as far as `cgroup.controllers` offers
them) in its own and the root's `cgroup.subtree_control`. A limit whose controller is missing raises
CgroupUnsupported, except swap_max (the default 0 is skipped with a `degraded` note when there is no
memory.swap.max). kill_all writes `cgroup.kill` (atomic, kernel >= 5.14), else freeze+kill loops.
"""

from __future__ import annotations

import contextlib
import select
import time
from pathlib import Path

from . import fs
from .base import JOB_PREFIX, check_parent, job_dir_name, kill_loop
from .errors import CgroupError, CgroupIOError, CgroupUnsupported
from .limits import CgroupLimits, CgroupUsage

WANTED = ("cpu", "memory", "io", "pids")
_IO_KEYS = (("rbps", "rbps"), ("wbps", "wbps"), ("riops", "riops"), ("wiops", "wiops"))


class V2JobCgroup:
    def __init__(self, job_id: str, path: Path) -> None:
        self.job_id = job_id
        self.path = path
        self._pids_seen = 0
        self._mem_seen = 0

    @property
    def name(self) -> str:
        return str(self.path)

    def attach(self, pid: int) -> None:
        fs.write(self.path / "cgroup.procs", str(pid))

    def procs(self) -> list[int]:
        return fs.pids_in(self.path)

    def usage(self) -> CgroupUsage:
        p = self.path
        cpu_us = fs.read_keyed(p / "cpu.stat").get("usage_usec", 0)
        if (p / "memory.peak").exists():
            mem = fs.read_int(p / "memory.peak")
        else:  # no memory controller or kernel < 5.19: the largest memory.current this object has seen
            self._mem_seen = max(self._mem_seen, fs.read_int(p / "memory.current"))
            mem = self._mem_seen
        rd = wr = 0
        for line in (fs.read(p / "io.stat") or "").splitlines():
            for kv in line.split()[1:]:
                k, _, v = kv.partition("=")
                if k == "rbytes":
                    rd += int(v)
                elif k == "wbytes":
                    wr += int(v)
        if (p / "pids.peak").exists():
            pids = fs.read_int(p / "pids.peak")
        else:
            self._pids_seen = max(self._pids_seen, fs.read_int(p / "pids.current"))
            pids = self._pids_seen
        return CgroupUsage(cpu_us / 1e6, mem, rd, wr, pids, self._oom_kills())

    def _oom_kills(self) -> int:
        return fs.read_keyed(self.path / "memory.events").get("oom_kill", 0)

    def oom_killed(self) -> bool:
        return self._oom_kills() > 0

    def _populated(self) -> bool:
        ev = fs.read_keyed(self.path / "cgroup.events")
        return bool(ev.get("populated", 0))

    def _freeze(self) -> bool:
        try:
            fs.write(self.path / "cgroup.freeze", "1")
        except CgroupIOError:
            if not self.path.exists():
                return False
            raise
        end = time.monotonic() + 0.5
        while not fs.read_keyed(self.path / "cgroup.events").get("frozen", 0) and time.monotonic() < end:
            time.sleep(0.0005)
        return True

    def _thaw(self) -> None:
        with contextlib.suppress(CgroupIOError):
            fs.write(self.path / "cgroup.freeze", "0")

    def kill_all(self) -> None:
        """SIGKILL every process of the cgroup and its descendants (cgroup.kill; race-free against forks)."""
        kill = self.path / "cgroup.kill"
        if kill.exists():
            try:
                fs.write(kill, "1")
            except CgroupIOError:
                if self.path.exists():
                    raise
            return
        kill_loop(self.name, self.procs, self._freeze, self._thaw)

    def wait_empty(self, timeout: float) -> bool:
        """Waits for `populated 0` in cgroup.events (the kernel signals changes with POLLPRI)."""
        end = time.monotonic() + timeout
        try:
            f = open(self.path / "cgroup.events", "rb")  # noqa: SIM115 - held across the poll loop
        except FileNotFoundError:
            return True
        with f:
            poller = select.poll()
            poller.register(f.fileno(), select.POLLPRI | select.POLLERR)
            delay = 0.0005  # the kernel rate-limits the notification (about 10 ms): poll short intervals first
            while True:
                f.seek(0)
                ev = {k: v for k, _, v in (ln.partition(" ") for ln in f.read().decode().splitlines())}
                if ev.get("populated", "0").strip() == "0":
                    return True
                left = end - time.monotonic()
                if left <= 0:
                    return False
                poller.poll(min(left, delay) * 1000)  # bounded: never rely on the notification alone
                delay = min(delay * 2, 0.05)

    def rename(self, job_id: str) -> None:
        """Not possible: the unified hierarchy refuses to rename a cgroup (EPERM); see V2Manager.can_rename."""
        raise CgroupUnsupported(self.name, "rename", "cgroup v2 does not allow renaming a cgroup")

    def destroy(self) -> None:
        fs.rmdir(self.path)


class V2Manager:
    """Job cgroups under `<root>/<parent>/jn-<job_id>` on a cgroup2 hierarchy mounted at `root`."""

    version = 2
    can_rename = False  # the unified hierarchy refuses rename(2) of a cgroup directory

    def __init__(self, root: Path, parent: str) -> None:
        self.root = root
        self.parent = check_parent(parent)
        self.parent_dir = root / parent
        self.degraded: list[str] = []
        available = set((fs.read(root / "cgroup.controllers") or "").split())
        fs.mkdir(self.parent_dir)
        self.controllers: set[str] = set()
        for c in WANTED:
            if c not in available:
                self.degraded.append(f"{c}: controller not available in {root}/cgroup.controllers")
                continue
            try:
                for d in (root, self.parent_dir):
                    if c not in (fs.read(d / "cgroup.subtree_control") or "").split():
                        fs.write(d / "cgroup.subtree_control", f"+{c}")
                self.controllers.add(c)
            except CgroupIOError as e:
                self.degraded.append(f"{c}: cannot enable: {e}")

    def _path(self, job_id: str) -> Path:
        return self.parent_dir / job_dir_name(job_id)

    def create(self, job_id: str, limits: CgroupLimits) -> V2JobCgroup:
        path = self._path(job_id)
        made = fs.mkdir(path)
        cg = V2JobCgroup(job_id, path)
        try:
            self._apply(cg, limits)
        except BaseException:
            if made:
                with contextlib.suppress(CgroupError):
                    fs.rmdir(path)
            raise
        return cg

    def _set(self, cg: V2JobCgroup, ctrl: str, field: str, file: str, value: str) -> None:
        p = cg.path / file
        if not p.exists():
            raise CgroupUnsupported(cg.name, field, f"{file} does not exist (controller {ctrl} "
                                    f"{'enabled' if ctrl in self.controllers else 'not available'})")
        fs.write(p, value)

    def _apply(self, cg: V2JobCgroup, lim: CgroupLimits) -> None:
        if lim.memory_max is not None:
            self._set(cg, "memory", "memory_max", "memory.max", str(lim.memory_max))
        if lim.memory_high is not None:
            self._set(cg, "memory", "memory_high", "memory.high", str(lim.memory_high))
        if lim.swap_max is not None:
            if (cg.path / "memory.swap.max").exists():
                fs.write(cg.path / "memory.swap.max", str(lim.swap_max))
            elif lim.swap_max != 0 or "memory" in self.controllers:
                why = "no memory.swap.max (swap accounting off or no memory controller)"
                if lim.swap_max != 0:
                    raise CgroupUnsupported(cg.name, "swap_max", why)
                if why not in self.degraded:
                    self.degraded.append(f"swap_max: {why}: swap off not enforced")
        if lim.cpu_weight is not None:
            self._set(cg, "cpu", "cpu_weight", "cpu.weight", str(lim.cpu_weight))
        if lim.cpu_quota_us is not None:
            self._set(cg, "cpu", "cpu_quota_us", "cpu.max", f"{lim.cpu_quota_us} {lim.cpu_period_us}")
        if lim.io_weight is not None:
            self._set(cg, "io", "io_weight", "io.weight", f"default {lim.io_weight}")
        for dev in lim.io_limits:
            kv = " ".join(f"{k}={getattr(dev, f)}" for f, k in _IO_KEYS if getattr(dev, f) is not None)
            if kv:
                self._set(cg, "io", "io_limits", "io.max", f"{dev.device} {kv}")
        if lim.pids_max is not None:
            self._set(cg, "pids", "pids_max", "pids.max", str(lim.pids_max))

    def open(self, job_id: str) -> V2JobCgroup | None:
        path = self._path(job_id)
        return V2JobCgroup(job_id, path) if path.is_dir() else None

    def list_jobs(self) -> list[str]:
        try:
            return sorted(p.name[len(JOB_PREFIX):] for p in self.parent_dir.iterdir()
                          if p.is_dir() and p.name.startswith(JOB_PREFIX))
        except FileNotFoundError:
            return []

    def close(self) -> None:
        with contextlib.suppress(CgroupError):
            fs.rmdir(self.parent_dir, busy_timeout=0.0)
