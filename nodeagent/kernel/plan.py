"""PURE planning: `plan(desired, observed, settings) -> list[Step]`, and `advance(observed, step,
settings)`: the model update that says what the kernel holds once a step succeeded (used by `plan` itself
and by the reconciler to keep its model current without reading the kernel).

Step order, and why:
  1. DeleteJobNetwork, DeleteLink(job veth)  - jobs no longer wanted (or broken) go first: they free bridge
                                               ports; a stray veth must go before its job is made anew.
  2. DeleteNeigh, DeleteFdb, DeleteBridgeFdb, - stale entries on devices that stay (entries on devices that
     DeleteJobNeigh, WithdrawJobNeigh          go die with them: a port's bridge FDB entries die with it).
  3. DeleteLink(vxlan), then DeleteLink(bridge) - groups gone, or malformed devices to recreate: a port
                                               before its master.
  4. CreateBridge / SetLink(bridge)          - the bridge is the master of everything below.
  5. CreateVxlan / SetLink(vxlan)            - enslaved to its bridge at creation.
  6. AddFloodEntry, ReplaceFdb, ReplaceNeigh - need the vxlan device; peers are reachable before our jobs
                                               start.
  7. CreateJobNetwork / ConfigureJob /      - need the bridge.
     SetJobPort
  8. ReplaceBridgeFdb                        - need the job's port on its bridge (a veth made in 7 gets its
                                               entry whatever the model says).
  9. ReplaceJobNeigh                         - need the job's eth0 (made or configured anew in 7: that
                                               flushes its entries, so such a job gets all of them).
 10. SpreadJobNeigh                          - a new peer's entry into the other jobs of its group (the
                                               group's convergence on this node: one step per address).
The creates are planned against the model as it will be after the deletes (`advance`), so whatever hangs
off a recreated device (its entries, its ports' master) is planned anew.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from nodeagent import names
from nodeagent.desired import DesiredState, GroupSpec, LocalJob, RemoteEndpoint
from nodeagent.kernel.model import (
    ZERO_MAC,
    BridgeAttrs,
    BridgeFdbEntry,
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
    DeleteBridgeFdb,
    DeleteFdb,
    DeleteJobNeigh,
    DeleteJobNetwork,
    DeleteLink,
    DeleteNeigh,
    JobNetSpec,
    ReplaceBridgeFdb,
    ReplaceFdb,
    ReplaceJobNeigh,
    ReplaceNeigh,
    SetJobPort,
    SetLink,
    SpreadJobNeigh,
    Step,
    WithdrawJobNeigh,
)

# -- what we want, as model objects ----------------------------------------------------------------


def bridge_link(ifname: str, mtu: int) -> Link:
    return Link(ifname, "bridge", mtu, True, "", bridge=BridgeAttrs(stp=False, forward_delay=0, mcast_snooping=False,
                                                                    mcast_querier=False))


def vxlan_link(ifname: str, vni: int, bridge: str, mtu: int, settings: NetSettings) -> Link:
    return Link(ifname, "vxlan", mtu, True, bridge, vxlan=VxlanAttrs(
        vni=vni, local=settings.underlay_ip, link=settings.underlay_ifname, port=settings.vxlan_port,
        learning=False, proxy=True))


def host_veth_link(spec: JobNetSpec) -> Link:
    """Learning off: the bridge never learns a MAC from a job's frames, so a job cannot move another job's
    entry (nor fill the FDB) by sending from its MAC; each job's own MAC is a static entry (BridgeFdbEntry)."""
    return Link(spec.host_ifname, "veth", spec.mtu, True, spec.bridge, learning=False)


def job_ns(spec: JobNetSpec) -> JobNs:
    iface = JobIface(spec.mac, spec.mtu, True, frozenset({f"{spec.ip}/{spec.prefixlen}"}), spec.gateway)
    return JobNs(spec.job_id, usable=True, eth0=iface, lo_up=True)


