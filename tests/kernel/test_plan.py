"""The pure planner: order of steps, what is (not) touched, repair of drift, and that the incremental
plan (desired diff) always equals the full plan. No root needed: the model is advanced step by step."""

from __future__ import annotations

import ipaddress
import random
from dataclasses import replace
from pathlib import Path

import pytest

from nodeagent.desired import Changes, DesiredState, GroupSpec, LocalJob, RemoteEndpoint
from nodeagent.kernel.model import BridgeFdbEntry, FdbEntry, JobNs, NeighEntry, NetSettings, Observed
from nodeagent.kernel.plan import advance, plan, plan_wanted, update_wanted, wanted
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
    JobNeighEntry,
    ReplaceBridgeFdb,
    ReplaceFdb,
    ReplaceJobNeigh,
    ReplaceNeigh,
    SetJobPort,
    SetLink,
    SpreadJobNeigh,
    Step,
    WithdrawJobNeigh,
    job_neigh_entries,
)

S = NetSettings(netns_dir=Path("/nonexistent"), underlay_ifname="jnu0", underlay_ip="198.18.0.1")
GA = GroupSpec("a", 100, "10.40.0.0/24", "10.40.0.1", 1450)
GB = GroupSpec("b", 200, "10.41.0.0/24", "10.41.0.1", 1400)


def job(i: int, group: GroupSpec = GA) -> LocalJob:
    net = group.subnet.rsplit(".", 2)[0] + ".0"
    return LocalJob(f"{i:010x}", group.name, f"{net}.{i + 2}", f"02:00:00:00:{group.vni % 256:02x}:{i:02x}", ("true",))


def ep(i: int, node: int, group: GroupSpec = GA) -> RemoteEndpoint:
    net = group.subnet.rsplit(".", 2)[0] + ".0"
    return RemoteEndpoint(group.name, f"e{i:09x}", f"n{node}", f"198.18.0.{node}", f"{net}.{100 + i}",
                          f"02:00:00:01:{group.vni % 256:02x}:{i:02x}")


def state(groups: list[GroupSpec], jobs: list[LocalJob], eps: list[RemoteEndpoint], rev: int = 1) -> DesiredState:
    return DesiredState(rev, {g.name: g for g in groups}, {j.id: j for j in jobs}, {e.job_id: e for e in eps})


def converge(desired: DesiredState, model: Observed) -> list[Step]:
    steps = plan(desired, model, S)
    for s in steps:
        advance(model, s, S)
    return steps


def test_from_scratch_creates_in_dependency_order_and_converges() -> None:
    d = state([GA], [job(1)], [ep(1, 2), ep(2, 3), ep(3, 1)])  # ep(3, 1) is on our own underlay address
    model = Observed()
    steps = converge(d, model)
    kinds = [type(s) for s in steps]
    assert kinds.index(CreateBridge) < kinds.index(CreateVxlan) < kinds.index(AddFloodEntry)
    assert max(i for i, k in enumerate(kinds) if k in (AddFloodEntry, ReplaceFdb, ReplaceNeigh)) < kinds.index(
        CreateJobNetwork)
    assert {s for s in steps if isinstance(s, AddFloodEntry)} == {
        AddFloodEntry("jnx100", "198.18.0.2"), AddFloodEntry("jnx100", "198.18.0.3")}
    assert ReplaceFdb("jnx100", ep(1, 2).mac, "198.18.0.2") in steps
    assert ReplaceNeigh("jnx100", ep(2, 3).ip, ep(2, 3).mac) in steps
    assert not any(getattr(s, "dst", "") == S.underlay_ip for s in steps)  # never towards ourselves
    create = next(s for s in steps if isinstance(s, CreateJobNetwork))
    assert (create.job.bridge, create.job.ip, create.job.prefixlen, create.job.mtu, create.job.gateway) == (
        "jnb100", job(1).ip, 24, 1450, "10.40.0.1")
    assert plan(d, model, S) == []


