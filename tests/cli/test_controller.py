"""The jobnet CLI against a real controller process (`python -m controller.main`).

No agent runs: the test registers fake nodes through RegisterNode (and keeps them alive with heartbeats),
plays the agent's part where a command needs one (ReportJobStatus for `job run --wait`), and serves job logs
from a small in-process NodeAgent service on 127.0.0.1. The CLI runs in-process through `main([...])`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from jobnet_cli import main as cli
from protos.jobnet.v1 import jobnet_pb2 as pb
from protos.jobnet.v1 import jobnet_pb2_grpc as pbg

REPO = Path(__file__).resolve().parents[2]
JOB_ID = re.compile(r"^[0-9a-f]{10}$")


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def fields(self) -> list[str]:
        """`show` output as 'Key: value' lines (alignment and indentation dropped)."""
        return [re.sub(r"^(\S[^:]*):\s+", r"\1: ", line.strip()) for line in self.out.splitlines()]


class FakeAgent(pbg.NodeAgentServicer):
    """Serves job output like the node agent does (offset, negative = from the end; finished flag)."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, str], bytes] = {}
        self.finished: set[str] = set()

    def ReadJobLog(self, request: pb.ReadJobLogRequest, context: grpc.ServicerContext) -> pb.ReadJobLogResponse:
        data = self.files.get((request.job_id, request.stream or "stdout"))
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.job_id} has no {request.stream} on this node")
        assert data is not None
        size = len(data)
        offset = request.offset if request.offset >= 0 else max(0, size + request.offset)
        chunk = data[offset:offset + min(request.max_bytes or (1 << 20), 1 << 20)]
        return pb.ReadJobLogResponse(data=chunk, offset=offset, size=size, finished=request.job_id in self.finished)


@dataclass
class World:
    address: str
    tmp: Path
    stub: pbg.ControllerStub
    agent: FakeAgent
    capsys: pytest.CaptureFixture[str] | None = None
    nodes: dict[str, str] = field(default_factory=dict)  # name -> boot id

    def cli(self, *args: str) -> Result:
        assert self.capsys is not None
        self.capsys.readouterr()
        code = cli.main(["--controller", self.address, *args])
        got = self.capsys.readouterr()
        return Result(code, got.out, got.err)

    def report(self, job_id: str, state: int, **kw: Any) -> None:
        job = self.stub.GetJob(pb.GetJobRequest(id=job_id), timeout=5)
        self.stub.ReportJobStatus(pb.ReportJobStatusRequest(node=job.node, boot_id=self.nodes[job.node],
                                                            job_id=job_id, state=state, **kw), timeout=5)


