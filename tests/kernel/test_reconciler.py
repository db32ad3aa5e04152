"""The network reconciler against a real kernel: two nodes on an underlay, groups a and b on both, group c
on n1 only. Checked with `ip -j` / `bridge -j` / `nsenter` as the oracle, and with ping between jobs."""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from nodeagent.desired import DesiredState
from nodeagent.kernel.errors import DependencyFailed, NotFound, ReconcileError
from nodeagent.kernel.steps import (
    ConfigureJob,
    CreateVxlan,
    DeleteBridgeFdb,
    DeleteJobNeigh,
    DeleteJobNetwork,
    DeleteLink,
    ReplaceBridgeFdb,
    ReplaceFdb,
    ReplaceJobNeigh,
    ReplaceNeigh,
    SetJobPort,
    WithdrawJobNeigh,
    job_neigh_entries,
)

from .conftest import CLONE_NEWNET, Node, World, _libc, sh

pytestmark = pytest.mark.root

ZERO = "00:00:00:00:00:00"
T = TypeVar("T")


def jn_set(steps: list[Any], op: str) -> set[tuple[str, ...]]:
    """The single job neighbour entries of `op` in the steps: (job, ip, mac) replaced, (job, ip) deleted."""
    return {(j, ip, mac) if op == "replace" else (j, ip)
            for s in steps for o, j, ip, mac in job_neigh_entries(s) if o == op}


def packed(ip: str, mac: str) -> tuple[bytes, bytes]:
    return socket.inet_aton(ip), bytes.fromhex(mac.replace(":", ""))


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


def bridge_static(node: Node, bridge: str) -> dict[str, tuple[str, bool]]:
    """The static entries of a bridge's FDB: mac -> (port, sticky)."""
    out = {}
    for e in json.loads(sh("bridge", "-n", node.netns, "-j", "fdb", "show", "br", bridge).stdout):
        if e.get("master") == bridge and e.get("state") == "static":
            assert e["mac"] not in out
            out[e["mac"]] = (e["ifname"], "sticky" in e.get("flags", []))
    return out


def local_static(w: World, node: Node, group: str) -> dict[str, tuple[str, bool]]:
    """What a group's bridge on `node` should hold: each local job's MAC on its port, and each remote job's
    on the group's VXLAN port, sticky."""
    vx = f"jnx{w.groups[group].vni}"
    remote = {job.mac: (vx, True) for other in w.nodes.values() if other is not node
              for g, job in other.jobs.values() if g == group}
    if not any(g == group for g, _ in node.jobs.values()):
        return {}  # (no bridge of the group on this node)
    return {**remote, **{job.mac: (f"jnv{job.id}", True) for g, job in node.jobs.values() if g == group}}


def learning(node: Node, ifname: str) -> bool:
    found = link(node, ifname)
    assert found is not None and found["linkinfo"]["info_slave_kind"] == "bridge", found
    return bool(found["linkinfo"]["info_slave_data"]["learning"])


def neigh(node: Node, dev: str) -> set[tuple[str, str]]:
    return {(n["dst"], n["lladdr"]) for n in node.ip("neigh", "show", "dev", dev)}


def job_neigh(node: Node, job_id: str) -> dict[str, tuple[str, list[str]]]:
    """The neighbour entries on eth0 in a job's namespace: ip -> (mac, states)."""
    out = json.loads(node.in_job(job_id, "ip", "-j", "-4", "neigh", "show", "dev", "eth0").stdout or "[]")
    return {n["dst"]: (n.get("lladdr", ""), n["state"]) for n in out}


