"""The agent's settings: one dataclass, built once from the command line, passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class AgentSettings:
    name: str
    controller: str  # "host:port" or "unix:/path"
    underlay_ip: str
    underlay_ifname: str
    underlay_mtu: int = 1500
    state_dir: Path = Path("/var/lib/jobnet/agent")
    netns_dir: Path = Path("/run/jobnet/netns")
    scratch_root: Path = Path("/var/lib/jobnet/scratch")
    resync_interval_s: float = 15.0
    poll_interval_s: float = 0.2
    stop_grace_s: float = 10.0
    job_uid: int = 65534
    job_gid: int = 65534
    allow_root_jobs: bool = False
    agent_port: int = 7401  # NodeAgent service (job logs) on underlay_ip
    usage_interval_s: float = 10.0  # network accounting: sample every job's counters this often
    usage_spool_max: int = 100_000  # usage reports kept for the controller before coalescing (see accounting)
    cgroup_parent_name: str = ""  # default jn-<name>; several agents sharing one machine need distinct ones
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def agent_address(self) -> str:
        return f"{self.underlay_ip}:{self.agent_port}"

    @property
    def cgroup_parent(self) -> str:
        return self.cgroup_parent_name or f"jn-{self.name}"
