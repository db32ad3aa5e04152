"""What the kernel of one node holds that is ours, as plain data (`Observed`), and the settings of the
kernel layer. Pure: no kernel access here; `observe.py` fills it in, `plan.py` reads it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class NetSettings:
    """netns_dir: where job network namespace files live (jnj-<job>); underlay_ifname / underlay_ip: the
    node's underlay link and address (VXLAN local end); vxlan_port: UDP destination port; label: names the
    agent's network namespace in errors (default: its inode, net:[...]); neigh_watch: follow the neighbour
    tables of job namespaces through the kernel's notifications (neighwatch.py; False: a full reconcile
    dumps every job namespace's table); neigh_sweep: how many job namespaces a full reconcile dumps the
    table of anyway, round robin, as a cross-check (observe.Sweep); spare_namespaces: job network namespaces
    made ahead while idle (spares.py; 0: none); paced_release: the networks of jobs that are gone are released
    one at a time by a thread of their own instead of all at once by the kernel (releaser.py: for tcx
    accounting programs, whose teardown holds the RTNL)."""

    netns_dir: Path
    underlay_ifname: str
    underlay_ip: str
    vxlan_port: int = 4789
    label: str = ""
    neigh_watch: bool = True
    neigh_sweep: int = 1
    spare_namespaces: int = 2
    paced_release: bool = False


@dataclass(frozen=True)
class VxlanAttrs:
    vni: int
    local: str
    link: str  # ifname of the underlay link ("" if none or unknown)
    port: int
    learning: bool
    proxy: bool


@dataclass(frozen=True)
class BridgeAttrs:
    stp: bool
    forward_delay: int
    mcast_snooping: bool
    mcast_querier: bool


@dataclass(frozen=True)
class Link:
    """One of our links (jnb*, jnx*, jnv*) in the agent's namespace. learning: its bridge port flag when it
    is a port of a bridge (None: not a port; a wanted VXLAN device: not managed, only job ports have it off)."""

    ifname: str
    kind: str
    mtu: int
    up: bool
    master: str  # ifname of the master, "" when none
    vxlan: VxlanAttrs | None = None
    bridge: BridgeAttrs | None = None
    learning: bool | None = None


@dataclass(frozen=True)
class FdbEntry:
    """A VXLAN FDB entry `mac -> dst` on device `dev` (mac 00:00:00:00:00:00: head-end flood entry).
    permanent: its state has NUD_PERMANENT (ours always do; one changed by hand is repaired)."""

    dev: str
    mac: str
    dst: str
    permanent: bool = True


@dataclass(frozen=True)
class NeighEntry:
    """An IPv4 neighbour entry on one of our VXLAN devices; permanent as in FdbEntry."""

    dev: str
    ip: str
    mac: str
    permanent: bool = True


@dataclass(frozen=True)
class BridgeFdbEntry:
    """A STATIC entry `mac -> port` in the FDB of one of our bridges (NTF_MASTER, NUD_NOARP: never ages):
    each local job's MAC on its veth. sticky: NTF_STICKY (ours always are: learning never moves them).
    Only we make static entries on our bridges: one no job needs goes; the kernel's own entries (local:
    the ports' addresses; learned: dynamic) are not observed."""

    bridge: str
    mac: str
    port: str
    sticky: bool = True


@dataclass(frozen=True)
class JobIface:
    """eth0 inside a job's namespace."""

    mac: str
    mtu: int
    up: bool
    addrs: frozenset[str]  # "ip/prefixlen"
    gateway: str  # of the default route, "" when none


@dataclass(frozen=True)
class JobNs:
    """A netns file of ours (<netns_dir>/jnj-<job>). usable: it is a live network namespace we could
    enter; eth0 None: no eth0 in it."""

    job_id: str
    usable: bool
    eth0: JobIface | None = None
    lo_up: bool = False


@dataclass
class Observed:
    """Our objects in the kernel. Mutable so that the reconciler can keep it up to date step by step
    (`plan.advance`) between full observations."""

    links: dict[str, Link] = field(default_factory=dict)
    fdb: dict[tuple[str, str, str], FdbEntry] = field(default_factory=dict)  # by fdb_key()
    neigh: dict[tuple[str, str], NeighEntry] = field(default_factory=dict)  # by (dev, ip)
    jobs: dict[str, JobNs] = field(default_factory=dict)
    # The static entries of our bridges' FDBs, by (bridge, mac): a MAC has one entry per bridge (no VLANs).
    bridge_fdb: dict[tuple[str, str], BridgeFdbEntry] = field(default_factory=dict)
    # The PERMANENT IPv4 neighbour entries on eth0 of each job namespace that has an eth0, by job id: packed
    # IP (4 bytes) -> packed MAC (6 bytes); bytes because a node holds hundreds of thousands of them. Only
    # we make permanent entries there: one no peer needs goes. Entries in other states are the kernel's
    # (left alone); a peer's is made permanent again. Known from the kernel's notifications (neighwatch.py).
    job_neigh: dict[str, dict[bytes, bytes]] = field(default_factory=dict)

    def copy(self, deep: bool = True) -> Observed:
        """deep=False shares each job's neighbour dict: for a copy on which only whole jobs are dropped."""
        job_neigh = {k: dict(v) for k, v in self.job_neigh.items()} if deep else dict(self.job_neigh)
        return Observed(dict(self.links), dict(self.fdb), dict(self.neigh), dict(self.jobs), dict(self.bridge_fdb),
                        job_neigh)


ZERO_MAC = "00:00:00:00:00:00"


def fdb_key(e: FdbEntry) -> tuple[str, str, str]:
    """A unicast MAC has one destination per device (replace overwrites it); the all-zeros flood entry has
    one per destination node."""
    return (e.dev, e.mac, e.dst if e.mac == ZERO_MAC else "")