def peers_of(w: World, job: Any) -> dict[str, tuple[str, list[str]]]:
    """What a job should have on eth0: a permanent entry for every other job of its group, on any node."""
    return {p.ip: (p.mac, ["PERMANENT"]) for n in w.nodes.values() for g, p in n.jobs.values()
            if g == job.group and p.id != job.id}


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
            assert (bi["stp_state"], bi["forward_delay"], bi["mcast_snooping"], bi["mcast_querier"]) == (0, 0, 0, 0)
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
        assert learning(node, f"jnv{job.id}") is False  # the bridge learns nothing from a job's frames
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

    # Each local job's MAC is a static, sticky entry of its group's bridge on its port (never flooded to);
    # nothing else is static there. The VXLAN device's port keeps learning.
    for node in (n1, n2):
        for group in world.groups.values():
            if link(node, f"jnb{group.vni}") is not None:
                assert bridge_static(node, f"jnb{group.vni}") == local_static(world, node, group.name)
                assert learning(node, f"jnx{group.vni}") is True
    assert bridge_static(n2, "jnb100") == {j["a2"].mac: (f"jnv{j['a2'].id}", True),
                                           j["a3"].mac: (f"jnv{j['a3'].id}", True), j["a1"].mac: ("jnx100", True)}

    # Every job has a permanent neighbour entry for every other job of its group: local (a2 <-> a3 on n2)
    # and remote ones; c1 is alone in its group.
    for node in (n1, n2):
        for _, job in node.jobs.values():
            assert job_neigh(node, job.id) == peers_of(world, job), job
    assert job_neigh(n2, j["a2"].id) == {j["a1"].ip: (j["a1"].mac, ["PERMANENT"]),
                                         j["a3"].ip: (j["a3"].mac, ["PERMANENT"])}
    assert job_neigh(n1, j["c1"].id) == {}

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
    # A job network made or configured anew has no neighbour entries (setting eth0's MAC flushes even the
    # permanent ones): both get all of their peers again.
    assert jn_set(steps["n2"], "replace") == {
        (j[a].id, j[b].ip, j[b].mac) for a, b in (("a2", "a1"), ("a2", "a3"), ("a3", "a1"), ("a3", "a2"))}
    # a2's veth is new: its static bridge FDB entry died with the old one (a3's port kept its own)
    assert [s for s in steps["n2"] if isinstance(s, ReplaceBridgeFdb)] == [
        ReplaceBridgeFdb("jnb100", f"jnv{j['a2'].id}", j["a2"].mac)]
    assert len(steps["n2"]) == 5  # 2 ConfigureJob, 1 ReplaceBridgeFdb, 1 ReplaceJobNeigh per job
    assert job_neigh(n2, j["a3"].id) == {j["a1"].ip: (j["a1"].mac, ["PERMANENT"]),
                                         j["a2"].ip: (j["a2"].mac, ["PERMANENT"])}
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
    assert steps["n2"][0] == DeleteJobNetwork(j["a2"].id, f"jnj-{j['a2'].id}", f"jnv{j['a2'].id}", gone=True)
    assert [type(s) for s in steps["n2"]] == [DeleteJobNetwork, WithdrawJobNeigh]
    assert jn_set(steps["n2"], "delete") == {(j["a3"].id, j["a2"].ip)}
    assert (j["a1"].id, j["a2"].ip) in jn_set(steps["n1"], "delete")
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
                                                                   "ReplaceNeigh", "ReplaceBridgeFdb"}
    assert all(isinstance(f.cause, DependencyFailed) for f in info.value.failures if f is not failure)
    # The underlay appears (renamed): the next reconcile observes anew and finishes the job.
    sh("ip", "-n", n1.netns, "link", "set", "jnt-u1", "name", "jnt-missing")
    steps = n1.reconcile(world.desired("n1"))
    assert [type(s).__name__ for s in steps] == ["CreateVxlan", "AddFloodEntry", "ReplaceFdb", "ReplaceNeigh",
                                                 "ReplaceBridgeFdb"]  # (the remote job's MAC on the VXLAN port)
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
        # the job comes back (same id): made anew, although the old namespace still exists; it gets its
        # peers (a2, a3 remote, a4 local), a4 gets it
        n1.jobs[j["a1"].id] = ("a", j["a1"])
        assert [type(s).__name__ for s in n1.reconcile(world.desired("n1"))] == [
            "CreateJobNetwork", "ReplaceBridgeFdb", "ReplaceJobNeigh", "SpreadJobNeigh"]
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
    assert sorted(type(f.step).__name__ for f in info.value.failures) == ["ReplaceBridgeFdb", "ReplaceFdb",
                                                                          "ReplaceNeigh"]
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
    assert [type(s).__name__ for s in steps] == ["DeleteJobNetwork", "DeleteJobNetwork", "CreateJobNetwork",
                                                 "ReplaceBridgeFdb", "ReplaceJobNeigh"]  # a1's peers: a2, a3
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


