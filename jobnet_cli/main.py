"""`jobnet`: the command-line client of the jobnet controller.

Talks to the controller's gRPC API (protos/jobnet/v1/jobnet.proto): groups, nodes, jobs, job logs, the
overlay topology and network usage. Output is an aligned table for people (`-o table`, the default) or JSON for
scripts (`-o json`: the API's messages with their proto field names, every field present, lists as JSON arrays);
`jobnet usage` also writes CSV (`-o csv`) and charts (`--chart`, `--chart-file PATH.svg`).

Exit codes: 0 ok; 1 runtime error (the controller refused, or a waited-for job failed); 2 usage error
(bad arguments, checked before anything is sent); 3 not found; 4 controller unreachable (or no answer
within --timeout). `job run --wait` exits with the job's own exit code instead (see its --help).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as dt
import getpass
import io
import ipaddress
import json
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from jobnet_cli import charts
from protos.jobnet.v1 import jobnet_pb2 as pb
from protos.jobnet.v1 import jobnet_pb2_grpc as pbg

PROG = "jobnet"
DEFAULT_CONTROLLER = "unix:/run/jobnet/controller.sock"
DEFAULT_TIMEOUT = 10.0

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNREACHABLE = 4

NET_DIRECTIONS = ("tx", "rx")
NET_CLASSES = ("local", "overlay", "external")
UINT32_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1


class UsageError(Exception):
    """A bad argument found after parsing (exit 2)."""


# ---------------------------------------------------------------- parsing of argument values


_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(ib|i|b)?$", re.IGNORECASE)
_SIZE_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str) -> int:
    """'512M' -> 536870912. Binary suffixes K, M, G, T (1K = 1024); 'Ki', 'KiB', 'KB' are accepted too.

    A plain number is bytes. Fractions are allowed with a suffix ('1.5G') and rounded down to a byte.
    """
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ValueError(f"invalid size {text!r}: use a number with an optional K, M, G or T suffix "
                         "(binary: 1K = 1024), e.g. 512M or 2G")
    number, unit = m.group(1), m.group(2).lower()
    if "." in number and not unit:
        raise ValueError(f"invalid size {text!r}: a size in bytes is a whole number (or use a suffix: 1.5G)")
    value = int(float(number) * (1024 ** _SIZE_UNITS[unit])) if "." in number else int(number) << (
        10 * _SIZE_UNITS[unit])
    if value > UINT64_MAX:
        raise ValueError(f"invalid size {text!r}: too large")
    return value


_DURATION_RE = re.compile(r"(\d+)([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """'10m' -> 600, '90s' -> 90, '3600' -> 3600, '1h30m' -> 5400 (units s, m, h, d; plain = seconds)."""
    s = text.strip().lower()
    if s.isdigit():
        seconds = int(s)
    else:
        parts = _DURATION_RE.findall(s)
        if not s or not parts or "".join(n + u for n, u in parts) != s:
            raise ValueError(f"invalid duration {text!r}: use seconds (3600) or a number with s, m, h or d "
                             "(90s, 10m, 2h, 1h30m)")
        seconds = sum(int(n) * _DURATION_UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be more than 0 seconds")
    if seconds > UINT32_MAX:
        raise ValueError(f"invalid duration {text!r}: at most {UINT32_MAX} seconds")
    return seconds


def parse_cpus(text: str) -> int:
    """CPUs -> millicores: '1.5' -> 1500, '0.25' -> 250; '500m' is 500 millicores."""
    s = text.strip().lower()
    if s in ("nan", "inf", "infinity", "+inf", "-inf"):
        raise ValueError(f"invalid CPU count {text!r}: use CPUs (1, 1.5, 0.25) or millicores (500m)")
    try:
        millis = int(s[:-1]) if s.endswith("m") else round(float(s) * 1000)
    except ValueError:
        raise ValueError(f"invalid CPU count {text!r}: use CPUs (1, 1.5, 0.25) or millicores (500m)") from None
    if not 1 <= millis <= UINT32_MAX:
        raise ValueError(f"invalid CPU count {text!r}: must be at least 0.001 (1m)")
    return millis


_DEVICE_RE = re.compile(r"^(\d+):(\d+)$")
_IO_KEYS = {"rbps": "read_bps", "wbps": "write_bps", "riops": "read_iops", "wiops": "write_iops"}


def parse_io_limit(text: str) -> pb.IoLimit:
    """'8:0:rbps=10M,wbps=5M,riops=100,wiops=50' -> IoLimit (bps take size suffixes, iops are counts)."""
    hint = "use MAJOR:MINOR:KEY=VALUE[,KEY=VALUE...] with keys rbps, wbps, riops, wiops, e.g. 8:0:rbps=10M,wiops=100"
    device, sep, rest = text.strip().rpartition(":")
    if not sep or not _DEVICE_RE.match(device) or not rest:
        raise ValueError(f"invalid io limit {text!r}: {hint}")
    limit = pb.IoLimit(device=device)
    seen: set[str] = set()
    for item in rest.split(","):
        key, eq, value = item.strip().partition("=")
        key = key.strip().lower()
        if not eq or key not in _IO_KEYS:
            raise ValueError(f"invalid io limit {text!r}: {item.strip()!r} is not KEY=VALUE; {hint}")
        if key in seen:
            raise ValueError(f"invalid io limit {text!r}: {key} given twice")
        seen.add(key)
        if key.endswith("bps"):
            n = parse_size(value)
        else:
            if not value.strip().isdigit():
                raise ValueError(f"invalid io limit {text!r}: {key} is a whole number of operations per second")
            n = int(value.strip())
        if n <= 0:
            raise ValueError(f"invalid io limit {text!r}: {key} must be more than 0")
        setattr(limit, _IO_KEYS[key], n)
    return limit


def parse_env(text: str) -> str:
    key, eq, _ = text.partition("=")
    if not eq or not key or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
        raise ValueError(f"invalid environment variable {text!r}: use KEY=VALUE (KEY: letters, digits, _)")
    return text


_USER_RE = re.compile(r"^[A-Za-z_](?:[A-Za-z0-9_.-]{0,30}[A-Za-z0-9_.$-])?$")
_JOB_ID_RE = re.compile(r"^[0-9a-f]{10}$")


def parse_user(text: str) -> str:
    """A login name (what `id -un` prints): 1-32 characters, A-Z a-z 0-9 _ . -, starting with a letter or _."""
    if not _USER_RE.match(text):
        raise ValueError(f"invalid user name {text!r}: use a login name of 1-32 characters from A-Z, a-z, 0-9, "
                         "'_', '.' and '-', starting with a letter or '_'")
    return text


def parse_job_id(text: str) -> str:
    if not _JOB_ID_RE.match(text):
        raise ValueError(f"invalid job id {text!r}: a job id is 10 hexadecimal characters, as `jobnet job list` "
                         "prints it")
    return text


def parse_when(text: str, now: float | None = None) -> float:
    """'2h' (that long ago), '1h30m', '3600' (seconds ago), 'now', or an ISO 8601 time ('2024-05-01T12:00',
    '2024-05-01 12:00:00+02:00', '2024-05-01'; without a zone: local time) -> Unix seconds."""
    s = text.strip()
    now = time.time() if now is None else now
    if s.lower() == "now":
        return now
    try:
        return now - parse_duration(s)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"invalid time {text!r}: use a duration ago (90s, 10m, 2h, 1d, 1h30m), 'now', or an ISO "
                         "time (2024-05-01T12:00, 2024-05-01T12:00:00Z; local time without a zone)") from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time
    return when.timestamp()


def parse_address(text: str) -> str:
    """Checks a controller address: HOST:PORT ([v6]:PORT) or unix:/path; returns it unchanged."""
    s = text.strip()
    if s.startswith("unix:"):
        if not s[len("unix:"):].lstrip("/"):
            raise ValueError(f"invalid controller address {text!r}: unix: needs a socket path, e.g. "
                             "unix:/run/jobnet/controller.sock")
        return s
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid controller address {text!r}: use HOST:PORT (e.g. 10.0.0.5:7400) or "
                         "unix:/path (e.g. unix:/run/jobnet/controller.sock)")
    return s


def _argtype(fn: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """Adapts a ValueError-raising parser to argparse (message shown as is, exit 2)."""
    def convert(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = name
    return convert


def _int_range(lo: int, hi: int, what: str) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: a whole number {lo}..{hi}") from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: must be {lo}..{hi}")
        return n
    return convert


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}: must be more than 0")
    return v


def _cidr(text: str) -> str:
    try:
        net = ipaddress.IPv4Network(text.strip(), strict=True)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"invalid CIDR {text!r}: {e} (e.g. 10.200.8.0/22)") from None
    return str(net)


def _abs_path(text: str) -> str:
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"invalid path {text!r}: must be absolute (it is a path on the node)")
    return text


# ---------------------------------------------------------------- formatting


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]], right: Iterable[int] = ()) -> str:
    """Aligned columns, two spaces apart, no trailing spaces. Columns whose index is in `right` are
    right-aligned (numbers). Returns the table without a final newline."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    ncols = max(len(r) for r in cells)
    for r in cells:
        r.extend([""] * (ncols - len(r)))
    widths = [max(len(r[i]) for r in cells) for i in range(ncols)]
    right_set = set(right)
    lines = []
    for r in cells:
        parts = [c.rjust(widths[i]) if i in right_set else c.ljust(widths[i]) for i, c in enumerate(r)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def format_fields(fields: Sequence[tuple[str, object]], indent: int = 0) -> str:
    """'Key:  value' lines with the values aligned; a value that is itself a list of (key, value) pairs
    becomes an indented block under its key."""
    flat = [k for k, v in fields if not isinstance(v, list)]
    width = max((len(k) for k in flat), default=0) + 3  # 'key:' and two spaces
    pad = " " * indent
    lines = []
    for key, value in fields:
        if isinstance(value, list):
            lines.append(f"{pad}{key}:")
            lines.append(format_fields(value, indent + 2))
        else:
            text = "-" if value is None or value == "" else value
            lines.append(f"{pad}{(key + ':').ljust(width)}{text}".rstrip())
    return "\n".join(lines)


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB', 536870912 -> '512 MiB', 12 -> '12 B'."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        value /= 1024
        if value < 1024 or unit == "EiB":
            text = f"{value:.1f}".removesuffix(".0")
            return f"{text} {unit}"
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """5400 -> '1h30m', 90 -> '1m30s', 86400 -> '1d'."""
    s = int(seconds)
    if s <= 0:
        return "0s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size:
            out.append(f"{s // size}{unit}")
            s %= size
    return "".join(out)


def _ts_set(ts: Timestamp) -> bool:
    return bool(ts.seconds or ts.nanos)


def ago(ts: Timestamp, now: float | None = None) -> str:
    """'3m ago', '2h ago', 'just now'; '-' when the timestamp is unset."""
    if not _ts_set(ts):
        return "-"
    now = time.time() if now is None else now
    delta = now - (ts.seconds + ts.nanos / 1e9)
    if abs(delta) < 1:
        return "just now"
    coarse = _coarse(abs(delta))
    return f"{coarse} ago" if delta > 0 else f"in {coarse}"


def _coarse(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def local_time(ts: Timestamp, now: float | None = None) -> str:
    """Local ISO time with a relative hint: '2024-05-01T12:00:03+02:00 (3m ago)'; '-' when unset."""
    if not _ts_set(ts):
        return "-"
    when = dt.datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9).astimezone()
    return f"{when.isoformat(timespec='seconds')} ({ago(ts, now)})"


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """JOB_STATE_RUNNING -> 'RUNNING'; unknown numbers stay numbers."""
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix)


