"""Spare job network namespaces (nodeagent/kernel/spares.py): made ahead while idle, taken by the next jobs.
A job made from a spare must be indistinguishable from one made anew, and spares must never be mistaken
for jobs, nor outlive the agent. Real namespaces, two nodes (tests/kernel/conftest.py)."""

from __future__ import annotations

import json

import pytest

from .conftest import Node, World, sh
from .test_reconciler import job_neigh, learning, link, peers_of, ping_ok, populate

pytestmark = pytest.mark.root


def spare_files(node: Node) -> set[str]:
    return {p.name for p in node.netns_dir.iterdir() if p.name.startswith("jnp-")}


def spare_links(node: Node) -> set[str]:
    return {x["ifname"] for x in node.ip("link", "show") if x["ifname"].startswith("jnw")}


def check_job_network(world: World, node: Node, job_id: str) -> None:
    """What the reconciler promises of a job's network (as test_reconciler's convergence test checks)."""
    group, job = node.jobs[job_id]
    g = world.groups[group]
    host = link(node, f"jnv{job.id}")
    assert host is not None and host["master"] == f"jnb{g.vni}" and host["mtu"] == g.mtu and "UP" in host["flags"]
    assert not [a for a in node.ip("addr", "show", "dev", f"jnv{job.id}")[0]["addr_info"] if a["family"] == "inet6"]
    assert learning(node, f"jnv{job.id}") is False
    addrs = json.loads(node.in_job(job.id, "ip", "-j", "addr", "show").stdout)
    eth0 = next(a for a in addrs if a["ifname"] == "eth0")
    lo = next(a for a in addrs if a["ifname"] == "lo")
    assert eth0["address"] == job.mac and eth0["mtu"] == g.mtu and "UP" in eth0["flags"] and "UP" in lo["flags"]
    assert [(a["family"], a["local"], a["prefixlen"]) for a in eth0["addr_info"]] == [("inet", job.ip, 24)]
    routes = json.loads(node.in_job(job.id, "ip", "-j", "route", "show", "default").stdout)
    assert [(r["gateway"], r["dev"]) for r in routes] == [(g.gateway, "eth0")]
    v6 = node.in_job(job.id, "cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6",
                     "/proc/sys/net/ipv6/conf/default/disable_ipv6", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6",
                     "/proc/sys/net/ipv4/conf/all/arp_notify", "/proc/sys/net/ipv4/conf/eth0/arp_notify")
    assert v6.stdout.split() == ["1", "1", "1", "0", "0"]
    assert job_neigh(node, job.id) == peers_of(world, job)


