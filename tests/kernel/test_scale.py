"""Scale of the neighbour entries in job namespaces (a group of N local jobs needs N*(N-1) of them): the
200th job of a group costs O(N) kernel work, a full reconcile that changes nothing stays cheap. Prints its
numbers (pytest -s); the bounds asserted are loose (a shared 2-vCPU VM), the step counts exact."""

from __future__ import annotations

import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from nodeagent.desired import DesiredState, GroupSpec, LocalJob, RemoteEndpoint
from nodeagent.kernel.observe import job_netns_files, observe, observe_node
from nodeagent.kernel.steps import (
    CreateJobNetwork,
    DeleteJobNeigh,
    DeleteJobNetwork,
    ReplaceJobNeigh,
    Step,
    job_neigh_entries,
)

from .conftest import Node, World

pytestmark = [pytest.mark.root, pytest.mark.slow]

BIG = GroupSpec("s", 500, "10.50.0.0/16", "10.50.0.1", 1450)


def big_job(i: int) -> LocalJob:
    return LocalJob(f"01f4{i:06x}", "s", f"10.50.{i // 240}.{10 + i % 240}", f"02:01:00:00:{i >> 8:02x}:{i & 255:02x}",
                    ("true",))


def big_endpoint(i: int) -> RemoteEndpoint:
    return RemoteEndpoint("s", f"01f5{i:06x}", "n2", "198.18.0.2", f"10.50.{100 + i // 240}.{10 + i % 240}",
                          f"02:02:00:00:{i >> 8:02x}:{i & 255:02x}")


def state(jobs: int, endpoints: int = 0, rev: int = 1) -> DesiredState:
    return DesiredState(rev, {"s": BIG}, {j.id: j for j in map(big_job, range(jobs))},
                        {e.job_id: e for e in map(big_endpoint, range(endpoints))})