def job_state(value: int) -> str:
    return enum_name(pb.JobState, value, "JOB_STATE_")


def node_state(value: int) -> str:
    return enum_name(pb.NodeState, value, "NODE_STATE_")


def end_reason(value: int) -> str:
    """END_REASON_SETUP_FAILED -> 'setup-failed' (the spelling of the job's message)."""
    if value == pb.END_REASON_UNSPECIFIED:
        return "-"
    return enum_name(pb.EndReason, value, "END_REASON_").lower().replace("_", "-")


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def job_result(job: pb.Job) -> str:
    """A short result for a finished job: 'exited 0', 'signalled SIGKILL', 'oom'; '-' while live."""
    if job.state != pb.JOB_STATE_FINISHED:
        return "-"
    reason = end_reason(job.end_reason)
    if job.end_reason == pb.END_REASON_EXITED:
        return f"exited {job.exit_code}"
    if job.end_reason == pb.END_REASON_SIGNALLED:
        return f"signalled {_signal_name(job.signal)}"
    return reason


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def to_dict(msg: Message) -> dict[str, Any]:
    """The JSON form of an API message: proto field names, every field present (zero values too),
    enums by name, 64-bit integers as numbers where they fit a double. A job always has its `isolation`
    (with `resources`) and `usage` objects; unset timestamps and an unset uid/gid are left out."""
    if isinstance(msg, pb.Job):
        job = pb.Job()
        job.CopyFrom(msg)
        job.isolation.resources.SetInParent()
        job.usage.SetInParent()
        _fill_net(job.net)
        msg = job
    return json_format.MessageToDict(msg, always_print_fields_with_no_presence=True,
                                     preserving_proto_field_name=True, unquote_int64_if_possible=True)


def _fill_net(net: pb.NetUsage) -> None:
    """Every direction and class present (zeros included), so scripts can index without checking."""
    for d in NET_DIRECTIONS:
        for c in NET_CLASSES:
            getattr(getattr(net, d), c).SetInParent()


# ---------------------------------------------------------------- exit codes and errors


def exit_code_for(code: grpc.StatusCode | None) -> int:
    """gRPC status -> the CLI's exit code."""
    if code == grpc.StatusCode.NOT_FOUND:
        return EXIT_NOT_FOUND
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return EXIT_UNREACHABLE
    return EXIT_FAILURE


def job_exit_code(job: pb.Job) -> tuple[int, str | None]:
    """The exit code of `job run --wait` for a finished job and, when it failed for a reason other than
    its own exit status, a message for stderr."""
    if job.end_reason == pb.END_REASON_EXITED:
        return job.exit_code, None
    if job.end_reason == pb.END_REASON_SIGNALLED:
        return 128 + job.signal, f"job {job.id} was killed by {_signal_name(job.signal)}"
    reason = end_reason(job.end_reason)
    if job.message.startswith(reason):  # the agent's messages name the reason first: "setup-failed: veth: ..."
        return EXIT_FAILURE, f"job {job.id} ended: {job.message}"
    detail = f": {job.message}" if job.message else ""
    return EXIT_FAILURE, f"job {job.id} ended: {reason}{detail}"