def test_flood_entries_only_towards_nodes_hosting_the_group() -> None:
    d = state([GA, GB], [job(1), job(2, GB)], [ep(1, 2), ep(2, 3, GB), ep(3, 3, GB)])
    steps = converge(d, Observed())
    floods = {(s.dev, s.dst) for s in steps if isinstance(s, AddFloodEntry)}
    assert floods == {("jnx100", "198.18.0.2"), ("jnx200", "198.18.0.3")}


def test_removed_group_deletes_jobs_then_vxlan_then_bridge_and_leaves_entries_to_the_device() -> None:
    model = Observed()
    converge(state([GA, GB], [job(1), job(2, GB)], [ep(1, 2), ep(2, 3, GB)]), model)
    steps = converge(state([GB], [job(2, GB)], [ep(2, 3, GB)]), model)
    assert steps == [DeleteJobNetwork(job(1).id, f"jnj-{job(1).id}", f"jnv{job(1).id}", gone=True),
                     DeleteLink("jnx100"), DeleteLink("jnb100")]
    assert all(e.dev == "jnx200" for e in model.fdb.values())


def test_stale_entries_deleted_and_moved_endpoint_replaced_in_place() -> None:
    model = Observed()
    converge(state([GA], [], [ep(1, 2), ep(2, 2)]), model)
    stray_fdb = FdbEntry("jnx100", "02:aa:00:00:00:01", "198.18.0.9")
    stray_neigh = NeighEntry("jnx100", "10.40.0.250", "02:aa:00:00:00:01")
    model.fdb[("jnx100", stray_fdb.mac, "")] = stray_fdb
    model.neigh[("jnx100", stray_neigh.ip)] = stray_neigh
    moved = replace(ep(1, 2), node="n4", underlay_ip="198.18.0.4")
    steps = converge(state([GA], [], [moved, ep(2, 2)]), model)
    assert DeleteFdb("jnx100", stray_fdb.mac, stray_fdb.dst) in steps
    assert DeleteNeigh("jnx100", stray_neigh.ip, stray_neigh.mac) in steps
    assert ReplaceFdb("jnx100", moved.mac, "198.18.0.4") in steps
    assert AddFloodEntry("jnx100", "198.18.0.4") in steps
    # ep(2) still lives on node 2: its flood entry stays; the moved MAC is replaced, not deleted first
    assert not any(isinstance(s, DeleteFdb) and s.dst == "198.18.0.2" for s in steps)
    steps = converge(state([GA], [], [moved]), model)
    assert DeleteFdb("jnx100", "00:00:00:00:00:00", "198.18.0.2") in steps


def test_malformed_vxlan_is_recreated_with_its_entries() -> None:
    model = Observed()
    d = state([GA], [job(1)], [ep(1, 2)])
    converge(d, model)
    vx = model.links["jnx100"]
    assert vx.vxlan is not None
    model.links["jnx100"] = replace(vx, vxlan=replace(vx.vxlan, learning=True))
    steps = converge(d, model)
    assert steps[0] == DeleteLink("jnx100")
    assert CreateVxlan("jnx100", 100, "jnb100", 1450) in steps
    assert AddFloodEntry("jnx100", "198.18.0.2") in steps and ReplaceNeigh("jnx100", ep(1, 2).ip, ep(1, 2).mac) in steps
    assert not any(isinstance(s, (CreateJobNetwork, ConfigureJob)) for s in steps)


def test_recreated_bridge_gets_its_ports_back() -> None:
    model = Observed()
    d = state([GA], [job(1)], [])
    converge(d, model)
    br = model.links["jnb100"]
    assert br.bridge is not None
    model.links["jnb100"] = replace(br, bridge=replace(br.bridge, stp=True))
    steps = converge(d, model)
    assert steps[:2] == [DeleteLink("jnb100"), CreateBridge("jnb100", 1450)]
    assert SetLink("jnx100", 1450, "jnb100", True) in steps
    # the job's port is attached again (and gets its static FDB entry again); its namespace is left alone
    assert SetJobPort(steps[-2].job) in steps and steps[-1] == ReplaceBridgeFdb(  # type: ignore[union-attr]
        "jnb100", f"jnv{job(1).id}", job(1).mac)
    assert not any(isinstance(s, (ConfigureJob, ReplaceJobNeigh)) for s in steps)