def cpu() -> float:
    """CPU time of this process (all threads, user + system): the kernel work of netlink requests is
    system time of the thread that sends them. Unlike wall time, barely moved by other load on the VM."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class Cost:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        median = statistics.median(self.wall)
        return (f"{min(self.wall) * 1e3:.1f} ms wall (min of {len(self.wall)}; median {median * 1e3:.1f}), "
                f"{min(self.cpu) * 1e3:.1f} ms CPU")


def timed(fn: Callable[[], list[Step]], cost: Cost | None = None) -> tuple[float, list[Step]]:
    c, t = cpu(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t
    if cost is not None:
        cost.wall.append(wall)
        cost.cpu.append(cpu() - c)
    return wall, out


def n_entries(steps: list[Step]) -> int:
    """The single job neighbour entries the steps write or delete."""
    return sum(len(job_neigh_entries(s)) for s in steps)


def kinds(steps: list[Step]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in steps:
        out[type(s).__name__] = out.get(type(s).__name__, 0) + 1
    return out


@pytest.mark.parametrize("endpoints", [0, 100])
def test_the_200th_job_of_a_group_costs_o_n_and_a_full_noop_reconcile_stays_cheap(world: World,
                                                                                   endpoints: int) -> None:
    n1 = world.nodes["n1"]
    rec = n1.rec
    assert rec is not None
    n = 200
    took, steps = timed(lambda: n1.reconcile(state(n - 1, endpoints)))
    entries = (n - 1) * (n - 2 + endpoints)
    assert kinds(steps)["ReplaceJobNeigh"] == n - 1 and n_entries(steps) == entries  # one step per job
    print(f"\n[{n} jobs in one group on n1, {endpoints} remote peers on n2]\n"
          f"  {n - 1} jobs from nothing, one reconcile: {took:.2f} s ({entries} job neighbour entries)")

    # The 200th job: its network, its 199 + endpoints peers (one step), its entry in the 199 others (one
    # step). O(N) entries, O(1) steps.
    add, remove = Cost(), Cost()
    one_job = {"CreateJobNetwork": 1, "ReplaceBridgeFdb": 1, "ReplaceJobNeigh": 1, "SpreadJobNeigh": 1}
    for rev in range(5):
        more, fewer = state(n, endpoints, rev + 2), state(n - 1, endpoints, rev + 10)
        _, steps = timed(lambda d=more: n1.reconcile(d), add)  # type: ignore[misc]
        assert kinds(steps) == one_job and n_entries(steps) == (n - 1) + (n - 1 + endpoints)
        _, steps = timed(lambda d=fewer: n1.reconcile(d), remove)  # type: ignore[misc]
        assert kinds(steps) == {"DeleteJobNetwork": 1, "WithdrawJobNeigh": 1} and n_entries(steps) == n - 1
    _, steps = timed(lambda: n1.reconcile(state(n, endpoints, 20)), add)
    assert kinds(steps) == one_job and n_entries(steps) == (n - 1) + (n - 1 + endpoints)
    print(f"  add the {n}th job (incremental, {2 * (n - 1) + endpoints} entries): {add}")
    print(f"  remove it again ({n - 1} entries): {remove}")
    assert min(add.wall) < 1.0

    full = state(n, endpoints, 20)
    total = n * (n - 1 + endpoints)
    noop, inc = Cost(), Cost()
    for _ in range(5):
        _, steps = timed(lambda: n1.reconcile(full, full=True), noop)
        assert steps == []
        _, steps = timed(lambda: n1.reconcile(full), inc)
        assert steps == []
    print(f"  full no-op reconcile ({total} entries known from notifications; {rec.settings.neigh_sweep} table "
          f"dumped as a cross-check): {noop}")
    print(f"  incremental no-op reconcile: {inc}")
    assert min(noop.wall) < 3.0

    # What the observation costs by how it reads the job namespaces' neighbour tables.
    files = job_netns_files(rec.settings.netns_dir)
    ways: dict[str, Callable[[str, int], bool] | None] = {
        "no table": lambda j, e: False, "one table (the sweep)": lambda j, e: j == big_job(0).id,
        "every table dumped": None}
    for what, whole in ways.items():
        cost = Cost()
        for _ in range(3):
            timed(lambda whole=whole: n1.call(lambda: [observe(rec._ns, files, whole)]), cost)  # type: ignore[misc]
        print(f"  observe, {what}: {cost}")
    print(f"  of which the node's namespace (links, FDB and neighbour dumps): {node_cost(n1)}")
    model = n1.call(rec.observed)
    assert sum(map(len, model.job_neigh.values())) == total
    assert len(model.bridge_fdb) == n + endpoints  # local MACs static on their ports, remote ones on the VXLAN port

    # A restarted reconciler reads every table whole once (then follows the notifications).
    n1.stop()
    n1.start()
    rec = n1.rec
    assert rec is not None
    first, then = Cost(), Cost()
    _, steps = timed(lambda: n1.reconcile(full, full=True), first)
    assert steps == []
    _, steps = timed(lambda: n1.reconcile(full, full=True), then)
    assert steps == []
    print(f"  after a restart: the first full reconcile (every table dumped) {first}; the next {then}")

    # Hand-made drift in one job is found (from the notifications) and repaired by the full reconcile.
    victim = big_job(7)
    assert n1.in_job(victim.id, "ip", "neigh", "flush", "dev", "eth0", "nud", "all").returncode == 0
    took, steps = timed(lambda: n1.reconcile(full, full=True))
    assert kinds(steps) == {"ReplaceJobNeigh": 1} and n_entries(steps) == n - 1 + endpoints
    assert {s.job_id for s in steps if isinstance(s, ReplaceJobNeigh)} == {victim.id}
    print(f"  full reconcile repairing one flushed job ({n - 1 + endpoints} entries): {took * 1e3:.0f} ms")
    for cls in (CreateJobNetwork, DeleteJobNetwork, DeleteJobNeigh):
        assert not any(isinstance(s, cls) for s in steps)

    # As on a node made before static bridge FDB entries: every job port learns and has no entry.
    jobs = [big_job(i) for i in range(n)]
    res = subprocess.run(["bridge", "-n", n1.netns, "-batch", "-"], capture_output=True, text=True, timeout=60,
                         input="".join(f"fdb del {j.mac} dev jnv{j.id} master\n" for j in jobs))
    assert res.returncode == 0, res.stderr
    res = subprocess.run(["ip", "-n", n1.netns, "-batch", "-"], capture_output=True, text=True, timeout=60,
                         input="".join(f"link set jnv{j.id} type bridge_slave learning on\n" for j in jobs))
    assert res.returncode == 0, res.stderr
    took, steps = timed(lambda: n1.reconcile(full, full=True))
    assert kinds(steps) == {"SetJobPort": n, "ReplaceBridgeFdb": n}
    print(f"  first full reconcile on a node made before static bridge FDB entries ({n} ports set, {n} entries):"
          f" {took * 1e3:.0f} ms")


def node_cost(node: Node) -> Cost:
    """What observing the node's own namespace costs: links (with the bridge ports' flags), one FDB dump
    (VXLAN devices' entries and the bridges' static ones) and one neighbour dump."""
    assert node.rec is not None
    label = node.rec._ns.label
    cost = Cost()
    for _ in range(5):
        timed(lambda: node.call(lambda: [observe_node(label)]), cost)  # type: ignore[misc]
    return cost


def spread(jobs: int, groups: int, rev: int = 1) -> DesiredState:
    """`jobs` local jobs dealt round robin into `groups` groups (of one /16 each)."""
    specs = {f"s{g}": GroupSpec(f"s{g}", 600 + g, f"10.{60 + g}.0.0/16", f"10.{60 + g}.0.1", 1450)
             for g in range(groups)}
    out = {}
    for i in range(jobs):
        g = i % groups
        out[f"0258{i:06x}"] = LocalJob(f"0258{i:06x}", f"s{g}", f"10.{60 + g}.{i // 240}.{10 + i % 240}",
                                       f"02:03:00:00:{i >> 8:02x}:{i & 255:02x}", ("true",))
    return DesiredState(rev, specs, out, {})


@pytest.mark.parametrize("groups", [10, 1])
def test_500_jobs_full_reconcile(world: World, groups: int) -> None:
    n1 = world.nodes["n1"]
    rec = n1.rec
    assert rec is not None
    n = 500
    per = n // groups
    took, steps = timed(lambda: n1.reconcile(spread(n - 1, groups)))
    print(f"\n[{n} jobs in {groups} group(s) of {per} on n1]\n  {n - 1} jobs from nothing, one reconcile: "
          f"{took:.2f} s ({n_entries(steps)} job neighbour entries)")
    add = Cost()
    for rev in range(3):
        _, steps = timed(lambda r=rev: n1.reconcile(spread(n, groups, 10 + 2 * r)), add)  # type: ignore[misc]
        assert kinds(steps) == {"CreateJobNetwork": 1, "ReplaceBridgeFdb": 1, "ReplaceJobNeigh": 1, "SpreadJobNeigh": 1}
        assert n_entries(steps) == 2 * (per - 1)
        n1.reconcile(spread(n - 1, groups, 11 + 2 * rev))
    _, steps = timed(lambda: n1.reconcile(spread(n, groups, 20)), add)
    print(f"  add the {n}th job (incremental, {2 * (per - 1)} entries): {add}")
    full, noop = spread(n, groups, 20), Cost()
    for _ in range(5):
        _, steps = timed(lambda: n1.reconcile(full, full=True), noop)
        assert steps == []
    print(f"  full no-op reconcile ({n * (per - 1)} entries known from notifications): {noop}")
    files = job_netns_files(rec.settings.netns_dir)
    base = Cost()
    for _ in range(3):
        timed(lambda: n1.call(lambda: [observe(rec._ns, files, lambda j, e: False)]), base)  # type: ignore[misc]
    print(f"  of which observing without any neighbour table: {base}")
    print(f"  of which the node's namespace (links, FDB and neighbour dumps): {node_cost(n1)}")
    assert len(n1.call(rec.observed).bridge_fdb) == n
    assert min(noop.wall) < 5.0
    n1.stop()
    n1.start()
    first = Cost()
    _, steps = timed(lambda: n1.reconcile(full, full=True), first)
    assert steps == []
    print(f"  after a restart, the first full reconcile (every table dumped once): {first}")