class TableReads:
    """Counts the neighbour tables read whole (dumps) in job namespaces."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from nodeagent.kernel import rawnl

        self.count = 0
        real = rawnl.permanent_neighbours_v4

        def counting(*args: Any) -> dict[bytes, bytes]:
            self.count += 1
            return real(*args)

        monkeypatch.setattr(rawnl, "permanent_neighbours_v4", counting)

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


@pytest.mark.parametrize("mode", ["notifications", "dumps"])
def test_job_neighbour_entries_follow_the_peers_and_are_repaired(world: World, mode: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """notifications: a full reconcile knows the job namespaces' neighbour tables from the kernel's
    notifications (no cross-check sweep here: it reads none whole); dumps: it reads every one whole."""
    for node in world.nodes.values():
        node.stop()
        node.start(neigh_watch=mode == "notifications", neigh_sweep=0)
    reads = TableReads(monkeypatch)
    j = populate(world)
    n1, n2 = world.nodes["n1"], world.nodes["n2"]
    world.reconcile_all(full=True)
    a1, a2, a3 = j["a1"], j["a2"], j["a3"]

    def entries(steps: list[Any], op: str) -> set[tuple[str, ...]]:
        return jn_set(steps, op)

    def all_in_sync() -> None:
        for node in (n1, n2):
            for _, job in node.jobs.values():
                assert job_neigh(node, job.id) == peers_of(world, job), job

    # Peers appear, one on each node: the new jobs get all their peers, the others get the new jobs.
    a4, a5 = world.add_job("n1", "a", 4), world.add_job("n2", "a", 5)
    steps = world.reconcile_all()
    assert entries(steps["n1"], "replace") == {(a1.id, a4.ip, a4.mac), (a1.id, a5.ip, a5.mac)} | {
        (a4.id, p.ip, p.mac) for p in (a1, a2, a3, a5)}
    assert entries(steps["n2"], "replace") == {(x.id, p.ip, p.mac) for x in (a2, a3) for p in (a4, a5)} | {
        (a5.id, p.ip, p.mac) for p in (a1, a2, a3, a4)}
    all_in_sync()

    # A peer goes: its entry goes from every job of the group, on both nodes.
    del n2.jobs[a5.id]
    steps = world.reconcile_all()
    assert entries(steps["n1"], "delete") == {(x.id, a5.ip) for x in (a1, a4)}
    assert entries(steps["n2"], "delete") == {(x.id, a5.ip) for x in (a2, a3)}
    all_in_sync()
    assert world.reconcile_all(full=True) == {"n1": [], "n2": []}

    # Drift by hand in a1's namespace: a peer's entry deleted, one made REACHABLE (same MAC), one given
    # another MAC, a permanent entry no peer needs; a kernel-made (STALE) entry of a non-peer stays. In a2's:
    # a peer's entry STALE. On n1's VXLAN device: a neighbour entry REACHABLE, an FDB entry dynamic.
    def in_a1(*cmd: str) -> None:
        assert n1.in_job(a1.id, "ip", *cmd).returncode == 0, cmd

    in_a1("neigh", "del", a2.ip, "dev", "eth0")
    in_a1("neigh", "change", a3.ip, "lladdr", a3.mac, "dev", "eth0", "nud", "reachable")
    in_a1("neigh", "replace", a4.ip, "lladdr", "02:00:00:00:ee:ee", "dev", "eth0", "nud", "permanent")
    in_a1("neigh", "add", "10.40.0.250", "lladdr", "02:00:00:00:ee:01", "dev", "eth0", "nud", "permanent")
    in_a1("neigh", "add", "10.40.0.1", "lladdr", "02:00:00:00:ee:02", "dev", "eth0", "nud", "stale")
    assert n2.in_job(a2.id, "ip", "neigh", "change", a3.ip, "lladdr", a3.mac, "dev", "eth0", "nud",
                     "stale").returncode == 0
    sh("ip", "-n", n1.netns, "neigh", "change", a2.ip, "lladdr", a2.mac, "dev", "jnx100", "nud", "reachable")
    sh("bridge", "-n", n1.netns, "fdb", "replace", a3.mac, "dev", "jnx100", "dst", "198.18.0.2", "dynamic")
    assert job_neigh(n1, a1.id)[a3.ip] == (a3.mac, ["REACHABLE"])
    assert job_neigh(n2, a2.id)[a3.ip] == (a3.mac, ["STALE"])

    assert world.reconcile_all() == {"n1": [], "n2": []}  # an incremental reconcile trusts its model
    reads.take()
    steps = world.reconcile_all(full=True)
    assert sorted(map(repr, [s for s in steps["n1"] if not job_neigh_entries(s)])) == sorted(map(repr, [
        ReplaceNeigh("jnx100", a2.ip, a2.mac), ReplaceFdb("jnx100", a3.mac, "198.18.0.2")]))
    assert jn_set(steps["n1"], "replace") == {(a1.id, p.ip, p.mac) for p in (a2, a3, a4)}
    assert jn_set(steps["n1"], "delete") == {(a1.id, "10.40.0.250")}
    assert [str(s) for s in steps["n2"]] == [str(ReplaceJobNeigh(a2.id, f"jnj-{a2.id}", (packed(a3.ip, a3.mac),)))]
    # found from the notifications alone, or by reading all 7 job namespaces' tables
    assert reads.take() == (0 if mode == "notifications" else 7)
    assert job_neigh(n1, a1.id) == {**peers_of(world, a1), "10.40.0.1": ("02:00:00:00:ee:02", ["STALE"])}
    assert job_neigh(n2, a2.id) == peers_of(world, a2)
    assert all("PERMANENT" in n["state"] for n in n1.ip("neigh", "show", "dev", "jnx100"))
    assert (a3.mac, "198.18.0.2") in fdb(n1, "jnx100")  # fdb() asserts every entry with a dst is permanent
    assert world.reconcile_all(full=True) == {"n1": [], "n2": []}
    assert ping(n1, a1.id, a3.ip) and ping(n1, a1.id, a4.ip)


ETH_P_ALL, ETH_P_ARP, PACKET_OUTGOING = 0x0003, 0x0806, 4
IGMP_ALL_HOSTS = "010000E0"  # 224.0.0.1 as /proc/net/igmp prints it


def in_netns(path: Path, fn: Callable[[], T]) -> T:
    """`fn()` in a thread that enters the network namespace at `path` (and ends there)."""
    out: list[T] = []
    failed: list[BaseException] = []

    def work() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {path}")
            finally:
                os.close(fd)
            out.append(fn())
        except BaseException as e:
            failed.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    if failed:
        raise failed[0]
    return out[0]


def tx_packets(node: Node, job_id: str, counter: str = "tx_packets") -> int:
    """eth0's tx_packets (or another counter) in a job namespace, read through netlink (IFLA_STATS64)."""
    from pyroute2 import IPRoute

    def read() -> int:
        with IPRoute() as ipr:
            return int(ipr.link("get", ifname="eth0")[0].get("IFLA_STATS64")[counter])

    return in_netns(node.job_ns(job_id), read)