FdbKey = tuple[str, str, str]
NeighKey = tuple[str, str]
BridgeFdbKey = tuple[str, str]  # (bridge, mac)
PeerKey = tuple[str, bytes]  # (group, packed IP)
HOST_VETH_PREFIX = names.host_veth("")
MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
NO_PEERS: dict[bytes, bytes] = {}


@dataclass
class Wanted:
    """Everything of ours that should exist, by the same keys as `Observed`. Built in full by `wanted`,
    or patched by `update_wanted` with what changed between two desired states."""

    links: dict[str, Link] = field(default_factory=dict)
    fdb: dict[FdbKey, FdbEntry] = field(default_factory=dict)
    neigh: dict[NeighKey, NeighEntry] = field(default_factory=dict)
    jobs: dict[str, JobNetSpec] = field(default_factory=dict)
    bridge_fdb: dict[BridgeFdbKey, BridgeFdbEntry] = field(default_factory=dict)  # each local job's MAC
    # Who claims each MAC on each bridge, "0<job id>" (a local job, on its veth) or "1<job id>" (a remote
    # endpoint, on the group's VXLAN device) -> the port. One, unless two jobs share a MAC (a job moving
    # between nodes, or a controller bug); then the smallest claimant gets the entry: a local job first.
    bridge_claims: dict[BridgeFdbKey, dict[str, str]] = field(default_factory=dict)
    veth_jobs: dict[str, str] = field(default_factory=dict)  # host veth name -> job id
    rejected: dict[str, str] = field(default_factory=dict)  # job id -> why it gets no network
    flood_refs: dict[FdbKey, int] = field(default_factory=dict)  # flood entry -> endpoints needing it
    # The peers of each group, packed IP -> packed MAC: every local job of the group and every remote
    # endpoint. Each job of the group wants a permanent neighbour entry on its eth0 for each of them but
    # itself. Stored once per group (not per job: a group of N local jobs needs N*(N-1) entries).
    peers: dict[str, dict[bytes, bytes]] = field(default_factory=dict)
    group_jobs: dict[str, set[str]] = field(default_factory=dict)  # group -> local jobs with a network
    job_group: dict[str, str] = field(default_factory=dict)  # job id -> group (jobs with a network)
    job_ip: dict[str, bytes] = field(default_factory=dict)  # job id -> its own packed IP
    # Who claims a peer address: "0<job id>" (a local job) or "1<job id>" (an endpoint) -> packed MAC. Two
    # claims on one address (a job moving between nodes) resolve to the smallest claimant, a local job first.
    claims: dict[PeerKey, dict[str, bytes]] = field(default_factory=dict)
    bad_peers: dict[str, str] = field(default_factory=dict)  # claimant -> why it gets no neighbour entries


@dataclass
class Keys:
    """The keys a plan compares (everything else is known to match)."""

    links: set[str] = field(default_factory=set)
    fdb: set[FdbKey] = field(default_factory=set)
    neigh: set[NeighKey] = field(default_factory=set)
    bridge_fdb: set[BridgeFdbKey] = field(default_factory=set)
    jobs: set[str] = field(default_factory=set)  # also: compare all of these jobs' neighbour entries
    peers: set[PeerKey] = field(default_factory=set)  # compare this entry in every job of the group


def job_spec(job: LocalJob, group: GroupSpec) -> JobNetSpec:
    return JobNetSpec(job_id=job.id, netns=names.job_netns(job.id), host_ifname=names.host_veth(job.id),
                      bridge=names.bridge(group.vni), mac=job.mac.lower(), ip=job.ip, prefixlen=group.prefixlen,
                      gateway=group.gateway, mtu=group.mtu)


def usable_job_id(job_id: str) -> bool:
    """A job id that names a file and a link unambiguously: [A-Za-z0-9_-], short enough that jnv<id>
    is not truncated."""
    return bool(job_id) and names.host_veth(job_id) == HOST_VETH_PREFIX + job_id and all(
        c.isascii() and (c.isalnum() or c in "-_") for c in job_id)


