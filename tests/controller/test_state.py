"""State that must survive, and desired state that must reach exactly the right agents (real controller)."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos.jobnet.v1 import jobnet_pb2 as pb
from tests.controller.conftest import ControllerProc, code_of


class Watch:
    """An agent's WatchNode stream, read on a thread so the test can wait with a timeout."""

    def __init__(self, ctl: ControllerProc, node: str, boot: str, revision: int = 0) -> None:
        self.q: queue.Queue[Any] = queue.Queue()
        self.call = ctl.stub.WatchNode(pb.WatchNodeRequest(node=node, boot_id=boot, revision=revision))
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        try:
            for u in self.call:
                self.q.put(u)
            self.q.put("end")
        except grpc.RpcError as e:
            self.q.put(e)

    def next(self, timeout: float = 5) -> pb.NodeStateUpdate:
        u = self.q.get(timeout=timeout)
        assert isinstance(u, pb.NodeStateUpdate), u
        return u

    def quiet(self, wait: float = 0.5) -> bool:
        try:
            self.q.get(timeout=wait)
            return False
        except queue.Empty:
            return True

    def close(self) -> None:
        self.call.cancel()


def finish(ctl: ControllerProc, job: pb.Job, boot: str = "b1") -> None:
    ctl.stub.ReportJobStatus(pb.ReportJobStatusRequest(node=job.node, boot_id=boot, job_id=job.id,
                                                       state=pb.JOB_STATE_FINISHED, end_reason=pb.END_REASON_EXITED))


def test_restart_keeps_everything_and_never_reuses_an_address(tmp_path: Path) -> None:
    c = ControllerProc(tmp_path, "--underlay", "198.18.5.0/24")
    c.start()
    try:
        c.node()
        groups = [c.stub.CreateGroup(pb.CreateGroupRequest(name=n)) for n in ("a", "b")]
        jobs = [c.stub.CreateJob(pb.CreateJobRequest(group="a", node="n1", command=["sleep", "1"])) for _ in range(3)]
        finish(c, jobs[0])  # releases 10.200.0.2 into quarantine
        c.restart()  # SIGKILL: no orderly shutdown
        assert [c.stub.GetGroup(pb.GetGroupRequest(name=g.name)) for g in groups] == \
            [c.stub.GetGroup(pb.GetGroupRequest(name=g.name)) for g in groups]
        for g in groups:
            g2 = c.stub.GetGroup(pb.GetGroupRequest(name=g.name))
            assert (g2.subnet, g2.vni, g2.mtu, g2.gateway) == (g.subnet, g.vni, g.mtu, g.gateway)
        for j in jobs[1:]:
            j2 = c.stub.GetJob(pb.GetJobRequest(id=j.id))
            assert (j2.ip, j2.mac, j2.group, j2.node) == (j.ip, j.mac, j.group, j.node)
        assert c.stub.GetJob(pb.GetJobRequest(id=jobs[0].id)).state == pb.JOB_STATE_FINISHED
        seen = {j.ip for j in jobs}
        for _ in range(5):
            new = c.stub.CreateJob(pb.CreateJobRequest(group="a", node="n1", command=["true"]))
            assert new.ip not in seen, f"{new.ip} handed out twice"
            seen.add(new.ip)
        # a new group gets a new VNI, never one in use
        assert c.stub.CreateGroup(pb.CreateGroupRequest(name="c")).vni not in {g.vni for g in groups}
    finally:
        c.stop()


def test_quarantine_ends(tmp_path: Path) -> None:
    c = ControllerProc(tmp_path, "--quarantine-seconds", "1")
    c.start()
    try:
        c.node()
        c.stub.CreateGroup(pb.CreateGroupRequest(name="a"))
        j = c.stub.CreateJob(pb.CreateJobRequest(group="a", node="n1", command=["true"]))
        finish(c, j)
        assert c.stub.CreateJob(pb.CreateJobRequest(group="a", node="n1", command=["true"])).ip != j.ip
        time.sleep(1.2)
        assert c.stub.CreateJob(pb.CreateJobRequest(group="a", node="n1", command=["true"])).ip == j.ip
    finally:
        c.stop()


