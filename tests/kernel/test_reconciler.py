"""The network reconciler against a real kernel: two nodes on an underlay, groups a and b on both, group c
on n1 only. Checked with `ip -j` / `bridge -j` / `nsenter` as the oracle, and with ping between jobs."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from nodeagent.desired import DesiredState
from nodeagent.kernel.errors import DependencyFailed, NotFound, ReconcileError
from nodeagent.kernel.steps import ConfigureJob, CreateVxlan, DeleteJobNetwork, ReplaceFdb, ReplaceNeigh

from .conftest import Node, World, sh

pytestmark = pytest.mark.root

ZERO = "00:00:00:00:00:00"


def populate(w: World) -> dict[str, Any]:
    return {
        "a1": w.add_job("n1", "a", 1), "a2": w.add_job("n2", "a", 2), "a3": w.add_job("n2", "a", 3),
        "b1": w.add_job("n1", "b", 1), "b2": w.add_job("n2", "b", 2),
        "c1": w.add_job("n1", "c", 1),
    }


def link(node: Node, ifname: str) -> dict[str, Any] | None:
    found = [x for x in node.ip("-d", "link", "show") if x["ifname"] == ifname]
    return found[0] if found else None


def ours(node: Node) -> set[str]:
    return {x["ifname"] for x in node.ip("link", "show") if x["ifname"].startswith(("jnb", "jnx", "jnv"))}


def fdb(node: Node, dev: str) -> set[tuple[str, str]]:
    entries = node.ip("link", "show")  # the device must exist for bridge fdb show dev
    assert any(x["ifname"] == dev for x in entries)
    out = set()
    for e in json.loads(sh("bridge", "-n", node.netns, "-j", "fdb", "show", "dev", dev).stdout):
        if "dst" in e:
            assert "permanent" in e.get("state", ""), e
            out.add((e["mac"], e["dst"]))
    return out


def neigh(node: Node, dev: str) -> set[tuple[str, str]]:
    return {(n["dst"], n["lladdr"]) for n in node.ip("neigh", "show", "dev", dev)}


def ping(node: Node, job_id: str, ip: str) -> bool:
    return node.in_job(job_id, "ping", "-c1", "-W1", "-q", ip).returncode == 0


def ping_ok(node: Node, job_id: str, ip: str) -> bool:
    return any(ping(node, job_id, ip) for _ in range(3))


def test_two_nodes_converge_with_the_right_devices_entries_and_job_networks(world: World) -> None:
    j = populate(world)
    n1, n2 = world.nodes["n1"], world.nodes["n2"]
    steps = world.reconcile_all(full=True)
    assert steps["n1"] and steps["n2"]

    # Devices: a bridge and a vxlan per group present, with our attributes.
    assert ours(n1) == {"jnb100", "jnx100", "jnb200", "jnx200", "jnb300", "jnx300"} | {
        f"jnv{j[k].id}" for k in ("a1", "b1", "c1")}
    assert ours(n2) == {"jnb100", "jnx100", "jnb200", "jnx200"} | {f"jnv{j[k].id}" for k in ("a2", "a3", "b2")}
    for node in (n1, n2):
        for vni, mtu in ((100, 1450), (200, 1400)):
            br, vx = link(node, f"jnb{vni}"), link(node, f"jnx{vni}")
            assert br is not None and vx is not None
            assert br["mtu"] == mtu and "UP" in br["flags"] and not node.ip("addr", "show", "dev", f"jnb{vni}")[0][
                "addr_info"]
            bi = br["linkinfo"]["info_data"]
            assert (bi["stp_state"], bi["forward_delay"], bi["mcast_snooping"]) == (0, 0, 0)
            vi = vx["linkinfo"]["info_data"]
            assert vx["mtu"] == mtu and vx["master"] == f"jnb{vni}" and "UP" in vx["flags"]
            assert vi["id"] == vni and vi["port"] == 4789 and vi["local"] == node.underlay_ip
            assert vi["learning"] is False and vi["proxy"] is True and "group" not in vi
            assert vi["link"] == f"jnt-u{node.name[1:]}"

    # Head-end replication only towards nodes hosting the group; a permanent FDB and neighbour entry per
    # remote job; nothing else.
    assert fdb(n1, "jnx100") == {(ZERO, "198.18.0.2"), (j["a2"].mac, "198.18.0.2"), (j["a3"].mac, "198.18.0.2")}
    assert fdb(n1, "jnx200") == {(ZERO, "198.18.0.2"), (j["b2"].mac, "198.18.0.2")}
    assert fdb(n1, "jnx300") == set()  # group c lives on n1 only
    assert fdb(n2, "jnx100") == {(ZERO, "198.18.0.1"), (j["a1"].mac, "198.18.0.1")}
    assert neigh(n1, "jnx100") == {(j["a2"].ip, j["a2"].mac), (j["a3"].ip, j["a3"].mac)}
    assert neigh(n2, "jnx200") == {(j["b1"].ip, j["b1"].mac)}
    assert all("PERMANENT" in n["state"] for n in n1.ip("neigh", "show", "dev", "jnx100"))

    # Job networks: host end on the group bridge without IPv6; eth0 inside with MAC, MTU, address, route.
    for node, key, vni, mtu in ((n1, "a1", 100, 1450), (n2, "b2", 200, 1400)):
        job = j[key]
        host = link(node, f"jnv{job.id}")
        assert host is not None and host["master"] == f"jnb{vni}" and host["mtu"] == mtu and "UP" in host["flags"]
        assert not [a for a in node.ip("addr", "show", "dev", f"jnv{job.id}")[0]["addr_info"] if a["family"] == "inet6"]
        addrs = json.loads(node.in_job(job.id, "ip", "-j", "addr", "show").stdout)
        eth0 = next(a for a in addrs if a["ifname"] == "eth0")
        lo = next(a for a in addrs if a["ifname"] == "lo")
        assert eth0["address"] == job.mac and eth0["mtu"] == mtu and "UP" in eth0["flags"] and "UP" in lo["flags"]
        assert [(a["family"], a["local"], a["prefixlen"]) for a in eth0["addr_info"]] == [("inet", job.ip, 24)]
        routes = json.loads(node.in_job(job.id, "ip", "-j", "route", "show", "default").stdout)
        assert [(r["gateway"], r["dev"]) for r in routes] == [(world.groups[job.group].gateway, "eth0")]
        v6 = node.in_job(job.id, "cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6",
                         "/proc/sys/net/ipv6/conf/default/disable_ipv6", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6")
        assert v6.stdout.split() == ["1", "1", "1"]

    # Traffic: within a group across nodes (both ways, and a third job); never across groups.
    assert ping_ok(n1, j["a1"].id, j["a2"].ip)
    assert ping_ok(n2, j["a3"].id, j["a1"].ip)
    assert ping_ok(n2, j["b2"].id, j["b1"].ip)
    assert not ping(n1, j["a1"].id, j["b2"].ip)
    assert not ping(n1, j["a1"].id, j["b1"].ip)

    # Applying the same state again changes nothing, incrementally or after observing anew.
    assert world.reconcile_all() == {"n1": [], "n2": []}
    assert world.reconcile_all(full=True) == {"n1": [], "n2": []}


def test_full_reconcile_repairs_drift(world: World) -> None:
    j = populate(world)
    n1, n2 = world.nodes["n1"], world.nodes["n2"]
    world.reconcile_all(full=True)
    sh("bridge", "-n", n1.netns, "fdb", "del", j["a2"].mac, "dev", "jnx100", "dst", "198.18.0.2")
    sh("ip", "-n", n1.netns, "neigh", "del", j["a2"].ip, "dev", "jnx100")
    sh("ip", "-n", n2.netns, "link", "del", f"jnv{j['a2'].id}")
    sh("nsenter", f"--net={n2.job_ns(j['a3'].id)}", "ip", "route", "del", "default")
    assert (j["a2"].mac, "198.18.0.2") not in fdb(n1, "jnx100")
    assert not ping(n1, j["a1"].id, j["a2"].ip)

    # An incremental reconcile trusts its model; a full one sees the drift and repairs exactly it.
    assert world.reconcile_all() == {"n1": [], "n2": []}
    steps = world.reconcile_all(full=True)
    assert sorted(map(type, steps["n1"]), key=str) == [ReplaceFdb, ReplaceNeigh]
    assert sorted((type(s), s.job.job_id, s.recreate_veth) for s in steps["n2"] if isinstance(s, ConfigureJob)) == \
        sorted([(ConfigureJob, j["a2"].id, True), (ConfigureJob, j["a3"].id, False)])
    assert len(steps["n2"]) == 2
    assert (j["a2"].mac, "198.18.0.2") in fdb(n1, "jnx100")
    assert (j["a2"].ip, j["a2"].mac) in neigh(n1, "jnx100")
    assert ping_ok(n1, j["a1"].id, j["a2"].ip)
    assert ping_ok(n2, j["a3"].id, j["a1"].ip)
    assert world.reconcile_all(full=True) == {"n1": [], "n2": []}


def wait_gone(node: Node, ifname: str, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if link(node, ifname) is None:
            return True
        time.sleep(0.05)
    return False


def test_removals_leave_nothing_behind_and_foreign_objects_untouched(world: World) -> None:
    j = populate(world)
    n1, n2 = world.nodes["n1"], world.nodes["n2"]
    world.reconcile_all(full=True)
    # Objects that are not ours: a link in the node namespace, a file in the netns dir.
    sh("ip", "-n", n1.netns, "link", "add", "jnt-foreign", "type", "veth", "peer", "name", "jnt-foreignp")
    (n1.netns_dir / "not-ours").write_text("")
    # A leaked bridge of ours (a group that no longer exists) goes.
    sh("ip", "-n", n1.netns, "link", "add", "jnb999", "type", "bridge")

    # A job leaves n2: its namespace and veth go there; n1 drops its entries (a3 still keeps the flood entry).
    del n2.jobs[j["a2"].id]
    steps = world.reconcile_all()
    assert steps["n2"] == [DeleteJobNetwork(j["a2"].id, f"jnj-{j['a2'].id}", f"jnv{j['a2'].id}")]
    assert not n2.job_ns(j["a2"].id).exists()
    assert wait_gone(n2, f"jnv{j['a2'].id}")
    assert fdb(n1, "jnx100") == {(ZERO, "198.18.0.2"), (j["a3"].mac, "198.18.0.2")}
    assert neigh(n1, "jnx100") == {(j["a3"].ip, j["a3"].mac)}

    # Group b leaves n2 entirely: its devices go there, and n1 stops flooding b towards n2.
    del n2.jobs[j["b2"].id]
    world.reconcile_all()
    assert link(n2, "jnb200") is None and link(n2, "jnx200") is None
    assert fdb(n1, "jnx200") == set() and neigh(n1, "jnx200") == set()

    # The full reconcile removes the leaked bridge, nothing else.
    steps = world.reconcile_all(full=True)
    assert [type(s).__name__ for s in steps["n1"]] == ["DeleteLink"] and link(n1, "jnb999") is None

    # Nothing desired: nothing of ours left, the foreign objects still there.
    for node in (n1, n2):
        node.reconcile(DesiredState(), full=True)
        deadline = time.monotonic() + 3
        while ours(node) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ours(node) == set()
        assert sorted(p.name for p in node.netns_dir.iterdir()) == (["not-ours"] if node is n1 else [])
    assert link(n1, "jnt-foreign") is not None and link(n1, "jnt-u1") is not None
    assert n1.reconcile(DesiredState(), full=True) == [] and n2.reconcile(DesiredState(), full=True) == []


def test_failed_step_is_reported_with_its_object_and_retried(world: World) -> None:
    n1 = world.nodes["n1"]
    n1.stop()
    n1.start(underlay_ifname="jnt-missing")
    world.add_job("n1", "a", 1)
    world.add_job("n2", "a", 2)
    with pytest.raises(ReconcileError) as info:
        n1.reconcile(world.desired("n1"), full=False)
    (failure,) = [f for f in info.value.failures if isinstance(f.step, CreateVxlan)]
    assert isinstance(failure.cause, NotFound) and "jnt-missing" in str(failure.cause)
    assert n1.netns in str(failure.cause) or "net:[" in str(failure.cause)
    # the steps that do not depend on the vxlan device were applied; those that do were not attempted
    assert any(type(s).__name__ == "CreateJobNetwork" for s in info.value.applied)
    assert {type(f.step).__name__ for f in info.value.failures} == {"CreateVxlan", "AddFloodEntry", "ReplaceFdb",
                                                                   "ReplaceNeigh"}
    assert all(isinstance(f.cause, DependencyFailed) for f in info.value.failures if f is not failure)
    # The underlay appears (renamed): the next reconcile observes anew and finishes the job.
    sh("ip", "-n", n1.netns, "link", "set", "jnt-u1", "name", "jnt-missing")
    steps = n1.reconcile(world.desired("n1"))
    assert [type(s).__name__ for s in steps] == ["CreateVxlan", "AddFloodEntry", "ReplaceFdb", "ReplaceNeigh"]
    assert n1.reconcile(world.desired("n1"), full=True) == []


def test_every_step_can_be_applied_twice(world: World) -> None:
    from nodeagent.kernel.apply import Applier
    from nodeagent.kernel.namespaces import Namespaces
    from nodeagent.kernel.netlink import Netlink

    j = populate(world)
    n1 = world.nodes["n1"]
    steps = n1.reconcile(world.desired("n1"))
    assert len(steps) > 10
    assert n1.rec is not None
    settings = n1.rec.settings

    def again() -> None:
        ns = Namespaces("test")
        with Netlink("test") as nl:
            applier = Applier(settings, nl, ns)
            for step in steps:
                applier.apply(step)
        ns.close()

    n1.call(again)
    assert n1.reconcile(world.desired("n1"), full=True) == []
    assert not ping(n1, j["a1"].id, j["a2"].ip)  # n2 has no network yet: nothing answers
    world.nodes["n2"].reconcile(world.desired("n2"))
    assert ping_ok(n1, j["a1"].id, j["a2"].ip)


def test_namespace_pinned_by_a_process_loses_its_veth_on_the_next_full_reconcile(world: World) -> None:
    import subprocess

    j = populate(world)
    world.add_job("n1", "a", 4)  # group a stays on n1 when a1 leaves
    n1 = world.nodes["n1"]
    world.reconcile_all()
    sleeper = subprocess.Popen(["nsenter", f"--net={n1.job_ns(j['a1'].id)}", "sleep", "60"])
    try:
        time.sleep(0.2)
        del n1.jobs[j["a1"].id]
        n1.reconcile(world.desired("n1"))
        assert not n1.job_ns(j["a1"].id).exists()
        assert link(n1, f"jnv{j['a1'].id}") is not None  # the namespace lives on in the process
        steps = n1.reconcile(world.desired("n1"), full=True)
        assert [type(s).__name__ for s in steps] == ["DeleteLink"] and link(n1, f"jnv{j['a1'].id}") is None
        # the job comes back (same id): made anew, although the old namespace still exists
        n1.jobs[j["a1"].id] = ("a", j["a1"])
        assert [type(s).__name__ for s in n1.reconcile(world.desired("n1"))] == ["CreateJobNetwork"]
        assert n1.reconcile(world.desired("n1"), full=True) == []
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_malformed_entry_fails_alone(world: World) -> None:
    from dataclasses import replace as dc_replace

    from nodeagent.kernel.errors import InvalidArgument

    j = populate(world)
    n1 = world.nodes["n1"]
    desired = world.desired("n1")
    bad = dc_replace(desired.endpoints[j["a2"].id], mac="02:zz:00:00:00:01")
    desired = dc_replace(desired, endpoints={**desired.endpoints, bad.job_id: bad})
    with pytest.raises(ReconcileError) as info:
        n1.reconcile(desired)
    assert sorted(type(f.step).__name__ for f in info.value.failures) == ["ReplaceFdb", "ReplaceNeigh"]
    assert all(isinstance(f.cause, InvalidArgument) and bad.mac in str(f.cause) for f in info.value.failures)
    assert (j["a3"].mac, "198.18.0.2") in fdb(n1, "jnx100")  # the rest of the batch went in


def test_namespace_files_that_are_no_namespaces_are_replaced_or_removed(world: World) -> None:
    j = populate(world)
    n1 = world.nodes["n1"]
    n1.reconcile(world.desired("n1"))
    # As after a reboot: the files are there, the mounts (and namespaces) are not.
    sh("umount", str(n1.job_ns(j["a1"].id)))
    (n1.netns_dir / "jnj-0000dead00").write_text("")  # a job this node no longer has
    steps = n1.reconcile(world.desired("n1"), full=True)
    assert [type(s).__name__ for s in steps] == ["DeleteJobNetwork", "DeleteJobNetwork", "CreateJobNetwork"]
    assert not (n1.netns_dir / "jnj-0000dead00").exists()
    assert n1.reconcile(world.desired("n1"), full=True) == []
    addrs = json.loads(n1.in_job(j["a1"].id, "ip", "-j", "addr", "show", "eth0").stdout)
    assert addrs[0]["addr_info"][0]["local"] == j["a1"].ip


def test_a_restarted_reconciler_adopts_what_is_there(world: World) -> None:
    j = populate(world)
    world.reconcile_all()
    for node in world.nodes.values():  # as after an agent restart: a new reconciler, same kernel
        node.stop()
        node.start()
    assert world.reconcile_all() == {"n1": [], "n2": []}  # its first reconcile observes the kernel
    assert ping_ok(world.nodes["n1"], j["a1"].id, j["a3"].ip)
