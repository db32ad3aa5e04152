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

from dataclasses import dataclass, field, replace

from nodeagent import names
from nodeagent.desired import DesiredState, GroupSpec, LocalJob, RemoteEndpoint
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


FdbKey = tuple[str, str, str]
NeighKey = tuple[str, str]
HOST_VETH_PREFIX = names.host_veth("")


@dataclass
class Wanted:
    """Everything of ours that should exist, by the same keys as `Observed`. Built in full by `wanted`,
    or patched by `update_wanted` with what changed between two desired states."""

    links: dict[str, Link] = field(default_factory=dict)
    fdb: dict[FdbKey, FdbEntry] = field(default_factory=dict)
    neigh: dict[NeighKey, NeighEntry] = field(default_factory=dict)
    jobs: dict[str, JobNetSpec] = field(default_factory=dict)
    veth_jobs: dict[str, str] = field(default_factory=dict)  # host veth name -> job id
    rejected: dict[str, str] = field(default_factory=dict)  # job id -> why it gets no network
    flood_refs: dict[FdbKey, int] = field(default_factory=dict)  # flood entry -> endpoints needing it


@dataclass
class Keys:
    """The keys a plan compares (everything else is known to match)."""

    links: set[str] = field(default_factory=set)
    fdb: set[FdbKey] = field(default_factory=set)
    neigh: set[NeighKey] = field(default_factory=set)
    jobs: set[str] = field(default_factory=set)


def job_spec(job: LocalJob, group: GroupSpec) -> JobNetSpec:
    return JobNetSpec(job_id=job.id, netns=names.job_netns(job.id), host_ifname=names.host_veth(job.id),
                      bridge=names.bridge(group.vni), mac=job.mac.lower(), ip=job.ip, prefixlen=group.prefixlen,
                      gateway=group.gateway, mtu=group.mtu)


def usable_job_id(job_id: str) -> bool:
    """A job id that names a file and a link unambiguously: [A-Za-z0-9_-], short enough that jnv<id>
    is not truncated."""
    return bool(job_id) and names.host_veth(job_id) == HOST_VETH_PREFIX + job_id and all(
        c.isascii() and (c.isalnum() or c in "-_") for c in job_id)


def _add_job(w: Wanted, job: LocalJob, desired: DesiredState, keys: Keys | None) -> None:
    group = desired.groups.get(job.group)
    if group is None:
        return  # the controller sends a job's group with it; until then there is nothing to attach it to
    if not usable_job_id(job.id):
        w.rejected[job.id] = f"job id {job.id!r} cannot name a namespace file and a veth"
        return
    spec = job_spec(job, group)
    w.jobs[job.id] = spec
    w.links[spec.host_ifname] = host_veth_link(spec)
    w.veth_jobs[spec.host_ifname] = job.id
    if keys is not None:
        keys.jobs.add(job.id)
        keys.links.add(spec.host_ifname)


def _remove_job(w: Wanted, job_id: str, keys: Keys) -> None:
    w.rejected.pop(job_id, None)
    spec = w.jobs.pop(job_id, None)
    keys.jobs.add(job_id)
    if spec is not None:
        w.links.pop(spec.host_ifname, None)
        w.veth_jobs.pop(spec.host_ifname, None)
        keys.links.add(spec.host_ifname)


def _endpoint_entries(ep: RemoteEndpoint, desired: DesiredState,
                      settings: NetSettings) -> tuple[FdbEntry, FdbEntry, NeighEntry] | None:
    group = desired.groups.get(ep.group)
    if group is None or ep.underlay_ip == settings.underlay_ip:
        return None
    vx = names.vxlan(group.vni)
    return (FdbEntry(vx, ZERO_MAC, ep.underlay_ip), FdbEntry(vx, ep.mac.lower(), ep.underlay_ip),
            NeighEntry(vx, ep.ip, ep.mac.lower()))


