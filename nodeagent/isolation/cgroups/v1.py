"""cgroup v1 (legacy or hybrid): one directory per job in each controller hierarchy we use.

Hierarchies used (each found by its mount, co-mounts like `cpu,cpuacct` handled): freezer (kill_all), pids,
memory, cpu, cpuacct, blkio. cpuset and devices are not used (a job gets the node's cpus/mems).

Mapping of the v2-style limits (see README.md):
  memory_max  -> memory.limit_in_bytes           memory_high -> memory.soft_limit_in_bytes
  swap_max    -> memory.memsw.limit_in_bytes = memory_max + swap_max (if swap accounting is on; else degraded)
                 and swap_max 0 also memory.swappiness = 0
  cpu_weight  -> cpu.shares = max(2, weight * 1024 // 100)
  cpu quota   -> cpu.cfs_period_us, cpu.cfs_quota_us
  io_weight   -> blkio.bfq.weight = clamp(weight, 1, 1000) (same default 100), or legacy CFQ blkio.weight =
                 clamp(weight * 5, 10, 1000) (default 500)
  io_limits   -> blkio.throttle.{read,write}_{bps,iops}_device
  pids_max    -> pids.max
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from . import fs
from .base import JOB_PREFIX, check_parent, job_dir_name, kill_loop
from .errors import CgroupError, CgroupIOError, CgroupUnsupported
from .limits import CgroupLimits, CgroupUsage

# order matters for attach: freezer first (a concurrent kill_all sees the process), pids before it can fork
CONTROLLERS = ("freezer", "pids", "memory", "cpu", "cpuacct", "blkio")
_THROTTLE = (("rbps", "read_bps"), ("wbps", "write_bps"), ("riops", "read_iops"), ("wiops", "write_iops"))


class V1JobCgroup:
    """A job's cgroup in every v1 hierarchy the manager uses."""

    def __init__(self, job_id: str, dirs: dict[str, Path]) -> None:
        self.job_id = job_id
        self.dirs = dirs  # controller -> the job's directory (co-mounted controllers share one)
        self._unique = list(dict.fromkeys(dirs.values()))
        self._primary = dirs.get("freezer") or dirs.get("pids") or self._unique[0]
        self._pids_seen = 0

    @property
    def name(self) -> str:
        return str(self._primary)

    def _d(self, ctrl: str) -> Path | None:
        return self.dirs.get(ctrl)

    def attach(self, pid: int) -> None:
        """Move process `pid` (all its threads) into the job's cgroup in every hierarchy."""
        for d in self._unique:
            fs.write(d / "cgroup.procs", str(pid))

    def procs(self) -> list[int]:
        return fs.pids_in(self._primary)

    def usage(self) -> CgroupUsage:
        cpu = mem = rd = wr = pids = 0
        if (d := self._d("cpuacct")) is not None:
            cpu = fs.read_int(d / "cpuacct.usage")
        if (d := self._d("memory")) is not None:
            mem = fs.read_int(d / "memory.max_usage_in_bytes")
        if (d := self._d("blkio")) is not None:
            for line in (fs.read(d / "blkio.throttle.io_service_bytes_recursive") or "").splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[1] == "Read":
                    rd += int(parts[2])
                elif len(parts) == 3 and parts[1] == "Write":
                    wr += int(parts[2])
        if (d := self._d("pids")) is not None:
            peak = d / "pids.peak"
            if peak.exists():
                pids = fs.read_int(peak)
            else:  # older kernels: the largest pids.current this object has seen
                self._pids_seen = max(self._pids_seen, fs.read_int(d / "pids.current"))
                pids = self._pids_seen
        return CgroupUsage(cpu / 1e9, mem, rd, wr, pids, self._oom_kills())

    def _oom_kills(self) -> int:
        d = self._d("memory")
        return 0 if d is None else fs.read_keyed(d / "memory.oom_control").get("oom_kill", 0)

    def oom_killed(self) -> bool:
        return self._oom_kills() > 0

    def _freeze(self) -> bool:
        d = self._d("freezer")
        assert d is not None
        try:
            fs.write(d / "freezer.state", "FROZEN")
        except CgroupIOError:
            if not d.exists():
                return False
            raise
        end = time.monotonic() + 0.5  # a task in uninterruptible sleep delays FROZEN; kill anyway after that
        while (fs.read(d / "freezer.state") or "").strip() == "FREEZING" and time.monotonic() < end:
            time.sleep(0.0005)
        return True

    def _thaw(self) -> None:
        d = self._d("freezer")
        assert d is not None
        with contextlib.suppress(CgroupIOError):
            fs.write(d / "freezer.state", "THAWED")

    def kill_all(self) -> None:
        """SIGKILL every process: freezer FROZEN, SIGKILL all, THAWED, until a round finds nobody new."""
        has_freezer = self._d("freezer") is not None
        kill_loop(self.name, self.procs, self._freeze if has_freezer else None, self._thaw if has_freezer else None)

    def wait_empty(self, timeout: float) -> bool:
        """True once no process is left (a killed process leaves when it has exited), False after `timeout`."""
        end = time.monotonic() + timeout
        delay = 0.0005
        while self.procs():
            if time.monotonic() >= end:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        return True

    def rename(self, job_id: str) -> None:
        """Rename the job's directory in every hierarchy to `jn-<job_id>` (v1 allows a rename within the parent;
        the processes stay where they are). Used to give a pre-made cgroup (a warm launch slot) its job's name.

        The primary hierarchy (freezer, used by procs/kill_all) is renamed last, so a rename cut short (agent
        killed) leaves the old name's freezer dir in place and `kill_all` under the old name still works.
        On failure the object reflects exactly which directories were renamed (CgroupIOError names the path).
        """
        name = job_dir_name(job_id)
        order = [d for d in self._unique if d != self._primary] + [self._primary]
        for d in order:
            new = d.parent / name
            fs.rename(d, new)
            self.dirs = {c: (new if p == d else p) for c, p in self.dirs.items()}
            self._unique = [new if p == d else p for p in self._unique]
            if d == self._primary:
                self._primary = new
        self.job_id = job_id

    def destroy(self) -> None:
        """Remove the job's directory in every hierarchy; gone is fine; EBUSY is retried briefly."""
        first: CgroupError | None = None
        for d in self._unique:
            try:
                fs.rmdir(d)
            except CgroupError as e:
                first = first or e
        if first is not None:
            raise first