def test_job_drift_repaired() -> None:
    model = Observed()
    d = state([GA], [job(1), job(2)], [])
    converge(d, model)
    j1, j2 = job(1).id, job(2).id
    del model.links[f"jnv{j1}"]  # veth deleted by hand
    eth0 = model.jobs[j2].eth0
    assert eth0 is not None
    model.jobs[j2] = replace(model.jobs[j2], eth0=replace(eth0, gateway=""))  # default route deleted
    steps = plan(d, model, S)
    assert [(type(s), s.job.job_id, s.recreate_veth) for s in steps if isinstance(s, ConfigureJob)] == [
        (ConfigureJob, j1, True), (ConfigureJob, j2, False)]
    model.jobs[j1] = JobNs(j1, usable=False)  # a namespace file that is no namespace any more
    steps = plan(d, model, S)
    assert steps.index(DeleteJobNetwork(j1, f"jnj-{j1}", f"jnv{j1}")) < steps.index(
        next(s for s in steps if isinstance(s, CreateJobNetwork)))


def test_stray_job_veth_without_namespace_is_deleted_before_the_job_is_made() -> None:
    model = Observed()
    d = state([GA], [job(1)], [])
    converge(d, model)
    del model.jobs[job(1).id]  # namespace file gone, veth still there (a process pins the namespace)
    steps = plan(d, model, S)
    assert steps == [DeleteLink(f"jnv{job(1).id}"), CreateJobNetwork(steps[1].job),  # type: ignore[union-attr]
                     ReplaceBridgeFdb("jnb100", f"jnv{job(1).id}", job(1).mac)]  # the old veth's died with it


def test_group_mtu_change_repairs_devices_and_jobs() -> None:
    model = Observed()
    converge(state([GA], [job(1)], []), model)
    steps = converge(state([replace(GA, mtu=1300)], [job(1)], []), model)
    assert SetLink("jnb100", 1300, "", True) in steps and SetLink("jnx100", 1300, "jnb100", True) in steps
    assert any(isinstance(s, ConfigureJob) and s.job.mtu == 1300 for s in steps)


def test_job_without_its_group_is_left_alone() -> None:
    steps = plan(state([], [job(1)], [ep(1, 2)]), Observed(), S)
    assert steps == []


@pytest.mark.parametrize("hinted", [False, True], ids=["compared", "delta-hinted"])
def test_incremental_plan_equals_full_plan(hinted: bool) -> None:
    """Patching the wanted state by a delta gives the plan a full plan gives, whether the reconciler compares
    every job and endpoint or only those the delta names (`DesiredState.changes`, as apply_update sets it)."""
    rng = random.Random(7)
    jobs = [job(i, rng.choice([GA, GB])) for i in range(30)]
    eps = [ep(i, rng.choice([2, 3, 4]), rng.choice([GA, GB])) for i in range(40)]
    prev = state([GA, GB], [], [])
    model = Observed()
    converge(prev, model)
    want = wanted(prev, S)
    for rev in range(60):
        def vary(e: RemoteEndpoint) -> RemoteEndpoint:
            r = rng.random()
            if r < 0.15:  # moved to another node
                return replace(e, underlay_ip=f"198.18.0.{rng.choice([2, 3, 4])}")
            if r < 0.25:  # another MAC
                return replace(e, mac=f"02:00:00:02:00:{rng.randrange(256):02x}")
            if r < 0.35:  # the address of a job (of its group or not): two claims on one address
                return replace(e, ip=rng.choice(jobs).ip)
            return e

        cur = state([GA, GB], rng.sample(jobs, rng.randint(0, 12)),
                    [vary(e) for e in rng.sample(eps, rng.randint(0, 15))], rev)
        if hinted:  # what a delta from prev would name: everything upserted or removed (a superset is fine)
            touched_jobs = {j for j in prev.jobs.keys() | cur.jobs.keys() if prev.jobs.get(j) != cur.jobs.get(j)}
            touched_eps = {e for e in prev.endpoints.keys() | cur.endpoints.keys()
                           if prev.endpoints.get(e) != cur.endpoints.get(e) or rng.random() < 0.1}
            cur = replace(cur, changes=Changes(prev.revision, frozenset(touched_jobs), frozenset(touched_eps)))
        keys = update_wanted(want, prev, cur, S)
        assert keys is not None
        incremental = plan_wanted(want, model, S, keys)
        full = plan(cur, model, S)
        # the same entries (grouped per job by the full plan, per address by the incremental one)
        assert sorted(map(repr, others(incremental))) == sorted(map(repr, others(full))), rev
        assert sorted(jentries(incremental)) == sorted(jentries(full)), rev
        for s in full:
            advance(model, s, S)
        assert plan(cur, model, S) == []
        prev = cur
    assert update_wanted(want, prev, state([GA], [], []), S) is None  # a group changed: plan in full


