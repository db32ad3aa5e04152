"""Site policy: a job's requested limits checked against what the site allows at most.

`clamp_or_reject(requested, site_max)`:
* a hard limit the job leaves open (None: memory_max, memory_high, swap_max, cpu quota, pids_max, a device
  throttle) while the site has a maximum is CLAMPED to the site maximum (a job never runs unbounded where the
  site bounds it);
* a limit above the site maximum is REJECTED with `SiteLimitExceeded` naming the limit and both values;
* weights (cpu_weight, io_weight): None means "the default share", not "unlimited", so it stays None; an
  explicit weight above the site's maximum is rejected;
* the CPU quota is compared as a number of CPUs (quota/period), so different periods compare correctly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import SiteLimitExceeded
from .limits import CgroupLimits, IoDeviceLimit

_HARD = ("memory_max", "memory_high", "swap_max", "pids_max")
_UNITS = {"memory_max": "bytes", "memory_high": "bytes", "swap_max": "bytes", "pids_max": "processes"}
_WEIGHTS = ("cpu_weight", "io_weight")
_IO_FIELDS = ("rbps", "wbps", "riops", "wiops")


def clamp_or_reject(requested: CgroupLimits, site_max: CgroupLimits) -> CgroupLimits:
    """The limits to apply: `requested` clamped to `site_max` where it is open; SiteLimitExceeded when it asks more.

    Fields of `site_max` that are None do not bound anything. `site_max.swap_max` 0 forbids swap.
    """
    changes: dict[str, Any] = {}
    for f in _HARD:
        want, cap = getattr(requested, f), getattr(site_max, f)
        if cap is None:
            continue
        if want is None:
            changes[f] = cap
        elif want > cap:
            raise SiteLimitExceeded(f, want, cap, _UNITS[f])
    for f in _WEIGHTS:
        want, cap = getattr(requested, f), getattr(site_max, f)
        if cap is not None and want is not None and want > cap:
            raise SiteLimitExceeded(f, want, cap)
    if site_max.cpu_quota_us is not None:
        cap_cpus = site_max.cpu_quota_us / site_max.cpu_period_us
        if requested.cpu_quota_us is None:
            changes["cpu_quota_us"] = site_max.cpu_quota_us
            changes["cpu_period_us"] = site_max.cpu_period_us
        elif (want_cpus := requested.cpu_quota_us / requested.cpu_period_us) > cap_cpus + 1e-9:
            raise SiteLimitExceeded(
                "cpu_quota_us/cpu_period_us",
                f"{requested.cpu_quota_us}/{requested.cpu_period_us} ({want_cpus:g} CPUs)",
                f"{site_max.cpu_quota_us}/{site_max.cpu_period_us} ({cap_cpus:g} CPUs)")
    if site_max.io_limits:
        changes["io_limits"] = _clamp_io(requested.io_limits, site_max.io_limits)
    return dataclasses.replace(requested, **changes) if changes else requested


def _clamp_io(req: tuple[IoDeviceLimit, ...], caps: tuple[IoDeviceLimit, ...]) -> tuple[IoDeviceLimit, ...]:
    by_dev = {d.device: d for d in req}
    out: list[IoDeviceLimit] = []
    for cap in caps:
        mine = by_dev.pop(cap.device, None) or IoDeviceLimit(cap.major, cap.minor)
        vals: dict[str, int | None] = {}
        for f in _IO_FIELDS:
            want, bound = getattr(mine, f), getattr(cap, f)
            if bound is not None and want is not None and want > bound:
                raise SiteLimitExceeded(f"io_limits[{cap.device}].{f}", want, bound)
            vals[f] = bound if want is None else want
        out.append(IoDeviceLimit(cap.major, cap.minor, **vals))
    return (*out, *by_dev.values())