def packed_peer(ip: str, mac: str) -> tuple[bytes, bytes]:
    """(4-byte IP, 6-byte MAC); ValueError when either is malformed."""
    if not MAC_RE.fullmatch(mac):
        raise ValueError(f"malformed MAC {mac!r}")
    return ipaddress.IPv4Address(ip).packed, bytes.fromhex(mac.replace(":", ""))


def _settle(w: Wanted, key: PeerKey, keys: Keys | None) -> None:
    group, ip = key
    claims = w.claims.get(key)
    peers = w.peers.setdefault(group, {})
    if claims:
        peers[ip] = claims[min(claims)]
    else:
        peers.pop(ip, None)
    if keys is not None:
        keys.peers.add(key)


def _claim(w: Wanted, group: str, claimant: str, ip: str, mac: str, keys: Keys | None) -> None:
    try:
        key_ip, key_mac = packed_peer(ip, mac)
    except ValueError as e:
        w.bad_peers[claimant] = f"peer {claimant[1:]} of group {group!r} ({ip} {mac}): {e}"
        return
    w.claims.setdefault((group, key_ip), {})[claimant] = key_mac
    _settle(w, (group, key_ip), keys)


def _unclaim(w: Wanted, group: str, claimant: str, ip: str, keys: Keys) -> None:
    if w.bad_peers.pop(claimant, None) is not None:
        return
    key = (group, ipaddress.IPv4Address(ip).packed)
    claims = w.claims.get(key)
    if claims is None or claims.pop(claimant, None) is None:
        return
    if not claims:
        del w.claims[key]
    _settle(w, key, keys)


def _settle_bridge_fdb(w: Wanted, key: BridgeFdbKey) -> None:
    claims = w.bridge_claims.get(key)
    if claims:
        bridge, mac = key
        w.bridge_fdb[key] = BridgeFdbEntry(bridge, mac, claims[min(claims)])
    else:
        w.bridge_claims.pop(key, None)
        w.bridge_fdb.pop(key, None)


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
    w.job_group[job.id] = group.name
    w.group_jobs.setdefault(group.name, set()).add(job.id)
    with contextlib.suppress(ValueError):  # else its network cannot be made (CreateJobNetwork says why)
        w.job_ip[job.id] = ipaddress.IPv4Address(job.ip).packed
    _claim(w, group.name, "0" + job.id, job.ip, spec.mac, keys)
    bkey = (spec.bridge, spec.mac)
    w.bridge_claims.setdefault(bkey, {})["0" + job.id] = spec.host_ifname
    _settle_bridge_fdb(w, bkey)
    if keys is not None:
        keys.jobs.add(job.id)
        keys.links.add(spec.host_ifname)
        keys.bridge_fdb.add(bkey)


def _remove_job(w: Wanted, job_id: str, keys: Keys) -> None:
    w.rejected.pop(job_id, None)
    spec = w.jobs.pop(job_id, None)
    keys.jobs.add(job_id)
    if spec is not None:
        w.links.pop(spec.host_ifname, None)
        w.veth_jobs.pop(spec.host_ifname, None)
        keys.links.add(spec.host_ifname)
        group = w.job_group.pop(job_id)
        w.group_jobs[group].discard(job_id)
        w.job_ip.pop(job_id, None)
        _unclaim(w, group, "0" + job_id, spec.ip, keys)
        bkey = (spec.bridge, spec.mac)
        w.bridge_claims.get(bkey, {}).pop("0" + job_id, None)
        _settle_bridge_fdb(w, bkey)
        keys.bridge_fdb.add(bkey)


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
    if ep.group in desired.groups:
        _claim(w, ep.group, "1" + ep.job_id, ep.ip, ep.mac.lower(), keys)
    entries = _endpoint_entries(ep, desired, settings)
    if entries is None:
        return
    flood, fdb, neigh = entries
    fk, mk, nk = fdb_key(flood), fdb_key(fdb), (neigh.dev, neigh.ip)
    w.flood_refs[fk] = w.flood_refs.get(fk, 0) + 1
    w.fdb[fk] = flood
    w.fdb[mk] = fdb
    w.neigh[nk] = neigh
    # Its MAC static on the group bridge's VXLAN port: a frame for it is never flooded to the local jobs,
    # even before it has sent anything (or after the bridge would have forgotten it).
    bkey = (names.bridge(desired.groups[ep.group].vni), fdb.mac)
    w.bridge_claims.setdefault(bkey, {})["1" + ep.job_id] = fdb.dev
    _settle_bridge_fdb(w, bkey)
    if keys is not None:
        keys.fdb.update((fk, mk))
        keys.neigh.add(nk)
        keys.bridge_fdb.add(bkey)


