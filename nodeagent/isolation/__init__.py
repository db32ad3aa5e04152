"""Per-job isolation: the job runtime (launch pipeline, lifecycle) and, in `cgroups`, the cgroup v1/v2 backend.

Public API (see runtime.py for the lifecycle and launcher.py for the in-namespace step order):

    JobRuntime(settings: RuntimeSettings, cgroups=None)
    .start(LaunchRequest) -> pid    .stop(job_id, grace_s)   .poll() -> list[JobExit]
    .running() -> dict[str, int]    .recover() -> list[JobExit]   .cleanup(job_id)   .close()
"""

from .runtime import JobRuntime
from .spec import (
    END_REASONS,
    IsolationError,
    IsolationSpec,
    JobExit,
    LaunchRequest,
    RuntimeSettings,
    SetupFailed,
    SiteMax,
    SpecError,
    UnknownJob,
    ZygoteError,
)

__all__ = [
    "END_REASONS",
    "IsolationError",
    "IsolationSpec",
    "JobExit",
    "JobRuntime",
    "LaunchRequest",
    "RuntimeSettings",
    "SetupFailed",
    "SiteMax",
    "SpecError",
    "UnknownJob",
    "ZygoteError",
]
