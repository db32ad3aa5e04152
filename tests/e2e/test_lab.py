"""End to end on a real 3-node lab: a controller and three agent processes, each node a network
namespace on an underlay bridge, jobs in their own namespaces joined by per-group bridges and VXLAN.

The tests in this module share one lab and run in order: connectivity, then agent SIGKILL, then
drift repaired, then controller restart.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from typing import Any

import pytest

from deploy.lab import Lab, wait_running
from protos.jobnet.v1 import jobnet_pb2 as pb

from .conftest import TcpServers, eventually, ping, run_jobs

pytestmark = [pytest.mark.root, pytest.mark.lab]

LAYOUT = [("blue", "n1"), ("blue", "n2"), ("blue", "n3"), ("blue", "n1"), ("red", "n1"), ("red", "n2")]


@pytest.fixture(scope="module")
def world(lab: Lab) -> dict[str, Any]:
    lab.stub().CreateGroup(pb.CreateGroupRequest(name="blue"))
    lab.stub().CreateGroup(pb.CreateGroupRequest(name="red"))
    jobs = run_jobs(lab, LAYOUT)
    return {"jobs": jobs}


def _node_kernel_state(lab: Lab, node: str) -> dict[str, Any]:
    """Independent oracle: what `ip`/`bridge` see in the node's namespace (our objects only)."""
    links = json.loads(lab.in_node(node, ["ip", "-j", "-d", "link", "show"]).stdout)
    fdb = json.loads(lab.in_node(node, ["bridge", "-j", "fdb", "show"]).stdout)
    neigh = json.loads(lab.in_node(node, ["ip", "-j", "neigh", "show"]).stdout)
    # (the agent's spare namespaces, jnp-* with their veths jnw*, are not state: made anew after a restart)
    ours = sorted(name for name in (link["ifname"] for link in links)
                  if name.startswith("jn") and name != "jnul0" and not name.startswith("jnw"))
    fdb_ours = sorted((e["mac"], e.get("dst", ""), e["ifname"]) for e in fdb if e.get("ifname", "").startswith("jnx"))
    neigh_ours = sorted((e["dst"], e.get("lladdr", ""), e["dev"]) for e in neigh if e.get("dev", "").startswith("jnx"))
    nsfiles = sorted(p.name for p in (lab.node_dir(node) / "netns").iterdir() if not p.name.startswith("jnp-"))
    return {"links": ours, "fdb": fdb_ours, "neigh": neigh_ours, "netns": nsfiles}


def test_same_group_reaches_across_and_within_nodes_other_group_does_not(lab: Lab, world: dict[str, Any]) -> None:
    jobs = world["jobs"]
    servers = TcpServers(lab)
    try:
        for j in jobs:
            servers.start(j)
        bad = []
        for src in jobs:
            for dst in jobs:
                if src.id == dst.id:
                    continue
                same = src.group == dst.group
                icmp = ping(lab, src, dst.ip)
                tcp = servers.connect(src, dst.ip, timeout=2.0 if same else 1.0)
                if icmp != same or tcp != same:
                    bad.append(f"{src.group}@{src.node}({src.ip}) -> {dst.group}@{dst.node}({dst.ip}): "
                               f"icmp={icmp} tcp={tcp}, expected {same}")
        assert not bad, "\n".join(bad)
    finally:
        servers.stop()


def test_job_cannot_reach_underlay_or_controller(lab: Lab, world: dict[str, Any]) -> None:
    servers = TcpServers(lab)
    src = world["jobs"][0]
    for member in lab.members:
        assert not ping(lab, src, lab.underlay_ip(member)), f"job reached underlay address of {member}"
    assert not servers.connect(src, lab.underlay_ip("ctl") + "", timeout=1.0)
    r = lab.in_job(src.node, src.id, ["ip", "-j", "route", "show"])
    routes = json.loads(r.stdout)
    assert any(rt["dst"] == "default" for rt in routes), routes


def test_vxlan_devices_and_entries_follow_the_groups(lab: Lab, world: dict[str, Any]) -> None:
    jobs = world["jobs"]
    blue = lab.stub().GetGroup(pb.GetGroupRequest(name="blue"))
    red = lab.stub().GetGroup(pb.GetGroupRequest(name="red"))
    assert blue.vni != red.vni and blue.mtu == 1450
    n3 = lab.in_node("n3", ["ip", "-j", "-d", "link", "show"])
    names = {link["ifname"]: link for link in json.loads(n3.stdout)}
    assert f"jnx{blue.vni}" in names and f"jnx{red.vni}" not in names, "red has no job on n3"
    vx = names[f"jnx{blue.vni}"]["linkinfo"]["info_data"]
    assert vx["id"] == blue.vni and vx["port"] == 4789 and not vx.get("learning", False)
    assert names[f"jnx{blue.vni}"]["mtu"] == 1450
    fdb = json.loads(lab.in_node("n3", ["bridge", "-j", "fdb", "show", "dev", f"jnx{blue.vni}"]).stdout)
    flood = sorted(e["dst"] for e in fdb if e["mac"] == "00:00:00:00:00:00")
    assert flood == sorted({lab.underlay_ip(n) for n in ("n1", "n2")}), "flood only to nodes hosting blue"
    remote_blue = [j for j in jobs if j.group == "blue" and j.node != "n3"]
    for j in remote_blue:
        # The VXLAN device's own entry (with dst); the bridge may also have learned the MAC on its port.
        entry = [e for e in fdb if e["mac"] == j.mac and "dst" in e]
        assert entry and entry[0]["dst"] == lab.underlay_ip(j.node)
        assert entry[0].get("state") == "permanent", entry
    neigh = json.loads(lab.in_node("n3", ["ip", "-j", "neigh", "show", "dev", f"jnx{blue.vni}"]).stdout)
    assert sorted((n["dst"], n["lladdr"]) for n in neigh) == sorted((j.ip, j.mac) for j in remote_blue)
    # inside a job: its own address, MAC and MTU
    j = jobs[0]
    eth0 = json.loads(lab.in_job(j.node, j.id, ["ip", "-j", "addr", "show", "eth0"]).stdout)[0]
    assert eth0["address"] == j.mac and eth0["mtu"] == 1450
    assert [a["local"] for a in eth0["addr_info"] if a["family"] == "inet"] == [j.ip]
    assert not [a for a in eth0["addr_info"] if a["family"] == "inet6"], "IPv6 is off unless asked for"