def test_changes_reach_only_the_nodes_of_the_group(ctl: ControllerProc) -> None:
    s = ctl.stub
    ctl.node("n1", "198.18.5.11", "b1")
    ctl.node("n2", "198.18.5.12", "b2")
    ctl.node("n3", "198.18.5.13", "b3")
    w = {n: Watch(ctl, n, f"b{n[1]}") for n in ("n1", "n2", "n3")}
    try:
        for n in w:  # nothing yet: an empty snapshot each
            first = w[n].next()
            assert first.snapshot and not first.upsert.groups
        s.CreateGroup(pb.CreateGroupRequest(name="blue"))
        assert all(w[n].quiet(0.3) for n in w), "a group without jobs concerns no node"
        j1 = s.CreateJob(pb.CreateJobRequest(group="blue", node="n1", command=["sleep", "9"]))
        u = w["n1"].next()
        assert not u.snapshot and [j.id for j in u.upsert.jobs] == [j1.id] and u.upsert.groups[0].name == "blue"
        assert not u.upsert.endpoints
        assert w["n2"].quiet() and w["n3"].quiet(0.1)
        j2 = s.CreateJob(pb.CreateJobRequest(group="blue", node="n2", command=["sleep", "9"]))
        u1, u2 = w["n1"].next(), w["n2"].next()
        assert u1.from_revision == u.revision and [e.job_id for e in u1.upsert.endpoints] == [j2.id]
        assert u1.upsert.endpoints[0].underlay_ip == "198.18.5.12" and u1.upsert.endpoints[0].mac == j2.mac
        assert [e.job_id for e in u2.upsert.endpoints] == [j1.id] and [j.id for j in u2.upsert.jobs] == [j2.id]
        assert w["n3"].quiet(), "n3 hosts no blue job"
        s.StopJob(pb.StopJobRequest(id=j1.id))
        u = w["n1"].next()
        assert [(j.id, j.desired_running) for j in u.upsert.jobs] == [(j1.id, False)]
        finish(ctl, j1)
        u1, u2 = w["n1"].next(), w["n2"].next()
        assert list(u1.removed_jobs) == [j1.id] and list(u1.removed_groups) == ["blue"]
        assert list(u1.removed_endpoints) == [j2.id]
        assert list(u2.removed_endpoints) == [j1.id] and not u2.removed_groups
        assert w["n3"].quiet()
    finally:
        for x in w.values():
            x.close()


def test_reconnect_gets_nothing_a_delta_or_a_snapshot(ctl: ControllerProc) -> None:
    s = ctl.stub
    ctl.node("n1", "198.18.5.11", "b1")
    ctl.node("n2", "198.18.5.12", "b2")
    s.CreateGroup(pb.CreateGroupRequest(name="blue"))
    s.CreateJob(pb.CreateJobRequest(group="blue", node="n1", command=["sleep", "9"]))
    w = Watch(ctl, "n1", "b1")
    snap = w.next()
    w.close()
    rev = snap.revision
    # current: an empty delta that says so
    w = Watch(ctl, "n1", "b1", rev)
    u = w.next()
    assert (u.snapshot, u.from_revision, u.revision) == (False, rev, rev) and not u.upsert.jobs
    w.close()
    j2 = s.CreateJob(pb.CreateJobRequest(group="blue", node="n2", command=["sleep", "9"]))
    # behind by one change: the delta since its revision
    w = Watch(ctl, "n1", "b1", rev)
    u = w.next()
    assert not u.snapshot and u.from_revision == rev and [e.job_id for e in u.upsert.endpoints] == [j2.id]
    w.close()
    # a revision the controller never published for this node: a snapshot
    w = Watch(ctl, "n1", "b1", 999_999)
    assert w.next().snapshot
    w.close()
    # after a controller restart with nothing changed, the agent is still current
    current = u.revision
    ctl.restart()
    w = Watch(ctl, "n1", "b1", current)
    u = w.next()
    assert not u.snapshot and u.from_revision == current == u.revision
    w.close()
    # a watch with a stale boot id is refused: the agent must register again
    got, msg = code_of(lambda: next(iter(ctl.stub.WatchNode(pb.WatchNodeRequest(node="n1", boot_id="old")))))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "register again" in msg


