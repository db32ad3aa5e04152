"""Plan steps: small, frozen, self-describing units of kernel work. Each carries everything `apply` needs
(names included), so a failed step can be reported exactly and retried."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JobNetSpec:
    """The network of one local job: eth0 (mac, ip/prefixlen, mtu, default route via gateway) in
    namespace `netns`, host end `host_ifname` on `bridge`."""

    job_id: str
    netns: str  # file name under netns_dir
    host_ifname: str
    bridge: str
    mac: str
    ip: str
    prefixlen: int
    gateway: str
    mtu: int


@dataclass(frozen=True)
class DeleteJobNetwork:
    job_id: str
    netns: str
    host_ifname: str
    gone: bool = False  # the job is not wanted any more (not a repair): its network may be released later


@dataclass(frozen=True)
class DeleteLink:
    """A link of ours that is not wanted (a group's vxlan or bridge, a stray job veth), or malformed
    (recreated afterwards)."""

    ifname: str


@dataclass(frozen=True)
class DeleteNeigh:
    dev: str
    ip: str
    mac: str


@dataclass(frozen=True)
class DeleteFdb:
    dev: str
    mac: str
    dst: str


@dataclass(frozen=True)
class CreateBridge:
    ifname: str
    mtu: int


@dataclass(frozen=True)
class CreateVxlan:
    ifname: str
    vni: int
    bridge: str
    mtu: int


@dataclass(frozen=True)
class SetLink:
    """Repair mtu / master / up of an existing link of ours."""

    ifname: str
    mtu: int
    master: str
    up: bool


@dataclass(frozen=True)
class AddFloodEntry:
    dev: str
    dst: str


@dataclass(frozen=True)
class ReplaceFdb:
    dev: str
    mac: str
    dst: str


@dataclass(frozen=True)
class ReplaceNeigh:
    dev: str
    ip: str
    mac: str


@dataclass(frozen=True)
class ReplaceBridgeFdb:
    """The static, sticky entry `mac -> port` in the FDB of `bridge` (a local job's MAC on its veth): a frame
    for a job goes to its port only, never flooded, whether or not the job ever sent anything."""

    bridge: str
    port: str
    mac: str


@dataclass(frozen=True)
class DeleteBridgeFdb:
    """A static entry of one of our bridges that no job needs (on `port`, where it is)."""

    bridge: str
    port: str
    mac: str


def _ip_text(ip: bytes) -> str:
    return ".".join(str(b) for b in ip)


def _entries_text(entries: tuple[tuple[bytes, bytes], ...]) -> str:
    shown = ", ".join(f"{_ip_text(ip)} lladdr {mac.hex(':')}" for ip, mac in entries[:3])
    return shown + (f", ... ({len(entries)} entries)" if len(entries) > 3 else "")


@dataclass(frozen=True)
class ReplaceJobNeigh:
    """Permanent neighbour entries `ip -> mac` on eth0 in ONE job's namespace `netns`: peers of its group
    (the other local jobs, the remote endpoints), so the job never has to ARP for them. A new job of a group
    of N gets its N-1 entries in one step (and one netlink datagram). Packed: 4-byte IPv4, 6-byte MAC."""

    job_id: str
    netns: str
    entries: tuple[tuple[bytes, bytes], ...]

    def __str__(self) -> str:
        return f"ReplaceJobNeigh({self.job_id}: {_entries_text(self.entries)})"


@dataclass(frozen=True)
class DeleteJobNeigh:
    """Permanent neighbour entries on eth0 in ONE job's namespace that no peer needs any more (the MAC is
    the one observed)."""

    job_id: str
    netns: str
    entries: tuple[tuple[bytes, bytes], ...]

    def __str__(self) -> str:
        return f"DeleteJobNeigh({self.job_id}: {_entries_text(self.entries)})"


@dataclass(frozen=True)
class SpreadJobNeigh:
    """ONE peer's permanent entry `ip -> mac` into the namespaces of the other local jobs of its group that
    lack it: the group's convergence on this node when a peer arrives (or its MAC changes). One step for
    all of them: adding the 500th job of a group writes 499 namespaces."""

    ip: bytes
    mac: bytes
    jobs: tuple[str, ...]

    def __str__(self) -> str:
        return f"SpreadJobNeigh({_ip_text(self.ip)} lladdr {self.mac.hex(':')} into {len(self.jobs)} job(s))"


@dataclass(frozen=True)
class WithdrawJobNeigh:
    """ONE former peer's entry (by address) out of the namespaces of the local jobs that still hold it."""

    ip: bytes
    jobs: tuple[str, ...]

    def __str__(self) -> str:
        return f"WithdrawJobNeigh({_ip_text(self.ip)} from {len(self.jobs)} job(s))"


@dataclass(frozen=True)
class CreateJobNetwork:
    job: JobNetSpec


@dataclass(frozen=True)
class SetJobPort:
    """Bring the host end of a job's veth back to its spec (onto its bridge, up, MTU, bridge port learning
    off) when only it drifted: the job's namespace, its eth0 and its neighbour entries are left alone."""

    job: JobNetSpec


@dataclass(frozen=True)
class ConfigureJob:
    """Bring an existing job namespace back to its spec; recreate_veth when an end of the veth is gone."""

    job: JobNetSpec
    recreate_veth: bool


Step = (DeleteJobNetwork | DeleteLink | DeleteNeigh | DeleteFdb | DeleteBridgeFdb | DeleteJobNeigh | CreateBridge
        | CreateVxlan | SetLink | AddFloodEntry | ReplaceFdb | ReplaceNeigh | CreateJobNetwork | ConfigureJob
        | SetJobPort | ReplaceBridgeFdb | ReplaceJobNeigh | SpreadJobNeigh | WithdrawJobNeigh)


JobNeighEntry = tuple[str, str, str, str]  # ("replace" | "delete", job id, ip, mac ("" for a withdraw))


def job_neigh_entries(step: Step) -> list[JobNeighEntry]:
    """A job neighbour step as the single entries it writes, as text (for logs and tests: a full plan and
    an incremental one group the same entries differently)."""
    match step:
        case ReplaceJobNeigh(job_id=job_id, entries=entries) | DeleteJobNeigh(job_id=job_id, entries=entries):
            op = "replace" if isinstance(step, ReplaceJobNeigh) else "delete"
            return [(op, job_id, _ip_text(ip), mac.hex(":")) for ip, mac in entries]
        case SpreadJobNeigh(ip=ip, mac=mac, jobs=jobs):
            return [("replace", job_id, _ip_text(ip), mac.hex(":")) for job_id in jobs]
        case WithdrawJobNeigh(ip=ip, jobs=jobs):
            return [("delete", job_id, _ip_text(ip), "") for job_id in jobs]
    return []
