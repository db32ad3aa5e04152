"""The agent's side of the job runtime: turns a LocalJob (from the controller) into a launch request for
nodeagent.isolation.JobRuntime, and keeps each finished job's stdout/stderr for `jobnet job logs` after the
job's scratch dir is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from nodeagent.agent import JobExitLike
from nodeagent.config import AgentSettings
from nodeagent.desired import LocalJob
from nodeagent.isolation import IsolationSpec, JobRuntime, LaunchRequest, RuntimeSettings, SetupFailed
from nodeagent.isolation.cgroups import CgroupLimits, IoDeviceLimit
from nodeagent.isolation.state import list_job_ids
from nodeagent.site import load_site

__all__ = ["RuntimeAdapter", "SetupFailed", "make_runtime", "spec_from_isolation"]

LOG_RETENTION_S = 24 * 3600
CPU_PERIOD_US = 100_000


def spec_from_isolation(iso: dict[str, Any]) -> IsolationSpec:
    """jobnet.v1.Isolation (as JSON with proto field names; 0/empty = site default) -> IsolationSpec."""
    res = iso.get("resources", {})
    lim: dict[str, Any] = {}
    if int(res.get("memory_max_bytes", 0)):
        lim["memory_max"] = int(res["memory_max_bytes"])
    if int(res.get("memory_high_bytes", 0)):
        lim["memory_high"] = int(res["memory_high_bytes"])
    if int(res.get("cpu_weight", 0)):
        lim["cpu_weight"] = int(res["cpu_weight"])
    if int(res.get("cpu_quota_millicores", 0)):
        lim["cpu_quota_us"] = int(res["cpu_quota_millicores"]) * CPU_PERIOD_US // 1000
        lim["cpu_period_us"] = CPU_PERIOD_US
    if int(res.get("io_weight", 0)):
        lim["io_weight"] = int(res["io_weight"])
    if int(res.get("pids_max", 0)):
        lim["pids_max"] = int(res["pids_max"])
    io = []
    for d in res.get("io_limits", []):
        major, _, minor = str(d.get("device", "")).partition(":")
        io.append(IoDeviceLimit(int(major), int(minor),
                                rbps=int(d.get("read_bps", 0)) or None, wbps=int(d.get("write_bps", 0)) or None,
                                riops=int(d.get("read_iops", 0)) or None, wiops=int(d.get("write_iops", 0)) or None))
    if io:
        lim["io_limits"] = tuple(io)
    env = {}
    for kv in iso.get("env", []):
        k, _, v = kv.partition("=")
        env[k] = v
    return IsolationSpec(
        limits=CgroupLimits(**lim) if lim else None,
        wall_time_s=float(res["wall_time_s"]) if int(res.get("wall_time_s", 0)) else None,
        rootfs=Path(iso["rootfs"]) if iso.get("rootfs") else None,
        uid=int(iso["uid"]) if "uid" in iso else None,
        gid=int(iso["gid"]) if "gid" in iso else None,
        env=env or None,
        cwd=iso.get("cwd") or None,
    )


class RuntimeAdapter:
    def __init__(self, settings: AgentSettings, runtime: JobRuntime) -> None:
        self.s = settings
        self.rt = runtime
        self.logs_dir = settings.state_dir / "logs"  # other jobs' output: hidden from jobs (see make_runtime)
        self.logs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.logs_dir, 0o700)
        self._last_prune = 0.0

    def start_job(self, job: LocalJob, netns_path: Path) -> int:
        try:
            spec = spec_from_isolation(json.loads(job.isolation_json))
        except (ValueError, TypeError, KeyError) as e:
            raise SetupFailed("validate", f"malformed isolation request: {e}", job.id) from e
        return self.rt.start(LaunchRequest(job.id, job.command, netns_path, spec))

    def stop(self, job_id: str, grace_s: float) -> None:
        self.rt.stop(job_id, grace_s)

    def poll(self) -> list[JobExitLike]:
        return [_exit(e) for e in self.rt.poll()]

    def recover(self) -> list[JobExitLike]:
        return [_exit(e) for e in self.rt.recover()]

    def running(self) -> dict[str, int]:
        return self.rt.running()

    def known_jobs(self) -> set[str]:
        # Hidden entries (".w<hex>") are the runtime's warm launch slots, not jobs.
        return set(list_job_ids(self.s.state_dir / "jobs"))

    def cleanup(self, job_id: str) -> None:
        """Keep the job's output, then release everything else the job had."""
        src = self.s.scratch_root / job_id
        dst = self.logs_dir / job_id
        for name in ("stdout", "stderr"):
            if (src / name).is_file():
                dst.mkdir(exist_ok=True)
                shutil.copyfile(src / name, dst / name)
        self.rt.cleanup(job_id)
        self._prune_logs()

    def _prune_logs(self) -> None:
        now = time.time()
        if now - self._last_prune < 60:
            return
        self._last_prune = now
        for d in self.logs_dir.iterdir():
            try:
                if now - d.stat().st_mtime > LOG_RETENTION_S:
                    shutil.rmtree(d, ignore_errors=True)
            except FileNotFoundError:
                continue

    def close(self) -> None:
        self.rt.close()


def _exit(e: Any) -> JobExitLike:
    return JobExitLike(e.job_id, e.end_reason, e.exit_code or 0, e.signal or 0, e.message, dict(e.usage))


def make_runtime(settings: AgentSettings, site_config: Path | None = None) -> RuntimeAdapter:
    defaults, site_max = load_site(site_config)
    rs = RuntimeSettings(
        state_dir=settings.state_dir / "jobs",
        scratch_root=settings.scratch_root,
        cgroup_parent=settings.cgroup_parent,
        defaults=defaults,
        site_max=site_max,
        allow_root=settings.allow_root_jobs,
        default_uid=settings.job_uid,
        default_gid=settings.job_gid,
        # the agent's whole state dir (desired state, outbox, kept logs of finished jobs), not only its jobs/
        # subdir (always hidden), is covered by an empty tmpfs in every job without its own rootfs
        hidden_paths=(settings.state_dir,),
    )
    os.makedirs(rs.state_dir, exist_ok=True)
    return RuntimeAdapter(settings, JobRuntime(rs))
