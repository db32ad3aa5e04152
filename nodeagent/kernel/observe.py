"""Read what of ours the kernel holds into `model.Observed`: our links (by name, see nodeagent.names), the
FDB and neighbour entries on our VXLAN devices, the static entries of our bridges' FDBs, and every job
namespace file in netns_dir with the config and the neighbour entries of its eth0 (read through a netlink
socket opened inside it). Dumps retry on NLM_F_DUMP_INTR (rawnl.py). Nothing here changes the kernel."""

from __future__ import annotations

import bisect
import os
import socket
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from nodeagent import names
from nodeagent.kernel import rawnl
from nodeagent.kernel.errors import InvalidArgument, KernelError, NotFound
from nodeagent.kernel.model import (
    BridgeAttrs,
    BridgeFdbEntry,
    FdbEntry,
    JobIface,
    JobNs,
    Link,
    NeighEntry,
    Observed,
    VxlanAttrs,
    fdb_key,
)
from nodeagent.kernel.namespaces import Namespaces

JOB_NETNS_PREFIX = names.job_netns("")
LOOPBACK_IFINDEX = 1
MAIN_TABLE = 254


# IFLA_INFO_DATA attribute types (linux/if_link.h)
IFLA_VXLAN_ID, IFLA_VXLAN_LINK, IFLA_VXLAN_LOCAL = 1, 3, 4
IFLA_VXLAN_LEARNING, IFLA_VXLAN_PROXY, IFLA_VXLAN_PORT = 7, 11, 15
IFLA_BR_FORWARD_DELAY, IFLA_BR_STP_STATE, IFLA_BR_MCAST_SNOOPING, IFLA_BR_MCAST_QUERIER = 1, 5, 23, 25


def _link(rec: rawnl.LinkInfo, by_index: dict[int, str]) -> Link:
    vxlan = bridge = None
    d = rec.data or {}
    if rec.kind == "vxlan":
        vxlan = VxlanAttrs(vni=rawnl.u32(d.get(IFLA_VXLAN_ID)), local=rawnl.ip4(d.get(IFLA_VXLAN_LOCAL)),
                           link=by_index.get(rawnl.u32(d.get(IFLA_VXLAN_LINK)), ""),
                           port=rawnl.be16(d.get(IFLA_VXLAN_PORT)),
                           learning=bool(rawnl.u32(d.get(IFLA_VXLAN_LEARNING))),
                           proxy=bool(rawnl.u32(d.get(IFLA_VXLAN_PROXY))))
    elif rec.kind == "bridge":
        bridge = BridgeAttrs(stp=bool(rawnl.u32(d.get(IFLA_BR_STP_STATE))),
                             forward_delay=rawnl.u32(d.get(IFLA_BR_FORWARD_DELAY)),
                             mcast_snooping=bool(rawnl.u32(d.get(IFLA_BR_MCAST_SNOOPING))),
                             mcast_querier=bool(rawnl.u32(d.get(IFLA_BR_MCAST_QUERIER))))
    # The bridge port flag learning is ours on job ports only (off); the VXLAN device's port keeps the default.
    learning = rec.learning if rec.kind == "veth" else None
    return Link(rec.ifname, rec.kind, rec.mtu, rec.up, by_index.get(rec.master, ""), vxlan=vxlan, bridge=bridge,
                learning=learning)


def observe_node(netns: str) -> tuple[Observed, dict[str, int]]:
    """Our links, FDB and neighbour entries in the calling thread's (the agent's) namespace; also every
    link's ifindex by name (ours and the underlay's), for the applier. Raw dumps: with hundreds of job
    veths and thousands of entries, pyroute2's message parsing would dominate a full reconcile. One FDB dump
    gives both the VXLAN devices' own entries (NTF_SELF, with a dst) and our bridges' (static entries on
    their ports: ifindex = the port, no NTF_SELF, state NUD_NOARP exactly; local entries are NUD_PERMANENT,
    learned ones REACHABLE/STALE)."""
    obs = Observed()
    with rawnl.route_socket() as sock:
        recs = rawnl.links(sock, netns)
        by_index = {r.index: r.ifname for r in recs}
        vx_index: dict[int, str] = {}
        bridges = {r.index for r in recs if r.kind == "bridge" and names.is_ours(r.ifname)}
        ports: dict[int, tuple[str, str]] = {}  # ifindex -> (bridge, port) of every port of our bridges
        for r in recs:
            if names.is_ours(r.ifname):
                obs.links[r.ifname] = _link(r, by_index)
                if r.kind == "vxlan":
                    vx_index[r.index] = r.ifname
            if r.master in bridges:
                ports[r.index] = (by_index[r.master], r.ifname)
        if vx_index or ports:
            def ours(ifindex: int, state: int, flags: int) -> bool:
                if flags & rawnl.NTF_SELF:
                    return ifindex in vx_index
                return state == rawnl.BRIDGE_FDB_STATIC and ifindex in ports

            for f in rawnl.neighbours(sock, rawnl.AF_BRIDGE, netns, ours):
                if f.flags & rawnl.NTF_SELF:
                    if f.dst:
                        dev = vx_index[f.ifindex]
                        e = FdbEntry(dev, f.mac, f.dst, bool(f.state & rawnl.NUD_PERMANENT))
                        obs.fdb[fdb_key(e)] = e
                elif not f.vlan:
                    bridge, port = ports[f.ifindex]
                    obs.bridge_fdb[(bridge, f.mac)] = BridgeFdbEntry(bridge, f.mac, port,
                                                                     bool(f.flags & rawnl.NTF_STICKY))
            for n in rawnl.neighbours(sock, socket.AF_INET, netns, lambda ifindex, state, flags: ifindex in vx_index):
                dev = vx_index[n.ifindex]
                if n.dst:
                    obs.neigh[(dev, n.dst)] = NeighEntry(dev, n.dst, n.mac, bool(n.state & rawnl.NUD_PERMANENT))
    return obs, {r.ifname: r.index for r in recs}


