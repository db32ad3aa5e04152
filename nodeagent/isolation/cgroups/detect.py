"""Choose the backend once at start-up: v2 if `root` is a cgroup2 mount (it has cgroup.controllers), else the v1
hierarchies mounted directly under `root` (from /proc/self/mountinfo; co-mounts like cpu,cpuacct handled)."""

from __future__ import annotations

from pathlib import Path

from .base import CgroupManager
from .errors import CgroupError
from .v1 import CONTROLLERS, V1Manager
from .v2 import V2Manager


def v1_mounts(root: Path, mountinfo: str | None = None) -> dict[str, Path]:
    """controller -> mount point of the v1 hierarchies mounted directly under `root`."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    out: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] != "cgroup":
            continue
        mnt = Path(fields[4].replace("\\040", " "))
        if mnt.parent != root:
            continue
        for opt in tail[2].split(","):
            if opt in CONTROLLERS and opt not in out:
                out[opt] = mnt
    return out


def detect(*, root: Path = Path("/sys/fs/cgroup"), parent: str) -> CgroupManager:
    """The cgroup manager for this machine: V2Manager on a unified hierarchy, V1Manager on legacy/hybrid."""
    if (root / "cgroup.controllers").exists():
        return V2Manager(root, parent)
    mounts = v1_mounts(root)
    if not mounts:
        raise CgroupError(f"no cgroup hierarchy at {root}: neither cgroup2 (no {root}/cgroup.controllers) nor any "
                          f"v1 controller of {CONTROLLERS} mounted below it")
    return V1Manager(parent, mounts)
