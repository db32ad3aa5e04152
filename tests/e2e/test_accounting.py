"""Issue 4 end to end: per-job network accounting through real agents and the real controller on a 3-node lab.
Jobs send UDP to each other; what the controller stores (GetJob(...).net, QueryUsage) must be the frame bytes
exactly (P + 8 + 34 n per datagram of P payload bytes in n frames at the group's MTU), in the right class, for
jobs of any length, with nothing when idle, and nothing lost when an agent is SIGKILLed during traffic or the
controller is away for a minute (the agents' spools hold the reports)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from deploy.lab import Lab, wait_running
from protos.jobnet.v1 import jobnet_pb2 as pb
from tests.accounting.conftest import frag_count
from tests.e2e.conftest import running_lab

pytestmark = [pytest.mark.root, pytest.mark.lab]
pytest.importorskip("controller.accounting", reason="the controller side of accounting (ReportUsage) is not there")

SIZES = (0, 1, 1472, 1473, 8000, 65507)
PORT = 9000

# A receiver: counts datagrams until `idle` seconds pass without one (the first may take `first` seconds).
RECV = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("0.0.0.0", 9000))
s.settimeout(float(sys.argv[1]))
n = b = 0
try:
    while True:
        b += len(s.recv(70000))
        n += 1
        s.settimeout(float(sys.argv[2]))
except socket.timeout:
    pass
print(n, b, flush=True)
"""
# A sender: every size in turn to every address, `gap` seconds apart, `repeat` times.
SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
ips, sizes, gap, repeat = sys.argv[1].split(","), [int(x) for x in sys.argv[2].split(",")], float(sys.argv[3]), \
    int(sys.argv[4])
for _ in range(repeat):
    for ip in ips:
        for n in sizes:
            s.sendto(b"x" * n, (ip, 9000))
            if gap:
                time.sleep(gap)
"""


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    with running_lab(request, "jnu", ("--usage-interval", "1")) as lab:
        yield lab


def net(n: pb.NetUsage) -> dict[str, tuple[int, int]]:
    """The non-zero counters of a NetUsage: {"tx_overlay": (bytes, packets), ...}."""
    out = {}
    for d in ("tx", "rx"):
        for c in ("local", "overlay", "external"):
            x = getattr(getattr(n, d), c)
            if x.bytes or x.packets:
                out[f"{d}_{c}"] = (x.bytes, x.packets)
    return out


def frames(sizes: Any, mtu: int, repeat: int = 1) -> tuple[int, int]:
    """(bytes, frames) of UDP datagrams of these payload sizes at this MTU."""
    b = sum(p + 8 + 34 * frag_count(p, mtu) for p in sizes)
    return b * repeat, sum(frag_count(p, mtu) for p in sizes) * repeat


def job(lab: Lab, group: str, node: str, *argv: str) -> pb.Job:
    j = lab.stub().CreateJob(pb.CreateJobRequest(group=group, node=node, command=list(argv)))
    wait_running(lab, [j.id])
    return lab.stub().GetJob(pb.GetJobRequest(id=j.id))


def receiver(lab: Lab, group: str, node: str, first: float = 60, idle: float = 3) -> pb.Job:
    return job(lab, group, node, "python3", "-c", RECV, str(first), str(idle))


def sender(lab: Lab, group: str, node: str, ips: list[str], sizes: Any, gap: float = 0.0, repeat: int = 1) -> str:
    return lab.stub().CreateJob(pb.CreateJobRequest(group=group, node=node, command=[
        "python3", "-c", SEND, ",".join(ips), ",".join(map(str, sizes)), str(gap), str(repeat)])).id


def finished(lab: Lab, job_id: str, timeout: float = 120) -> pb.Job:
    deadline = time.monotonic() + timeout
    while (j := lab.stub().GetJob(pb.GetJobRequest(id=job_id))).state != pb.JOB_STATE_FINISHED:
        assert time.monotonic() < deadline, f"job {job_id} did not finish: {j}"
        time.sleep(0.1)
    return j


def final_net(lab: Lab, job_id: str, want: dict[str, tuple[int, int]], timeout: float = 60) -> dict[str, Any]:
    """The job's totals at the controller once they equal `want` (or what they are after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        j = lab.stub().GetJob(pb.GetJobRequest(id=job_id))
        got = net(j.net)
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def received(lab: Lab, job_id: str) -> tuple[int, int]:
    n, b = lab.cli("job", "logs", job_id).stdout.split()
    return int(n), int(b)


def test_udp_to_the_byte_local_and_overlay(lab: Lab) -> None:
    lab.stub().CreateGroup(pb.CreateGroupRequest(name="acc-exact"))
    mtu = lab.stub().GetGroup(pb.GetGroupRequest(name="acc-exact")).mtu
    r_over = receiver(lab, "acc-exact", "n2")
    r_local = receiver(lab, "acc-exact", "n1")
    time.sleep(1)  # both bound
    s = sender(lab, "acc-exact", "n1", [r_over.ip, r_local.ip], SIZES)
    assert finished(lab, s).exit_code == 0
    for r in (r_over, r_local):
        assert finished(lab, r.id).exit_code == 0
        assert received(lab, r.id) == (len(SIZES), sum(SIZES))
    want = frames(SIZES, mtu)
    assert final_net(lab, s, {"tx_overlay": want, "tx_local": want}) == {"tx_overlay": want, "tx_local": want}
    assert final_net(lab, r_over.id, {"rx_overlay": want}) == {"rx_overlay": want}
    assert final_net(lab, r_local.id, {"rx_local": want}) == {"rx_local": want}
    # the same through QueryUsage, summed per group
    q = lab.stub().QueryUsage(pb.QueryUsageRequest(group="acc-exact", by="group"))
    assert [row.key for row in q.rows] == ["acc-exact"]
    assert net(q.rows[0].net) == {"tx_overlay": want, "tx_local": want, "rx_overlay": want, "rx_local": want}
    assert q.rows[0].total_bytes == 4 * want[0]