def _remove_endpoint(w: Wanted, ep: RemoteEndpoint, prev: DesiredState, settings: NetSettings,
                     keys: Keys) -> None:
    if ep.group in prev.groups:
        _unclaim(w, ep.group, "1" + ep.job_id, ep.ip, keys)
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
    bkey = (names.bridge(prev.groups[ep.group].vni), fdb.mac)
    w.bridge_claims.get(bkey, {}).pop("1" + ep.job_id, None)
    _settle_bridge_fdb(w, bkey)
    keys.fdb.update((fk, mk))
    keys.neigh.add(nk)
    keys.bridge_fdb.add(bkey)


def wanted(desired: DesiredState, settings: NetSettings) -> Wanted:
    """Everything of ours that should exist. Jobs and endpoints whose group is not present here are left
    out, and so are the VXLAN entries of endpoints on our own underlay address."""
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
    ch = desired.changes
    if ch is not None and ch.base == prev.revision != desired.revision:
        # a delta from `prev`: only what it touched can differ (claims settle by the lowest claimant, so the
        # order of the patches does not matter)
        job_ids: Iterable[str] = sorted(ch.jobs)
        ep_ids: Iterable[str] = sorted(ch.endpoints)
    else:
        job_ids = () if prev.jobs is desired.jobs else [*desired.jobs, *(prev.jobs.keys() - desired.jobs.keys())]
        ep_ids = () if prev.endpoints is desired.endpoints else [
            *desired.endpoints, *(prev.endpoints.keys() - desired.endpoints.keys())]
    for job_id in job_ids:
        job, old = desired.jobs.get(job_id), prev.jobs.get(job_id)
        if job is None:
            if old is not None:
                _remove_job(w, job_id, keys)
        elif old is not job and old != job:
            _remove_job(w, job_id, keys)
            _add_job(w, job, desired, keys)
    for ep_id in ep_ids:
        ep, old_ep = desired.endpoints.get(ep_id), prev.endpoints.get(ep_id)
        if old_ep is not ep and old_ep != ep:
            if old_ep is not None:
                _remove_endpoint(w, old_ep, prev, settings, keys)
            if ep is not None:
                _add_endpoint(w, ep, desired, settings, keys)
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
                    neigh=set(observed.neigh) | set(want.neigh),
                    bridge_fdb=set(observed.bridge_fdb) | set(want.bridge_fdb),
                    jobs=set(observed.jobs) | set(want.jobs))
    deletes = _deletes(want, observed, keys)
    # The creates are planned against the model after the deletes of whole objects. Deleted entries do not
    # matter there: no create is planned for an entry that is not wanted.
    structural = [s for s in deletes if isinstance(s, (DeleteJobNetwork, DeleteLink))]
    after = observed.copy(deep=False) if structural else observed
    for step in structural:
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
            jobs.append(DeleteJobNetwork(job_id, names.job_netns(job_id), names.host_veth(job_id),
                                         gone=job_id not in want.jobs))
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
    # A bridge FDB entry dies with its port or bridge (the veth of a job whose namespace goes too).
    gone = doomed | {s.host_ifname for s in jobs if isinstance(s, DeleteJobNetwork)}
    for bkey in sorted(keys.bridge_fdb):
        b = observed.bridge_fdb.get(bkey)
        if b is not None and bkey not in want.bridge_fdb and b.port not in gone and b.bridge not in gone:
            entries.append(DeleteBridgeFdb(b.bridge, b.port, b.mac))
    entries += _job_neigh_deletes(want, observed, keys)
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
        elif ns != job_ns(spec):
            jobs.append(ConfigureJob(spec, recreate_veth=False))
        elif host != host_veth_link(spec):
            jobs.append(SetJobPort(spec))  # only the host end (e.g. its learning flag, its bridge recreated)
    # A job whose veth is made in this plan gets its bridge FDB entry whatever the model says (a port
    # attached anew to its bridge has none in the model: `advance`).
    specs = [s.job for s in jobs if isinstance(s, (CreateJobNetwork, ConfigureJob, SetJobPort))]
    fresh_ports = {s.job.host_ifname for s in jobs if isinstance(s, CreateJobNetwork) or (
        isinstance(s, ConfigureJob) and s.recreate_veth)} | {s.ifname for s in vxlans if isinstance(s, CreateVxlan) or (
        isinstance(s, SetLink) and have.links[s.ifname].master != s.master)}
    bridge_fdb: list[Step] = []
    for bkey in sorted(keys.bridge_fdb.union((spec.bridge, spec.mac) for spec in specs)):
        b = want.bridge_fdb.get(bkey)
        if b is not None and (b.port in fresh_ports or have.bridge_fdb.get(bkey) != b):
            bridge_fdb.append(ReplaceBridgeFdb(b.bridge, b.port, b.mac))
    # A job whose eth0 is made or configured in this plan has no neighbour entries afterwards (setting its
    # MAC flushes even permanent ones): it gets them all.
    fresh = {s.job.job_id for s in jobs if isinstance(s, (CreateJobNetwork, ConfigureJob))}
    return bridges + vxlans + entries + jobs + bridge_fdb + _job_neigh_creates(want, have, keys, fresh)