def _wait_for_socket(proc: subprocess.Popen[str], sock: Path, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"controller exited with {proc.returncode}:\n{log.read_text()}")
        if sock.exists() and "listening on" in log.read_text():
            return
        time.sleep(0.05)
    raise TimeoutError(f"controller did not listen on {sock} within {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("cli")
    sock, log = tmp / "c.sock", tmp / "controller.log"
    with open(log, "w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "controller.main", "--listen", f"unix:{sock}",
                                 "--db", str(tmp / "c.db")],
                                cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, text=True)
    agent = FakeAgent()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pbg.add_NodeAgentServicer_to_server(agent, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()
    channel: grpc.Channel | None = None
    try:
        _wait_for_socket(proc, sock, log)
        channel = grpc.insecure_channel(f"unix:{sock}")
        w = World(address=f"unix:{sock}", tmp=tmp, stub=pbg.ControllerStub(channel), agent=agent)
        for name, ip, boot in (("n1", "198.18.5.11", "b1"), ("n2", "198.18.5.12", "b2")):
            w.stub.RegisterNode(pb.RegisterNodeRequest(name=name, underlay_ip=ip, boot_id=boot, underlay_mtu=1500,
                                                       agent_version="fake-0", agent_address=f"127.0.0.1:{port}"),
                                timeout=5)
            w.nodes[name] = boot

        def heartbeat() -> None:  # the nodes stay READY however long the tests take
            while not stop.wait(1.0):
                for name, boot in list(w.nodes.items()):
                    with contextlib.suppress(grpc.RpcError):
                        w.stub.Heartbeat(pb.HeartbeatRequest(name=name, boot_id=boot), timeout=5)

        threading.Thread(target=heartbeat, daemon=True).start()
        yield w
    finally:
        stop.set()
        if channel is not None:
            channel.close()
        server.stop(None)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def w(world: World, capsys: pytest.CaptureFixture[str]) -> Iterator[World]:
    world.capsys = capsys
    yield world
    world.capsys = None


# ---------------------------------------------------------------- groups


def test_group_create_list_show_delete(w: World) -> None:
    r = w.cli("group", "create", "blue")
    assert r.code == 0, r.err
    assert re.match(r"^group blue created: 10\.200\.\d+\.0/24, VNI \d+, MTU 1450$", r.out.strip()), r.out

    r = w.cli("group", "list")
    assert r.code == 0
    header, *rows = r.out.splitlines()
    assert header.split() == ["NAME", "SUBNET", "GATEWAY", "VNI", "MTU", "JOBS", "FREE", "CREATED"]
    blue = next(row for row in rows if row.split()[0] == "blue")
    assert "1450" in blue.split() and "253" in blue.split(), blue

    r = w.cli("group", "show", "blue")
    assert r.code == 0
    assert re.search(r"^Subnet:\s+10\.200\.\d+\.0/24$", r.out, re.M) and re.search(r"^MTU:\s+1450$", r.out, re.M)
    assert re.search(r"^Created:\s+\d{4}-\d\d-\d\dT.*\((just now|\d+s ago)\)$", r.out, re.M), r.out

    r = w.cli("group", "delete", "blue")
    assert (r.code, r.out.strip()) == (0, "group blue deleted")
    r = w.cli("group", "show", "blue")
    assert r.code == cli.EXIT_NOT_FOUND
    assert r.err.startswith("jobnet: error: no group named blue"), r.err


def test_group_json_output_parses(w: World) -> None:
    r = w.cli("-o", "json", "group", "create", "jsn", "--prefix-len", "26", "--vni", "4242", "--mtu", "1400")
    assert r.code == 0, r.err
    g = r.json()
    assert (g["name"], g["vni"], g["mtu"]) == ("jsn", 4242, 1400) and g["subnet"].endswith("/26")
    assert g["live_jobs"] == 0 and g["free_addresses"] == 61

    r = w.cli("-o", "json", "group", "list")
    groups = r.json()
    assert isinstance(groups, list) and "jsn" in [x["name"] for x in groups]
    assert w.cli("-o", "json", "group", "show", "jsn").json() == g | {"created": g["created"]}

    r = w.cli("-o", "json", "group", "create", "cidr", "--cidr", "10.200.64.0/22")
    assert r.code == 0 and r.json()["subnet"] == "10.200.64.0/22" and r.json()["gateway"] == "10.200.64.1"
    assert w.cli("-o", "json", "group", "delete", "jsn").json() == {"name": "jsn", "deleted": True}
    assert w.cli("group", "delete", "cidr").code == 0


def test_duplicate_group_exits_1_with_the_message(w: World) -> None:
    assert w.cli("group", "create", "dup").code == 0
    r = w.cli("group", "create", "dup")
    assert r.code == cli.EXIT_FAILURE
    assert r.err.startswith("jobnet: error: group dup already exists"), r.err
    assert r.out == ""
    r = w.cli("group", "create", "dup2", "--vni", str(w.stub.GetGroup(pb.GetGroupRequest(name="dup")).vni))
    assert r.code == 1 and "already group dup's" in r.err
    assert w.cli("group", "delete", "dup").code == 0


def test_unknown_things_exit_3(w: World) -> None:
    for args in (["group", "show", "nosuch"], ["group", "delete", "nosuch"], ["job", "show", "0000000000"],
                 ["job", "stop", "0000000000"], ["job", "run", "--group", "nosuch", "--node", "n1", "--", "true"],
                 ["topology", "--group", "nosuch"]):
        r = w.cli(*args)
        assert r.code == cli.EXIT_NOT_FOUND, (args, r)
        assert r.err.startswith("jobnet: error: "), r.err
    assert w.cli("group", "create", "nonode").code == 0
    r = w.cli("job", "run", "--group", "nonode", "--node", "n9", "--", "true")
    assert r.code == 3 and "no node named n9" in r.err
    assert w.cli("group", "delete", "nonode").code == 0


def test_controller_refusal_is_exit_1(w: World) -> None:
    r = w.cli("group", "create", "Bad_Name")
    assert r.code == cli.EXIT_FAILURE and r.err.startswith("jobnet: error: ") and "hint" not in r.err


# ---------------------------------------------------------------- nodes


def test_node_list(w: World) -> None:
    r = w.cli("node", "list")
    assert r.code == 0
    header, *rows = r.out.splitlines()
    assert header.split()[:3] == ["NAME", "STATE", "UNDERLAY"]
    n1 = next(row.split() for row in rows if row.split()[0] == "n1")
    assert n1[1:4] == ["READY", "198.18.5.11", "1500"] and n1[-1] == "fake-0"
    nodes = w.cli("-o", "json", "node", "list").json()
    assert [n["name"] for n in nodes] == ["n1", "n2"]
    assert nodes[0]["state"] == "NODE_STATE_READY" and nodes[0]["boot_id"] == "b1"


# ---------------------------------------------------------------- jobs


def test_job_run_show_list_stop(w: World) -> None:
    assert w.cli("group", "create", "jobs").code == 0
    r = w.cli("job", "run", "--group", "jobs", "--node", "n1", "--name", "sim", "--memory", "512M",
              "--memory-high", "400M", "--cpus", "1.5", "--cpu-weight", "200", "--io-weight", "50",
              "--io-limit", "8:0:rbps=10M,wiops=100", "--pids", "64", "--wall-time", "10m", "--uid", "1000",
              "--gid", "1000", "--env", "A=1", "--env", "B=two words", "--cwd", "/tmp",
              "--", "sh", "-c", "echo hi; sleep 600")
    assert r.code == 0, r.err
    job_id = r.out.strip()
    assert JOB_ID.match(job_id), r.out

    r = w.cli("job", "show", job_id)
    assert r.code == 0
    for line in (f"ID: {job_id}", "Name: sim", "Group: jobs", "Node: n1", "Command: sh -c 'echo hi; sleep 600'",
                 "State: PENDING", "PID: -", "Started: -", "Isolation:", "Memory max: 512 MiB", "Memory high: 400 MiB",
                 "CPU weight: 200", "CPUs: 1.5", "IO weight: 50", "IO limits: 8:0 rbps=10 MiB/s wiops=100",
                 "PIDs max: 64", "Wall time: 10m", "UID: 1000", "GID: 1000", "Env: A=1 'B=two words'", "Cwd: /tmp",
                 "Usage:", "Memory peak: 0 B"):
        assert line in r.fields(), (line, r.out)
    assert re.search(r"^IP:\s+10\.200\.\d+\.2$", r.out, re.M) and re.search(r"^MAC:\s+[0-9a-f:]{17}$", r.out, re.M)

    j = w.cli("-o", "json", "job", "show", job_id).json()
    res = j["isolation"]["resources"]
    assert j["state"] == "JOB_STATE_PENDING" and j["command"] == ["sh", "-c", "echo hi; sleep 600"]
    assert (res["memory_max_bytes"], res["cpu_quota_millicores"], res["wall_time_s"]) == (512 << 20, 1500, 600)
    assert res["io_limits"] == [{"device": "8:0", "read_bps": 10 << 20, "write_bps": 0, "read_iops": 0,
                                 "write_iops": 100}]
    assert j["isolation"]["uid"] == 1000 and j["isolation"]["env"] == ["A=1", "B=two words"]

    r = w.cli("job", "list")
    assert r.code == 0
    header, *rows = r.out.splitlines()
    assert header.split() == ["ID", "NAME", "GROUP", "NODE", "IP", "STATE", "RESULT", "CREATED", "COMMAND"]
    row = next(x for x in rows if x.startswith(job_id))
    assert row.split()[1:4] == ["sim", "jobs", "n1"] and " PENDING " in row
    assert job_id in w.cli("job", "list", "--group", "jobs", "--node", "n1").out
    assert job_id not in w.cli("job", "list", "--node", "n2").out
    listed = w.cli("-o", "json", "job", "list", "--group", "jobs").json()
    assert [x["id"] for x in listed] == [job_id]

    r = w.cli("job", "stop", job_id)
    assert (r.code, r.out.strip()) == (0, f"job {job_id}: STOPPING")
    r = w.cli("job", "show", job_id)
    assert "State: STOPPING (stop requested)" in r.fields()
    assert w.cli("-o", "json", "job", "stop", job_id).json()["state"] == "JOB_STATE_STOPPING"

    r = w.cli("group", "delete", "jobs")
    assert r.code == 1 and "live job" in r.err and "--force" in r.err
    assert w.cli("group", "delete", "jobs", "--force").code == 0
    r = w.cli("job", "show", job_id)
    assert "State: FINISHED" in r.fields() and "End reason: stopped" in r.fields()
    assert w.cli("job", "list").out.count(job_id) == 0
    assert job_id in w.cli("job", "list", "--all").out


def test_job_run_json_is_the_job(w: World) -> None:
    assert w.cli("group", "create", "jrun").code == 0
    r = w.cli("-o", "json", "job", "run", "--group", "jrun", "--node", "n2", "--", "sleep", "3600")
    assert r.code == 0, r.err
    j = r.json()
    assert JOB_ID.match(j["id"]) and (j["group"], j["node"]) == ("jrun", "n2") and j["ip"].startswith("10.200.")
    assert "uid" not in j["isolation"], "an unset uid stays unset (the site's default)"
    assert w.cli("group", "delete", "jrun", "--force").code == 0


def _run_waiting(w: World, group: str, report: dict[str, Any]) -> tuple[int, str, str, str]:
    """`job run --wait` in a thread while this test plays the agent: RUNNING, then FINISHED as `report`."""
    assert w.capsys is not None
    w.capsys.readouterr()
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(
        cli.main(["--controller", w.address, "job", "run", "--group", group, "--node", "n1", "--wait", "--", "x"])))
    t.start()
    deadline = time.monotonic() + 10
    jobs: list[pb.Job] = []
    while not jobs and time.monotonic() < deadline:
        jobs = list(w.stub.ListJobs(pb.ListJobsRequest(group=group), timeout=5).jobs)
        time.sleep(0.05)
    assert len(jobs) == 1
    job_id = jobs[0].id
    w.report(job_id, pb.JOB_STATE_RUNNING, pid=4242)
    time.sleep(0.5)
    assert t.is_alive(), "still waiting while the job runs"
    w.report(job_id, pb.JOB_STATE_FINISHED, **report)
    t.join(15)
    assert not t.is_alive()
    got = w.capsys.readouterr()
    return result[0], job_id, got.out, got.err


