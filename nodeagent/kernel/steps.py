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


@dataclass(frozen=True)
class ReplaceJobNeigh:
    """A permanent neighbour entry `ip -> mac` on eth0 in a job's namespace `netns`: a peer of its group
    (another local job, or a remote endpoint). The job never has to ARP for it."""

    job_id: str
    netns: str
    ip: str
    mac: str


@dataclass(frozen=True)
class DeleteJobNeigh:
    """A permanent neighbour entry on eth0 in a job's namespace that no peer needs any more."""

    job_id: str
    netns: str
    ip: str
    mac: str


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
        | SetJobPort | ReplaceBridgeFdb | ReplaceJobNeigh)
