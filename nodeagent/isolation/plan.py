"""The launch plan: everything a launch will do, computed as data before the first side effect.

`build_plan` merges the request with the site defaults, validates it and resolves every path. The parent side
(runtime.py) executes the host-side steps from it; the `ChildPlan` part crosses to the zygote as JSON and drives
the in-namespace steps (launcher.py). Stdlib only (the zygote imports it).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .spec import (
    DEFAULT_MOUNT_UNDER_SCRATCH,
    IsolationSpec,
    LaunchRequest,
    RuntimeSettings,
    SpecError,
    bound,
    merge,
    scratch_name,
    validate,
)

JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SCRATCH_IN_ROOTFS = "/scratch"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")


@dataclass(frozen=True)
class BindMount:
    source: str  # host path (a directory under the job's scratch dir)
    target: str  # path as the job sees it


@dataclass(frozen=True)
class ChildPlan:
    """The in-namespace half of the plan, sent to the zygote as JSON."""

    job_id: str
    command: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int
    wall_time_s: float | None
    rootfs: str | None
    scratch_dir: str  # host path of the job's scratch dir
    scratch_in_job: str  # where the job sees it
    binds: tuple[BindMount, ...]  # MOUNT_UNDER_SCRATCH binds (target paths as seen by the job)
    dev_shm_size: str = "64m"
    hide: tuple[str, ...] = ()  # without a rootfs: covered by an empty read-only tmpfs (other jobs' scratch, state)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> ChildPlan:
        d: dict[str, Any] = json.loads(text)
        d["command"] = tuple(d["command"])
        d["binds"] = tuple(BindMount(**b) for b in d["binds"])
        return ChildPlan(**d)


@dataclass(frozen=True)
class LaunchPlan:
    job_id: str
    netns_path: Path
    state_dir: Path  # state_dir/<job_id>
    scratch_dir: Path  # scratch_root/<job_id>
    spec: IsolationSpec  # merged with the site defaults, validated
    child: ChildPlan

    @property
    def stdout_path(self) -> Path:
        return self.scratch_dir / "stdout"

    @property
    def stderr_path(self) -> Path:
        return self.scratch_dir / "stderr"


def build_plan(settings: RuntimeSettings, req: LaunchRequest) -> LaunchPlan:
    """Pure: no file system or kernel access. Raises SpecError. (The agent side only: `bound` imports the
    cgroups package; the zygote never builds plans.)"""
    if not JOB_ID_RE.match(req.job_id):
        raise SpecError(f"invalid job id {req.job_id!r}", req.job_id)
    if not req.command or not req.command[0] or any("\0" in a for a in req.command):
        raise SpecError("empty command or NUL byte in an argument", req.job_id)
    spec = merge(req.spec, settings.defaults)
    validate(spec, settings, req.job_id)
    spec = bound(spec, settings, req.job_id)
    uid = spec.uid if spec.uid is not None else settings.default_uid
    gid = spec.gid if spec.gid is not None else settings.default_gid
    scratch = settings.scratch_root / req.job_id
    mus = spec.mount_under_scratch if spec.mount_under_scratch is not None else DEFAULT_MOUNT_UNDER_SCRATCH
    scratch_in_job = SCRATCH_IN_ROOTFS if spec.rootfs is not None else str(scratch)
    for d in mus:
        if spec.rootfs is None and (scratch == Path(d) or Path(d) in scratch.parents):
            raise SpecError(f"the scratch dir {scratch} lies below {d}, which is mounted under scratch", req.job_id)
    binds = tuple(BindMount(str(scratch / scratch_name(d)), d.rstrip("/")) for d in mus)
    env = {
        "PATH": DEFAULT_PATH,
        "HOME": scratch_in_job,
        "TMPDIR": "/tmp",
        "JOBNET_JOB_ID": req.job_id,
        "JOBNET_SCRATCH": scratch_in_job,
        **(spec.env or {}),
    }
    spec = IsolationSpec(
        limits=spec.limits, wall_time_s=spec.wall_time_s, rootfs=spec.rootfs, uid=uid, gid=gid,
        mount_under_scratch=mus, env=env, cwd=spec.cwd or scratch_in_job,
    )
    child = ChildPlan(
        job_id=req.job_id, command=tuple(req.command), env=env, cwd=spec.cwd or scratch_in_job, uid=uid, gid=gid,
        wall_time_s=spec.wall_time_s, rootfs=str(spec.rootfs) if spec.rootfs else None, scratch_dir=str(scratch),
        scratch_in_job=scratch_in_job, binds=binds,
        dev_shm_size=settings.dev_shm_size, hide=() if spec.rootfs is not None else _hidden(settings),
    )
    return LaunchPlan(job_id=req.job_id, netns_path=req.netns_path, state_dir=settings.state_dir / req.job_id,
                      scratch_dir=scratch, spec=spec, child=child)


def _hidden(settings: RuntimeSettings) -> tuple[str, ...]:
    """Outermost first; a path below another hidden one is already hidden."""
    paths = sorted({settings.scratch_root, settings.state_dir, *settings.hidden_paths}, key=lambda p: len(p.parts))
    out: list[Path] = []
    for p in paths:
        if not any(q == p or q in p.parents for q in out):
            out.append(p)
    return tuple(str(p) for p in out)