def rx_packets(node: Node, job_id: str) -> int:
    return tx_packets(node, job_id, "rx_packets")


def sniffer(node: Node, job_id: str) -> socket.socket:
    """A packet socket on eth0 in a job namespace: every frame it sends or receives."""

    def open_it() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind(("eth0", ETH_P_ALL))
        s.setblocking(False)
        return s

    return in_netns(node.job_ns(job_id), open_it)


def frames(s: socket.socket) -> list[tuple[int, int]]:
    """(ethertype, packet type) of every frame captured so far."""
    out = []
    while True:
        try:
            data, addr = s.recvfrom(65535)
        except BlockingIOError:
            return out
        out.append((int.from_bytes(data[12:14], "big"), addr[2]))


def igmp_groups(node: Node, job_id: str) -> dict[str, list[list[str]]]:
    """/proc/net/igmp inside a job namespace: device -> [[group, users, timer, reporter], ...]."""
    out: dict[str, list[list[str]]] = {}
    dev = ""
    for line in node.in_job(job_id, "cat", "/proc/net/igmp").stdout.splitlines()[1:]:
        if line[:1].isdigit():
            dev = line.split()[1]
            out[dev] = []
        elif line.strip():
            out[dev].append(line.split())
    return out


@pytest.mark.slow
def test_a_job_sends_nothing_on_its_own_and_never_arps_for_a_peer(world: World) -> None:
    """Every byte a job sends is charged to it: idle, it sends nothing (no ARP, IGMP, IPv6 RS/MLD/DAD, GARP),
    and a peer's ping costs it exactly the replies (its entry for the peer is permanent: no ARP)."""
    j = populate(world)
    a4 = world.add_job("n1", "a", 4)  # a local peer of a1
    world.reconcile_all(full=True)
    n1, n2 = world.nodes["n1"], world.nodes["n2"]
    everyone = [(node, job) for node in (n1, n2) for _, job in node.jobs.values()]
    sniffers = {job.id: sniffer(node, job.id) for node, job in everyone}
    try:
        # Nothing sent since its namespace was made; IGMP knows only the all-hosts group, never reported.
        assert {job.id: tx_packets(node, job.id) for node, job in everyone} == {job.id: 0 for _, job in everyone}
        for node, job in everyone:
            igmp = igmp_groups(node, job.id)
            assert [g[0] for g in igmp["eth0"]] == [IGMP_ALL_HOSTS], igmp
            assert igmp["eth0"][0][2:] == ["0:00000000", "0"], igmp  # no timer running, never reported
        for node in (n1, n2):  # no querier on the group bridges (and no snooping)
            for vni in (100, 200):
                info = link(node, f"jnb{vni}")
                assert info is not None
                assert (info["linkinfo"]["info_data"]["mcast_querier"],
                        info["linkinfo"]["info_data"]["mcast_snooping"]) == (0, 0)

        time.sleep(10)
        assert {job.id: tx_packets(node, job.id) for node, job in everyone} == {job.id: 0 for _, job in everyone}

        # Peers ping a1: a2 from the other node, a4 from the same one. One try each, no ARP anywhere.
        for node, src in ((n2, j["a2"]), (n1, a4)):
            res = node.in_job(src.id, "ping", "-n", "-c3", "-i0.2", "-W1", "-q", j["a1"].ip)
            assert res.returncode == 0 and " 0% packet loss" in res.stdout, res.stdout
        want = {job.id: 0 for _, job in everyone} | {j["a1"].id: 6, j["a2"].id: 3, a4.id: 3}
        assert {job.id: tx_packets(node, job.id) for node, job in everyone} == want

        time.sleep(10)  # no probe, no reachability confirmation afterwards either
        assert {job.id: tx_packets(node, job.id) for node, job in everyone} == want
        seen = {job_id: frames(s) for job_id, s in sniffers.items()}
        assert {k: [f for f in v if f[0] == ETH_P_ARP] for k, v in seen.items()} == {k: [] for k in seen}
        assert {k: sum(1 for f in v if f[1] == PACKET_OUTGOING) for k, v in seen.items()} == want
    finally:
        for s in sniffers.values():
            s.close()


