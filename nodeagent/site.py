"""The site's isolation policy: defaults every job gets and the most a job may ask for.

Read from a TOML file (`jobnet-agent --site-config /etc/jobnet/site.toml`); every key is optional:

    [defaults]                 # what a job gets when it asks for nothing
    memory_max = "4G"          # hard limit: the kernel OOM-kills above it
    memory_high = "3G"         # soft limit
    cpu_weight = 100           # relative CPU share under contention (1..10000)
    pids_max = 4096
    wall_time_s = 86400
    mount_under_scratch = ["/tmp", "/var/tmp"]   # HTCondor's MOUNT_UNDER_SCRATCH

    [max]                      # a job asking for more fails with setup-failed: validate: ...
    memory_max = "64G"         # a job that sets no memory limit (and no default does) gets this one
    cpu_weight = 1000
    pids_max = 65536
    wall_time_s = 604800       # likewise: a job without a wall time gets this one
    allow_rootfs = true

The defaults must lie within the maximum (SiteConfigError otherwise).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from nodeagent.isolation import IsolationSpec, SiteMax
from nodeagent.isolation.cgroups import CgroupLimitError, CgroupLimits, SiteLimitExceeded, clamp_or_reject

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
LIMIT_KEYS = ("memory_max", "memory_high", "cpu_weight", "cpu_quota_us", "io_weight", "pids_max")


class SiteConfigError(ValueError):
    pass


def parse_bytes(value: int | str, key: str) -> int:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([kmgtKMGT]?)i?[bB]?\s*", value)
    if not m:
        raise SiteConfigError(f"{key}: {value!r} is not a size (examples: 512M, 4G, 1073741824)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _limits(section: dict[str, Any], where: str) -> CgroupLimits | None:
    kw: dict[str, Any] = {}
    for key in LIMIT_KEYS:
        if key in section:
            v = section[key]
            kw[key] = parse_bytes(v, f"[{where}] {key}") if key.startswith("memory") else int(v)
    try:
        return CgroupLimits(**kw) if kw else None
    except CgroupLimitError as e:
        raise SiteConfigError(f"[{where}] {e}") from e


def load_site(path: Path | None) -> tuple[IsolationSpec, SiteMax]:
    if path is None:
        return IsolationSpec(), SiteMax()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SiteConfigError(f"site config {path}: {e}") from e
    unknown = set(data) - {"defaults", "max"}
    if unknown:
        raise SiteConfigError(f"site config {path}: unknown section(s) {sorted(unknown)}; use [defaults] and [max]")
    d, m = data.get("defaults", {}), data.get("max", {})
    defaults = IsolationSpec(
        limits=_limits(d, "defaults"),
        wall_time_s=float(d["wall_time_s"]) if "wall_time_s" in d else None,
        mount_under_scratch=tuple(d["mount_under_scratch"]) if "mount_under_scratch" in d else None,
    )
    site_max = SiteMax(
        limits=_limits(m, "max"),
        wall_time_s=float(m["wall_time_s"]) if "wall_time_s" in m else None,
        allow_rootfs=bool(m.get("allow_rootfs", True)),
    )
    if site_max.limits is not None:
        try:
            clamp_or_reject(defaults.limits or CgroupLimits(), site_max.limits)
        except SiteLimitExceeded as e:
            raise SiteConfigError(f"site config {path}: [defaults] exceed [max]: {e}") from e
    dw, mw = defaults.wall_time_s, site_max.wall_time_s
    if dw is not None and mw is not None and dw > mw:
        raise SiteConfigError(f"site config {path}: [defaults] wall_time_s {dw} exceeds [max] wall_time_s {mw}")
    return defaults, site_max