def _err(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


# ---------------------------------------------------------------- commands


@dataclasses.dataclass
class Ctx:
    stub: pbg.ControllerStub
    channel: grpc.Channel
    address: str
    output: str
    timeout: float

    @property
    def json(self) -> bool:
        return self.output == "json"


def emit_json(value: object) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def cmd_group_create(ctx: Ctx, a: argparse.Namespace) -> int:
    req = pb.CreateGroupRequest(name=a.name, cidr=a.cidr or "", prefix_len=a.prefix_len or 0)
    if a.vni is not None:  # optional fields: unset means "the controller chooses"
        req.vni = a.vni
    if a.mtu is not None:
        req.mtu = a.mtu
    group = ctx.stub.CreateGroup(req, timeout=ctx.timeout)
    if ctx.json:
        emit_json(to_dict(group))
    else:
        print(f"group {group.name} created: {group.subnet}, VNI {group.vni}, MTU {group.mtu}")
    return EXIT_OK


def _group_rows(groups: Iterable[pb.Group]) -> str:
    return format_table(
        ["NAME", "SUBNET", "GATEWAY", "VNI", "MTU", "JOBS", "FREE", "CREATED"],
        [[g.name, g.subnet, g.gateway, g.vni, g.mtu, g.live_jobs, g.free_addresses, ago(g.created)]
         for g in groups],
        right=(3, 4, 5, 6),
    )


def cmd_group_list(ctx: Ctx, a: argparse.Namespace) -> int:
    groups = sorted(ctx.stub.ListGroups(pb.ListGroupsRequest(), timeout=ctx.timeout).groups, key=lambda g: g.name)
    if ctx.json:
        emit_json([to_dict(g) for g in groups])
    elif groups:
        print(_group_rows(groups))
    else:
        print("no groups (create one: jobnet group create NAME)")
    return EXIT_OK


def cmd_group_show(ctx: Ctx, a: argparse.Namespace) -> int:
    g = ctx.stub.GetGroup(pb.GetGroupRequest(name=a.name), timeout=ctx.timeout)
    if ctx.json:
        emit_json(to_dict(g))
        return EXIT_OK
    print(format_fields([
        ("Name", g.name), ("Subnet", g.subnet), ("Gateway", g.gateway), ("VNI", g.vni), ("MTU", g.mtu),
        ("Live jobs", g.live_jobs), ("Free addresses", g.free_addresses), ("Created", local_time(g.created)),
    ]))
    return EXIT_OK


def cmd_group_delete(ctx: Ctx, a: argparse.Namespace) -> int:
    ctx.stub.DeleteGroup(pb.DeleteGroupRequest(name=a.name, force=a.force), timeout=ctx.timeout)
    if ctx.json:
        emit_json({"name": a.name, "deleted": True})
    else:
        print(f"group {a.name} deleted")
    return EXIT_OK


def cmd_node_list(ctx: Ctx, a: argparse.Namespace) -> int:
    nodes = sorted(ctx.stub.ListNodes(pb.ListNodesRequest(), timeout=ctx.timeout).nodes, key=lambda n: n.name)
    if ctx.json:
        emit_json([to_dict(n) for n in nodes])
    elif nodes:
        print(format_table(
            ["NAME", "STATE", "UNDERLAY", "MTU", "JOBS", "REVISION", "HEARTBEAT", "REGISTERED", "VERSION"],
            [[n.name, node_state(n.state), n.underlay_ip, n.underlay_mtu, n.live_jobs, n.applied_revision,
              ago(n.last_heartbeat), ago(n.registered), n.agent_version or "-"] for n in nodes],
            right=(3, 4, 5),
        ))
    else:
        print("no nodes registered (start jobnet-agent on a node)")
    return EXIT_OK


def build_isolation(a: argparse.Namespace) -> pb.Isolation:
    res = pb.Resources(
        memory_max_bytes=a.memory or 0, memory_high_bytes=a.memory_high or 0, cpu_weight=a.cpu_weight or 0,
        cpu_quota_millicores=a.cpus or 0, io_weight=a.io_weight or 0, pids_max=a.pids or 0,
        wall_time_s=a.wall_time or 0, io_limits=a.io_limit or [],
    )
    iso = pb.Isolation(resources=res, rootfs=a.rootfs or "", env=a.env or [], cwd=a.cwd or "")
    if a.uid is not None:
        iso.uid = a.uid
    if a.gid is not None:
        iso.gid = a.gid
    return iso


def job_command(a: argparse.Namespace) -> list[str]:
    cmd = list(a.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    return cmd


def invoking_user() -> str:
    """The login name the job is accounted to by default; empty (the controller says "unknown") when it cannot
    be told or is not a valid login name."""
    try:
        name = getpass.getuser()
    except (OSError, KeyError):
        return ""
    return name if _USER_RE.match(name) else ""


WAIT_OUTAGE_S = 60.0  # how long `--wait` rides out an unreachable controller (e.g. a restart)


def wait_for_job(ctx: Ctx, job_id: str, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> pb.Job:
    """Polls GetJob until the job is FINISHED (0.2 s at first, then up to every 2 s). A controller that
    is unreachable for a while (a restart) is waited for, up to WAIT_OUTAGE_S, with a note on stderr."""
    interval = 0.2
    outage_since: float | None = None
    while True:
        try:
            job = ctx.stub.GetJob(pb.GetJobRequest(id=job_id), timeout=ctx.timeout)
        except grpc.RpcError as e:
            if exit_code_for(e.code()) != EXIT_UNREACHABLE:
                raise
            now = clock()
            if outage_since is None:
                outage_since = now
                print(f"{PROG}: the controller is not answering ({e.code().name}); still waiting for job "
                      f"{job_id} for up to {WAIT_OUTAGE_S:g} s", file=sys.stderr)
            elif now - outage_since > WAIT_OUTAGE_S:
                raise
            sleep(2.0)
            continue
        outage_since = None
        if job.state == pb.JOB_STATE_FINISHED:
            return job
        sleep(interval)
        interval = min(interval * 1.5, 2.0)


def cmd_job_run(ctx: Ctx, a: argparse.Namespace) -> int:
    command = job_command(a)
    if not command:
        raise UsageError("job run needs a command after '--', e.g. jobnet job run --group blue --node n1 -- "
                         "sleep 600")
    if a.memory_high and a.memory and a.memory_high > a.memory:
        raise UsageError("--memory-high is above --memory: the soft limit must not exceed the hard limit")
    req = pb.CreateJobRequest(group=a.group, node=a.node, command=command, name=a.name or "",
                              isolation=build_isolation(a), user=a.user or invoking_user())
    job = ctx.stub.CreateJob(req, timeout=ctx.timeout)
    if not a.wait:
        if ctx.json:
            emit_json(to_dict(job))
        else:
            print(job.id)
        return EXIT_OK
    if not ctx.json:
        print(job.id, flush=True)
    try:
        final = wait_for_job(ctx, job.id)
    except KeyboardInterrupt:
        print(f"{PROG}: stopped waiting; job {job.id} keeps running (jobnet job stop {job.id})", file=sys.stderr)
        return 130
    if ctx.json:
        emit_json(to_dict(final))
    code, message = job_exit_code(final)
    if message:
        print(f"{PROG}: {message}", file=sys.stderr)
    return code


def cmd_job_list(ctx: Ctx, a: argparse.Namespace) -> int:
    req = pb.ListJobsRequest(group=a.group or "", node=a.node or "", include_finished=a.all)
    jobs = sorted(ctx.stub.ListJobs(req, timeout=ctx.timeout).jobs,
                  key=lambda j: (j.created.seconds, j.created.nanos, j.id))
    if ctx.json:
        emit_json([to_dict(j) for j in jobs])
    elif jobs:
        print(format_table(
            ["ID", "NAME", "GROUP", "NODE", "IP", "STATE", "RESULT", "CREATED", "COMMAND"],
            [[j.id, j.name or "-", j.group, j.node, j.ip, job_state(j.state), job_result(j), ago(j.created),
              _short(shlex.join(j.command), 40)] for j in jobs],
        ))
    else:
        print("no jobs" + ("" if a.all else " running (--all shows finished ones too)"))
    return EXIT_OK


def _or_default(value: object, text: str | None = None) -> object:
    return (text if text is not None else value) if value else "default"


def isolation_fields(iso: pb.Isolation) -> list[tuple[str, object]]:
    r = iso.resources
    io_limits = ", ".join(
        f"{lim.device} " + " ".join(
            f"{k}={human_bytes(getattr(lim, f)) + '/s' if k.endswith('bps') else getattr(lim, f)}"
            for k, f in _IO_KEYS.items() if getattr(lim, f))
        for lim in r.io_limits)
    return [
        ("Memory max", _or_default(r.memory_max_bytes, human_bytes(r.memory_max_bytes))),
        ("Memory high", _or_default(r.memory_high_bytes, human_bytes(r.memory_high_bytes))),
        ("CPU weight", _or_default(r.cpu_weight)),
        ("CPUs", _or_default(r.cpu_quota_millicores, f"{r.cpu_quota_millicores / 1000:g}")),
        ("IO weight", _or_default(r.io_weight)),
        ("IO limits", io_limits or "none"),
        ("PIDs max", _or_default(r.pids_max)),
        ("Wall time", _or_default(r.wall_time_s, human_duration(r.wall_time_s))),
        ("Rootfs", iso.rootfs or "default (the node's root)"),
        ("UID", iso.uid if iso.HasField("uid") else "default"),
        ("GID", iso.gid if iso.HasField("gid") else "default"),
        ("Env", " ".join(shlex.quote(e) for e in iso.env) or "-"),
        ("Cwd", iso.cwd or "default (the job's scratch dir)"),
    ]


def usage_fields(u: pb.Usage) -> list[tuple[str, object]]:
    return [
        ("CPU time", f"{u.cpu_seconds:.2f} s"),
        ("Memory peak", human_bytes(u.memory_peak_bytes)),
        ("IO read", human_bytes(u.io_read_bytes)),
        ("IO written", human_bytes(u.io_write_bytes)),
        ("PIDs peak", u.pids_peak),
        ("OOM kills", u.oom_kills),
    ]


def net_line(cls: pb.NetClassCounters) -> str:
    """'1.2 MiB (local 1 MiB, overlay 200 KiB, external 0 B)'"""
    parts = [(c, getattr(cls, c).bytes) for c in NET_CLASSES]
    return f"{human_bytes(sum(b for _, b in parts))} (" + ", ".join(f"{c} {human_bytes(b)}" for c, b in parts) + ")"


def usage_and_net_fields(j: pb.Job) -> list[tuple[str, object]]:
    fields = usage_fields(j.usage)
    if j.HasField("net"):
        fields += [("Net sent", net_line(j.net.tx)), ("Net received", net_line(j.net.rx))]
    else:
        fields.append(("Network", "no accounting report yet"))
    return fields


def job_fields(j: pb.Job) -> list[tuple[str, object]]:
    fields: list[tuple[str, object]] = [
        ("ID", j.id), ("Name", j.name or "-"), ("Group", j.group), ("Node", j.node), ("User", j.user or "-"),
        ("Command", shlex.join(j.command)), ("IP", j.ip), ("MAC", j.mac),
        ("State", job_state(j.state) + ("" if j.desired_running or j.state == pb.JOB_STATE_FINISHED
                                       else " (stop requested)")),
        ("PID", j.pid or "-"),
        ("Created", local_time(j.created)), ("Started", local_time(j.started)),
        ("Finished", local_time(j.finished)),
    ]
    if j.state == pb.JOB_STATE_FINISHED:
        fields.append(("End reason", end_reason(j.end_reason)))
        fields.append(("Exit code", j.exit_code if j.end_reason == pb.END_REASON_EXITED else "-"))
        if j.end_reason == pb.END_REASON_SIGNALLED:
            fields.append(("Signal", f"{j.signal} ({_signal_name(j.signal)})"))
    fields.append(("Message", j.message or "-"))
    fields.append(("Isolation", isolation_fields(j.isolation)))
    fields.append(("Usage", usage_and_net_fields(j)))
    return fields


def cmd_job_show(ctx: Ctx, a: argparse.Namespace) -> int:
    job = ctx.stub.GetJob(pb.GetJobRequest(id=a.id), timeout=ctx.timeout)
    if ctx.json:
        emit_json(to_dict(job))
    else:
        print(format_fields(job_fields(job)))
    return EXIT_OK


def cmd_job_stop(ctx: Ctx, a: argparse.Namespace) -> int:
    job = ctx.stub.StopJob(pb.StopJobRequest(id=a.id), timeout=ctx.timeout)
    if ctx.json:
        emit_json(to_dict(job))
    else:
        print(f"job {job.id}: {job_state(job.state)}")
    return EXIT_OK


def _write_bytes(data: bytes) -> None:
    out = sys.stdout
    buf = getattr(out, "buffer", None)
    out.flush()
    if buf is None:
        out.write(data.decode(errors="replace"))
        out.flush()
    else:
        buf.write(data)
        buf.flush()


def cmd_job_logs(ctx: Ctx, a: argparse.Namespace, sleep: Callable[[float], None] = time.sleep) -> int:
    stream = "stderr" if a.stderr else "stdout"
    offset = -a.tail if a.tail else 0
    while True:
        try:
            resp = ctx.stub.ReadJobLog(pb.ReadJobLogRequest(job_id=a.id, stream=stream, offset=offset),
                                       timeout=ctx.timeout)
        except grpc.RpcError as e:
            # A job that has not started yet has no output file: wait for it when following.
            if not a.follow or e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            job = ctx.stub.GetJob(pb.GetJobRequest(id=a.id), timeout=ctx.timeout)
            if job.state == pb.JOB_STATE_FINISHED:
                raise
            sleep(0.5)
            continue
        if resp.data:
            _write_bytes(resp.data)
        offset = resp.offset + len(resp.data)
        if resp.data and offset < resp.size:
            continue  # more than one chunk is waiting
        if not a.follow or (resp.finished and offset >= resp.size):
            return EXIT_OK
        if not resp.data:
            sleep(0.5)


# ---------------------------------------------------------------- topology


def _kind(node_id: str) -> str:
    return node_id.partition("/")[0]


def _name(node_id: str) -> str:
    return node_id.partition("/")[2] or node_id


def render_topology(topo: pb.Topology, only_group: str | None = None) -> str:
    """Per group: its nodes, the jobs on each node (id, ip, state) and the tunnels between the nodes."""
    kinds = {n.id: (n.kind or _kind(n.id)) for n in topo.nodes}
    attrs = {n.id: dict(n.attrs) for n in topo.nodes}
    for e in topo.edges:  # endpoints named only by edges still count
        for end in (e.source, e.target):
            kinds.setdefault(end, _kind(end))
            attrs.setdefault(end, {})
    groups = sorted(i for i, k in kinds.items() if k == "group")
    all_nodes = sorted(i for i, k in kinds.items() if k == "node")
    job_group: dict[str, str] = {}
    job_node: dict[str, str] = {}
    group_nodes: dict[str, set[str]] = {g: set() for g in groups}
    tunnels: list[tuple[str, str, dict[str, str]]] = []
    for e in topo.edges:
        pair = {kinds.get(e.source): e.source, kinds.get(e.target): e.target}
        if e.kind == "tunnel" or (kinds.get(e.source) == "node" and kinds.get(e.target) == "node"):
            tunnels.append((e.source, e.target, dict(e.attrs)))
        elif "job" in pair and "group" in pair:
            job_group[pair["job"]] = pair["group"]
        elif "job" in pair and "node" in pair:
            job_node[pair["job"]] = pair["node"]
        elif "node" in pair and "group" in pair:
            group_nodes[pair["group"]].add(pair["node"])
    for job, group in job_group.items():
        if job in job_node:
            group_nodes.setdefault(group, set()).add(job_node[job])
    if only_group:
        groups = [g for g in groups if _name(g) == only_group]

    lines = [f"topology (revision {topo.revision}): {len(groups)} group(s), {len(all_nodes)} node(s)"]
    for g in groups:
        ga = attrs.get(g, {})
        info = "  ".join(f"{k} {ga[k]}" for k in ("subnet", "vni", "mtu") if ga.get(k))
        lines.append("")
        lines.append(f"group {_name(g)}" + (f"  {info}" if info else ""))
        nodes = sorted(group_nodes.get(g, set()))
        if not nodes:
            lines.append("  (no nodes: the group has no jobs)")
        for n in nodes:
            na = attrs.get(n, {})
            ninfo = "  ".join(v for v in (na.get("underlay_ip", ""), na.get("state", "")) if v)
            lines.append(f"  node {_name(n)}" + (f"  {ninfo}" if ninfo else ""))
            jobs = sorted(j for j, grp in job_group.items() if grp == g and job_node.get(j) == n)
            rows = [[f"job {_name(j)}", attrs[j].get("ip", "-"), attrs[j].get("state", ""),
                     attrs[j].get("name", "")] for j in jobs]
            if rows:
                lines.extend("    " + line for line in format_table(["", "", "", ""], rows).splitlines()[1:])
            else:
                lines.append("    (no jobs)")
        gname, gvni = _name(g), ga.get("vni")
        mine = sorted({
            tuple(sorted((_name(s), _name(t))))
            for s, t, ta in tunnels
            if s in nodes and t in nodes and (
                (ta.get("group", gname) == gname and ta.get("vni", gvni) == gvni)
                or gname in ta.get("groups", "").split(","))
        })
        if len(nodes) > 1 or mine:
            text = ", ".join(f"{s} <-> {t}" for s, t in mine) or "none"
            lines.append(f"  tunnels: {text}")
    idle = sorted(_name(n) for n in all_nodes if not any(n in ns for ns in group_nodes.values()))
    if idle and not only_group:
        lines.append("")
        lines.append("nodes without jobs: " + ", ".join(idle))
    return "\n".join(lines)


def cmd_topology(ctx: Ctx, a: argparse.Namespace) -> int:
    topo = ctx.stub.GetTopology(pb.GetTopologyRequest(group=a.group or ""), timeout=ctx.timeout)
    if ctx.json:
        emit_json(to_dict(topo))
    else:
        print(render_topology(topo, a.group))
    return EXIT_OK


# ---------------------------------------------------------------- usage (network accounting)

USAGE_BY = ("job", "group", "node", "user", "all")
CSV_COUNTERS = tuple(f"{d}_{c}_{k}" for d in NET_DIRECTIONS for c in NET_CLASSES for k in ("bytes", "packets"))
CSV_HEADER = ("kind", "key", "start", "end", *CSV_COUNTERS, "total_bytes")
CHART_POINTS_MAX = 120


def net_counters(net: pb.NetUsage) -> list[int]:
    """The 12 counters in CSV_COUNTERS order."""
    out = []
    for d in NET_DIRECTIONS:
        for c in NET_CLASSES:
            n = getattr(getattr(net, d), c)
            out += [n.bytes, n.packets]
    return out


def net_bytes(net: pb.NetUsage, direction: str) -> int:
    side = getattr(net, direction)
    return int(sum(getattr(side, c).bytes for c in NET_CLASSES))


def _secs(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def _iso(ts: Timestamp | float) -> str:
    t = _secs(ts) if isinstance(ts, Timestamp) else ts
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _local(ts: Timestamp) -> str:
    return dt.datetime.fromtimestamp(_secs(ts)).astimezone().isoformat(timespec="seconds")


def usage_request(a: argparse.Namespace, points: int = 0) -> pb.QueryUsageRequest:
    """--since/--until are Unix seconds already (parse_when at parse time)."""
    req = pb.QueryUsageRequest(job_id=a.job or "", group=a.group or "", node=a.node or "", user=a.user or "",
                               by=a.by, top=a.top or 0)
    since, until = a.since, a.until
    if since is not None and until is None:
        if since >= a.now:
            raise UsageError(f"--since ({_iso(since)}) is in the future")
        until = a.now  # the same instant `--since 2h` was counted from: exactly two hours
    if since is not None and until is not None and since >= until:
        raise UsageError(f"--since ({_iso(since)}) must be before --until ({_iso(until)})")
    if since is not None:
        req.start.FromNanoseconds(int(since * 1e9))
    if until is not None:
        req.end.FromNanoseconds(int(until * 1e9))
    if a.step:
        req.step_s = a.step
    elif points:
        req.points = points
    return req


def usage_table(resp: pb.QueryUsageResponse, by: str, top: int) -> str:
    head = {"job": "JOB", "group": "GROUP", "node": "NODE", "user": "USER", "all": ""}[by]
    headers = [head, "TX LOCAL", "TX OVERLAY", "TX EXTERNAL", "RX LOCAL", "RX OVERLAY", "RX EXTERNAL", "TOTAL"]

    def cells(key: str, net: pb.NetUsage) -> list[object]:
        c = net_counters(net)
        return [key, *(human_bytes(c[i]) for i in range(0, 12, 2)), human_bytes(sum(c[0:12:2]))]

    rows = [cells(r.key, r.net) for r in resp.rows]
    rows.append(cells("TOTAL", resp.total))
    window = f"{_local(resp.start) if _ts_set(resp.start) else 'the beginning'} .. {_local(resp.end)}"
    if _ts_set(resp.start):
        window += f" ({human_duration(_secs(resp.end) - _secs(resp.start))})"
    lines = [f"network usage by {by}, {window}", format_table(headers, rows, right=range(1, 8))]
    if top and len(resp.rows) == top:
        lines.append(f"(--top {top}: the rows with the most bytes; TOTAL counts every matching row)")
    for r in resp.rows:
        if r.series:
            lines.append("")
            lines.append(f"{head.lower() or 'all'} {r.key}, per {human_duration(resp.step_s)} (time = end of step):")
            lines.append(format_table(["TIME", "TX", "RX", "TOTAL"], [
                [_local(pt.t), human_bytes(net_bytes(pt.net, "tx")), human_bytes(net_bytes(pt.net, "rx")),
                 human_bytes(net_bytes(pt.net, "tx") + net_bytes(pt.net, "rx"))] for pt in r.series], right=(1, 2, 3)))
    return "\n".join(lines)


def usage_csv(resp: pb.QueryUsageResponse) -> str:
    """kind,key,start,end,<12 counters>,total_bytes: a `row` per key over the window, then its `point`s (one per
    step, start/end of the step), and a last `total` line over every matching row. Raw integers; UTC times."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    start = _iso(resp.start) if _ts_set(resp.start) else ""
    end = _iso(resp.end)
    for r in resp.rows:
        c = net_counters(r.net)
        w.writerow(["row", r.key, start, end, *c, sum(c[0:12:2])])
        prev = start
        for pt in r.series:
            c = net_counters(pt.net)
            w.writerow(["point", r.key, prev, _iso(pt.t), *c, sum(c[0:12:2])])
            prev = _iso(pt.t)
    c = net_counters(resp.total)
    w.writerow(["total", "", start, end, *c, sum(c[0:12:2])])
    return buf.getvalue()


def chart_points(resp: pb.QueryUsageResponse) -> list[charts.Point]:
    """The series of the query's one row (by all): (end of step, tx bytes, rx bytes)."""
    if not resp.rows:
        return []
    return [(_secs(pt.t), net_bytes(pt.net, "tx"), net_bytes(pt.net, "rx")) for pt in resp.rows[0].series]


def chart_title(a: argparse.Namespace, resp: pb.QueryUsageResponse) -> str:
    what = ", ".join(f"{k} {v}" for k, v in (("job", a.job), ("group", a.group), ("node", a.node),
                                             ("user", a.user)) if v) or "all jobs"
    return (f"bytes per {human_duration(resp.step_s)}, {what}, {_local(resp.start)} .. {_local(resp.end)}; "
            f"total {human_bytes(net_bytes(resp.total, 'tx') + net_bytes(resp.total, 'rx'))}")


def cmd_usage(ctx: Ctx, a: argparse.Namespace) -> int:
    output = a.usage_output or ctx.output
    charting = a.chart or a.chart_file
    if charting and a.by != "all" and a.by != "job":
        raise UsageError("--chart draws the traffic of everything that matches as one series: leave out --by")
    if charting and a.top:
        raise UsageError("--chart draws one series: --top does not apply")
    if a.chart_file and not a.chart_file.endswith(".svg"):
        raise UsageError(f"--chart-file {a.chart_file}: the chart is written as SVG, name the file *.svg")
    if charting:
        width = min(CHART_POINTS_MAX, max(20, _terminal_columns() - 16))
        chart_args = argparse.Namespace(**{**vars(a), "by": "all", "top": 0})
        resp = ctx.stub.QueryUsage(usage_request(chart_args, points=width), timeout=ctx.timeout)
        points = chart_points(resp)
        if a.chart_file:
            with open(a.chart_file, "w") as f:
                f.write(charts.svg_chart(points, chart_title(a, resp), human_bytes))
            print(f"{PROG}: wrote {a.chart_file}", file=sys.stderr)
        if a.chart:
            if not points or not any(tx or rx for _, tx, rx in points):
                print("no network traffic recorded in the window")
            else:
                print(charts.terminal_chart(points, chart_title(a, resp), human_bytes))
            return EXIT_OK
        if output == "table":
            return EXIT_OK
    resp = ctx.stub.QueryUsage(usage_request(a), timeout=ctx.timeout)
    if output == "json":
        emit_json({"by": a.by, **to_dict(resp)})
    elif output == "csv":
        sys.stdout.write(usage_csv(resp))
    elif not resp.rows:
        print("no network usage recorded for that in the window (agents report every few seconds; "
              "`jobnet job list --all` shows the jobs)")
    else:
        print(usage_table(resp, a.by, a.top or 0))
    return EXIT_OK


def _terminal_columns() -> int:
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 80


# ---------------------------------------------------------------- argument parser

EPILOG = """\
examples:
  export JOBNET_CONTROLLER=unix:/run/jobnet/lab/controller.sock   # or HOST:PORT, e.g. 10.0.0.5:7400
  jobnet node list
  jobnet group create blue
  jobnet job run --group blue --node n1 -- sleep 600
  jobnet job run --group blue --node n2 --memory 512M --cpus 1.5 --wait -- ping -c1 10.200.0.2
  jobnet job list
  jobnet job logs -f JOB_ID
  jobnet topology
  jobnet usage --group blue --since 2h
  jobnet -o json group list | jq -r '.[].name'

exit codes:
  0  ok
  1  runtime error (the controller refused the request), or a job waited for with --wait failed
  2  usage error (bad arguments; nothing was sent)
  3  not found (no such group, node or job)
  4  controller unreachable, or no answer within --timeout
  `job run --wait` exits with the job's own exit code (see `jobnet job run --help`).

`jobnet COMMAND --help` explains each command.
"""

GROUP_EPILOG = """\
examples:
  jobnet group create blue                       # a free /24 from the pool, a free VNI, MTU from the underlay
  jobnet group create big --prefix-len 22        # a bigger subnet from the pool
  jobnet group create lab --cidr 10.200.8.0/22 --vni 4242 --mtu 1400
  jobnet group list
  jobnet group show blue
  jobnet group delete blue                       # refused while the group has live jobs
  jobnet group delete blue --force               # stops the group's jobs first
"""

CREATE_EPILOG = """\
examples:
  jobnet group create blue
  jobnet group create big --prefix-len 22
  jobnet group create lab --cidr 10.200.8.0/22 --vni 4242 --mtu 1400

All jobs of a group share its subnet (one L2 segment across nodes, carried by VXLAN); no other group's
jobs can reach them. The first host address is the group's gateway and is never given to a job.
"""

DELETE_EPILOG = """\
examples:
  jobnet group delete blue
  jobnet group delete blue --force   # stop the group's live jobs, then delete it
"""

NODE_EPILOG = """\
examples:
  jobnet node list
  jobnet -o json node list

Nodes register themselves when their jobnet-agent starts. STATE is READY while the agent sends heartbeats,
LOST when it stopped; REVISION is the last desired-state revision the agent applied.
"""

JOB_EPILOG = """\
examples:
  jobnet job run --group blue --node n1 -- sleep 600
  jobnet job list --group blue
  jobnet job show JOB_ID
  jobnet job logs -f JOB_ID
  jobnet job stop JOB_ID
"""

RUN_EPILOG = """\
examples:
  jobnet job run --group blue --node n1 -- sleep 600
  jobnet job run --group blue --node n1 --name web -- python3 -m http.server 8080
  jobnet job run --group blue --node n2 --wait -- ping -c1 10.200.0.2
  jobnet job run --group blue --node n1 --memory 512M --memory-high 400M --cpus 1.5 --pids 256 \\
      --wall-time 10m --io-limit 8:0:rbps=10M,wiops=100 --env OMP_NUM_THREADS=2 -- ./simulate
  ID=$(jobnet job run --group blue --node n1 -- ./task) && jobnet job logs -f "$ID"

Everything after '--' is the job's command, passed on as is (no shell: use -- sh -c '...' for one).
The job id is printed on stdout (with -o json: the whole job).

Sizes take binary suffixes K, M, G, T (512M = 512 MiB); durations s, m, h, d (90s, 10m, 1h30m) or plain
seconds; --cpus takes CPUs (1.5) or millicores (1500m). Limits not given are the site's defaults; a request
above the site's maximum ends the job as setup-failed, naming the limit.

--wait polls until the job has finished, then exits with:
  the job's exit code                      when the job exited on its own (0..255)
  128 + signal number                      when it was killed by a signal (e.g. 137 for SIGKILL)
  1, with a message on stderr              when it ended as oom, timeout, setup-failed, stopped or lost
(Errors of jobnet itself still exit 1, 2, 3 or 4, see `jobnet --help`.) Ctrl-C stops waiting, not the job.
"""

LIST_EPILOG = """\
examples:
  jobnet job list                       # live jobs (PENDING, RUNNING, STOPPING)
  jobnet job list --all                 # finished ones too
  jobnet job list --group blue --node n1
  jobnet -o json job list | jq -r '.[] | .id + " " + .ip'
"""

SHOW_EPILOG = """\
examples:
  jobnet job show 1f3c0a9b2e
  jobnet -o json job show 1f3c0a9b2e | jq .usage

Shows the job's placement, user, network (IP, MAC), state, end reason and exit code, the isolation it asked
for ('default' means the site's default applies) and its resource usage (at the end, or while running when the
node reports it), with the bytes it sent and received by class (local: a job on the same node, overlay: a job
on another node, external: anything else; `jobnet usage --job ID` has them over time).
"""

LOGS_EPILOG = """\
examples:
  jobnet job logs JOB_ID                 # everything the job wrote to stdout so far
  jobnet job logs --stderr JOB_ID
  jobnet job logs --tail 4K JOB_ID       # the last 4 KiB
  jobnet job logs -f JOB_ID              # keep printing until the job has finished

The output is read from the job's node (through the controller) and written as is, in bytes (-o json too).
"""

STOP_EPILOG = """\
examples:
  jobnet job stop 1f3c0a9b2e

The job goes to STOPPING at once and to FINISHED (end reason stopped) when its node has stopped it.
"""

TOPOLOGY_EPILOG = """\
examples:
  jobnet topology
  jobnet topology --group blue
  jobnet -o json topology            # the graph itself: nodes, edges (runs-on, member-of, tunnel)

Per group: the nodes that host its jobs, the jobs on each node (id, IP) and the VXLAN tunnels between those
nodes (a group's traffic only ever goes to the nodes that host it).
"""

USAGE_EPILOG = """\
examples:
  jobnet usage                                   # every job's traffic since its start, most bytes first
  jobnet usage --group blue --since 2h           # the last two hours of group blue's jobs
  jobnet usage --by user --since 2024-05-01 --until 2024-06-01 --top 10
  jobnet usage --node n1 --by group -o csv > n1.csv
  jobnet usage --job 1f3c0a9b2e --step 1m -o json
  jobnet usage --group blue --since 1d --chart   # bytes over time in the terminal
  jobnet usage --group blue --chart-file blue.svg

Traffic is counted by the node's kernel on each job's own device, every Ethernet frame (header included),
by direction (tx: sent by the job, rx: received) and class: local (a job on the same node), overlay (a job on
another node, through the VXLAN tunnel), external (anything else: broadcast, the gateway and beyond).

A window [--since, --until] counts, per job, its counters at its last sample before --until minus those at its
last sample before --since (a job that started inside the window counts from zero). --since/--until take a
duration ago (90s, 10m, 2h, 1d), 'now', or an ISO time (2024-05-01T12:00, local time unless it has a zone).
Default: since the beginning, until now. Filters combine (AND).

-o csv: header kind,key,start,end,tx_local_bytes,tx_local_packets,...,rx_external_packets,total_bytes; a `row`
line per key, its `point` lines with --step (start/end of each step), a last `total` line; raw integers,
UTC times. -o json: the API's QueryUsageResponse plus "by".
"""


def _parser_kwargs(epilog: str) -> dict[str, Any]:
    return {"epilog": epilog, "formatter_class": argparse.RawDescriptionHelpFormatter}


def build_parser() -> argparse.ArgumentParser:
    now = time.time()
    env_controller = os.environ.get("JOBNET_CONTROLLER") or DEFAULT_CONTROLLER
    p = argparse.ArgumentParser(
        prog=PROG,
        description="jobnet: run batch jobs in private, isolated networks. Talks to the jobnet controller.",
        **_parser_kwargs(EPILOG),
    )
    p.add_argument("--controller", default=env_controller, type=_argtype(parse_address, "address"),
                   metavar="ADDRESS",
                   help="controller address, HOST:PORT or unix:/path (default: env JOBNET_CONTROLLER, else "
                   f"{DEFAULT_CONTROLLER}; now: %(default)s)")
    p.add_argument("-o", "--output", choices=["table", "json", "csv"], default="table",
                   help="table: aligned text for people (default); json: the API objects for scripts "
                   "(proto field names, lists as arrays); csv: `jobnet usage` only")
    p.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="give up on a controller call after SECONDS (default: %(default)g)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # group
    g = sub.add_parser("group", help="create, list, show and delete groups (private networks)",
                       description="A group is a private network: one subnet and one VXLAN VNI, shared by "
                       "its jobs on any node.", **_parser_kwargs(GROUP_EPILOG))
    gs = g.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = gs.add_parser("create", help="create a group", description="Create a group: a subnet, a VNI and an MTU.",
                      **_parser_kwargs(CREATE_EPILOG))
    c.add_argument("name", metavar="NAME", help="group name (lowercase letters, digits, '-')")
    excl = c.add_mutually_exclusive_group()
    excl.add_argument("--cidr", type=_cidr, help="the subnet to use, e.g. 10.200.8.0/22 (default: a free one "
                      "from the controller's pool)")
    excl.add_argument("--prefix-len", type=_int_range(1, 30, "prefix length"), metavar="N",
                      help="take a free /N from the pool (default: the pool's default, /24)")
    c.add_argument("--vni", type=_int_range(1, (1 << 24) - 1, "VNI"), metavar="N",
                   help="VXLAN network identifier 1..16777215 (default: a free one)")
    c.add_argument("--mtu", type=_int_range(68, 65535, "MTU"), metavar="N",
                   help="MTU of the jobs' interfaces (default: underlay MTU minus the VXLAN overhead)")
    c.set_defaults(func=cmd_group_create)
    gl = gs.add_parser("list", help="list groups", description="List all groups.", **_parser_kwargs(GROUP_EPILOG))
    gl.set_defaults(func=cmd_group_list)
    gsh = gs.add_parser("show", help="show one group", description="Show one group.",
                        **_parser_kwargs(GROUP_EPILOG))
    gsh.add_argument("name", metavar="NAME")
    gsh.set_defaults(func=cmd_group_show)
    gd = gs.add_parser("delete", help="delete a group", description="Delete a group and free its subnet and VNI.",
                       **_parser_kwargs(DELETE_EPILOG))
    gd.add_argument("name", metavar="NAME")
    gd.add_argument("--force", action="store_true", help="stop the group's live jobs first (otherwise a group "
                    "with live jobs is not deleted)")
    gd.set_defaults(func=cmd_group_delete)

    # node
    n = sub.add_parser("node", help="list nodes", description="Nodes: the machines running jobnet-agent.",
                       **_parser_kwargs(NODE_EPILOG))
    ns = n.add_subparsers(dest="action", metavar="ACTION", required=True)
    nl = ns.add_parser("list", help="list nodes", description="List the registered nodes.",
                       **_parser_kwargs(NODE_EPILOG))
    nl.set_defaults(func=cmd_node_list)

    # job
    j = sub.add_parser("job", help="run, list, show, stop jobs and read their output",
                       description="Jobs: processes in their own network namespace, in a group's network.",
                       **_parser_kwargs(JOB_EPILOG))
    js = j.add_subparsers(dest="action", metavar="ACTION", required=True)
    r = js.add_parser("run", help="start a job", description="Start a job on a node, in a group's network.",
                      usage="jobnet job run --group G --node N [options] [--wait] -- COMMAND [ARG...]",
                      **_parser_kwargs(RUN_EPILOG))
    r.add_argument("--group", required=True, metavar="G", help="the group whose network the job joins")
    r.add_argument("--node", required=True, metavar="N", help="the node to run the job on")
    r.add_argument("--name", metavar="X", help="a name for the job, unique among the group's live jobs")
    r.add_argument("--user", type=_argtype(parse_user, "user"), metavar="U",
                   help="account the job to this user (default: your login name)")
    lim = r.add_argument_group("limits (default: the site's)")
    size = _argtype(parse_size, "size")
    lim.add_argument("--memory", type=size, metavar="SIZE",
                     help="hard memory limit, e.g. 512M; above it the job is OOM-killed (end reason oom)")
    lim.add_argument("--memory-high", type=size, metavar="SIZE",
                     help="soft memory limit: the job is throttled and reclaimed above it")
    lim.add_argument("--cpu-weight", type=_int_range(1, 10000, "CPU weight"), metavar="N",
                     help="share of the CPU under contention, 1..10000 (100 is the default)")
    lim.add_argument("--cpus", type=_argtype(parse_cpus, "cpus"), metavar="CPUS",
                     help="hard CPU cap, e.g. 1.5 (CPUs) or 500m (millicores)")
    lim.add_argument("--io-weight", type=_int_range(1, 10000, "IO weight"), metavar="N",
                     help="share of block IO under contention, 1..10000")
    lim.add_argument("--io-limit", type=_argtype(parse_io_limit, "io_limit"), action="append",
                     metavar="MAJ:MIN:KEY=VAL,...",
                     help="per-device IO cap, keys rbps, wbps (sizes per second), riops, wiops; repeatable. "
                     "e.g. 8:0:rbps=10M,wbps=5M")
    lim.add_argument("--pids", type=_int_range(1, UINT32_MAX, "PID limit"), metavar="N",
                     help="at most N processes and threads")
    lim.add_argument("--wall-time", type=_argtype(parse_duration, "duration"), metavar="DURATION",
                     help="end the job (end reason timeout) after this long, e.g. 90s, 10m, 2h, 3600")
    env = r.add_argument_group("environment")
    env.add_argument("--rootfs", type=_abs_path, metavar="DIR", help="a directory on the node to use as the "
                     "job's root (default: the node's root)")
    env.add_argument("--uid", type=_int_range(0, UINT32_MAX, "uid"), metavar="N",
                     help="run as this uid (default: the site's job uid)")
    env.add_argument("--gid", type=_int_range(0, UINT32_MAX, "gid"), metavar="N",
                     help="run with this gid (default: the site's job gid)")
    env.add_argument("--env", type=_argtype(parse_env, "env"), action="append", metavar="K=V",
                     help="set an environment variable in the job; repeatable")
    env.add_argument("--cwd", type=_abs_path, metavar="DIR",
                     help="working directory inside the job (default: its scratch directory)")
    r.add_argument("--wait", action="store_true",
                   help="wait until the job has finished and exit with its exit code (see below)")
    r.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND",
                   help="the job's command and arguments, after '--'")
    r.set_defaults(func=cmd_job_run)

    jl = js.add_parser("list", help="list jobs", description="List jobs, oldest first.",
                       **_parser_kwargs(LIST_EPILOG))
    jl.add_argument("--group", metavar="G", help="only the jobs of this group")
    jl.add_argument("--node", metavar="N", help="only the jobs on this node")
    jl.add_argument("--all", action="store_true", help="include finished jobs")
    jl.set_defaults(func=cmd_job_list)
    jsh = js.add_parser("show", help="show one job in detail", description="Show one job in detail.",
                        **_parser_kwargs(SHOW_EPILOG))
    jsh.add_argument("id", metavar="ID")
    jsh.set_defaults(func=cmd_job_show)
    jst = js.add_parser("stop", help="stop a job", description="Stop a job (its node kills it).",
                        **_parser_kwargs(STOP_EPILOG))
    jst.add_argument("id", metavar="ID")
    jst.set_defaults(func=cmd_job_stop)
    jlg = js.add_parser("logs", help="print a job's output", description="Print a job's stdout (or stderr).",
                        **_parser_kwargs(LOGS_EPILOG))
    jlg.add_argument("id", metavar="ID")
    jlg.add_argument("--stderr", action="store_true", help="print stderr instead of stdout")
    jlg.add_argument("-f", "--follow", action="store_true", help="keep printing new output until the job ends")
    jlg.add_argument("--tail", type=size, metavar="BYTES",
                     help="start this many bytes before the end (sizes like 4K are fine)")
    jlg.set_defaults(func=cmd_job_logs)

    # usage
    u = sub.add_parser("usage", help="network traffic per job, group, node or user",
                       description="Network accounting: bytes and packets per job, group, node or user, within a "
                       "time window; tables, CSV, JSON and charts.", **_parser_kwargs(USAGE_EPILOG))
    flt = u.add_argument_group("what (filters combine)")
    flt.add_argument("--job", type=_argtype(parse_job_id, "job_id"), metavar="ID", help="only this job")
    flt.add_argument("--group", metavar="G", help="only the jobs of this group")
    flt.add_argument("--node", metavar="N", help="only the jobs on this node")
    flt.add_argument("--user", type=_argtype(parse_user, "user"), metavar="U", help="only this user's jobs")
    when = u.add_argument_group("when")
    when_t = _argtype(lambda text: parse_when(text, now), "when")  # one "now" for --since and --until
    when.add_argument("--since", type=when_t, metavar="WHEN",
                      help="start of the window: 2h (ago), ISO time (default: the beginning)")
    when.add_argument("--until", type=when_t, metavar="WHEN",
                      help="end of the window: 30m (ago), now, ISO time (default: now)")
    u.add_argument("--by", choices=USAGE_BY, default="job", help="one row per job (default), group, node, user, or "
                   "one row for all")
    u.add_argument("--top", type=_int_range(1, UINT32_MAX, "row count"), metavar="N",
                   help="only the N rows with the most bytes (the total still counts every row)")
    u.add_argument("--step", type=_argtype(parse_duration, "duration"), metavar="DURATION",
                   help="also the traffic per step (e.g. 5m): a series per row")
    u.add_argument("-o", "--output", dest="usage_output", choices=["table", "json", "csv"],
                   help="table (default), json, or csv (raw integers, stable header)")
    u.add_argument("--chart", action="store_true",
                   help="draw the bytes over time in the terminal (everything that matches, as one series)")
    u.add_argument("--chart-file", metavar="PATH.svg", help="write the bytes over time as an SVG line chart")
    u.set_defaults(func=cmd_usage, now=now)

    # topology
    t = sub.add_parser("topology", help="show groups, nodes, jobs and tunnels",
                       description="The overlay as text: per group, its nodes, jobs and tunnels.",
                       **_parser_kwargs(TOPOLOGY_EPILOG))
    t.add_argument("--group", metavar="G", help="only this group")
    t.set_defaults(func=cmd_topology)
    return p


# ---------------------------------------------------------------- main


def open_channel(address: str) -> grpc.Channel:
    # No proxy: the controller is reached directly, whatever http_proxy says.
    return grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)])