def test_job_shorter_than_100_ms_is_fully_accounted(lab: Lab) -> None:
    """bash sends one 1000-byte datagram through /dev/udp and exits: a job of a few milliseconds. Its
    table was in place before it started and its final totals were read after it ended."""
    lab.stub().CreateGroup(pb.CreateGroupRequest(name="acc-short"))
    r = receiver(lab, "acc-short", "n2", idle=2)
    time.sleep(1)
    s = lab.stub().CreateJob(pb.CreateJobRequest(group="acc-short", node="n1", command=[
        "bash", "-c", f"printf '%1000s' > /dev/udp/{r.ip}/{PORT}"])).id
    j = finished(lab, s)
    assert j.exit_code == 0, j.message
    assert j.usage.cpu_seconds < 0.1, j.usage
    assert final_net(lab, s, {"tx_overlay": (1042, 1)}) == {"tx_overlay": (1042, 1)}
    finished(lab, r.id)
    assert received(lab, r.id) == (1, 1000)
    assert final_net(lab, r.id, {"rx_overlay": (1042, 1)}) == {"rx_overlay": (1042, 1)}


@pytest.mark.slow
def test_idle_jobs_count_zero_for_30_seconds(lab: Lab) -> None:
    lab.stub().CreateGroup(pb.CreateGroupRequest(name="acc-idle"))
    jobs = [job(lab, "acc-idle", n, "sleep", "600") for n in ("n1", "n1", "n2")]  # local and overlay peers
    t0 = time.time()
    time.sleep(30)
    rows = {row.key: row for row in lab.stub().QueryUsage(pb.QueryUsageRequest(group="acc-idle")).rows}
    assert set(rows) == {j.id for j in jobs}, "every job has reported samples"
    for j in jobs:
        assert net(rows[j.id].net) == {}, (j.id, rows[j.id])
    series = lab.stub().QueryUsage(pb.QueryUsageRequest(group="acc-idle", by="all", step_s=5))
    assert series.rows and all(net(p.net) == {} for p in series.rows[0].series)
    assert time.time() - t0 >= 30
    for j in jobs:
        lab.stub().StopJob(pb.StopJobRequest(id=j.id))
    for j in jobs:
        finished(lab, j.id)
        assert final_net(lab, j.id, {}, timeout=2) == {}


def test_agent_sigkill_during_traffic_loses_nothing(lab: Lab) -> None:
    """Both agents are SIGKILLed (and restarted) while 2000 datagrams flow: the restarted agents read the
    kernel counters again (they are cumulative and live in the job's namespace, which outlives the agent)
    and re-send their spools; the controller's final totals are exact."""
    lab.stub().CreateGroup(pb.CreateGroupRequest(name="acc-kill"))
    mtu = lab.stub().GetGroup(pb.GetGroupRequest(name="acc-kill")).mtu
    r = receiver(lab, "acc-kill", "n2", idle=8)
    time.sleep(1)
    count, size = 2000, 1000
    s = sender(lab, "acc-kill", "n1", [r.ip], [size], gap=0.003, repeat=count)
    wait_running(lab, [s])
    time.sleep(1.5)
    lab.restart_agent("n1", signal.SIGKILL)
    time.sleep(1.5)
    lab.restart_agent("n2", signal.SIGKILL)
    assert finished(lab, s).exit_code == 0
    want = frames([size], mtu, count)
    assert final_net(lab, s, {"tx_overlay": want}) == {"tx_overlay": want}
    finished(lab, r.id)
    n, b = received(lab, r.id)
    assert b == n * size
    assert final_net(lab, r.id, {"rx_overlay": frames([size], mtu, n)}) == {"rx_overlay": frames([size], mtu, n)}
    assert n == count, f"{count - n} datagrams lost on the way (not an accounting error; the pacing was too fast)"


@pytest.mark.slow
def test_controller_down_for_a_minute_loses_nothing(lab: Lab) -> None:
    """Jobs send, end and are sampled while the controller is down for 60 s; the agents keep every report
    (UNAVAILABLE keeps the spool) and deliver them once it is back: the totals are exact."""
    lab.stub().CreateGroup(pb.CreateGroupRequest(name="acc-down"))
    mtu = lab.stub().GetGroup(pb.GetGroupRequest(name="acc-down")).mtu
    r = receiver(lab, "acc-down", "n3", idle=10)
    r2 = receiver(lab, "acc-down", "n1", idle=10)
    time.sleep(1)
    count = 1500
    s = sender(lab, "acc-down", "n1", [r.ip, r2.ip], [100, 3000], gap=0.005, repeat=count)
    wait_running(lab, [s])
    lab.kill("ctl", signal.SIGKILL)
    time.sleep(60)  # the sender (~15 s) and the receivers end meanwhile; samples every second pile up
    spools = [lab.node_dir(n) / "state" / "usage" for n in ("n1", "n3")]
    assert all(any(p.glob("seg-*.jsonl")) for p in spools), "reports wait in the spools"
    lab.start_controller()
    assert finished(lab, s).exit_code == 0
    want = frames([100, 3000], mtu, count)
    assert final_net(lab, s, {"tx_overlay": want, "tx_local": want}) == {"tx_overlay": want, "tx_local": want}
    for rj, cls in ((r, "rx_overlay"), (r2, "rx_local")):
        finished(lab, rj.id)
        n, b = received(lab, rj.id)
        assert n == 2 * count and b == count * 3100
        assert final_net(lab, rj.id, {cls: want}) == {cls: want}
