"""What a job asks for and what the site allows: plain frozen data, merged and validated before any side effect.

`IsolationSpec` fields left as None take the site default (`RuntimeSettings.defaults`); the merged spec is then
bounded by `RuntimeSettings.site_max` (`bound`): cgroup limits with `cgroups.clamp_or_reject` (a hard limit left
open is clamped to the site maximum, one above it is refused naming the limit; the CPU quota is compared in CPUs),
the wall time likewise; root only if the site allows it. Violations raise `SpecError`, a `SetupFailed` at step
"validate".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cgroups import CgroupLimits

END_REASONS = frozenset({"exited", "signalled", "oom", "timeout", "stopped", "setup-failed"})


class IsolationError(Exception):
    """Base of every error of the job runtime."""


class SetupFailed(IsolationError):
    """A launch step failed; every step done before it was rolled back.

    `str(err)` is the user-facing "setup-failed: <step>: <cause>".
    """

    def __init__(self, step: str, cause: str, job_id: str = "") -> None:
        self.step = step
        self.cause = cause
        self.job_id = job_id
        super().__init__(f"setup-failed: {step}: {cause}")


class SpecError(SetupFailed):
    """The request is invalid or asks for more than the site allows (step "validate")."""

    def __init__(self, cause: str, job_id: str = "") -> None:
        super().__init__("validate", cause, job_id)


class UnknownJob(IsolationError, KeyError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"unknown job {job_id!r}")


class ZygoteError(IsolationError):
    """The fork server could not be started or went away."""


@dataclass(frozen=True)
class IsolationSpec:
    """Per-job isolation request; None means "the site default"."""

    limits: CgroupLimits | None = None
    wall_time_s: float | None = None
    rootfs: Path | None = None
    uid: int | None = None
    gid: int | None = None
    mount_under_scratch: tuple[str, ...] | None = None
    env: Mapping[str, str] | None = None
    cwd: str | None = None


@dataclass(frozen=True)
class SiteMax:
    """What the site allows at most (None = no bound). A job that leaves a bounded hard limit or the wall time
    open gets the maximum; one that asks for more is refused (see `bound`)."""

    limits: CgroupLimits | None = None
    wall_time_s: float | None = None
    allow_rootfs: bool = True


@dataclass(frozen=True)
class RuntimeSettings:
    state_dir: Path
    scratch_root: Path
    cgroup_parent: str  # "jn-<node>"
    defaults: IsolationSpec = field(default_factory=IsolationSpec)
    site_max: SiteMax = field(default_factory=SiteMax)
    allow_root: bool = False
    default_uid: int = 65534
    default_gid: int = 65534
    cgroup_root: Path = Path("/sys/fs/cgroup")
    setup_timeout_s: float = 10.0  # a launch that does not pass the barrier and exec within this fails
    python: str | None = None  # interpreter for the zygote; default sys.executable
    # host paths a job without its own rootfs must not see (scratch_root and state_dir always are): each is
    # covered by an empty read-only tmpfs in the job's mount namespace (e.g. the agent's own state dir)
    hidden_paths: tuple[Path, ...] = ()
    dev_shm_size: str = "64m"  # the job's private /dev/shm (tmpfs, charged to the job's memory cgroup)
    # pre-forked job inits kept attached to a cgroup with the default limits (0: none); jobs with the default
    # limits launch through them (no fork, no cgroup creation or migration on the launch path)
    warm_slots: int = 2


@dataclass(frozen=True)
class LaunchRequest:
    job_id: str
    command: tuple[str, ...]
    netns_path: Path
    spec: IsolationSpec = field(default_factory=IsolationSpec)


@dataclass(frozen=True)
class JobExit:
    job_id: str
    end_reason: str  # one of END_REASONS
    exit_code: int | None = None
    signal: int | None = None
    message: str = ""
    usage: dict[str, Any] = field(default_factory=dict)


DEFAULT_MOUNT_UNDER_SCRATCH = ("/tmp", "/var/tmp")


def merge(job: IsolationSpec, defaults: IsolationSpec) -> IsolationSpec:
    """The job's spec with every unset field taken from the site defaults (cgroup limits field by field)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(IsolationSpec):
        mine, dflt = getattr(job, f.name), getattr(defaults, f.name)
        if f.name == "limits" and mine is not None and dflt is not None:
            values[f.name] = _merge_limits(mine, dflt)
        elif f.name == "env" and mine is not None and dflt is not None:
            values[f.name] = {**dflt, **mine}
        else:
            values[f.name] = mine if mine is not None else dflt
    return IsolationSpec(**values)