def test_jobs_made_from_spares_are_like_jobs_made_anew_and_spares_are_never_jobs(world: World) -> None:
    j = populate(world)
    n1, n2 = world.nodes["n1"], world.nodes["n2"]
    rec = n1.rec
    assert rec is not None
    assert n1.call(rec.refill_spares) == 2  # the default: 2
    assert spare_files(n1) == {"jnp-0", "jnp-1"} and spare_links(n1) == {"jnw0", "jnw1"}
    assert n1.call(rec.refill_spares) == 0  # full

    # n1's three jobs: two from the spares, one made anew (the pool is empty then).
    world.reconcile_all(full=True)
    assert (rec.spares.taken, rec.spares.missed) == (2, 1)
    assert spare_files(n1) == set() and spare_links(n1) == set()
    for node in (n1, n2):
        for job_id in node.jobs:
            check_job_network(world, node, job_id)
    assert world.reconcile_all(full=True) == {"n1": [], "n2": []}  # the kernel is what is wanted
    assert ping_ok(n1, j["a1"].id, j["a2"].ip) and ping_ok(n2, j["a3"].id, j["a1"].ip)
    assert not ping_ok(n1, j["b1"].id, j["a2"].ip)

    # Spares are not jobs: a full reconcile neither deletes nor reports them.
    assert n1.call(rec.refill_spares) == 2
    assert world.reconcile_all(full=True) == {"n1": [], "n2": []}
    assert spare_files(n1) == {"jnp-2", "jnp-3"} and spare_links(n1) == {"jnw2", "jnw3"}

    # A spare broken behind our back (its veth deleted) is thrown away; the job is made anew, and well.
    sh("ip", "-n", n1.netns, "link", "del", "jnw2")
    a4 = world.add_job("n1", "a", 4)
    world.reconcile_all()
    assert "jnp-2" not in spare_files(n1) and rec.spares.taken == 3
    check_job_network(world, n1, a4.id)
    assert ping_ok(n1, a4.id, j["a3"].ip)
    a5 = world.add_job("n1", "a", 5)  # the other spare is fine
    world.reconcile_all()
    assert rec.spares.taken == 4 and spare_files(n1) == set() and spare_links(n1) == set()
    check_job_network(world, n1, a5.id)
    assert ping_ok(n2, j["a2"].id, a5.ip)
    assert world.reconcile_all(full=True) == {"n1": [], "n2": []}

    # A job made from a spare goes like any other.
    del n1.jobs[a4.id]
    world.reconcile_all()
    assert not n1.job_ns(a4.id).exists()

    # What a killed agent leaves (a spare file, a spare link) is removed by the next one; a stopped agent
    # leaves none of its own.
    n1.call(rec.refill_spares)
    n1.stop()
    assert spare_files(n1) == set() and spare_links(n1) == set()
    (n1.netns_dir / "jnp-99").write_text("")
    sh("ip", "-n", n1.netns, "link", "add", "jnw99", "type", "veth", "peer", "name", "jnw99p")
    n1.start()
    assert spare_files(n1) == set() and spare_links(n1) == set()
    assert world.reconcile_all(full=True)["n1"] == []  # the jobs are as they were
    n1.call(n1.rec.refill_spares)  # type: ignore[union-attr]
    n1.stop()
    assert spare_files(n1) == set() and spare_links(n1) == set()


def test_spares_carry_the_next_jobs_accounting_programs(world: World) -> None:
    """`refill(prepare=...)` as the agent calls it: each spare gets this node's counting programs ahead of time
    (their tcx attach waits for RCU grace periods), so a job taking it finds its counters in place, at zero,
    and counting. A failing prepare leaves the spare usable (the job's own ensure does the work then)."""
    from nodeagent.accounting import JobNet, NetAccounting

    j = populate(world)
    n1 = world.nodes["n1"]
    rec = n1.rec
    assert rec is not None
    acct = n1.call(lambda: NetAccounting())
    try:
        assert n1.call(lambda: rec.refill_spares(prepare=lambda: acct.prepare_here("02:00:00"))) == 2
        world.reconcile_all(full=True)  # two of n1's three jobs take the spares
        assert rec.spares.taken == 2
        got = {job_id: n1.call(lambda job_id=job_id, mac=job.mac: acct.ensure(job_id, n1.job_ns(job_id), mac))
               for job_id, (_g, job) in n1.jobs.items()}
        assert sorted(r.action for r in got.values()) == ["created", "ok", "ok"], got
        assert all(r.totals.total_bytes == 0 and not r.problems for r in got.values())
        assert ping_ok(n1, j["a1"].id, j["a2"].ip)
        r = n1.call(lambda: acct.read({j["a1"].id: JobNet(n1.job_ns(j["a1"].id), j["a1"].mac)}))[j["a1"].id]
        assert not isinstance(r, Exception) and r.action == "ok"
        assert r.totals.get("tx_local")[1] >= 1, r.totals  # the ping went to a job on the same node

        def fail() -> None:
            raise OSError(1, "Operation not permitted")

        assert n1.call(lambda: rec.refill_spares(prepare=fail)) == 2, "spares are made all the same"
    finally:
        n1.call(acct.close)