@pytest.mark.parametrize(("report", "code", "err"), [
    ({"end_reason": pb.END_REASON_EXITED, "exit_code": 0}, 0, ""),
    ({"end_reason": pb.END_REASON_EXITED, "exit_code": 7}, 7, ""),
    ({"end_reason": pb.END_REASON_SIGNALLED, "signal": 9}, 137, "was killed by SIGKILL"),
    ({"end_reason": pb.END_REASON_OOM, "message": "oom: memory.max 512 MiB"}, 1, "ended: oom: memory.max 512 MiB"),
    ({"end_reason": pb.END_REASON_SETUP_FAILED, "message": "setup-failed: pids_max above the site's maximum"}, 1,
     "ended: setup-failed: pids_max above"),
    ({"end_reason": pb.END_REASON_TIMEOUT}, 1, "ended: timeout"),
])
def test_job_run_wait_exit_codes(w: World, report: dict[str, Any], code: int, err: str) -> None:
    group = f"wait{code}-{report['end_reason']}"
    assert w.cli("group", "create", group).code == 0
    got, job_id, out, stderr = _run_waiting(w, group, report)
    assert got == code, stderr
    assert out.strip() == job_id
    assert err in stderr if err else stderr == ""
    r = w.cli("job", "show", job_id)
    assert "State: FINISHED" in r.fields() and "PID: -" in r.fields()
    assert w.cli("group", "delete", group).code == 0