def _inside_job(job_id: str, path: Path,
                whole: Callable[[str, int], bool] | None) -> tuple[JobNs, int, dict[bytes, bytes] | None]:
    """The state of a job namespace, read from inside it (the calling thread is in it): eth0's config,
    its ifindex (0: no eth0) and, if `whole(job_id, ifindex)` (always when None), all its permanent
    neighbour entries (a dump), else None."""
    with rawnl.route_socket() as sock:
        links = rawnl.links(sock, path.name)
        eth0 = next((r for r in links if r.ifname == names.JOB_IFNAME), None)
        lo_up = any(r.index == LOOPBACK_IFINDEX and r.up for r in links)
        if eth0 is None:
            return JobNs(job_id, usable=True, eth0=None, lo_up=lo_up), 0, None
        addrs = frozenset(f"{a.address}/{a.prefixlen}" for a in rawnl.addrs(sock, path.name) if a.index == eth0.index)
        gateway = next((r.gateway for r in rawnl.routes(sock, path.name)
                        if r.table == MAIN_TABLE and r.dst_len == 0 and r.oif == eth0.index), "")
        table = None
        if whole is None or whole(job_id, eth0.index):
            table = rawnl.permanent_neighbours_v4(sock, eth0.index, path.name)
    ns = JobNs(job_id, usable=True, eth0=JobIface(eth0.mac, eth0.mtu, eth0.up, addrs, gateway), lo_up=lo_up)
    return ns, eth0.index, table


class Sweep:
    """Round robin over job ids: which namespaces a full observation reads the whole neighbour table of
    although it knows it from notifications (neighwatch.py): `per_pass` at a time, a cross-check that
    costs a dump each (a walk of the node's whole neighbour table)."""

    def __init__(self, per_pass: int) -> None:
        self.per_pass = per_pass
        self.last = ""  # the job id swept last

    def pick(self, job_ids: Collection[str]) -> set[str]:
        if self.per_pass <= 0:
            return set()
        if len(job_ids) <= self.per_pass:
            return set(job_ids)
        ids = sorted(job_ids)
        start = bisect.bisect_right(ids, self.last)
        chosen = (ids[start:] + ids[:start])[:self.per_pass]
        self.last = chosen[-1]
        return set(chosen)


@dataclass
class JobTables:
    """What `observe_jobs` read of the job namespaces' neighbour entries: eth0's ifindex of every job that
    has an eth0, and the whole permanent table of those it read (see `_inside_job`)."""

    eth0: dict[str, int] = field(default_factory=dict)
    read: dict[str, dict[bytes, bytes]] = field(default_factory=dict)


def observe_jobs(namespaces: Namespaces, paths: dict[str, Path],
                 whole: Callable[[str, int], bool] | None = None) -> tuple[dict[str, JobNs], JobTables]:
    """Every job namespace file (by job id), from one worker thread, and the permanent neighbour entries on
    the eth0 of those that have one and `whole` picks (all when None). A file that is not (any more) a
    network namespace is not usable; any other failure is raised."""
    out: dict[str, JobNs] = {}
    tables = JobTables()
    for job_id, res in namespaces.run_in_each(paths, lambda j, p: _inside_job(j, p, whole)).items():
        if isinstance(res, (InvalidArgument, NotFound)) and res.op in ("open netns", "setns"):
            out[job_id] = JobNs(job_id, usable=False)
        elif isinstance(res, KernelError):
            raise res
        else:
            out[job_id], eth0, table = res
            if eth0:
                tables.eth0[job_id] = eth0
            if table is not None:
                tables.read[job_id] = table
    return out, tables


def job_netns_files(netns_dir: Path) -> dict[str, Path]:
    """Our namespace files in netns_dir, by job id."""
    out: dict[str, Path] = {}
    with os.scandir(netns_dir) as it:
        for entry in it:
            if entry.name.startswith(JOB_NETNS_PREFIX) and len(entry.name) > len(JOB_NETNS_PREFIX):
                out[entry.name[len(JOB_NETNS_PREFIX):]] = Path(entry.path)
    return out


def observe(namespaces: Namespaces, files: dict[str, Path],
            whole: Callable[[str, int], bool] | None = None) -> tuple[Observed, dict[str, int], JobTables]:
    """The whole picture: `observe_node` plus the job namespace files `files` (`job_netns_files`). The
    neighbour entries of the tables read whole go into `Observed.job_neigh`; the caller adds those it knows
    otherwise (neighwatch.py)."""
    obs, index = observe_node(namespaces.label)
    obs.jobs, tables = observe_jobs(namespaces, files, whole)
    obs.job_neigh = dict(tables.read)
    return obs, index, tables