def test_a_second_stream_of_a_node_replaces_the_first(ctl: ControllerProc) -> None:
    ctl.node()
    a = Watch(ctl, "n1", "b1")
    a.next()
    b = Watch(ctl, "n1", "b1")
    b.next()
    # the first stream ends (cleanly) instead of competing with the second
    assert a.q.get(timeout=5) == "end"
    b.close()


def test_force_delete_stops_jobs_and_removes_the_group_everywhere(ctl: ControllerProc) -> None:
    s = ctl.stub
    ctl.node("n1", "198.18.5.11", "b1")
    s.CreateGroup(pb.CreateGroupRequest(name="blue"))
    j = s.CreateJob(pb.CreateJobRequest(group="blue", node="n1", command=["sleep", "9"]))
    w = Watch(ctl, "n1", "b1")
    assert w.next().upsert.jobs[0].id == j.id
    s.DeleteGroup(pb.DeleteGroupRequest(name="blue", force=True))
    u = w.next()
    assert list(u.removed_jobs) == [j.id] and list(u.removed_groups) == ["blue"]
    j2 = s.GetJob(pb.GetJobRequest(id=j.id))
    assert j2.state == pb.JOB_STATE_FINISHED and j2.end_reason == pb.END_REASON_STOPPED
    # the node's late report still records what the job used
    s.ReportJobStatus(pb.ReportJobStatusRequest(node="n1", boot_id="b1", job_id=j.id, state=pb.JOB_STATE_FINISHED,
                                                end_reason=pb.END_REASON_SIGNALLED, signal=9,
                                                usage=pb.Usage(cpu_seconds=1.5)))
    j3 = s.GetJob(pb.GetJobRequest(id=j.id))
    assert j3.end_reason == pb.END_REASON_STOPPED and j3.usage.cpu_seconds == 1.5
    assert code_of(s.GetGroup, pb.GetGroupRequest(name="blue"))[0] == grpc.StatusCode.NOT_FOUND
    w.close()


@pytest.mark.slow
def test_node_without_heartbeat_is_lost_and_comes_back(tmp_path: Path) -> None:
    c = ControllerProc(tmp_path, "--node-timeout-seconds", "1", "--heartbeat-interval-ms", "200")
    c.start()
    try:
        c.node()
        c.stub.CreateGroup(pb.CreateGroupRequest(name="a"))
        j = c.stub.CreateJob(pb.CreateJobRequest(group="a", node="n1", command=["sleep", "9"]))
        deadline = time.monotonic() + 10
        while c.stub.ListNodes(pb.ListNodesRequest()).nodes[0].state != pb.NODE_STATE_LOST:
            assert time.monotonic() < deadline, "node never marked lost"
            time.sleep(0.2)
        got, msg = code_of(c.stub.CreateJob, pb.CreateJobRequest(group="a", node="n1", command=["x"]))
        assert got == grpc.StatusCode.FAILED_PRECONDITION and "lost" in msg
        # the job on the lost node stays (the node may come back) ...
        assert c.stub.GetJob(pb.GetJobRequest(id=j.id)).state == pb.JOB_STATE_PENDING
        c.stub.Heartbeat(pb.HeartbeatRequest(name="n1", boot_id="b1"))
        assert c.stub.ListNodes(pb.ListNodesRequest()).nodes[0].state == pb.NODE_STATE_READY
    finally:
        c.stop()


def test_job_macs_carry_their_nodes_prefix(ctl: ControllerProc) -> None:
    """Accounting tells same-node peers by MAC prefix (02:NN:NN = node number): unique per node, kept."""
    s = ctl.stub
    p1 = ctl.node("n1", "198.18.5.11", "b1").node.mac_prefix
    p2 = ctl.node("n2", "198.18.5.12", "b2").node.mac_prefix
    assert p1 != p2 and p1.startswith("02:") and len(p1) == 8
    assert ctl.node("n1", "198.18.5.11", "b1-again").node.mac_prefix == p1, "a restart keeps the number"
    s.CreateGroup(pb.CreateGroupRequest(name="blue"))
    macs = {n: [s.CreateJob(pb.CreateJobRequest(group="blue", node=n, command=["true"])).mac for _ in range(20)]
            for n in ("n1", "n2")}
    assert all(m.startswith(p1 + ":") for m in macs["n1"]) and all(m.startswith(p2 + ":") for m in macs["n2"])
    assert len(set(macs["n1"] + macs["n2"])) == 40
