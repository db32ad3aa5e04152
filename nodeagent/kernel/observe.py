"""Read what of ours the kernel holds into `model.Observed`: our links (by name, see nodeagent.names), the
FDB and neighbour entries on our VXLAN devices, and every job namespace file in netns_dir with the config
of its eth0 (read through a netlink socket opened inside it). Dumps retry on NLM_F_DUMP_INTR (netlink.py).
Nothing here changes the kernel."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from nodeagent import names
from nodeagent.kernel import rawnl
from nodeagent.kernel.errors import InvalidArgument, NotFound
from nodeagent.kernel.model import (
    BridgeAttrs,
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
from nodeagent.kernel.netlink import LinkRec, Netlink

JOB_NETNS_PREFIX = names.job_netns("")
LOOPBACK_IFINDEX = 1
MAIN_TABLE = 254


def _link(rec: LinkRec, by_index: dict[int, str]) -> Link:
    vxlan = bridge = None
    d = rec.data
    if rec.kind == "vxlan":
        vxlan = VxlanAttrs(vni=int(d.get("IFLA_VXLAN_ID") or 0), local=str(d.get("IFLA_VXLAN_LOCAL") or ""),
                           link=by_index.get(int(d.get("IFLA_VXLAN_LINK") or 0), ""),
                           port=int(d.get("IFLA_VXLAN_PORT") or 0), learning=bool(d.get("IFLA_VXLAN_LEARNING")),
                           proxy=bool(d.get("IFLA_VXLAN_PROXY")))
    elif rec.kind == "bridge":
        bridge = BridgeAttrs(stp=bool(d.get("IFLA_BR_STP_STATE")),
                             forward_delay=int(d.get("IFLA_BR_FORWARD_DELAY") or 0),
                             mcast_snooping=bool(d.get("IFLA_BR_MCAST_SNOOPING")))
    return Link(rec.ifname, rec.kind, rec.mtu, rec.up, by_index.get(rec.master, ""), vxlan=vxlan, bridge=bridge)


def observe_node(nl: Netlink) -> tuple[Observed, dict[str, int]]:
    """Our links, FDB and neighbour entries in the agent's namespace; also every link's ifindex by name
    (ours and the underlay's), for the applier."""
    recs = nl.links()
    by_index = {r.index: r.ifname for r in recs}
    obs = Observed()
    vx_index: dict[int, str] = {}
    for r in recs:
        if names.is_ours(r.ifname):
            obs.links[r.ifname] = _link(r, by_index)
            if r.kind == "vxlan":
                vx_index[r.index] = r.ifname
    if vx_index:
        with rawnl.route_socket() as sock:  # raw: thousands of entries, parsed in a fraction of the time
            for f in rawnl.neighbours(sock, rawnl.AF_BRIDGE, nl.netns):
                dev = vx_index.get(f.ifindex)
                if dev is not None and f.dst and f.flags & rawnl.NTF_SELF:
                    e = FdbEntry(dev, f.mac, f.dst)
                    obs.fdb[fdb_key(e)] = e
            for n in rawnl.neighbours(sock, socket.AF_INET, nl.netns):
                dev = vx_index.get(n.ifindex)
                if dev is not None and n.dst:
                    obs.neigh[(dev, n.dst)] = NeighEntry(dev, n.dst, n.mac)
    return obs, {r.ifname: r.index for r in recs}


def observe_job(namespaces: Namespaces, path: Path, job_id: str) -> JobNs:
    """The state of one job namespace file, read from inside it (raw dumps: this runs for every job on a
    full reconcile). Not usable: the file is not a live network namespace."""

    def inside() -> JobNs:
        with rawnl.route_socket() as sock:
            links = rawnl.links(sock, path.name)
            eth0 = next((r for r in links if r.ifname == names.JOB_IFNAME), None)
            lo_up = any(r.index == LOOPBACK_IFINDEX and r.up for r in links)
            if eth0 is None:
                return JobNs(job_id, usable=True, eth0=None, lo_up=lo_up)
            addrs = frozenset(f"{a.address}/{a.prefixlen}" for a in rawnl.addrs(sock, path.name)
                              if a.index == eth0.index)
            gateway = next((r.gateway for r in rawnl.routes(sock, path.name)
                            if r.table == MAIN_TABLE and r.dst_len == 0 and r.oif == eth0.index), "")
        return JobNs(job_id, usable=True, eth0=JobIface(eth0.mac, eth0.mtu, eth0.up, addrs, gateway), lo_up=lo_up)

    try:
        return namespaces.run_in(path, inside)
    except (InvalidArgument, NotFound) as e:
        if e.op in ("open netns", "setns"):  # not (any more) a namespace: only then is it unusable
            return JobNs(job_id, usable=False)
        raise


def job_netns_files(netns_dir: Path) -> dict[str, Path]:
    """Our namespace files in netns_dir, by job id."""
    out: dict[str, Path] = {}
    with os.scandir(netns_dir) as it:
        for entry in it:
            if entry.name.startswith(JOB_NETNS_PREFIX) and len(entry.name) > len(JOB_NETNS_PREFIX):
                out[entry.name[len(JOB_NETNS_PREFIX):]] = Path(entry.path)
    return out


def observe(nl: Netlink, namespaces: Namespaces, netns_dir: Path) -> tuple[Observed, dict[str, int]]:
    """The whole picture: `observe_node` plus every job namespace."""
    obs, index = observe_node(nl)
    for job_id, path in sorted(job_netns_files(netns_dir).items()):
        obs.jobs[job_id] = observe_job(namespaces, path, job_id)
    return obs, index
