"""The jobnet CLI without a controller: argument value parsing, formatting, exit codes, the topology view,
and the commands whose logic lives in the client (`job logs` paging/following, `job run --wait`) against a
scripted stub."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from jobnet_cli import main as cli
from protos.jobnet.v1 import jobnet_pb2 as pb

# ---------------------------------------------------------------- sizes, durations, cpus, io limits


@pytest.mark.parametrize(("text", "expected"), [
    ("0", 0), ("512", 512), ("1K", 1024), ("1k", 1024), ("512M", 512 << 20), ("2G", 2 << 30),
    ("1T", 1 << 40), ("1.5G", 3 << 29), ("4Ki", 4096), ("4KiB", 4096), ("4KB", 4096), (" 8M ", 8 << 20),
])
def test_parse_size(text: str, expected: int) -> None:
    assert cli.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "-1M", "5X", "1.5", "12 bytes", "1e6", "1P", "0x10",
                                  "99999999999999T"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        cli.parse_size(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("3600", 3600), ("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), ("1M", 60),
])
def test_parse_duration(text: str, expected: int) -> None:
    assert cli.parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "0", "0s", "10x", "m10", "1.5h", "-5", "10m junk", "h", str(1 << 32)])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        cli.parse_duration(text)


@pytest.mark.parametrize(("text", "expected"), [("1", 1000), ("1.5", 1500), ("0.25", 250), ("500m", 500),
                                                ("0.001", 1)])
def test_parse_cpus(text: str, expected: int) -> None:
    assert cli.parse_cpus(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "abc", "0.0001", "nan", "inf", "1.5m", ""])
def test_parse_cpus_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid CPU count"):
        cli.parse_cpus(text)


def test_parse_io_limit() -> None:
    lim = cli.parse_io_limit("8:0:rbps=10M,wbps=5M,riops=100,wiops=50")
    assert (lim.device, lim.read_bps, lim.write_bps, lim.read_iops, lim.write_iops) == (
        "8:0", 10 << 20, 5 << 20, 100, 50)
    only = cli.parse_io_limit("259:3:wiops=7")
    assert (only.device, only.read_bps, only.write_iops) == ("259:3", 0, 7)


@pytest.mark.parametrize("text", ["8:0", "8:0:", "sda:rbps=1M", "8:rbps=1M", "8:0:rbps", "8:0:xbps=1",
                                  "8:0:riops=1K", "8:0:rbps=1M,rbps=2M", "8:0:rbps=0", "a:b:rbps=1"])
def test_parse_io_limit_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid io limit"):
        cli.parse_io_limit(text)


@pytest.mark.parametrize("text", ["unix:/run/jobnet/controller.sock", "unix:///tmp/c.sock", "127.0.0.1:7400",
                                  "ctl.example:7400", "[::1]:7400"])
def test_parse_address(text: str) -> None:
    assert cli.parse_address(text) == text


@pytest.mark.parametrize("text", ["unix:", "ctl.example", "ctl:port", ":7400", "host:0", "host:70000"])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid controller address"):
        cli.parse_address(text)


def test_parse_env() -> None:
    assert cli.parse_env("A=b=c") == "A=b=c"
    assert cli.parse_env("EMPTY=") == "EMPTY="
    for bad in ("NOEQUALS", "=x", "1A=x", "A-B=x"):
        with pytest.raises(ValueError, match="invalid environment variable"):
            cli.parse_env(bad)


# ---------------------------------------------------------------- the parser: local validation exits 2


def _parse(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser().parse_args(argv)


def test_job_run_arguments_become_the_request() -> None:
    a = _parse(["job", "run", "--group", "blue", "--node", "n1", "--name", "x", "--memory", "512M",
                "--memory-high", "400M", "--cpu-weight", "200", "--cpus", "1.5", "--io-weight", "50",
                "--io-limit", "8:0:rbps=10M", "--io-limit", "8:16:wiops=5", "--pids", "64", "--wall-time", "10m",
                "--rootfs", "/srv/root", "--uid", "1000", "--gid", "0", "--env", "A=1", "--env", "B=2",
                "--cwd", "/work", "--wait", "--", "sh", "-c", "echo --node"])
    assert cli.job_command(a) == ["sh", "-c", "echo --node"]
    iso = cli.build_isolation(a)
    r = iso.resources
    assert (r.memory_max_bytes, r.memory_high_bytes, r.cpu_weight, r.cpu_quota_millicores, r.io_weight,
            r.pids_max, r.wall_time_s) == (512 << 20, 400 << 20, 200, 1500, 50, 64, 600)
    assert [(x.device, x.read_bps, x.write_iops) for x in r.io_limits] == [("8:0", 10 << 20, 0), ("8:16", 0, 5)]
    assert (iso.rootfs, iso.uid, iso.gid, list(iso.env), iso.cwd) == ("/srv/root", 1000, 0, ["A=1", "B=2"], "/work")
    assert iso.HasField("gid"), "gid 0 is a request, not 'the default'"


def test_job_run_defaults_leave_isolation_unset() -> None:
    a = _parse(["job", "run", "--group", "g", "--node", "n", "sleep", "1"])
    assert cli.job_command(a) == ["sleep", "1"]
    iso = cli.build_isolation(a)
    assert iso.resources == pb.Resources()
    assert not iso.HasField("uid") and not iso.HasField("gid")
    assert not a.wait


@pytest.mark.parametrize(("argv", "message"), [
    (["job", "run", "--group", "g", "--node", "n", "--memory", "5X", "--", "true"], "argument --memory: invalid size"),
    (["job", "run", "--group", "g", "--node", "n", "--wall-time", "soon", "--", "true"], "invalid duration"),
    (["job", "run", "--group", "g", "--node", "n", "--io-limit", "sda", "--", "true"], "invalid io limit"),
    (["job", "run", "--group", "g", "--node", "n", "--cpu-weight", "0", "--", "true"], "must be 1..10000"),
    (["job", "run", "--group", "g", "--node", "n", "--cwd", "rel", "--", "true"], "must be absolute"),
    (["job", "run", "--group", "g", "--", "true"], "--node"),
    (["group", "create", "g", "--cidr", "10.0.0.1/24"], "invalid CIDR"),
    (["group", "create", "g", "--cidr", "10.0.0.0/24", "--prefix-len", "24"], "not allowed with"),
    (["group", "create", "g", "--vni", "16777216"], "invalid VNI"),
    (["--timeout", "0", "group", "list"], "must be more than 0"),
    (["--controller", "nowhere", "group", "list"], "invalid controller address"),
    (["-o", "yaml", "group", "list"], "invalid choice"),
    (["group"], "required"),
    ([], "required"),
])
def test_usage_errors_exit_2_with_a_message(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err, err


def test_usage_errors_after_parsing_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    # Checked before any channel is used: the address does not exist and is never dialled.
    base = ["--controller", "unix:/nonexistent/jn.sock", "job", "run", "--group", "g", "--node", "n"]
    assert cli.main([*base, "--"]) == cli.EXIT_USAGE
    assert "needs a command" in capsys.readouterr().err
    assert cli.main([*base, "--memory", "1M", "--memory-high", "2M", "--", "true"]) == cli.EXIT_USAGE
    assert "--memory-high is above --memory" in capsys.readouterr().err


def test_help_exits_0_and_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "exit codes:" in out and "JOBNET_CONTROLLER" in out
    assert cli.main(["job", "run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "128 + signal" in out and "setup-failed" in out and "512M" in out


def test_controller_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOBNET_CONTROLLER", raising=False)
    assert _parse(["group", "list"]).controller == cli.DEFAULT_CONTROLLER
    monkeypatch.setenv("JOBNET_CONTROLLER", "10.0.0.5:7400")
    assert _parse(["group", "list"]).controller == "10.0.0.5:7400"
    assert _parse(["--controller", "unix:/x.sock", "group", "list"]).controller == "unix:/x.sock"
    monkeypatch.delenv("JOBNET_CONTROLLER")
    assert _parse(["group", "list"]).controller == cli.DEFAULT_CONTROLLER


# ---------------------------------------------------------------- formatting


def test_format_table_aligns_without_trailing_spaces() -> None:
    out = cli.format_table(["NAME", "VNI", "NOTE"], [["blue", 1, ""], ["a-longer-name", 4242, "x"]], right=(1,))
    assert out.splitlines() == [
        "NAME            VNI  NOTE",
        "blue              1",
        "a-longer-name  4242  x",
    ]


def test_format_table_short_rows_and_none() -> None:
    out = cli.format_table(["A", "B"], [["x"], [None, "y"]])
    assert out.splitlines() == ["A  B", "x", "   y"]


def test_format_fields_nested() -> None:
    out = cli.format_fields([("ID", "abc"), ("Long key", 1), ("Usage", [("CPU", "1 s"), ("Peak", "2 MiB")])])
    assert out.splitlines() == ["ID:        abc", "Long key:  1", "Usage:", "  CPU:   1 s", "  Peak:  2 MiB"]


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"),
                                         (512 << 20, "512 MiB"), (3 << 29, "1.5 GiB"), (1 << 40, "1 TiB")])
def test_human_bytes(n: int, text: str) -> None:
    assert cli.human_bytes(n) == text


def test_human_duration() -> None:
    assert [cli.human_duration(s) for s in (0, 59, 90, 600, 5400, 86400, 90061)] == [
        "0s", "59s", "1m30s", "10m", "1h30m", "1d", "1d1h1m1s"]


def test_ago_and_local_time() -> None:
    now = 1_700_000_000.0
    ts = lambda s: pb.Job(created={"seconds": s}).created  # noqa: E731
    assert cli.ago(pb.Job().created, now) == "-"
    assert cli.ago(ts(int(now) - 180), now) == "3m ago"
    assert cli.ago(ts(int(now) - 7200), now) == "2h ago"
    assert cli.ago(ts(int(now) - 5), now) == "5s ago"
    assert cli.ago(ts(int(now) - 3 * 86400), now) == "3d ago"
    assert cli.ago(ts(int(now)), now) == "just now"
    assert cli.ago(ts(int(now) + 120), now) == "in 2m"
    assert cli.local_time(pb.Job().created) == "-"
    text = cli.local_time(ts(int(now) - 180), now)
    assert text.startswith("2023-11-1") and text.endswith("(3m ago)")


def test_enum_names() -> None:
    assert cli.job_state(pb.JOB_STATE_RUNNING) == "RUNNING"
    assert cli.node_state(pb.NODE_STATE_READY) == "READY"
    assert cli.end_reason(pb.END_REASON_SETUP_FAILED) == "setup-failed"
    assert cli.end_reason(pb.END_REASON_OOM) == "oom"
    assert cli.end_reason(pb.END_REASON_UNSPECIFIED) == "-"
    assert cli.job_state(99) == "99"


def test_job_result_and_show_fields() -> None:
    job = pb.Job(id="0123456789", group="g", node="n1", command=["sh", "-c", "exit 3"], ip="10.200.0.2",
                 state=pb.JOB_STATE_FINISHED, end_reason=pb.END_REASON_SIGNALLED, signal=9, desired_running=True,
                 isolation=pb.Isolation(resources=pb.Resources(memory_max_bytes=512 << 20, cpu_quota_millicores=1500,
                                                               wall_time_s=600,
                                                               io_limits=[pb.IoLimit(device="8:0", read_bps=1 << 20)]),
                                        uid=0, env=["A=1 2"]),
                 usage=pb.Usage(cpu_seconds=1.234, memory_peak_bytes=3 << 20, io_read_bytes=4096, pids_peak=3))
    assert cli.job_result(job) == "signalled SIGKILL"
    assert cli.job_result(pb.Job(state=pb.JOB_STATE_FINISHED, end_reason=pb.END_REASON_EXITED)) == "exited 0"
    assert cli.job_result(pb.Job(state=pb.JOB_STATE_RUNNING)) == "-"
    text = cli.format_fields(cli.job_fields(job))
    for expected in ("Command:     sh -c 'exit 3'", "End reason:  signalled", "Signal:      9 (SIGKILL)",
                     "Memory max:   512 MiB", "CPUs:         1.5", "Wall time:    10m", "UID:          0",
                     "GID:          default", "IO limits:    8:0 rbps=1 MiB/s", "Env:          'A=1 2'",
                     "CPU time:     1.23 s", "Memory peak:  3 MiB", "IO read:      4 KiB", "PIDs peak:    3"):
        assert expected in text, (expected, text)


def test_to_dict_is_stable_for_scripts() -> None:
    d = cli.to_dict(pb.Job(id="x", usage=pb.Usage(memory_peak_bytes=5)))
    assert d["state"] == "JOB_STATE_UNSPECIFIED" and d["exit_code"] == 0 and d["command"] == []
    assert d["usage"]["memory_peak_bytes"] == 5, "64-bit numbers as JSON numbers"
    assert "isolation" in d and d["isolation"]["resources"]["memory_max_bytes"] == 0
    json.dumps(d)


# ---------------------------------------------------------------- exit codes


@pytest.mark.parametrize(("code", "exit_code"), [
    (grpc.StatusCode.NOT_FOUND, 3), (grpc.StatusCode.UNAVAILABLE, 4), (grpc.StatusCode.DEADLINE_EXCEEDED, 4),
    (grpc.StatusCode.ALREADY_EXISTS, 1), (grpc.StatusCode.INVALID_ARGUMENT, 1),
    (grpc.StatusCode.FAILED_PRECONDITION, 1), (grpc.StatusCode.RESOURCE_EXHAUSTED, 1),
    (grpc.StatusCode.INTERNAL, 1), (None, 1),
])
def test_exit_code_for(code: grpc.StatusCode | None, exit_code: int) -> None:
    assert cli.exit_code_for(code) == exit_code


@pytest.mark.parametrize(("job", "code", "message"), [
    (pb.Job(end_reason=pb.END_REASON_EXITED, exit_code=0), 0, None),
    (pb.Job(end_reason=pb.END_REASON_EXITED, exit_code=42), 42, None),
    (pb.Job(id="j", end_reason=pb.END_REASON_SIGNALLED, signal=9), 137, "killed by SIGKILL"),
    (pb.Job(id="j", end_reason=pb.END_REASON_SIGNALLED, signal=15), 143, "killed by SIGTERM"),
    (pb.Job(id="j", end_reason=pb.END_REASON_OOM), 1, "ended: oom"),
    (pb.Job(id="j", end_reason=pb.END_REASON_TIMEOUT), 1, "ended: timeout"),
    (pb.Job(id="j", end_reason=pb.END_REASON_SETUP_FAILED, message="setup-failed: veth"), 1,
     "job j ended: setup-failed: veth"),
    (pb.Job(id="j", end_reason=pb.END_REASON_OOM, message="memory.max 1 MiB"), 1, "job j ended: oom: memory.max"),
    (pb.Job(id="j", end_reason=pb.END_REASON_STOPPED), 1, "ended: stopped"),
    (pb.Job(id="j", end_reason=pb.END_REASON_LOST), 1, "ended: lost"),
])
def test_job_exit_code(job: pb.Job, code: int, message: str | None) -> None:
    got_code, got_message = cli.job_exit_code(job)
    assert got_code == code
    if message is None:
        assert got_message is None
    else:
        assert got_message is not None and message in got_message


# ---------------------------------------------------------------- topology view


def _topology() -> pb.Topology:
    t = pb.Topology(revision=7)
    t.nodes.add(id="group/blue", kind="group", attrs={"subnet": "10.200.0.0/24", "vni": "1", "mtu": "1450"})
    t.nodes.add(id="group/red", kind="group", attrs={"subnet": "10.200.1.0/24", "vni": "2", "mtu": "1450"})
    t.nodes.add(id="group/empty", kind="group", attrs={"subnet": "10.200.2.0/24", "vni": "3", "mtu": "1450"})
    for n, ip in (("n1", "198.18.0.11"), ("n2", "198.18.0.12"), ("n3", "198.18.0.13")):
        t.nodes.add(id=f"node/{n}", kind="node", attrs={"underlay_ip": ip, "state": "READY"})
    jobs = [("aaaaaaaaaa", "blue", "n1", "10.200.0.2"), ("bbbbbbbbbb", "blue", "n2", "10.200.0.3"),
            ("cccccccccc", "red", "n1", "10.200.1.2")]
    for jid, g, n, ip in jobs:
        t.nodes.add(id=f"job/{jid}", kind="job", attrs={"ip": ip, "state": "RUNNING", "name": ""})
        t.edges.add(source=f"job/{jid}", target=f"node/{n}", kind="runs-on")
        t.edges.add(source=f"job/{jid}", target=f"group/{g}", kind="member-of")
    t.edges.add(source="node/n1", target="node/n2", kind="tunnel", attrs={"group": "blue", "vni": "1"})
    return t


def test_render_topology() -> None:
    out = cli.render_topology(_topology())
    assert out.startswith("topology (revision 7): 3 group(s), 3 node(s)")
    blue = out[out.index("group blue"):out.index("group empty")]
    assert "subnet 10.200.0.0/24  vni 1  mtu 1450" in blue
    assert "node n1  198.18.0.11  READY" in blue and "node n2" in blue and "n3" not in blue
    assert "job aaaaaaaaaa  10.200.0.2  RUNNING" in blue and "job bbbbbbbbbb" in blue
    assert "tunnels: n1 <-> n2" in blue
    red = out[out.index("group red"):]
    assert "job cccccccccc  10.200.1.2" in red and "tunnels" not in red, "one node: no tunnel line"
    assert "group empty" in out and "(no nodes: the group has no jobs)" in out
    assert out.rstrip().endswith("nodes without jobs: n3")


def test_render_topology_one_group() -> None:
    out = cli.render_topology(_topology(), "red")
    assert "group red" in out and "group blue" not in out and "nodes without jobs" not in out


def test_render_topology_missing_tunnel_is_visible() -> None:
    t = _topology()
    del t.edges[-1]
    out = cli.render_topology(t, "blue")
    assert "tunnels: none" in out


# ---------------------------------------------------------------- logs and --wait against a scripted stub


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.RpcError:
    class E(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return code

        def details(self) -> str:
            return details
    return E()


@dataclass
class FakeStub:
    """Serves one growing log file and a job whose state advances on each GetJob."""
    chunks: list[bytes] = field(default_factory=list)  # appended to the file, one per ReadJobLog call
    states: list[pb.Job] = field(default_factory=list)
    max_bytes: int = 4
    content: bytes = b""
    finished_after: int = 10**9  # ReadJobLog calls
    not_found_first: int = 0
    unavailable_first: int = 0
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def ReadJobLog(self, req: pb.ReadJobLogRequest, timeout: float) -> pb.ReadJobLogResponse:
        self.calls.append(("ReadJobLog", (req.stream, req.offset)))
        if self.not_found_first:
            self.not_found_first -= 1
            raise _rpc_error(grpc.StatusCode.NOT_FOUND, "no stdout yet")
        if self.chunks:
            self.content += self.chunks.pop(0)
        size = len(self.content)
        start = req.offset if req.offset >= 0 else max(0, size + req.offset)
        data = self.content[start:start + self.max_bytes]
        reads = sum(1 for c in self.calls if c[0] == "ReadJobLog")
        return pb.ReadJobLogResponse(data=data, offset=start, size=size, finished=reads >= self.finished_after)

    def GetJob(self, req: pb.GetJobRequest, timeout: float) -> pb.Job:
        self.calls.append(("GetJob", req.id))
        if self.unavailable_first:
            self.unavailable_first -= 1
            raise _rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]


def _ctx(stub: FakeStub, output: str = "table") -> cli.Ctx:
    return cli.Ctx(stub=stub, channel=None, address="unix:/fake", output=output, timeout=1)  # type: ignore[arg-type]


def _logs_args(*extra: str) -> argparse.Namespace:
    return _parse(["job", "logs", "0123456789", *extra])


def test_logs_reads_all_chunks(capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    stub = FakeStub(content=b"hello world\n")
    assert cli.cmd_job_logs(_ctx(stub), _logs_args(), sleep=lambda s: None) == 0
    assert capfdbinary.readouterr().out == b"hello world\n"
    assert [c[1] for c in stub.calls] == [("stdout", 0), ("stdout", 4), ("stdout", 8)]


def test_logs_tail_and_stderr(capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    stub = FakeStub(content=b"0123456789")
    assert cli.cmd_job_logs(_ctx(stub), _logs_args("--stderr", "--tail", "3"), sleep=lambda s: None) == 0
    assert capfdbinary.readouterr().out == b"789"
    assert stub.calls[0][1] == ("stderr", -3)


def test_logs_follow_until_finished(capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    sleeps: list[float] = []
    stub = FakeStub(chunks=[b"ab", b"", b"cdefgh", b"", b"ij"], finished_after=7, not_found_first=1,
                    states=[pb.Job(state=pb.JOB_STATE_PENDING)])
    assert cli.cmd_job_logs(_ctx(stub), _logs_args("-f"), sleep=sleeps.append) == 0
    assert capfdbinary.readouterr().out == b"abcdefghij"
    assert ("GetJob", "0123456789") in stub.calls, "a missing file while pending is waited for"
    assert sleeps, "polls between reads that brought nothing"


def test_logs_not_found_is_an_error_without_follow() -> None:
    stub = FakeStub(not_found_first=1)
    with pytest.raises(grpc.RpcError):
        cli.cmd_job_logs(_ctx(stub), _logs_args(), sleep=lambda s: None)


def test_wait_for_job_polls_until_finished() -> None:
    sleeps: list[float] = []
    stub = FakeStub(states=[pb.Job(state=pb.JOB_STATE_PENDING)] * 3 + [pb.Job(state=pb.JOB_STATE_RUNNING)] * 5
                    + [pb.Job(state=pb.JOB_STATE_FINISHED, exit_code=3)])
    job = cli.wait_for_job(_ctx(stub), "0123456789", sleep=sleeps.append)
    assert job.exit_code == 3
    assert len(sleeps) == 8 and sleeps[0] == pytest.approx(0.2) and max(sleeps) <= 2.0


def test_wait_rides_out_a_controller_restart(capsys: pytest.CaptureFixture[str]) -> None:
    stub = FakeStub(states=[pb.Job(state=pb.JOB_STATE_RUNNING), pb.Job(state=pb.JOB_STATE_FINISHED, exit_code=5)],
                    unavailable_first=3)
    assert cli.wait_for_job(_ctx(stub), "0123456789", sleep=lambda s: None).exit_code == 5
    assert capsys.readouterr().err.count("still waiting for job 0123456789") == 1


def test_wait_gives_up_after_a_long_outage() -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    stub = FakeStub(states=[pb.Job(state=pb.JOB_STATE_RUNNING)], unavailable_first=10**6)
    with pytest.raises(grpc.RpcError):
        cli.wait_for_job(_ctx(stub), "0123456789", sleep=sleep, clock=lambda: now[0])
    assert cli.WAIT_OUTAGE_S < now[0] <= cli.WAIT_OUTAGE_S + 4
