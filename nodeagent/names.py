"""Names of every kernel object the agent creates. All start with the project prefix `jn` and fit
IFNAMSIZ (15 usable characters); cleanup goes by these names, never by pattern on foreign objects."""

from __future__ import annotations

PREFIX = "jn"
IFNAMSIZ = 15


def bridge(vni: int) -> str:
    """Per-group bridge: jnb<vni> (at most 11 characters)."""
    return f"{PREFIX}b{vni}"


def vxlan(vni: int) -> str:
    """Per-group VXLAN device: jnx<vni>."""
    return f"{PREFIX}x{vni}"


def host_veth(job_id: str) -> str:
    """The node-side end of a job's veth: jnv<job id> (job ids are 10 hex characters)."""
    return f"{PREFIX}v{job_id}"[:IFNAMSIZ]


JOB_IFNAME = "eth0"  # the job-side end, inside the job's network namespace


def job_netns(job_id: str) -> str:
    """The job's network namespace file name under the agent's netns directory."""
    return f"{PREFIX}j-{job_id}"


def is_ours(ifname: str) -> bool:
    return ifname.startswith((f"{PREFIX}b", f"{PREFIX}x", f"{PREFIX}v"))