def _merge_limits(mine: Any, dflt: Any) -> Any:
    changes = {f.name: getattr(dflt, f.name) for f in dataclasses.fields(mine)
               if getattr(mine, f.name) is None and getattr(dflt, f.name, None) is not None}
    return dataclasses.replace(mine, **changes) if changes else mine


def validate(spec: IsolationSpec, settings: RuntimeSettings, job_id: str) -> None:
    """Raise SpecError when the merged spec is malformed or exceeds the site maximum."""
    smax = settings.site_max
    uid = spec.uid if spec.uid is not None else settings.default_uid
    gid = spec.gid if spec.gid is not None else settings.default_gid
    if uid < 0 or gid < 0:
        raise SpecError(f"uid/gid must be >= 0 (uid {uid}, gid {gid})", job_id)
    if (uid == 0 or gid == 0) and not settings.allow_root:
        raise SpecError("running as root (uid or gid 0) is not allowed by the site", job_id)
    if spec.wall_time_s is not None:
        if spec.wall_time_s <= 0:
            raise SpecError(f"wall_time_s must be > 0, got {spec.wall_time_s}", job_id)
        if smax.wall_time_s is not None and spec.wall_time_s > smax.wall_time_s:
            raise SpecError(f"wall_time_s {spec.wall_time_s} exceeds the site maximum {smax.wall_time_s}", job_id)
    if spec.rootfs is not None:
        if not smax.allow_rootfs:
            raise SpecError("a per-job root filesystem is not allowed by the site", job_id)
        if not spec.rootfs.is_absolute():
            raise SpecError(f"rootfs must be an absolute path: {spec.rootfs}", job_id)
    for d in spec.mount_under_scratch or ():
        if not d.startswith("/") or ".." in d.split("/") or d.rstrip("/") in ("", "/proc"):
            raise SpecError(f"mount_under_scratch entry not allowed: {d!r}", job_id)
    if spec.cwd is not None and (not spec.cwd.startswith("/") or "\0" in spec.cwd):
        raise SpecError(f"cwd must be an absolute path: {spec.cwd!r}", job_id)
    for k, v in (spec.env or {}).items():
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise SpecError(f"environment variable not allowed: {k!r} (a name without '=', no NUL bytes)", job_id)


def bound(spec: IsolationSpec, settings: RuntimeSettings, job_id: str) -> IsolationSpec:
    """The merged spec within the site maximum: open hard limits and an open wall time get the site's maximum;
    more than the maximum raises SpecError naming the limit and both values."""
    smax = settings.site_max
    changes: dict[str, Any] = {}
    if spec.wall_time_s is None and smax.wall_time_s is not None:
        changes["wall_time_s"] = smax.wall_time_s
    if smax.limits is not None:
        from .cgroups import CgroupLimits, SiteLimitExceeded, clamp_or_reject  # not in the zygote

        try:
            limits = clamp_or_reject(spec.limits if spec.limits is not None else CgroupLimits(), smax.limits)
        except SiteLimitExceeded as e:
            raise SpecError(str(e), job_id) from e
        if limits != spec.limits:
            changes["limits"] = limits
    return dataclasses.replace(spec, **changes) if changes else spec


def job_defaults(settings: RuntimeSettings) -> IsolationSpec:
    """What a job that asks for nothing gets (the site defaults within the site maximum). SpecError if the
    defaults themselves exceed the maximum."""
    spec = merge(IsolationSpec(), settings.defaults)
    validate(spec, settings, "")
    return bound(spec, settings, "")


def scratch_name(mount_point: str) -> str:
    """Directory under the job's scratch dir that backs `mount_point` ("/var/tmp" -> "var_tmp")."""
    return mount_point.strip("/").replace("/", "_")