class V1Manager:
    """Job cgroups under `<hierarchy>/<parent>/jn-<job_id>` in each v1 hierarchy in `mounts`."""

    version = 1
    can_rename = True  # V1JobCgroup.rename: cgroup v1 allows renaming a cgroup directory within its parent

    def __init__(self, parent: str, mounts: dict[str, Path]) -> None:
        self.parent = check_parent(parent)
        self.mounts = {c: mounts[c] for c in CONTROLLERS if c in mounts}
        if not self.mounts:
            raise CgroupError(f"cgroup v1: none of the controllers {CONTROLLERS} is mounted ({mounts})")
        self.parent_dirs = {c: m / parent for c, m in self.mounts.items()}
        self.degraded: list[str] = [f"{c}: controller not mounted" for c in CONTROLLERS if c not in self.mounts]
        for d in dict.fromkeys(self.parent_dirs.values()):
            fs.mkdir(d)
        mem = self.parent_dirs.get("memory")
        self.has_memsw = mem is not None and (mem / "memory.memsw.limit_in_bytes").exists()
        if mem is not None and not self.has_memsw:
            self.degraded.append("swap_max: memory.memsw.* absent (swap accounting off: swapaccount=0 or no "
                                 "CONFIG_MEMCG_SWAP); swap is limited only by memory.swappiness=0 for swap_max 0")

    def _dirs(self, job_id: str) -> dict[str, Path]:
        name = job_dir_name(job_id)
        return {c: d / name for c, d in self.parent_dirs.items()}

    def create(self, job_id: str, limits: CgroupLimits) -> V1JobCgroup:
        """Make (or reuse) the job's cgroup and write its limits. A cgroup made here is removed again on failure."""
        dirs = self._dirs(job_id)
        made = [d for d in dict.fromkeys(dirs.values()) if fs.mkdir(d)]
        cg = V1JobCgroup(job_id, dirs)
        try:
            self._apply(cg, limits)
        except BaseException:
            for d in made:
                with contextlib.suppress(CgroupError):
                    fs.rmdir(d)
            raise
        return cg

    def _need(self, cg: V1JobCgroup, ctrl: str, field: str) -> Path:
        d = cg.dirs.get(ctrl)
        if d is None:
            raise CgroupUnsupported(cg.name, field, f"the v1 {ctrl} controller is not mounted")
        return d

    def _apply(self, cg: V1JobCgroup, lim: CgroupLimits) -> None:
        if lim.memory_max is not None or lim.memory_high is not None or lim.swap_max is not None:
            mem = cg.dirs.get("memory")
            if mem is None:
                if lim.memory_max is not None or lim.memory_high is not None:
                    self._need(cg, "memory", "memory_max")
            else:
                self._apply_memory(mem, lim)
        if lim.cpu_weight is not None:
            d = self._need(cg, "cpu", "cpu_weight")
            fs.write(d / "cpu.shares", str(max(2, lim.cpu_weight * 1024 // 100)))
        if lim.cpu_quota_us is not None:
            d = self._need(cg, "cpu", "cpu_quota_us")
            fs.write(d / "cpu.cfs_period_us", str(lim.cpu_period_us))
            fs.write(d / "cpu.cfs_quota_us", str(lim.cpu_quota_us))
        if lim.io_weight is not None:
            d = self._need(cg, "blkio", "io_weight")
            if (d / "blkio.bfq.weight").exists():
                fs.write(d / "blkio.bfq.weight", str(min(1000, max(1, lim.io_weight))))
            elif (d / "blkio.weight").exists():
                fs.write(d / "blkio.weight", str(min(1000, max(10, lim.io_weight * 5))))
            else:
                raise CgroupUnsupported(cg.name, "io_weight", "no blkio.bfq.weight or blkio.weight (no BFQ/CFQ)")
        for dev in lim.io_limits:
            d = self._need(cg, "blkio", "io_limits")
            for field, name in _THROTTLE:
                v = getattr(dev, field)
                if v is not None:
                    fs.write(d / f"blkio.throttle.{name}_device", f"{dev.device} {v}")
        if lim.pids_max is not None:
            d = self._need(cg, "pids", "pids_max")
            fs.write(d / "pids.max", str(lim.pids_max))

    def _apply_memory(self, mem: Path, lim: CgroupLimits) -> None:
        memsw = mem / "memory.memsw.limit_in_bytes"
        if self.has_memsw:  # memsw must stay >= limit: open it up first, set it last
            fs.write(memsw, "-1")
        fs.write(mem / "memory.limit_in_bytes", str(lim.memory_max) if lim.memory_max is not None else "-1")
        if lim.memory_high is not None:
            fs.write(mem / "memory.soft_limit_in_bytes", str(lim.memory_high))
        if lim.swap_max == 0:
            fs.write(mem / "memory.swappiness", "0")
        if self.has_memsw and lim.memory_max is not None and lim.swap_max is not None:
            fs.write(memsw, str(lim.memory_max + lim.swap_max))

    def open(self, job_id: str) -> V1JobCgroup | None:
        dirs = self._dirs(job_id)
        if not any(d.is_dir() for d in dirs.values()):
            return None
        return V1JobCgroup(job_id, dirs)

    def list_jobs(self) -> list[str]:
        jobs: set[str] = set()
        for d in dict.fromkeys(self.parent_dirs.values()):
            with contextlib.suppress(FileNotFoundError):
                jobs.update(p.name[len(JOB_PREFIX):] for p in d.iterdir()
                            if p.is_dir() and p.name.startswith(JOB_PREFIX))
        return sorted(jobs)

    def close(self) -> None:
        """Remove the parent cgroups if empty; a parent still holding jobs (they outlive the agent) stays."""
        for d in dict.fromkeys(self.parent_dirs.values()):
            with contextlib.suppress(CgroupError):
                fs.rmdir(d, busy_timeout=0.0)