def test_job_run_wait_json_prints_the_finished_job(w: World) -> None:
    assert w.cli("group", "create", "waitjson").code == 0
    assert w.capsys is not None
    w.capsys.readouterr()
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(cli.main(
        ["--controller", w.address, "-o", "json", "job", "run", "--group", "waitjson", "--node", "n1", "--wait",
         "--", "x"])))
    t.start()
    deadline = time.monotonic() + 10
    jobs: list[pb.Job] = []
    while not jobs and time.monotonic() < deadline:
        jobs = list(w.stub.ListJobs(pb.ListJobsRequest(group="waitjson"), timeout=5).jobs)
        time.sleep(0.05)
    w.report(jobs[0].id, pb.JOB_STATE_FINISHED, end_reason=pb.END_REASON_EXITED, exit_code=3,
             usage=pb.Usage(cpu_seconds=1.5, memory_peak_bytes=3 << 20, pids_peak=2))
    t.join(15)
    assert result == [3]
    j = json.loads(w.capsys.readouterr().out)
    assert (j["state"], j["end_reason"], j["exit_code"]) == ("JOB_STATE_FINISHED", "END_REASON_EXITED", 3)
    assert j["usage"]["memory_peak_bytes"] == 3 << 20
    r = w.cli("job", "show", j["id"])
    for line in ("End reason: exited", "Exit code: 3", "CPU time: 1.50 s", "Memory peak: 3 MiB", "PIDs peak: 2"):
        assert line in r.fields(), (line, r.out)
    r = w.cli("job", "list", "--all", "--group", "waitjson")
    assert "exited 3" in r.out
    assert w.cli("group", "delete", "waitjson").code == 0


