"""Per-job cgroups, v1 (legacy/hybrid) and v2 (unified) behind one interface chosen once at start-up.

    mgr = detect(parent="jn-node1")                  # V1Manager or V2Manager; mgr.version is 1 or 2
    cg = mgr.create(job_id, CgroupLimits(memory_max=1 << 30, cpu_weight=200, pids_max=512))
    cg.attach(child_pid)                              # while the child waits at its barrier, before it execs
    ... cg.usage(), cg.oom_killed()
    cg.kill_all(); cg.wait_empty(2.0); cg.destroy()
    mgr.close()

Limits are validated when CgroupLimits is constructed (CgroupLimitError, a ValueError); `clamp_or_reject`
applies a site's maximum. See README.md for the v1 mapping, what is degraded where, and what was tested where.
"""

from .base import CgroupManager, JobCgroup
from .detect import detect, v1_mounts
from .errors import CgroupError, CgroupIOError, CgroupLimitError, CgroupUnsupported, SiteLimitExceeded
from .limits import CgroupLimits, CgroupUsage, IoDeviceLimit
from .policy import clamp_or_reject
from .v1 import V1JobCgroup, V1Manager
from .v2 import V2JobCgroup, V2Manager

__all__ = [
    "CgroupError",
    "CgroupIOError",
    "CgroupLimitError",
    "CgroupLimits",
    "CgroupManager",
    "CgroupUnsupported",
    "CgroupUsage",
    "IoDeviceLimit",
    "JobCgroup",
    "SiteLimitExceeded",
    "V1JobCgroup",
    "V1Manager",
    "V2JobCgroup",
    "V2Manager",
    "clamp_or_reject",
    "detect",
    "v1_mounts",
]