def test_neighbour_notifications_after_restarts_losses_and_reused_namespace_ids(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tables the notifications keep: namespaces made by the reconciler are known from the start; a
    restarted one reads each table whole once; lost notifications make it read them all again; a namespace
    id the kernel gives again to another job's namespace is followed as that job's."""
    for node in world.nodes.values():
        node.stop()
        node.start(neigh_sweep=0)
    reads = TableReads(monkeypatch)
    j = populate(world)
    n1, n2 = world.nodes["n1"], world.nodes["n2"]
    world.reconcile_all()
    assert world.reconcile_all(full=True) == {"n1": [], "n2": []} and reads.take() == 0

    def watch(node: Node) -> Any:
        assert node.rec is not None and node.rec._watch is not None
        return node.rec._watch

    def mirror_is_kernel(node: Node) -> None:
        for _, job in node.jobs.values():
            table = node.call(lambda job=job: dict(watch(node).table(job.id)))
            assert {socket.inet_ntoa(ip): mac.hex(":") for ip, mac in table.items()} == {
                ip: mac for ip, (mac, states) in job_neigh(node, job.id).items() if "PERMANENT" in states}

    # A restarted reconciler reads every job's table once, then follows them.
    n2.stop()
    n2.start(neigh_sweep=0)
    assert n2.reconcile(world.desired("n2"), full=True) == [] and reads.take() == len(n2.jobs)
    assert n2.reconcile(world.desired("n2"), full=True) == [] and reads.take() == 0
    mirror_is_kernel(n2)

    # Notifications lost (a receive buffer too small for a burst made by hand): every table read again.
    w = watch(n2)
    n2.call(lambda: w._events.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1))  # the kernel's minimum
    batch = "".join(f"neigh add 10.40.1.{i} lladdr 02:00:00:00:ef:01 dev eth0 nud permanent\n" for i in range(1, 200))
    res = subprocess.run(["nsenter", f"--net={n2.job_ns(j['a3'].id)}", "ip", "-batch", "-"], input=batch,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    n2.call(lambda: w._events.setsockopt(socket.SOL_SOCKET, 33, 32 << 20))  # SO_RCVBUFFORCE: as it was
    steps = n2.reconcile(world.desired("n2"), full=True)
    assert w.lost >= 1 and reads.take() == len(n2.jobs)
    assert len(steps) == 1 and isinstance(steps[0], DeleteJobNeigh) and steps[0].job_id == j["a3"].id
    assert len(steps[0].entries) == 199
    assert n2.reconcile(world.desired("n2"), full=True) == [] and reads.take() == 0
    mirror_is_kernel(n2)

    # A job goes and another comes once its namespace is gone: the kernel may give the new namespace the
    # id of the old one. Changes in it by hand are seen as the new job's.
    old = n2.call(lambda: w._jobs[j["a2"].id].nsid)
    del n2.jobs[j["a2"].id]
    world.reconcile_all()
    assert wait_gone(n2, f"jnv{j['a2'].id}")
    a6 = world.add_job("n2", "a", 6)
    world.reconcile_all()
    print(f"namespace id of the job gone: {old}, of the new one: {n2.call(lambda: w._jobs[a6.id].nsid)}")
    assert n2.in_job(a6.id, "ip", "neigh", "del", j["a1"].ip, "dev", "eth0").returncode == 0
    assert n2.in_job(a6.id, "ip", "neigh", "add", "10.40.0.251", "lladdr", "02:00:00:00:ef:02", "dev", "eth0",
                     "nud", "permanent").returncode == 0
    steps = n2.reconcile(world.desired("n2"), full=True)
    assert steps == [DeleteJobNeigh(a6.id, f"jnj-{a6.id}", (packed("10.40.0.251", "02:00:00:00:ef:02"),)),
                     ReplaceJobNeigh(a6.id, f"jnj-{a6.id}", (packed(j["a1"].ip, j["a1"].mac),))]
    assert reads.take() == 0
    mirror_is_kernel(n1)
    mirror_is_kernel(n2)

    # A job whose eth0 is made anew (another ifindex) has its table read again.
    sh("ip", "-n", n2.netns, "link", "del", f"jnv{a6.id}")
    steps = n2.reconcile(world.desired("n2"), full=True)
    assert [type(s).__name__ for s in steps] == ["ConfigureJob", "ReplaceBridgeFdb", "ReplaceJobNeigh"]
    assert n2.reconcile(world.desired("n2"), full=True) == [] and reads.take() == 1
    mirror_is_kernel(n2)


# -- static bridge FDB entries: a frame for a local job goes to its port only ------------------------


def send_frame(node: Node, job_id: str, src: str, dst: str = "ff:ff:ff:ff:ff:ff") -> None:
    """One raw Ethernet frame out of eth0 in a job namespace, with any source MAC (as a job with
    CAP_NET_RAW could send; 0x88b5: the local experimental ethertype)."""

    def send() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind(("eth0", 0))
            s.send(bytes.fromhex(dst.replace(":", "") + src.replace(":", "")) + b"\x88\xb5" + bytes(46))

    in_netns(node.job_ns(job_id), send)


def learned_on_job_ports(node: Node, bridge: str) -> list[dict[str, Any]]:
    """Entries the bridge learned (dynamic) on job ports."""
    return [e for e in json.loads(sh("bridge", "-n", node.netns, "-j", "fdb", "show", "br", bridge).stdout)
            if e.get("master") == bridge and e["ifname"].startswith("jnv")
            and e.get("state", "") not in ("static", "permanent")]


def test_static_bridge_fdb_entries_follow_local_jobs_and_are_repaired(world: World) -> None:
    j = populate(world)
    n1, n2 = world.nodes["n1"], world.nodes["n2"]
    a1, a4, a5 = j["a1"], world.add_job("n1", "a", 4), world.add_job("n1", "a", 5)
    world.reconcile_all()
    assert bridge_static(n1, "jnb100") == local_static(world, n1, "a") and len(local_static(world, n1, "a")) == 5

    def port(job: Any) -> str:
        return f"jnv{job.id}"

    # A job comes: its entry comes with its network; a job goes: its entry goes with its veth (no step), and a
    # full reconcile afterwards finds what the model says.
    a6 = world.add_job("n1", "a", 6)
    steps = n1.reconcile(world.desired("n1"))
    assert [s for s in steps if isinstance(s, (ReplaceBridgeFdb, DeleteBridgeFdb))] == [
        ReplaceBridgeFdb("jnb100", port(a6), a6.mac)]
    assert bridge_static(n1, "jnb100") == local_static(world, n1, "a")
    del n1.jobs[a6.id]
    steps = n1.reconcile(world.desired("n1"))
    assert not [s for s in steps if isinstance(s, (ReplaceBridgeFdb, DeleteBridgeFdb))]
    assert wait_gone(n1, port(a6))
    assert bridge_static(n1, "jnb100") == local_static(world, n1, "a")
    assert world.reconcile_all(full=True) == {"n1": [], "n2": []}

    # Drift by hand: an entry deleted, one moved to another job's port, one no longer sticky, static entries
    # no job needs (on a job's port, on the VXLAN port), learning turned on on a job's port; another
    # group's job port taken off its bridge (which takes its entry with it).
    def br(*args: str) -> None:
        sh("bridge", "-n", n1.netns, "fdb", *args)

    br("del", a4.mac, "dev", port(a4), "master")
    br("replace", a5.mac, "dev", port(a4), "master", "static", "sticky")
    br("replace", a1.mac, "dev", port(a1), "master", "static")
    br("add", "02:00:00:00:ee:01", "dev", port(a4), "master", "static")
    br("add", "02:00:00:00:ee:02", "dev", "jnx100", "master", "static")
    sh("ip", "-n", n1.netns, "link", "set", port(j["c1"]), "nomaster")
    sh("ip", "-n", n1.netns, "link", "set", port(a5), "type", "bridge_slave", "learning", "on")
    assert bridge_static(n1, "jnb100") == {a5.mac: (port(a4), True), a1.mac: (port(a1), False),
                                           "02:00:00:00:ee:01": (port(a4), False),
                                           "02:00:00:00:ee:02": ("jnx100", False),
                                           j["a2"].mac: ("jnx100", True), j["a3"].mac: ("jnx100", True)}
    assert learning(n1, port(a5)) is True
    assert bridge_static(n1, "jnb300") == {}

    assert world.reconcile_all() == {"n1": [], "n2": []}  # an incremental reconcile trusts its model
    steps = n1.reconcile(world.desired("n1"), full=True)
    assert sorted(map(repr, [s for s in steps if isinstance(s, (ReplaceBridgeFdb, DeleteBridgeFdb))])) == sorted(
        map(repr, [ReplaceBridgeFdb("jnb100", port(a4), a4.mac), ReplaceBridgeFdb("jnb100", port(a5), a5.mac),
                   ReplaceBridgeFdb("jnb100", port(a1), a1.mac), ReplaceBridgeFdb("jnb300", port(j["c1"]), j["c1"].mac),
                   DeleteBridgeFdb("jnb100", port(a4), "02:00:00:00:ee:01"),
                   DeleteBridgeFdb("jnb100", "jnx100", "02:00:00:00:ee:02")]))
    # the ports with learning on, or off their bridge, are set again; nothing else of those jobs is touched
    assert sorted(s.job.job_id for s in steps if isinstance(s, SetJobPort)) == sorted([a5.id, j["c1"].id])
    assert len(steps) == 6 + 2
    for group in ("a", "c"):
        assert bridge_static(n1, f"jnb{world.groups[group].vni}") == local_static(world, n1, group)
    assert learning(n1, port(a5)) is False
    assert world.reconcile_all(full=True) == {"n1": [], "n2": []}

    # A job sending from another job's MAC moves nothing: its port learns nothing, and the entries are
    # sticky (a remote job's frame, which the VXLAN device's port does learn from, moves nothing either).
    send_frame(n1, a5.id, src=a4.mac)
    send_frame(n1, a5.id, src="02:00:00:00:ee:03")
    send_frame(n2, j["a2"].id, src=a4.mac)
    assert bridge_static(n1, "jnb100") == local_static(world, n1, "a")
    assert learned_on_job_ports(n1, "jnb100") == []
    assert ping_ok(n1, a1.id, a4.ip) and ping_ok(n2, j["a2"].id, a4.ip)
    assert learned_on_job_ports(n1, "jnb100") == [] and learned_on_job_ports(n2, "jnb100") == []
    assert world.reconcile_all(full=True) == {"n1": [], "n2": []}


def vxlan_tx(node: Node, dev: str) -> int:
    return int(node.ip("-s", "link", "show", dev)[0]["stats64"]["tx"]["packets"])


def test_a_frame_for_a_silent_local_job_is_not_flooded(world: World) -> None:
    """Without a static entry, a frame for a local job the bridge has not learned (it never sent, or was
    silent for the ageing time) goes to every port of the group: the other local jobs' eth0 and, through the
    VXLAN device, every other node of the group (which floods it to its jobs in turn)."""
    j = populate(world)
    n1, n2 = world.nodes["n1"], world.nodes["n2"]
    a1, a2, a3 = j["a1"], j["a2"], j["a3"]
    b, c = world.add_job("n1", "a", 4), world.add_job("n1", "a", 5)  # b: silent; c: a bystander
    world.reconcile_all()
    assert tx_packets(n1, b.id) == 0  # b never sent anything: the bridge could not have learned its MAC

    def counters() -> dict[str, int]:
        return {"b rx": rx_packets(n1, b.id), "c rx": rx_packets(n1, c.id), "jnx100 tx": vxlan_tx(n1, "jnx100"),
                "a2 rx": rx_packets(n2, a2.id), "a3 rx": rx_packets(n2, a3.id)}

    def ping3() -> dict[str, int]:
        before = counters()
        res = n1.in_job(a1.id, "ping", "-n", "-c3", "-i0.2", "-W1", "-q", b.ip)
        assert res.returncode == 0 and " 0% packet loss" in res.stdout, res.stdout
        after = counters()
        return {k: after[k] - before[k] for k in after}

    nothing_else = {"c rx": 0, "jnx100 tx": 0, "a2 rx": 0, "a3 rx": 0}
    assert ping3() == {"b rx": 3, **nothing_else}
    assert ping3() == {"b rx": 3, **nothing_else}  # b has answered since: still only its static entry counts

    # Control: b's entry deleted by hand. Its port learns nothing, so every frame for b is flooded: to c, and
    # once per other node of the group through the VXLAN device. There it stops: n2's bridge holds b's MAC
    # static on its own VXLAN port (b is a remote job to n2), where the frame came from.
    sh("bridge", "-n", n1.netns, "fdb", "del", b.mac, "dev", f"jnv{b.id}", "master")
    assert ping3() == {"b rx": 3, "c rx": 3, "jnx100 tx": 3, "a2 rx": 0, "a3 rx": 0}
    assert n1.reconcile(world.desired("n1"), full=True) == [ReplaceBridgeFdb("jnb100", f"jnv{b.id}", b.mac)]
    assert ping3() == {"b rx": 3, **nothing_else}

    # The same for a silent REMOTE job d (on n2): its MAC is static on n1's VXLAN port, so a frame for it
    # goes through the tunnel only, never to n1's other jobs; on n2 to d only.
    d = world.add_job("n2", "a", 6)
    world.reconcile_all()
    assert tx_packets(n2, d.id) == 0

    def ping_d() -> dict[str, int]:
        before = {"c rx": rx_packets(n1, c.id), "b rx": rx_packets(n1, b.id), "d rx": rx_packets(n2, d.id),
                  "a2 rx": rx_packets(n2, a2.id)}
        res = n1.in_job(a1.id, "ping", "-n", "-c3", "-i0.2", "-W1", "-q", d.ip)
        assert res.returncode == 0 and " 0% packet loss" in res.stdout, res.stdout
        return {k: v - before[k] for k, v in {"c rx": rx_packets(n1, c.id), "b rx": rx_packets(n1, b.id),
                                              "d rx": rx_packets(n2, d.id), "a2 rx": rx_packets(n2, a2.id)}.items()}

    assert ping_d() == {"c rx": 0, "b rx": 0, "d rx": 3, "a2 rx": 0}
    # Control: d's entry on n1's VXLAN port deleted by hand, and what the bridge learned from d's replies
    # flushed: the next frame for d is flooded to n1's jobs too.
    sh("bridge", "-n", n1.netns, "fdb", "del", d.mac, "dev", "jnx100", "master")
    assert ping_d()["c rx"] >= 1
    assert n1.reconcile(world.desired("n1"), full=True) == [ReplaceBridgeFdb("jnb100", "jnx100", d.mac)]


def test_a_node_made_before_static_entries_is_brought_up_to_date_without_touching_the_jobs(world: World) -> None:
    """An agent upgraded on a node whose job ports learn and have no static entries: its first full reconcile
    sets each port and adds each entry, and enters no job namespace (no eth0 change, no neighbour entry)."""
    populate(world)
    n1 = world.nodes["n1"]
    world.add_job("n1", "a", 4)
    world.reconcile_all()
    for _, job in n1.jobs.values():
        sh("bridge", "-n", n1.netns, "fdb", "del", job.mac, "dev", f"jnv{job.id}", "master")
        sh("ip", "-n", n1.netns, "link", "set", f"jnv{job.id}", "type", "bridge_slave", "learning", "on")
    assert all(not [p for p, _ in bridge_static(n1, f"jnb{g.vni}").values() if p.startswith("jnv")]
               for g in world.groups.values())
    n1.stop()
    n1.start()
    steps = n1.reconcile(world.desired("n1"), full=True)
    assert sorted(type(s).__name__ for s in steps) == ["ReplaceBridgeFdb"] * 4 + ["SetJobPort"] * 4
    for group in ("a", "b", "c"):
        assert bridge_static(n1, f"jnb{world.groups[group].vni}") == local_static(world, n1, group)
    assert all(learning(n1, f"jnv{job.id}") is False for _, job in n1.jobs.values())
    assert world.reconcile_all(full=True) == {"n1": [], "n2": []}



def test_paced_release_of_jobs_that_are_gone(world: World, caplog: pytest.LogCaptureFixture) -> None:
    """paced_release (the agent's setting with tcx accounting): the networks of jobs that are gone are released
    by the releaser thread, one at a time, after the reconcile returned. Meanwhile a job that comes back with the
    same id gets a new network at once (the releaser never deletes the new veth), a full reconcile leaves the
    waiting veths alone (no DeleteLink), and close() hands what still waits to the kernel."""
    n1 = world.nodes["n1"]
    n1.stop()
    n1.start(paced_release=True)
    rec = n1.rec
    assert rec is not None
    jobs = [world.add_job("n1", "a", i) for i in range(1, 23)]
    peer = world.add_job("n2", "a", 40)
    world.reconcile_all()
    gone, stay = jobs[:21], jobs[21]
    back = gone[-1]  # the last of the gone ones in the releaser's queue: ~20 veth deletions wait before it
    for j in gone:
        del n1.jobs[j.id]

    def pending() -> frozenset[str]:
        return rec._releaser.pending if rec._releaser is not None else frozenset()

    def go_and_come_back() -> tuple[list[Any], bool, list[Any], frozenset[str], list[Any], int]:
        rec.refill_spares(limit=1)
        removed = rec.reconcile(world.desired("n1", 2))
        back_waits = f"jnv{back.id}" in pending()
        taken = rec._spares.taken
        n1.jobs[back.id] = ("a", back)  # back again, same id, before the releaser got to its old network
        made = rec.reconcile(world.desired("n1", 3))
        taken = rec._spares.taken - taken
        waiting = pending()
        return removed, back_waits, made, waiting, rec.reconcile(world.desired("n1", 3), full=True), taken

    removed, back_waits, made, waiting, full, taken = n1.call(go_and_come_back)
    assert sorted(s.job_id for s in removed if isinstance(s, DeleteJobNetwork) and s.gone) == sorted(
        j.id for j in gone)
    assert all(not n1.job_ns(j.id).exists() for j in gone[:-1])
    assert back_waits, "the reconcile waited for the releases"
    assert [type(s).__name__ for s in made][:1] == ["CreateJobNetwork"], made
    assert taken == 1 and "not usable" not in caplog.text, "the spare was thrown away: its old veth had the name"
    assert waiting, "nothing waited for the releaser during the full reconcile"
    assert not [s for s in full if isinstance(s, DeleteLink)], full  # the releaser's, not the reconciler's
    assert n1.call(lambda: rec.wait_released(30))
    left = ours(n1)
    assert {f"jnv{j.id}" for j in gone[:-1]}.isdisjoint(left) and {f"jnv{back.id}", f"jnv{stay.id}"} <= left, left
    assert n1.in_job(back.id, "ping", "-c1", "-W2", "-q", peer.ip).returncode == 0
    assert n1.reconcile(world.desired("n1", 3), full=True) == []

    for j in (back, stay):  # close() with releases still waiting: the kernel takes them over
        del n1.jobs[j.id]
    n1.reconcile(world.desired("n1", 4))
    n1.stop()
    deadline = time.monotonic() + 15
    while any(x.startswith("jnv") for x in ours(n1)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(x.startswith("jnv") for x in ours(n1)), ours(n1)
    n1.start()  # (the fixture's teardown closes it again)