def _reachable(channel: grpc.Channel) -> bool:
    try:
        grpc.channel_ready_future(channel).result(timeout=0.3)
    except grpc.FutureTimeoutError:
        return False
    return True


def report_rpc_error(e: grpc.RpcError, ctx: Ctx) -> int:
    code = e.code()
    details = e.details() or (code.name if code else "unknown error")
    if code == grpc.StatusCode.UNAVAILABLE and _reachable(ctx.channel):
        # The controller answered, but something behind it (e.g. a node's agent) is unavailable.
        _err(details)
        return EXIT_FAILURE
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        _err(f"no answer from the controller at {ctx.address} within {ctx.timeout:g} s ({details})")
    else:
        _err(details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        print(f"{PROG}: hint: is the controller running at {ctx.address}? set --controller or JOBNET_CONTROLLER",
              file=sys.stderr)
    return exit_code_for(code)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    channel = open_channel(args.controller)
    ctx = Ctx(stub=pbg.ControllerStub(channel), channel=channel, address=args.controller,
              output=args.output, timeout=args.timeout)
    try:
        if args.output == "csv" and args.func is not cmd_usage:
            raise UsageError("-o csv is available for `jobnet usage` only: use -o table or -o json")
        code: int = args.func(ctx, args)
        return code
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except grpc.RpcError as e:
        return report_rpc_error(e, ctx)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: nothing more to say.
        with contextlib.suppress(OSError):
            # keeps the interpreter from complaining when it flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        channel.close()


if __name__ == "__main__":
    sys.exit(main())