# ---------------------------------------------------------------- logs (through the controller to the fake agent)


def test_job_logs(w: World) -> None:
    assert w.cli("group", "create", "logs").code == 0
    job_id = w.cli("job", "run", "--group", "logs", "--node", "n1", "--", "echo").out.strip()
    w.agent.files[(job_id, "stdout")] = b"line 1\nline 2\n"
    w.agent.files[(job_id, "stderr")] = b"oops\n"
    r = w.cli("job", "logs", job_id)
    assert (r.code, r.out) == (0, "line 1\nline 2\n")
    assert w.cli("job", "logs", "--stderr", job_id).out == "oops\n"
    assert w.cli("job", "logs", "--tail", "7", job_id).out == "line 2\n"

    # --follow: prints what comes, ends when the job has finished and everything was read.
    w.agent.files[(job_id, "stdout")] = b""
    assert w.capsys is not None
    w.capsys.readouterr()
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(cli.main(["--controller", w.address, "job", "logs", "-f",
                                                                job_id])))
    t.start()
    for part in (b"a\n", b"b\n", b"c\n"):
        time.sleep(0.7)
        w.agent.files[(job_id, "stdout")] += part
    time.sleep(0.7)
    assert t.is_alive(), "following until the job has finished"
    w.agent.finished.add(job_id)
    t.join(10)
    assert result == [0]
    assert w.capsys.readouterr().out == "a\nb\nc\n"

    r = w.cli("job", "logs", "--stderr", "0000000000")
    assert r.code == 3
    other = w.cli("job", "run", "--group", "logs", "--node", "n1", "--", "true").out.strip()
    r = w.cli("job", "logs", other)
    assert r.code == 3 and f"job {other} has no stdout" in r.err
    assert w.cli("group", "delete", "logs", "--force").code == 0