def test_job_id_that_cannot_name_kernel_objects_is_rejected_not_truncated() -> None:
    bad = replace(job(1), id="../../etc/x")
    long = replace(job(2), id="0123456789abcdef")  # jnv<id> would be cut to 15 characters
    w = wanted(state([GA], [bad, long, job(3)], []), S)
    assert set(w.rejected) == {bad.id, long.id}
    assert set(w.jobs) == {job(3).id}


# -- permanent neighbour entries in job namespaces -------------------------------------------------


def jn(job_id: str, peer: LocalJob | RemoteEndpoint, op: str = "replace") -> JobNeighEntry:
    return (op, job_id, peer.ip, peer.mac if op == "replace" else "")


def jentries(steps: list[Step], op: str = "") -> list[JobNeighEntry]:
    """The single job neighbour entries of the plan's steps (deletes without the MAC)."""
    out = [(o, j, ip, mac if o == "replace" else "") for s in steps for o, j, ip, mac in job_neigh_entries(s)]
    return [e for e in out if not op or e[0] == op]


def others(steps: list[Step]) -> list[Step]:
    return [s for s in steps if not job_neigh_entries(s) and not isinstance(s, JOB_NEIGH)]


JOB_NEIGH = (ReplaceJobNeigh, DeleteJobNeigh, SpreadJobNeigh, WithdrawJobNeigh)


def test_every_job_gets_a_permanent_entry_for_every_peer_after_its_network() -> None:
    d = state([GA, GB], [job(1), job(2), job(3, GB)], [ep(1, 2), ep(2, 3, GB), ep(3, 1)])  # ep(3, 1): our underlay
    model = Observed()
    steps = converge(d, model)
    got = jentries(steps)
    assert sorted(got) == sorted([jn(job(1).id, job(2)), jn(job(1).id, ep(1, 2)), jn(job(1).id, ep(3, 1)),
                                  jn(job(2).id, job(1)), jn(job(2).id, ep(1, 2)), jn(job(2).id, ep(3, 1)),
                                  jn(job(3, GB).id, ep(2, 3, GB))])
    kinds = [type(s) for s in steps]
    assert kinds.index(ReplaceJobNeigh) > max(i for i, k in enumerate(kinds) if k is CreateJobNetwork)
    assert kinds.count(ReplaceJobNeigh) == 3  # one per new job, all its peers at once
    assert plan(d, model, S) == []


