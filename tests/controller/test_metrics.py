"""The controller's /metrics parse with the Prometheus text parser and agree with the API."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.jobnet.v1 import jobnet_pb2 as pb
from tests.controller.conftest import ControllerProc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def mctl(tmp_path: Path) -> object:
    port = free_port()
    c = ControllerProc(tmp_path, "--metrics-listen", f"127.0.0.1:{port}")
    c.start()
    c.port = port  # type: ignore[attr-defined]
    yield c
    c.stop()


def test_metrics_agree_with_the_api(mctl: ControllerProc) -> None:
    s = mctl.stub
    mctl.node("n1", "198.18.5.11", "b1")
    mctl.node("n2", "198.18.5.12", "b2")
    for g in ("blue", "red"):
        s.CreateGroup(pb.CreateGroupRequest(name=g))
    jobs = [s.CreateJob(pb.CreateJobRequest(group="blue", node=n, command=["sleep", "1"])) for n in ("n1", "n2", "n1")]
    s.StopJob(pb.StopJobRequest(id=jobs[0].id))
    s.ReportJobStatus(pb.ReportJobStatusRequest(node="n2", boot_id="b2", job_id=jobs[1].id,
                                                state=pb.JOB_STATE_FINISHED, end_reason=pb.END_REASON_OOM))
    with pytest.raises(grpc.RpcError):
        s.CreateGroup(pb.CreateGroupRequest(name="blue"))
    m = scrape(mctl.port)  # type: ignore[attr-defined]
    assert m[("jobnet_groups", ())] == len(s.ListGroups(pb.ListGroupsRequest()).groups) == 2
    assert m[("jobnet_nodes", (("state", "ready"),))] == 2
    api_jobs = s.ListJobs(pb.ListJobsRequest(include_finished=True)).jobs
    for state, name in ((pb.JOB_STATE_PENDING, "pending"), (pb.JOB_STATE_STOPPING, "stopping"),
                        (pb.JOB_STATE_FINISHED, "finished")):
        assert m[("jobnet_jobs", (("state", name),))] == sum(j.state == state for j in api_jobs)
    assert m[("jobnet_group_live_jobs", (("group", "blue"),))] == 2
    assert m[("jobnet_group_live_jobs", (("group", "red"),))] == 0
    assert m[("jobnet_jobs_ended_total", (("reason", "oom"),))] == 1
    assert m[("jobnet_rpcs_total", (("code", "ALREADY_EXISTS"), ("method", "CreateGroup")))] == 1
    assert m[("jobnet_rpcs_total", (("code", "OK"), ("method", "CreateGroup")))] == 2
    assert m[("jobnet_revision", ())] > 0
    # no job id appears as a label: cardinality stays bounded by nodes, groups and states
    text = urllib.request.urlopen(f"http://127.0.0.1:{mctl.port}/metrics", timeout=5).read().decode()  # type: ignore[attr-defined]
    assert not any(j.id in text for j in jobs)


def test_network_bytes_by_group_and_class_agree_with_query_usage(mctl: ControllerProc) -> None:
    import time

    s = mctl.stub
    mctl.node("n1", "198.18.5.11", "b1")
    s.CreateGroup(pb.CreateGroupRequest(name="blue"))
    jobs = [s.CreateJob(pb.CreateJobRequest(group="blue", node="n1", command=["true"])) for _ in range(2)]
    now = int(time.time())
    for i, j in enumerate(jobs):
        net = pb.NetUsage(tx=pb.NetClassCounters(local=pb.NetCounters(bytes=1000 * (i + 1), packets=i + 1),
                                                 overlay=pb.NetCounters(bytes=77, packets=1)),
                          rx=pb.NetClassCounters(external=pb.NetCounters(bytes=42, packets=1)))
        r = s.ReportUsage(pb.ReportUsageRequest(node="n1", boot_id="b1", reports=[
            pb.JobUsageReport(job_id=j.id, seq=1, sampled={"seconds": now}, net=net)]))
        assert r.accepted == 1
    m = scrape(mctl.port)  # type: ignore[attr-defined]
    q = s.QueryUsage(pb.QueryUsageRequest(group="blue", by="group")).rows[0].net
    for direction, cls in (("tx", "local"), ("tx", "overlay"), ("rx", "external"), ("rx", "local")):
        want = getattr(getattr(q, direction), cls)
        labels = (("class", cls), ("direction", direction), ("group", "blue"))
        assert m[("jobnet_network_bytes_total", labels)] == want.bytes
        assert m[("jobnet_network_packets_total", labels)] == want.packets
    assert m[("jobnet_network_bytes_total", (("class", "local"), ("direction", "tx"), ("group", "blue")))] == 3000
    assert m[("jobnet_usage_reports_total", (("outcome", "accepted"),))] == 2
