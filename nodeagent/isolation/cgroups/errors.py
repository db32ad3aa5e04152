"""Typed errors of the cgroup layer. Every error names the cgroup (path or job) it is about."""

from __future__ import annotations


class CgroupError(Exception):
    """Base of every cgroup error."""


class CgroupLimitError(CgroupError, ValueError):
    """A limit value is malformed (e.g. cpu_weight 0); raised at construction, before anything is written."""

    def __init__(self, field: str, value: object, why: str) -> None:
        self.field = field
        self.value = value
        super().__init__(f"{field}={value!r}: {why}")


class SiteLimitExceeded(CgroupLimitError):
    """A job asks for more than the site allows (see `clamp_or_reject`)."""

    def __init__(self, field: str, requested: object, site_max: object, unit: str = "") -> None:
        self.requested = requested
        self.site_max = site_max
        u = f" {unit}" if unit else ""
        CgroupError.__init__(self, f"{field}: the job asks for {requested}{u}, the site allows at most {site_max}{u}")
        self.field = field
        self.value = requested


class CgroupUnsupported(CgroupError):
    """A limit was asked for whose controller (or file) this machine's cgroup hierarchy does not offer."""

    def __init__(self, job: str, field: str, why: str) -> None:
        self.job = job
        self.field = field
        super().__init__(f"cgroup {job}: cannot apply {field}: {why}")


class CgroupIOError(CgroupError):
    """A cgroup file could not be written/read or a directory could not be made/removed."""

    def __init__(self, path: str, op: str, err: OSError, value: str | None = None) -> None:
        self.path = path
        self.op = op
        self.errno = err.errno
        self.value = value
        what = f"{op} {value!r} to {path}" if value is not None else f"{op} {path}"
        super().__init__(f"{what}: {err.strerror or err}")