def test_a_peer_that_comes_or_goes_costs_one_entry_per_job_of_its_group() -> None:
    n = 30
    jobs = [job(i) for i in range(1, n)]
    model = Observed()
    want = wanted(state([GA], jobs, [ep(1, 2)]), S)
    converge(state([GA], jobs, [ep(1, 2)]), model)
    prev = state([GA], jobs, [ep(1, 2)])
    # the n-th local job: its network, its n peers (n-1 local, 1 remote), and its entry in the n-1 others
    cur = state([GA], [*jobs, job(n)], [ep(1, 2)], 2)
    keys = update_wanted(want, prev, cur, S)
    assert keys is not None
    steps = plan_wanted(want, model, S, keys)
    # ONE step for the new job's n peers, ONE that spreads its entry into the n-1 others
    assert [type(s) for s in steps] == [CreateJobNetwork, ReplaceBridgeFdb, ReplaceJobNeigh, SpreadJobNeigh]
    assert len(jentries(steps)) == 2 * n - 1
    assert {e for e in jentries(steps) if e[1] != job(n).id} == {jn(j.id, job(n)) for j in jobs}
    for s in steps:
        advance(model, s, S)
    assert plan(cur, model, S) == []
    # a remote peer leaves: one delete per local job; nothing else
    prev, cur = cur, state([GA], [*jobs, job(n)], [], 3)
    keys = update_wanted(want, prev, cur, S)
    assert keys is not None
    steps = plan_wanted(want, model, S, keys)
    gone = [jn(j.id, ep(1, 2), "delete") for j in [*jobs, job(n)]]
    assert sorted(map(repr, others(steps))) == sorted(repr(s) for s in [
        DeleteFdb("jnx100", "00:00:00:00:00:00", "198.18.0.2"), DeleteFdb("jnx100", ep(1, 2).mac, "198.18.0.2"),
        DeleteNeigh("jnx100", ep(1, 2).ip, ep(1, 2).mac), DeleteBridgeFdb("jnb100", "jnx100", ep(1, 2).mac)])
    assert sorted(jentries(steps)) == sorted(gone) and sum(isinstance(s, WithdrawJobNeigh) for s in steps) == 1


def test_drifted_job_entries_are_repaired_and_strangers_removed() -> None:
    d = state([GA], [job(1), job(2)], [ep(1, 2)])
    model = Observed()
    converge(d, model)
    have = model.job_neigh[job(1).id]
    ip = lambda x: ipaddress.IPv4Address(x).packed  # noqa: E731
    del have[ip(job(2).ip)]  # deleted by hand, or not permanent any more (observe keeps only permanent ones)
    have[ip(ep(1, 2).ip)] = bytes(6)  # another MAC
    have[ip("10.40.0.250")] = bytes(6)  # a permanent entry no peer needs
    have[ip(job(1).ip)] = bytes(6)  # one for its own address
    steps = plan(d, model, S)
    assert sorted(jentries(steps)) == sorted([
        jn(job(1).id, job(2)), jn(job(1).id, ep(1, 2)),
        ("delete", job(1).id, "10.40.0.250", ""), ("delete", job(1).id, job(1).ip, "")])
    assert [type(s) for s in steps] == [DeleteJobNeigh, ReplaceJobNeigh]
    for s in steps:
        advance(model, s, S)
    assert plan(d, model, S) == []
    # a job whose eth0 is configured anew (here: its default route was gone) gets all its entries again
    eth0 = model.jobs[job(2).id].eth0
    assert eth0 is not None
    model.jobs[job(2).id] = replace(model.jobs[job(2).id], eth0=replace(eth0, gateway=""))
    steps = plan(d, model, S)
    assert [type(s) for s in steps] == [ConfigureJob, ReplaceJobNeigh] and len(jentries(steps)) == 2


def test_two_claims_on_one_address_resolve_to_the_local_job_then_the_endpoint() -> None:
    moving = replace(ep(7, 2), ip=job(2).ip, mac="02:00:00:09:09:09")  # job 2, still listed on node 2
    d1 = state([GA], [job(1), job(2)], [moving])
    model = Observed()
    converge(d1, model)
    assert model.job_neigh[job(1).id][ipaddress.IPv4Address(job(2).ip).packed] == bytes.fromhex(
        job(2).mac.replace(":", ""))
    want = wanted(d1, S)
    d2 = state([GA], [job(1)], [moving], 2)  # the local one goes: the endpoint's MAC takes over
    keys = update_wanted(want, d1, d2, S)
    assert keys is not None
    steps = plan_wanted(want, model, S, keys)
    full = plan(d2, model, S)
    assert jn(job(1).id, moving) in jentries(steps) and sorted(jentries(steps)) == sorted(jentries(full))
    assert sorted(map(repr, others(steps))) == sorted(map(repr, others(full)))