# -- neighbour entries in job namespaces -----------------------------------------------------------


def _in_sync(have: dict[bytes, bytes], peers: dict[bytes, bytes], own: bytes | None) -> bool:
    """`have` is exactly `peers` without the job's own address (set operations in C: a full reconcile
    checks every job of a 200-job group against its 199 peers)."""
    return (len(have) == len(peers) - (own in peers) and own not in have
            and have.items() <= peers.items())


def _members(want: Wanted, keys: Keys) -> dict[str, list[str]]:
    """The local jobs of each group in `keys.peers`, sorted once (a snapshot may bring thousands of peers)."""
    return {group: sorted(want.group_jobs.get(group, ())) for group in {g for g, _ in keys.peers}}


def _job_neigh_deletes(want: Wanted, observed: Observed, keys: Keys) -> list[Step]:
    """Permanent entries no peer needs: in the jobs of `keys.jobs` all of them (one DeleteJobNeigh per job),
    elsewhere those of the addresses in `keys.peers` (one WithdrawJobNeigh per address). Jobs that go or have
    no eth0 lose their entries with it."""
    out: list[Step] = []
    for job_id in sorted(keys.jobs):
        have = observed.job_neigh.get(job_id)
        if not have or job_id not in want.jobs:
            continue
        peers, own = want.peers.get(want.job_group[job_id], NO_PEERS), want.job_ip.get(job_id)
        if own in have or not have.keys() <= peers.keys():
            stale = tuple(sorted((ip, mac) for ip, mac in have.items() if ip == own or ip not in peers))
            out.append(DeleteJobNeigh(job_id, names.job_netns(job_id), stale))
    members = _members(want, keys)
    job_neigh = observed.job_neigh
    for group, ip in sorted(keys.peers):
        if ip in want.peers.get(group, NO_PEERS):
            # still a peer: only a local job of that address itself may hold it (its claimants "0<job id>")
            candidates = sorted(c[1:] for c in want.claims.get((group, ip), ()) if c[0] == "0")
        else:
            candidates = members[group]
        holders = tuple(job_id for job_id in candidates if job_id not in keys.jobs
                        and ip in job_neigh.get(job_id, NO_PEERS))
        if holders:
            out.append(WithdrawJobNeigh(ip, holders))
    return out