def _add_endpoint(w: Wanted, ep: RemoteEndpoint, desired: DesiredState, settings: NetSettings,
                  keys: Keys | None) -> None:
    entries = _endpoint_entries(ep, desired, settings)
    if entries is None:
        return
    flood, fdb, neigh = entries
    fk, mk, nk = fdb_key(flood), fdb_key(fdb), (neigh.dev, neigh.ip)
    w.flood_refs[fk] = w.flood_refs.get(fk, 0) + 1
    w.fdb[fk] = flood
    w.fdb[mk] = fdb
    w.neigh[nk] = neigh
    if keys is not None:
        keys.fdb.update((fk, mk))
        keys.neigh.add(nk)


def _remove_endpoint(w: Wanted, ep: RemoteEndpoint, prev: DesiredState, settings: NetSettings,
                     keys: Keys) -> None:
    entries = _endpoint_entries(ep, prev, settings)
    if entries is None:
        return
    flood, fdb, neigh = entries
    fk, mk, nk = fdb_key(flood), fdb_key(fdb), (neigh.dev, neigh.ip)
    refs = w.flood_refs.get(fk, 0) - 1
    if refs > 0:
        w.flood_refs[fk] = refs
    else:
        w.flood_refs.pop(fk, None)
        w.fdb.pop(fk, None)
    if w.fdb.get(mk) == fdb:
        del w.fdb[mk]
    if w.neigh.get(nk) == neigh:
        del w.neigh[nk]
    keys.fdb.update((fk, mk))
    keys.neigh.add(nk)


def wanted(desired: DesiredState, settings: NetSettings) -> Wanted:
    """Everything of ours that should exist. Jobs and endpoints whose group is not present here are left
    out, and so are endpoints on our own underlay address."""
    w = Wanted()
    for g in desired.groups.values():
        br, vx = names.bridge(g.vni), names.vxlan(g.vni)
        w.links[br] = bridge_link(br, g.mtu)
        w.links[vx] = vxlan_link(vx, g.vni, br, g.mtu, settings)
    for ep in desired.endpoints.values():
        _add_endpoint(w, ep, desired, settings, None)
    for job in desired.jobs.values():
        _add_job(w, job, desired, None)
    return w


def update_wanted(w: Wanted, prev: DesiredState, desired: DesiredState, settings: NetSettings) -> Keys | None:
    """Patch `w` (built for `prev`) into what `desired` wants; return the keys that may have changed.
    None when the groups changed: build anew with `wanted` then (rare; everything may depend on a group)."""
    if prev.groups != desired.groups:
        return None
    keys = Keys()
    if prev.jobs is not desired.jobs:
        for job_id, job in desired.jobs.items():
            old = prev.jobs.get(job_id)
            if old is not job and old != job:
                _remove_job(w, job_id, keys)
                _add_job(w, job, desired, keys)
        for job_id in prev.jobs.keys() - desired.jobs.keys():
            _remove_job(w, job_id, keys)
    if prev.endpoints is not desired.endpoints:
        for ep_id, ep in desired.endpoints.items():
            old_ep = prev.endpoints.get(ep_id)
            if old_ep is not ep and old_ep != ep:
                if old_ep is not None:
                    _remove_endpoint(w, old_ep, prev, settings, keys)
                _add_endpoint(w, ep, desired, settings, keys)
        for ep_id in prev.endpoints.keys() - desired.endpoints.keys():
            _remove_endpoint(w, prev.endpoints[ep_id], prev, settings, keys)
    return keys


# -- the plan --------------------------------------------------------------------------------------


def plan(desired: DesiredState, observed: Observed, settings: NetSettings) -> list[Step]:
    """All steps that make `observed` into what `desired` wants."""
    return plan_wanted(wanted(desired, settings), observed, settings, None)


