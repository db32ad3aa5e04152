"""PURE planning: `plan(desired, observed, settings) -> list[Step]`, and `advance(observed, step,
settings)`: the model update that says what the kernel holds once a step succeeded (used by `plan` itself
and by the reconciler to keep its model current without reading the kernel).

Step order, and why:
  1. DeleteJobNetwork, DeleteLink(job veth)  - jobs no longer wanted (or broken) go first: they free bridge
                                               ports; a stray veth must go before its job is made anew.
  2. DeleteNeigh, DeleteFdb                  - stale entries on devices that stay (entries on devices that
                                               go die with them).
  3. DeleteLink(vxlan), then DeleteLink(bridge) - groups gone, or malformed devices to recreate: a port
                                               before its master.
  4. CreateBridge / SetLink(bridge)          - the bridge is the master of everything below.
  5. CreateVxlan / SetLink(vxlan)            - enslaved to its bridge at creation.
  6. AddFloodEntry, ReplaceFdb, ReplaceNeigh - need the vxlan device; peers are reachable before our jobs
                                               start.
  7. CreateJobNetwork / ConfigureJob         - need the bridge.
The creates are planned against the model as it will be after the deletes (`advance`), so whatever hangs
off a recreated device (its entries, its ports' master) is planned anew.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nodeagent import names
from nodeagent.desired import DesiredState
from nodeagent.kernel.model import (
    ZERO_MAC,
    BridgeAttrs,
    FdbEntry,
    JobIface,
    JobNs,
    Link,
    NeighEntry,
    NetSettings,
    Observed,
    VxlanAttrs,
    fdb_key,
)
from nodeagent.kernel.steps import (
    AddFloodEntry,
    ConfigureJob,
    CreateBridge,
    CreateJobNetwork,
    CreateVxlan,
    DeleteFdb,
    DeleteJobNetwork,
    DeleteLink,
    DeleteNeigh,
    JobNetSpec,
    ReplaceFdb,
    ReplaceNeigh,
    SetLink,
    Step,
)

# -- what we want, as model objects ----------------------------------------------------------------


def bridge_link(ifname: str, mtu: int) -> Link:
    return Link(ifname, "bridge", mtu, True, "", bridge=BridgeAttrs(stp=False, forward_delay=0, mcast_snooping=False))


def vxlan_link(ifname: str, vni: int, bridge: str, mtu: int, settings: NetSettings) -> Link:
    return Link(ifname, "vxlan", mtu, True, bridge, vxlan=VxlanAttrs(
        vni=vni, local=settings.underlay_ip, link=settings.underlay_ifname, port=settings.vxlan_port,
        learning=False, proxy=True))


def host_veth_link(spec: JobNetSpec) -> Link:
    return Link(spec.host_ifname, "veth", spec.mtu, True, spec.bridge)


def job_ns(spec: JobNetSpec) -> JobNs:
    iface = JobIface(spec.mac, spec.mtu, True, frozenset({f"{spec.ip}/{spec.prefixlen}"}), spec.gateway)
    return JobNs(spec.job_id, usable=True, eth0=iface, lo_up=True)


@dataclass(frozen=True)
class Wanted:
    links: dict[str, Link]
    fdb: dict[tuple[str, str, str], FdbEntry]
    neigh: dict[tuple[str, str], NeighEntry]
    jobs: dict[str, JobNetSpec]


def wanted(desired: DesiredState, settings: NetSettings) -> Wanted:
    """Everything of ours that should exist. Jobs and endpoints whose group is not present here are left
    out, and so are endpoints on our own underlay address."""
    w = Wanted({}, {}, {}, {})
    for g in desired.groups.values():
        br, vx = names.bridge(g.vni), names.vxlan(g.vni)
        w.links[br] = bridge_link(br, g.mtu)
        w.links[vx] = vxlan_link(vx, g.vni, br, g.mtu, settings)
    for ep in desired.endpoints.values():
        group = desired.groups.get(ep.group)
        if group is None or ep.underlay_ip == settings.underlay_ip:
            continue
        vx = names.vxlan(group.vni)
        for e in (FdbEntry(vx, ZERO_MAC, ep.underlay_ip), FdbEntry(vx, ep.mac.lower(), ep.underlay_ip)):
            w.fdb[fdb_key(e)] = e
        w.neigh[(vx, ep.ip)] = NeighEntry(vx, ep.ip, ep.mac.lower())
    for job in desired.jobs.values():
        group = desired.groups.get(job.group)
        if group is None:
            continue
        spec = JobNetSpec(job_id=job.id, netns=names.job_netns(job.id), host_ifname=names.host_veth(job.id),
                          bridge=names.bridge(group.vni), mac=job.mac.lower(), ip=job.ip,
                          prefixlen=group.prefixlen, gateway=group.gateway, mtu=group.mtu)
        w.jobs[job.id] = spec
        w.links[spec.host_ifname] = host_veth_link(spec)
    return w


# -- the plan --------------------------------------------------------------------------------------


def plan(desired: DesiredState, observed: Observed, settings: NetSettings) -> list[Step]:
    want = wanted(desired, settings)
    deletes = _deletes(want, observed)
    after = observed.copy()
    for step in deletes:
        advance(after, step, settings)
    return deletes + _creates(want, after)


def _deletes(want: Wanted, observed: Observed) -> list[Step]:
    jobs: list[Step] = []
    entries: list[Step] = []
    vxlans: list[Step] = []
    bridges: list[Step] = []
    others: list[Step] = []
    for job_id, ns in sorted(observed.jobs.items()):
        if job_id not in want.jobs or not ns.usable:
            jobs.append(DeleteJobNetwork(job_id, names.job_netns(job_id), names.host_veth(job_id)))
    veth_job = {names.host_veth(j): j for j in observed.jobs}
    doomed: set[str] = set()
    for ifname, link in sorted(observed.links.items()):
        w = want.links.get(ifname)
        if link.kind == "veth" and ifname in veth_job:
            job = veth_job[ifname]
            if job not in want.jobs or not observed.jobs[job].usable:
                continue  # DeleteJobNetwork above deletes it
        if w is not None and (link.kind, link.vxlan, link.bridge) == (w.kind, w.vxlan, w.bridge) and (
                link.kind != "veth" or link.ifname in veth_job):
            continue  # wanted and well-formed (a job veth: and its namespace file exists)
        doomed.add(ifname)
        out = {"veth": jobs, "vxlan": vxlans, "bridge": bridges}.get(link.kind, others)
        out.append(DeleteLink(ifname))
    for key, e in sorted(observed.fdb.items()):
        if e.dev not in doomed and want.fdb.get(key) is None:
            entries.append(DeleteFdb(e.dev, e.mac, e.dst))
    for nkey, n in sorted(observed.neigh.items()):
        if n.dev not in doomed and want.neigh.get(nkey) is None:
            entries.append(DeleteNeigh(n.dev, n.ip, n.mac))
    return jobs + entries + others + vxlans + bridges


def _creates(want: Wanted, have: Observed) -> list[Step]:
    bridges: list[Step] = []
    vxlans: list[Step] = []
    entries: list[Step] = []
    jobs: list[Step] = []
    for ifname, w in sorted(want.links.items()):
        if w.kind == "veth":
            continue
        out = bridges if w.kind == "bridge" else vxlans
        h = have.links.get(ifname)
        if h is None:
            if w.vxlan is not None:
                out.append(CreateVxlan(ifname, w.vxlan.vni, w.master, w.mtu))
            else:
                out.append(CreateBridge(ifname, w.mtu))
        elif (h.mtu, h.master, h.up) != (w.mtu, w.master, w.up):
            out.append(SetLink(ifname, w.mtu, w.master, w.up))
    for key, e in sorted(want.fdb.items()):
        if have.fdb.get(key) != e:
            entries.append(AddFloodEntry(e.dev, e.dst) if e.mac == ZERO_MAC else ReplaceFdb(e.dev, e.mac, e.dst))
    for nkey, n in sorted(want.neigh.items()):
        if have.neigh.get(nkey) != n:
            entries.append(ReplaceNeigh(n.dev, n.ip, n.mac))
    for job_id, spec in sorted(want.jobs.items()):
        ns = have.jobs.get(job_id)
        host = have.links.get(spec.host_ifname)
        if ns is None:
            jobs.append(CreateJobNetwork(spec))
        elif host is None or ns.eth0 is None:
            jobs.append(ConfigureJob(spec, recreate_veth=True))
        elif host != host_veth_link(spec) or ns != job_ns(spec):
            jobs.append(ConfigureJob(spec, recreate_veth=False))
    return bridges + vxlans + entries + jobs


# -- the model after a step ------------------------------------------------------------------------


def advance(model: Observed, step: Step, settings: NetSettings) -> None:
    """Update `model` in place to what the kernel holds after `step` succeeded."""
    match step:
        case DeleteJobNetwork(job_id=job_id, host_ifname=host):
            model.jobs.pop(job_id, None)
            model.links.pop(host, None)
        case DeleteLink(ifname=ifname):
            link = model.links.pop(ifname, None)
            if link is None:
                return
            if link.kind == "vxlan":
                for key in [k for k, e in model.fdb.items() if e.dev == ifname]:
                    del model.fdb[key]
                for nkey in [k for k, n in model.neigh.items() if n.dev == ifname]:
                    del model.neigh[nkey]
            elif link.kind == "bridge":
                for name, lk in list(model.links.items()):
                    if lk.master == ifname:
                        model.links[name] = replace(lk, master="")
            elif link.kind == "veth":
                for job_id, ns in list(model.jobs.items()):
                    if names.host_veth(job_id) == ifname:
                        model.jobs[job_id] = replace(ns, eth0=None)
        case DeleteFdb(dev=dev, mac=mac, dst=dst):
            e = FdbEntry(dev, mac, dst)
            if model.fdb.get(fdb_key(e)) == e:
                del model.fdb[fdb_key(e)]
        case DeleteNeigh(dev=dev, ip=ip, mac=mac):
            if model.neigh.get((dev, ip)) == NeighEntry(dev, ip, mac):
                del model.neigh[(dev, ip)]
        case CreateBridge(ifname=ifname, mtu=mtu):
            model.links[ifname] = bridge_link(ifname, mtu)
        case CreateVxlan(ifname=ifname, vni=vni, bridge=bridge, mtu=mtu):
            model.links[ifname] = vxlan_link(ifname, vni, bridge, mtu, settings)
        case SetLink(ifname=ifname, mtu=mtu, master=master, up=up):
            if ifname in model.links:
                model.links[ifname] = replace(model.links[ifname], mtu=mtu, master=master, up=up)
        case AddFloodEntry(dev=dev, dst=dst):
            e = FdbEntry(dev, ZERO_MAC, dst)
            model.fdb[fdb_key(e)] = e
        case ReplaceFdb(dev=dev, mac=mac, dst=dst):
            e = FdbEntry(dev, mac, dst)
            model.fdb[fdb_key(e)] = e
        case ReplaceNeigh(dev=dev, ip=ip, mac=mac):
            model.neigh[(dev, ip)] = NeighEntry(dev, ip, mac)
        case CreateJobNetwork(job=spec) | ConfigureJob(job=spec):
            model.jobs[spec.job_id] = job_ns(spec)
            model.links[spec.host_ifname] = host_veth_link(spec)