def _job_neigh_creates(want: Wanted, have_model: Observed, keys: Keys, fresh: set[str]) -> list[Step]:
    """Missing or wrong (other MAC, not permanent) entries of the peers: in the jobs of `keys.jobs` all
    of them (one ReplaceJobNeigh per job), elsewhere those of the addresses in `keys.peers` (one
    SpreadJobNeigh per address, last: the group's convergence)."""
    out: list[Step] = []
    for job_id in sorted(keys.jobs):
        if job_id not in want.jobs:
            continue
        have = NO_PEERS if job_id in fresh else have_model.job_neigh.get(job_id)
        if have is None:
            continue  # no eth0, and none made in this plan: nothing to put entries on
        peers, own = want.peers.get(want.job_group[job_id], NO_PEERS), want.job_ip.get(job_id)
        if not _in_sync(have, peers, own):
            # (the group's peers in their own order: a new job of a big group gets hundreds)
            if not have:
                missing = tuple(e for e in peers.items() if e[0] != own) if own in peers else tuple(peers.items())
            else:
                missing = tuple(e for e in peers.items() if e[0] != own and have.get(e[0]) != e[1])
            if missing:
                out.append(ReplaceJobNeigh(job_id, names.job_netns(job_id), missing))
    members = _members(want, keys)
    job_neigh, job_ip = have_model.job_neigh, want.job_ip
    for group, ip in sorted(keys.peers):
        mac = want.peers.get(group, NO_PEERS).get(ip)
        if mac is None:
            continue
        # (one pass in a comprehension: a spread into a 500-job group checks 499 namespaces' entries)
        lacking = [job_id for job_id in members[group]
                   if (have := job_neigh.get(job_id)) is not None and have.get(ip) != mac]
        lacking = [job_id for job_id in lacking if job_id not in keys.jobs and job_id not in fresh
                   and ip != job_ip.get(job_id)]
        if lacking:
            out.append(SpreadJobNeigh(ip, mac, tuple(lacking)))
    return out


# -- the model after a step ------------------------------------------------------------------------