def test_malformed_peer_gets_no_entries_and_is_reported() -> None:
    bad = replace(ep(1, 2), mac="02:zz:00:00:00:01")
    w = wanted(state([GA], [job(1)], [bad, ep(2, 2)]), S)
    assert set(w.bad_peers) == {"1" + bad.job_id} and "02:zz" in w.bad_peers["1" + bad.job_id]
    assert [ipaddress.IPv4Address(x).packed for x in (job(1).ip, ep(2, 2).ip)] == sorted(w.peers["a"])


# -- static bridge FDB entries of local jobs ---------------------------------------------------------


def bfdb(j: LocalJob, group: GroupSpec = GA) -> BridgeFdbEntry:
    return BridgeFdbEntry(f"jnb{group.vni}", j.mac, f"jnv{j.id}")


def test_every_local_job_gets_a_static_bridge_fdb_entry_on_its_port_which_dies_with_it() -> None:
    d = state([GA, GB], [job(1), job(2), job(3, GB)], [ep(1, 2), ep(2, 3, GB)])
    model = Observed()
    steps = converge(d, model)
    got = [s for s in steps if isinstance(s, ReplaceBridgeFdb)]
    # the local jobs' on their ports, and the remote endpoints' on their group's VXLAN port
    remote = (BridgeFdbEntry("jnb100", ep(1, 2).mac, "jnx100"), BridgeFdbEntry("jnb200", ep(2, 3, GB).mac, "jnx200"))
    want = (bfdb(job(1)), bfdb(job(2)), bfdb(job(3, GB), GB), *remote)
    assert sorted(got, key=repr) == sorted((ReplaceBridgeFdb(b.bridge, b.port, b.mac) for b in want), key=repr)
    kinds = [type(s) for s in steps]
    # after the job networks (the ports), before the job namespaces' neighbour entries; in one run (one batch)
    first = kinds.index(ReplaceBridgeFdb)
    assert max(i for i, k in enumerate(kinds) if k is CreateJobNetwork) < first
    assert kinds[first:first + 5] == [ReplaceBridgeFdb] * 5 and kinds.index(ReplaceJobNeigh) == first + 5
    assert model.bridge_fdb == {(b.bridge, b.mac): b for b in want}
    assert all(model.links[f"jnv{j.id}"].learning is False for j in (job(1), job(2), job(3, GB)))
    assert plan(d, model, S) == []
    # A job goes: its entry goes with its veth (no step); the model agrees.
    steps = converge(state([GA, GB], [job(1), job(3, GB)], [ep(1, 2), ep(2, 3, GB)]), model)
    assert not any(isinstance(s, (DeleteBridgeFdb, ReplaceBridgeFdb)) for s in steps)
    assert set(model.bridge_fdb) == {("jnb100", job(1).mac), ("jnb200", job(3, GB).mac), ("jnb100", ep(1, 2).mac),
                                     ("jnb200", ep(2, 3, GB).mac)}
    # A group goes: so do its bridge and every entry on it.
    converge(state([GB], [job(3, GB)], [ep(2, 3, GB)]), model)
    assert set(model.bridge_fdb) == {("jnb200", job(3, GB).mac), ("jnb200", ep(2, 3, GB).mac)}


