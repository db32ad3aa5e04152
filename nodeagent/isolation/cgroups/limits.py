"""The data of the cgroup layer: limits (validated at construction), per-device I/O limits, usage.

All numbers use cgroup v2 semantics; each backend maps them (see README.md for the v1 mapping).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import CgroupLimitError

WEIGHT_MIN, WEIGHT_MAX = 1, 10_000
PERIOD_MIN_US, PERIOD_MAX_US = 1_000, 1_000_000
QUOTA_MIN_US = 1_000
MAX_BYTES = 1 << 62


def _int(field: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise CgroupLimitError(field, v, "must be an integer")
    return v


def _range(field: str, v: object, lo: int, hi: int, hint: str = "") -> None:
    n = _int(field, v)
    if not lo <= n <= hi:
        raise CgroupLimitError(field, v, f"must be between {lo} and {hi}{hint}")


@dataclass(frozen=True)
class IoDeviceLimit:
    """Throttle of one block device (major:minor, see `lsblk -o MAJ:MIN`). None = no limit for that direction."""

    major: int
    minor: int
    rbps: int | None = None
    wbps: int | None = None
    riops: int | None = None
    wiops: int | None = None

    def __post_init__(self) -> None:
        _range("io_limits.major", self.major, 0, (1 << 12) - 1)
        _range("io_limits.minor", self.minor, 0, (1 << 20) - 1)
        for f in ("rbps", "wbps", "riops", "wiops"):
            v = getattr(self, f)
            if v is not None:
                _range(f"io_limits[{self.device}].{f}", v, 1, MAX_BYTES, " (leave it None for no limit)")

    @property
    def device(self) -> str:
        return f"{self.major}:{self.minor}"


@dataclass(frozen=True)
class CgroupLimits:
    """What a job's cgroup enforces. None = no limit (weights: None = the kernel default, 100)."""

    memory_max: int | None = None  # bytes, hard limit: the kernel OOM-kills
    memory_high: int | None = None  # bytes, soft limit (v2 memory.high; v1 memory.soft_limit_in_bytes)
    swap_max: int | None = 0  # bytes of swap; 0 = swap off, None = unlimited
    cpu_weight: int | None = None  # 1..10000, 100 = default
    cpu_quota_us: int | None = None  # CPU time per period; quota/period = number of CPUs
    cpu_period_us: int = 100_000
    io_weight: int | None = None  # 1..10000, 100 = default
    io_limits: tuple[IoDeviceLimit, ...] = ()
    pids_max: int | None = None

    def __post_init__(self) -> None:
        mb = " bytes (leave it None for no limit)"
        if self.memory_max is not None:
            _range("memory_max", self.memory_max, 1 << 20, MAX_BYTES, f"{mb}; at least 1 MiB")
        if self.memory_high is not None:
            _range("memory_high", self.memory_high, 1 << 20, MAX_BYTES, f"{mb}; at least 1 MiB")
        if self.swap_max is not None:
            _range("swap_max", self.swap_max, 0, MAX_BYTES, " bytes (0 = swap off, None = unlimited)")
        if self.cpu_weight is not None:
            _range("cpu_weight", self.cpu_weight, WEIGHT_MIN, WEIGHT_MAX, " (100 is the default share)")
        _range("cpu_period_us", self.cpu_period_us, PERIOD_MIN_US, PERIOD_MAX_US, " microseconds")
        if self.cpu_quota_us is not None:
            _range("cpu_quota_us", self.cpu_quota_us, QUOTA_MIN_US, MAX_BYTES,
                   f" microseconds per period (e.g. {self.cpu_period_us} = 1 CPU; None = no quota)")
        if self.io_weight is not None:
            _range("io_weight", self.io_weight, WEIGHT_MIN, WEIGHT_MAX, " (100 is the default share)")
        if not isinstance(self.io_limits, tuple) or not all(isinstance(d, IoDeviceLimit) for d in self.io_limits):
            raise CgroupLimitError("io_limits", self.io_limits, "must be a tuple of IoDeviceLimit")
        devs = [d.device for d in self.io_limits]
        if len(set(devs)) != len(devs):
            raise CgroupLimitError("io_limits", devs, "names a device more than once")
        if self.pids_max is not None:
            _range("pids_max", self.pids_max, 1, 1 << 22, " processes/threads (None = no limit)")

    @property
    def cpus(self) -> float | None:
        """The quota as a number of CPUs (None = no quota)."""
        return None if self.cpu_quota_us is None else self.cpu_quota_us / self.cpu_period_us


@dataclass(frozen=True)
class CgroupUsage:
    """What a job used, read from its cgroup (best effort: a counter the kernel lacks reads 0, see README)."""

    cpu_seconds: float
    memory_peak_bytes: int
    io_read_bytes: int
    io_write_bytes: int
    pids_peak: int
    oom_kills: int


LIMIT_FIELDS = tuple(f.name for f in fields(CgroupLimits))