def advance(model: Observed, step: Step, settings: NetSettings) -> None:
    """Update `model` in place to what the kernel holds after `step` succeeded."""
    match step:
        case DeleteJobNetwork(job_id=job_id, host_ifname=host):
            model.jobs.pop(job_id, None)
            model.job_neigh.pop(job_id, None)
            model.links.pop(host, None)
            _drop_bridge_fdb(model, host)
        case DeleteLink(ifname=ifname):
            _drop_bridge_fdb(model, ifname)
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
                        model.links[name] = replace(lk, master="", learning=None)
            elif link.kind == "veth":
                job_id = ifname[len(HOST_VETH_PREFIX):]
                ns = model.jobs.get(job_id)
                if ns is not None and names.host_veth(job_id) == ifname:
                    model.jobs[job_id] = replace(ns, eth0=None)  # the peer died with it, and its entries
                    model.job_neigh.pop(job_id, None)
        case DeleteFdb(dev=dev, mac=mac, dst=dst):
            key = fdb_key(FdbEntry(dev, mac, dst))
            e = model.fdb.get(key)
            if e is not None and (e.mac, e.dst) == (mac, dst):
                del model.fdb[key]
        case DeleteNeigh(dev=dev, ip=ip, mac=mac):
            n = model.neigh.get((dev, ip))
            if n is not None and n.mac == mac:
                del model.neigh[(dev, ip)]
        case DeleteBridgeFdb(bridge=bridge, port=port, mac=mac):
            b = model.bridge_fdb.get((bridge, mac))
            if b is not None and b.port == port:
                del model.bridge_fdb[(bridge, mac)]
        case ReplaceBridgeFdb(bridge=bridge, port=port, mac=mac):
            model.bridge_fdb[(bridge, mac)] = BridgeFdbEntry(bridge, mac, port)
        case DeleteJobNeigh(job_id=job_id, entries=entries):
            have = model.job_neigh.get(job_id)
            if have is not None:
                for ip, _ in entries:
                    have.pop(ip, None)
        case ReplaceJobNeigh(job_id=job_id, entries=entries):
            model.job_neigh.setdefault(job_id, {}).update(entries)
        case SpreadJobNeigh(ip=ip, mac=mac, jobs=jobs):
            advance_spread(model, ip, mac, jobs)
        case WithdrawJobNeigh(ip=ip, jobs=jobs):
            for job_id in jobs:
                have = model.job_neigh.get(job_id)
                if have is not None:
                    have.pop(ip, None)
        case CreateBridge(ifname=ifname, mtu=mtu):
            model.links[ifname] = bridge_link(ifname, mtu)
        case CreateVxlan(ifname=ifname, vni=vni, bridge=bridge, mtu=mtu):
            model.links[ifname] = vxlan_link(ifname, vni, bridge, mtu, settings)
        case SetLink(ifname=ifname, mtu=mtu, master=master, up=up):
            if ifname in model.links:
                if model.links[ifname].master != master:  # a port that leaves a bridge loses its entries there
                    _drop_bridge_fdb(model, ifname)
                model.links[ifname] = replace(model.links[ifname], mtu=mtu, master=master, up=up)
        case AddFloodEntry(dev=dev, dst=dst):
            e = FdbEntry(dev, ZERO_MAC, dst)
            model.fdb[fdb_key(e)] = e
        case ReplaceFdb(dev=dev, mac=mac, dst=dst):
            e = FdbEntry(dev, mac, dst)
            model.fdb[fdb_key(e)] = e
        case ReplaceNeigh(dev=dev, ip=ip, mac=mac):
            model.neigh[(dev, ip)] = NeighEntry(dev, ip, mac)
        case SetJobPort(job=spec):
            _drop_bridge_fdb(model, spec.host_ifname, keep_bridge=spec.bridge)  # a port leaving a bridge loses them
            model.links[spec.host_ifname] = host_veth_link(spec)
        case CreateJobNetwork(job=spec) | ConfigureJob(job=spec):
            # A new veth has no bridge FDB entries; one moved to another bridge has none left on the old one.
            # (Entries only exist for ports that exist: a port the model does not have has none to drop, and
            # a new job's does not cost a walk over every job's entries.)
            moved = isinstance(step, ConfigureJob) and not step.recreate_veth
            if spec.host_ifname in model.links:
                _drop_bridge_fdb(model, spec.host_ifname, keep_bridge=spec.bridge if moved else "")
            model.jobs[spec.job_id] = job_ns(spec)
            model.job_neigh[spec.job_id] = {}  # a new eth0, or one whose MAC was set: no entries
            model.links[spec.host_ifname] = host_veth_link(spec)


def advance_spread(model: Observed, ip: bytes, mac: bytes, jobs: tuple[str, ...] | list[str]) -> None:
    """The model after `ip -> mac` was written into these jobs' namespaces (all of a SpreadJobNeigh, or
    those of them that succeeded)."""
    job_neigh = model.job_neigh
    for job_id in jobs:
        have = job_neigh.get(job_id)
        if have is None:
            job_neigh[job_id] = {ip: mac}
        else:
            have[ip] = mac


def _drop_bridge_fdb(model: Observed, ifname: str, keep_bridge: str = "") -> None:
    """The bridge FDB entries that go with link `ifname` (a port, or a bridge), but those on `keep_bridge`."""
    if model.bridge_fdb:
        for key in [k for k, b in model.bridge_fdb.items()
                    if (b.port == ifname or b.bridge == ifname) and b.bridge != keep_bridge]:
            del model.bridge_fdb[key]