def test_bridge_fdb_drift_is_repaired_and_strangers_removed() -> None:
    d = state([GA], [job(1), job(2), job(3)], [ep(1, 2)])
    model = Observed()
    converge(d, model)
    j1, j2, j3 = job(1), job(2), job(3)
    del model.bridge_fdb[("jnb100", j1.mac)]  # deleted by hand (or made dynamic: observe keeps static ones only)
    model.bridge_fdb[("jnb100", j2.mac)] = replace(bfdb(j2), port=f"jnv{j3.id}")  # on the wrong port
    model.bridge_fdb[("jnb100", j3.mac)] = replace(bfdb(j3), sticky=False)  # learning could move it
    stranger = BridgeFdbEntry("jnb100", "02:aa:00:00:00:01", f"jnv{j1.id}")  # a static entry no job needs
    on_vxlan = BridgeFdbEntry("jnb100", "02:aa:00:00:00:02", "jnx100")
    for b in (stranger, on_vxlan):
        model.bridge_fdb[(b.bridge, b.mac)] = b
    steps = plan(d, model, S)
    assert sorted(map(repr, steps)) == sorted(map(repr, [
        ReplaceBridgeFdb("jnb100", f"jnv{j1.id}", j1.mac), ReplaceBridgeFdb("jnb100", f"jnv{j2.id}", j2.mac),
        ReplaceBridgeFdb("jnb100", f"jnv{j3.id}", j3.mac), DeleteBridgeFdb("jnb100", f"jnv{j1.id}", stranger.mac),
        DeleteBridgeFdb("jnb100", "jnx100", on_vxlan.mac)]))
    for s in steps:
        advance(model, s, S)
    assert plan(d, model, S) == []
    # Learning turned on by hand on a job's port: only the port is set again; its entry stays (same bridge).
    model.links[f"jnv{j1.id}"] = replace(model.links[f"jnv{j1.id}"], learning=True)
    steps = plan(d, model, S)
    assert steps == [SetJobPort(wanted(d, S).jobs[j1.id])]
    for s in steps:
        advance(model, s, S)
    assert plan(d, model, S) == []
    # A stranger on the port of a job that goes is not deleted: it dies with the veth.
    model.bridge_fdb[(stranger.bridge, stranger.mac)] = stranger
    steps = plan(state([GA], [job(2), job(3)], [ep(1, 2)]), model, S)
    assert [type(s) for s in steps] == [DeleteJobNetwork, DeleteJobNeigh, DeleteJobNeigh]  # j1 from j2 and j3
    assert sorted(jentries(steps)) == [("delete", j2.id, j1.ip, ""), ("delete", j3.id, j1.ip, "")]
    for s in steps:
        advance(model, s, S)
    assert ("jnb100", stranger.mac) not in model.bridge_fdb


def test_a_recreated_bridge_or_veth_gets_its_entries_again() -> None:
    model = Observed()
    d = state([GA], [job(1)], [])
    converge(d, model)
    br = model.links["jnb100"]
    assert br.bridge is not None
    model.links["jnb100"] = replace(br, bridge=replace(br.bridge, stp=True))
    steps = converge(d, model)
    assert ReplaceBridgeFdb("jnb100", f"jnv{job(1).id}", job(1).mac) in steps
    del model.links[f"jnv{job(1).id}"]  # veth deleted by hand
    steps = converge(d, model)
    assert [type(s) for s in steps] == [ConfigureJob, ReplaceBridgeFdb]


def test_two_local_jobs_with_one_mac_the_smallest_job_id_gets_the_entry() -> None:
    twin = replace(job(2), mac=job(1).mac)
    d1 = state([GA], [job(1), twin], [])
    model = Observed()
    converge(d1, model)
    assert model.bridge_fdb == {("jnb100", job(1).mac): bfdb(job(1))}
    want = wanted(d1, S)
    d2 = state([GA], [twin], [], 2)
    keys = update_wanted(want, d1, d2, S)
    assert keys is not None
    steps = plan_wanted(want, model, S, keys)
    assert ReplaceBridgeFdb("jnb100", f"jnv{twin.id}", twin.mac) in steps
    full = plan(d2, model, S)
    assert sorted(map(repr, others(steps))) == sorted(map(repr, others(full)))
    assert sorted(jentries(steps)) == sorted(jentries(full))


def test_delta_hints_from_another_base_are_not_trusted() -> None:
    """A state whose `changes` are relative to another revision than the one planned last is compared whole
    (the agent may reconcile after several deltas: each one's hint covers only itself)."""
    prev = state([GA], [job(1)], [], 1)
    want = wanted(prev, S)
    cur = replace(state([GA], [job(2)], [], 3), changes=Changes(2, frozenset({job(2).id}), frozenset()))
    keys = update_wanted(want, prev, cur, S)
    assert keys is not None and {job(1).id, job(2).id} <= keys.jobs, "job 1's removal is not in the hint: found"
    assert set(want.jobs) == {job(2).id}