# ---------------------------------------------------------------- topology


def test_topology(w: World) -> None:
    assert w.cli("group", "create", "topo").code == 0
    ids = [w.cli("job", "run", "--group", "topo", "--node", n, "--", "sleep", "600").out.strip()
           for n in ("n1", "n1", "n2")]
    r = w.cli("topology")
    assert r.code == 0, r.err
    assert r.out.startswith("topology (revision ")
    r = w.cli("topology", "--group", "topo")
    assert r.code == 0
    text = r.out
    assert re.search(r"^group topo  subnet 10\.200\.\d+\.0/24  vni \d+  mtu 1450$", text, re.M), text
    assert "  node n1  198.18.5.11  READY" in text and "  node n2  198.18.5.12  READY" in text
    for job_id in ids:
        assert re.search(rf"^    job {job_id}  10\.200\.\d+\.\d+  PENDING$", text, re.M), text
    assert "  tunnels: n1 <-> n2" in text
    n1_block = text[text.index("node n1"):text.index("node n2")]
    assert ids[0] in n1_block and ids[1] in n1_block and ids[2] not in n1_block
    topo = w.cli("-o", "json", "topology", "--group", "topo").json()
    assert {"node/n1", "node/n2", "group/topo"} <= {n["id"] for n in topo["nodes"]}
    assert any(e["kind"] == "tunnel" for e in topo["edges"])
    assert w.cli("group", "delete", "topo", "--force").code == 0


# ---------------------------------------------------------------- an unreachable controller


def test_unreachable_controller_exits_4_quickly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.monotonic()
    code = cli.main(["--controller", f"unix:{tmp_path}/nope.sock", "--timeout", "2", "group", "list"])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert code == cli.EXIT_UNREACHABLE
    assert elapsed < 3, elapsed
    assert err.startswith("jobnet: error: ") and "is the controller running" in err and "JOBNET_CONTROLLER" in err


def test_silent_controller_exits_4_at_the_timeout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)  # accepts connections (in the backlog) and never speaks HTTP/2
    try:
        t0 = time.monotonic()
        code = cli.main(["--controller", f"unix:{path}", "--timeout", "1", "node", "list"])
        elapsed = time.monotonic() - t0
    finally:
        listener.close()
    err = capsys.readouterr().err
    assert code == cli.EXIT_UNREACHABLE
    assert 0.9 < elapsed < 3, elapsed
    assert "no answer from the controller" in err and "within 1 s" in err and "hint" in err


def test_agent_unavailable_is_not_controller_unreachable(w: World) -> None:
    """UNAVAILABLE that comes from the controller (a node's agent is down) is exit 1, without the hint."""
    w.stub.RegisterNode(pb.RegisterNodeRequest(name="n3", underlay_ip="198.18.5.13", boot_id="b3",
                                               agent_address="127.0.0.1:9"), timeout=5)
    w.nodes["n3"] = "b3"
    assert w.cli("group", "create", "deadagent").code == 0
    job_id = w.cli("job", "run", "--group", "deadagent", "--node", "n3", "--", "true").out.strip()
    r = w.cli("job", "logs", job_id)
    assert r.code == cli.EXIT_FAILURE, r
    assert "could not read the log" in r.err and "hint" not in r.err
    assert w.cli("group", "delete", "deadagent", "--force").code == 0


# ---------------------------------------------------------------- the real entry point


def test_python_dash_m(world: World) -> None:
    env = dict(os.environ, JOBNET_CONTROLLER=world.address)
    p = subprocess.run([sys.executable, "-m", "jobnet_cli.main", "-o", "json", "node", "list"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert "n1" in [n["name"] for n in json.loads(p.stdout)]
    p = subprocess.run([sys.executable, "-m", "jobnet_cli.main", "group", "show", "nosuch"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 3 and p.stderr.startswith("jobnet: error: no group named nosuch")