def test_agent_sigkill_restart_keeps_jobs_and_changes_nothing(lab: Lab, world: dict[str, Any]) -> None:
    jobs = world["jobs"]
    before = {n: _node_kernel_state(lab, n) for n in ("n1", "n2", "n3")}
    pids = {j.id: lab.stub().GetJob(pb.GetJobRequest(id=j.id)).pid for j in jobs if j.node == "n1"}
    log = lab.node_dir("n1") / "agent.log"
    offset = log.stat().st_size
    lab.restart_agent("n1", signal.SIGKILL)
    lab.wait_nodes_ready()
    # the restarted agent's first full reconcile finds nothing to change
    def first_full() -> str | None:
        text = log.read_text()[offset:]
        m = re.search(r"full reconcile of revision \d+: (\d+) step", text)
        return m.group(1) if m else None
    assert eventually(first_full, timeout=20) == "0", log.read_text()[offset:][-3000:]
    for j in jobs:
        assert lab.stub().GetJob(pb.GetJobRequest(id=j.id)).state == pb.JOB_STATE_RUNNING
    for jid, pid in pids.items():
        assert lab.stub().GetJob(pb.GetJobRequest(id=jid)).pid == pid, "the job was adopted, not restarted"
    after = {n: _node_kernel_state(lab, n) for n in ("n1", "n2", "n3")}
    assert after == before, "nothing duplicated, nothing leaked"
    blue = [j for j in jobs if j.group == "blue"]
    assert ping(lab, blue[0], blue[1].ip) and ping(lab, blue[1], blue[0].ip)


def test_entries_deleted_behind_the_agents_back_come_back(lab: Lab, world: dict[str, Any]) -> None:
    jobs = world["jobs"]
    blue = lab.stub().GetGroup(pb.GetGroupRequest(name="blue"))
    remote = next(j for j in jobs if j.group == "blue" and j.node == "n2")
    dev = f"jnx{blue.vni}"
    before = _node_kernel_state(lab, "n1")
    lab.in_node("n1", ["bridge", "fdb", "del", remote.mac, "dev", dev, "dst", lab.underlay_ip("n2")])
    lab.in_node("n1", ["ip", "neigh", "del", remote.ip, "dev", dev])
    victim = next(j for j in jobs if j.node == "n1")
    subprocess.run(["nsenter", f"--net={lab.job_netns('n1', victim.id)}", "ip", "route", "del", "default"],
                   check=True)
    assert _node_kernel_state(lab, "n1") != before
    assert eventually(lambda: _node_kernel_state(lab, "n1") == before, timeout=20)
    routes = json.loads(lab.in_job("n1", victim.id, ["ip", "-j", "route", "show"]).stdout)
    assert eventually(lambda: any(r["dst"] == "default" for r in
                                  json.loads(lab.in_job("n1", victim.id, ["ip", "-j", "route"]).stdout)), 20), routes
    local_blue = next(j for j in jobs if j.group == "blue" and j.node == "n1")
    assert ping(lab, local_blue, remote.ip)


def test_controller_restart_keeps_everything_and_never_reuses_an_ip(lab: Lab, world: dict[str, Any]) -> None:
    stub = lab.stub()
    groups = {g.name: (g.subnet, g.vni, g.mtu) for g in stub.ListGroups(pb.ListGroupsRequest()).groups}
    jobs = {j.id: (j.ip, j.mac, j.node, j.group) for j in stub.ListJobs(pb.ListJobsRequest()).jobs}
    # a finished job's address must stay quarantined across the restart
    short = stub.CreateJob(pb.CreateJobRequest(group="red", node="n3", command=["true"]))
    assert eventually(lambda: stub.GetJob(pb.GetJobRequest(id=short.id)).state == pb.JOB_STATE_FINISHED, 20)
    lab.restart_controller(signal.SIGKILL)
    stub = lab.stub()
    lab.wait_nodes_ready()
    assert {g.name: (g.subnet, g.vni, g.mtu) for g in stub.ListGroups(pb.ListGroupsRequest()).groups} == groups
    assert {j.id: (j.ip, j.mac, j.node, j.group) for j in stub.ListJobs(pb.ListJobsRequest()).jobs} == jobs
    finished = stub.GetJob(pb.GetJobRequest(id=short.id))
    assert finished.state == pb.JOB_STATE_FINISHED and finished.end_reason == pb.END_REASON_EXITED
    new = [stub.CreateJob(pb.CreateJobRequest(group="red", node="n3", command=["sleep", "600"])) for _ in range(3)]
    used = {ip for ip, *_ in jobs.values()} | {short.ip}
    assert not {j.ip for j in new} & used, "an address was handed out twice"
    wait_running(lab, [j.id for j in new])
    red_n1 = next(stub.GetJob(pb.GetJobRequest(id=j)) for j, v in jobs.items() if v[3] == "red" and v[2] == "n1")
    assert eventually(lambda: ping(lab, red_n1, new[0].ip), 20), "new job reachable after the controller restart"