def plan_wanted(want: Wanted, observed: Observed, settings: NetSettings, keys: Keys | None) -> list[Step]:
    """The steps that make `observed` into `want`, comparing only `keys` (None: all). The incremental
    reconcile passes the keys `update_wanted` touched: its cost is O(change)."""
    if keys is None:
        keys = Keys(links=set(observed.links) | set(want.links), fdb=set(observed.fdb) | set(want.fdb),
                    neigh=set(observed.neigh) | set(want.neigh), jobs=set(observed.jobs) | set(want.jobs))
    deletes = _deletes(want, observed, keys)
    after = observed.copy() if deletes else observed
    for step in deletes:
        advance(after, step, settings)
    return deletes + _creates(want, after, keys)


def _veth_job(ifname: str, want: Wanted) -> str:
    job = want.veth_jobs.get(ifname)
    if job is not None:
        return job
    return ifname[len(HOST_VETH_PREFIX):] if ifname.startswith(HOST_VETH_PREFIX) else ""


def _deletes(want: Wanted, observed: Observed, keys: Keys) -> list[Step]:
    jobs: list[Step] = []
    entries: list[Step] = []
    vxlans: list[Step] = []
    bridges: list[Step] = []
    others: list[Step] = []
    for job_id in sorted(keys.jobs):
        ns = observed.jobs.get(job_id)
        if ns is not None and (job_id not in want.jobs or not ns.usable):
            jobs.append(DeleteJobNetwork(job_id, names.job_netns(job_id), names.host_veth(job_id)))
    doomed: set[str] = set()
    for ifname in sorted(keys.links):
        link = observed.links.get(ifname)
        if link is None:
            continue
        w = want.links.get(ifname)
        ns = None
        if link.kind == "veth":
            job = _veth_job(ifname, want)
            ns = observed.jobs.get(job)
            if ns is not None and (job not in want.jobs or not ns.usable):
                continue  # goes with its namespace (DeleteJobNetwork above)
        if w is not None and (link.kind, link.vxlan, link.bridge) == (w.kind, w.vxlan, w.bridge) and (
                link.kind != "veth" or ns is not None):
            continue  # wanted and well-formed (a job veth: and its namespace file exists)
        doomed.add(ifname)
        out = {"veth": jobs, "vxlan": vxlans, "bridge": bridges}.get(link.kind, others)
        out.append(DeleteLink(ifname))
    for key in sorted(keys.fdb):
        e = observed.fdb.get(key)
        if e is not None and e.dev not in doomed and key not in want.fdb:
            entries.append(DeleteFdb(e.dev, e.mac, e.dst))
    for nkey in sorted(keys.neigh):
        n = observed.neigh.get(nkey)
        if n is not None and n.dev not in doomed and nkey not in want.neigh:
            entries.append(DeleteNeigh(n.dev, n.ip, n.mac))
    return jobs + entries + others + vxlans + bridges


def _creates(want: Wanted, have: Observed, keys: Keys) -> list[Step]:
    bridges: list[Step] = []
    vxlans: list[Step] = []
    entries: list[Step] = []
    jobs: list[Step] = []
    for ifname in sorted(keys.links):
        w = want.links.get(ifname)
        if w is None or w.kind == "veth":
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
    for key in sorted(keys.fdb, key=lambda k: (k[0], k[1] != ZERO_MAC, k)):
        e = want.fdb.get(key)
        if e is not None and have.fdb.get(key) != e:
            entries.append(AddFloodEntry(e.dev, e.dst) if e.mac == ZERO_MAC else ReplaceFdb(e.dev, e.mac, e.dst))
    for nkey in sorted(keys.neigh):
        n = want.neigh.get(nkey)
        if n is not None and have.neigh.get(nkey) != n:
            entries.append(ReplaceNeigh(n.dev, n.ip, n.mac))
    for job_id in sorted(keys.jobs):
        spec = want.jobs.get(job_id)
        if spec is None:
            continue
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
                job_id = ifname[len(HOST_VETH_PREFIX):]
                ns = model.jobs.get(job_id)
                if ns is not None and names.host_veth(job_id) == ifname:
                    model.jobs[job_id] = replace(ns, eth0=None)  # the peer died with it
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
