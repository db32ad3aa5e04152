"""`jobnet usage`, the user a job is accounted to, and the network totals in `job show`: formatting without a
controller, then the CLI against a real controller process (the agent's part played through ReportUsage)."""

from __future__ import annotations

import csv
import getpass
import io
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from jobnet_cli import charts
from jobnet_cli import main as cli
from protos.jobnet.v1 import jobnet_pb2 as pb
from tests.cli.test_controller import World, w, world  # noqa: F401 - fixtures

NAMES = [f"{d}_{c}_{k}" for d in ("tx", "rx") for c in ("local", "overlay", "external") for k in ("bytes", "packets")]


def net(c: list[int]) -> pb.NetUsage:
    out = pb.NetUsage()
    for i, name in enumerate(NAMES):
        d, cls, k = name.split("_")
        setattr(getattr(getattr(out, d), cls), k, c[i])
    return out


# ---------------------------------------------------------------- without a controller


def test_parse_when() -> None:
    now = 1_700_000_000.0
    assert cli.parse_when("2h", now) == now - 7200
    assert cli.parse_when("90s", now) == now - 90
    assert cli.parse_when("1d", now) == now - 86400
    assert cli.parse_when("now", now) == now
    assert cli.parse_when("2024-05-01T12:00:00Z", now) == 1714564800
    assert cli.parse_when("2024-05-01T14:00:00+02:00", now) == 1714564800
    local = cli.parse_when("2024-05-01T12:00", now)
    assert abs(local - 1714564800) <= 14 * 3600  # local time, whatever the zone
    for bad in ("yesterday", "2h ago", "2024-13-01", ""):
        with pytest.raises(ValueError, match="invalid time"):
            cli.parse_when(bad, now)


@pytest.mark.parametrize(("text", "ok"), [("alice", True), ("_svc", True), ("build-01.x$", True), ("a" * 32, True),
                                          ("a" * 33, False), ("1abc", False), ("no body", False), ("", False)])
def test_parse_user(text: str, ok: bool) -> None:
    if ok:
        assert cli.parse_user(text) == text
    else:
        with pytest.raises(ValueError, match="login name"):
            cli.parse_user(text)


def response() -> pb.QueryUsageResponse:
    r = pb.QueryUsageResponse(step_s=600)
    r.start.FromSeconds(1_714_564_800)
    r.end.FromSeconds(1_714_564_800 + 1200)
    a = r.rows.add(key="blue", net=net([3 << 20, 10, 1024, 2, 0, 0, 5 << 30, 7, 12, 1, 0, 0]))
    a.total_bytes = (3 << 20) + 1024 + (5 << 30) + 12
    for k, part in enumerate(([1 << 20, 4, 1024, 2, 0, 0, 5 << 30, 7, 0, 0, 0, 0],
                              [2 << 20, 6, 0, 0, 0, 0, 0, 0, 12, 1, 0, 0])):
        p = a.series.add(net=net(part))
        p.t.FromSeconds(1_714_564_800 + 600 * (k + 1))
    r.total.CopyFrom(net([4 << 20, 11, 1024, 2, 0, 0, 5 << 30, 7, 12, 1, 99, 1]))
    return r


def test_usage_csv_has_a_stable_header_and_raw_integers() -> None:
    text = cli.usage_csv(response())
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["kind", "key", "start", "end", *NAMES, "total_bytes"]
    assert [r[0] for r in rows[1:]] == ["row", "point", "point", "total"]
    row = dict(zip(rows[0], rows[1], strict=True))
    assert (row["key"], row["start"], row["end"]) == ("blue", "2024-05-01T12:00:00.000Z", "2024-05-01T12:20:00.000Z")
    assert int(row["tx_local_bytes"]) == 3 << 20 and int(row["rx_local_bytes"]) == 5 << 30
    assert int(row["total_bytes"]) == (3 << 20) + 1024 + (5 << 30) + 12
    points = [dict(zip(rows[0], r, strict=True)) for r in rows[2:4]]
    assert [(p["start"], p["end"]) for p in points] == [("2024-05-01T12:00:00.000Z", "2024-05-01T12:10:00.000Z"),
                                                         ("2024-05-01T12:10:00.000Z", "2024-05-01T12:20:00.000Z")]
    for name in NAMES:
        assert sum(int(p[name]) for p in points) == int(row[name]), name
    total = dict(zip(rows[0], rows[4], strict=True))
    assert total["key"] == "" and int(total["rx_external_bytes"]) == 99


def test_usage_table_is_human_readable_with_totals() -> None:
    text = cli.usage_table(response(), "group", 0)
    lines = text.splitlines()
    assert lines[0].startswith("network usage by group, 2024-05-01T") and lines[0].endswith("(20m)")
    assert lines[1].split() == ["GROUP", "TX", "LOCAL", "TX", "OVERLAY", "TX", "EXTERNAL", "RX", "LOCAL", "RX",
                                "OVERLAY", "RX", "EXTERNAL", "TOTAL"]
    assert re.match(r"^blue\s+3 MiB\s+1 KiB\s+0 B\s+5 GiB\s+12 B\s+0 B\s+5 GiB$", lines[2]), lines[2]
    assert lines[3].startswith("TOTAL ") and "4 MiB" in lines[3] and "99 B" in lines[3]
    assert "group blue, per 10m" in text


def test_sparkline_and_bars() -> None:
    assert charts.sparkline([0, 1, 4, 8]) == " ▁▄█"
    assert charts.sparkline([0, 0]) == "  "
    rows = charts.bars([0, 1, 8, 16], 2)
    assert rows == [" " + " " + " " + "█", " " + "▁" + "█" + "█"]


def test_terminal_and_svg_chart() -> None:
    pts = [(1_714_564_800.0 + 60 * k, k * 1000, (20 - k) * 500) for k in range(1, 21)]
    text = charts.terminal_chart(pts, "title", cli.human_bytes)
    lines = text.splitlines()
    assert lines[0] == "title"
    assert len(lines) == 1 + 8 + 1 + 1 + 2
    assert all(len(line) >= 20 for line in lines[1:9]) and "█" in text
    assert lines[-2].split()[0] == "tx" and lines[-2].endswith(cli.human_bytes(sum(p[1] for p in pts)))
    svg = charts.svg_chart(pts, "a <title> & more", cli.human_bytes)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    lines_ = root.findall(f"{ns}polyline")
    assert [e.get("class") for e in lines_] == ["total", "tx", "rx"]
    assert len(lines_[0].get("points", "").split()) == 2 * len(pts)
    assert any(t.text == "a <title> & more" for t in root.iter(f"{ns}text"))


def test_job_show_prints_user_and_network_by_class() -> None:
    job = pb.Job(id="0123456789", user="alice", usage=pb.Usage(cpu_seconds=1.5),
                 net=net([1 << 20, 1, 2 << 20, 1, 0, 0, 512, 1, 0, 0, 3 << 30, 1]))
    text = cli.format_fields(cli.job_fields(job))
    assert re.search(r"^User:\s+alice$", text, re.M)
    assert "CPU time:      1.50 s" in text
    assert re.search(r"Net sent:\s+3 MiB \(local 1 MiB, overlay 2 MiB, external 0 B\)", text), text
    assert re.search(r"Net received:\s+3 GiB \(local 512 B, overlay 0 B, external 3 GiB\)", text), text
    assert "no accounting report yet" in cli.format_fields(cli.job_fields(pb.Job(id="x")))
    d = cli.to_dict(pb.Job(id="x"))
    assert d["net"]["rx"]["external"] == {"bytes": 0, "packets": 0}, "every class present for scripts"


# ---------------------------------------------------------------- against the controller


@pytest.fixture(scope="module")
def acct(world: World) -> dict[str, Any]:  # noqa: F811
    """Group acct: jobs on n1 and n2 for alice and bob, an hour of reports every 60 s."""
    s = world.stub
    s.CreateGroup(pb.CreateGroupRequest(name="acct"), timeout=5)
    jobs = [s.CreateJob(pb.CreateJobRequest(group="acct", node=n, command=["x"], user=u), timeout=5)
            for n, u in (("n1", "alice"), ("n2", "alice"), ("n1", "bob"))]
    now = time.time()
    last: dict[str, list[int]] = {}
    for k, j in enumerate(jobs):
        reps = []
        c = [0] * 12
        for m in range(60):
            c = [v + (m + 1) * (k + 1) * (1000 if i % 2 == 0 else 1) for i, v in enumerate(c)]
            r = pb.JobUsageReport(job_id=j.id, seq=m + 1, net=net(c))
            r.sampled.FromMilliseconds(int((now - 3600 + m * 60) * 1000))
            reps.append(r)
        resp = s.ReportUsage(pb.ReportUsageRequest(node=j.node, boot_id=world.nodes[j.node], reports=reps), timeout=5)
        assert resp.accepted == 60
        last[j.id] = c
    return {"jobs": jobs, "last": last, "now": now}


def test_usage_table(w: World, acct: dict[str, Any]) -> None:  # noqa: F811
    r = w.cli("usage", "--group", "acct")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].startswith("network usage by job, the beginning .. ")
    keys = [line.split()[0] for line in lines[2:]]
    last = acct["last"]
    assert keys == [*sorted(last, key=lambda j: -sum(last[j][0:12:2])), "TOTAL"]
    r = w.cli("usage", "--group", "acct", "--by", "user", "--top", "1")
    assert [line.split()[0] for line in r.out.splitlines()[2:4]] == ["alice", "TOTAL"]
    assert "--top 1" in r.out
    r = w.cli("usage", "--group", "nothing-here")
    assert r.code == 0 and "no network usage recorded" in r.out


def test_usage_json_and_csv_parse_and_agree(w: World, acct: dict[str, Any]) -> None:  # noqa: F811
    last = acct["last"]
    r = w.cli("-o", "json", "usage", "--group", "acct")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["by"] == "job"
    got = {row["key"]: row for row in doc["rows"]}
    assert set(got) == set(last)
    for jid, c in last.items():
        assert got[jid]["net"]["tx"]["local"]["bytes"] == c[0] and got[jid]["net"]["rx"]["external"]["packets"] == c[11]
        assert got[jid]["total_bytes"] == sum(c[0:12:2])
    for argv in (["-o", "csv", "usage", "--group", "acct"], ["usage", "--group", "acct", "-o", "csv"]):
        r = w.cli(*argv)
        assert r.code == 0, r.err
        rows = list(csv.DictReader(io.StringIO(r.out)))
        assert list(rows[0]) == list(cli.CSV_HEADER)
        body = {x["key"]: x for x in rows if x["kind"] == "row"}
        assert {k: [int(body[k][n]) for n in NAMES] for k in body} == last
        total = next(x for x in rows if x["kind"] == "total")
        assert int(total["total_bytes"]) == sum(sum(c[0:12:2]) for c in last.values())
    # A window with a series: the points sum to the row.
    r = w.cli("usage", "--group", "acct", "--by", "group", "--since", "40m", "--step", "10m", "-o", "csv")
    rows = list(csv.DictReader(io.StringIO(r.out)))
    row = next(x for x in rows if x["kind"] == "row")
    points = [x for x in rows if x["kind"] == "point"]
    assert len(points) == 4
    for n in NAMES:
        assert sum(int(p[n]) for p in points) == int(row[n]), n


def test_usage_chart_in_the_terminal_and_as_svg(w: World, acct: dict[str, Any], tmp_path: Path) -> None:  # noqa: F811
    r = w.cli("usage", "--group", "acct", "--chart")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].startswith("bytes per ") and "group acct" in lines[0]
    assert any(ch in r.out for ch in "▁▂▃▄▅▆▇█")
    assert lines[-2].split()[0] == "tx" and lines[-1].split()[0] == "rx"
    svg = tmp_path / "acct.svg"
    r = w.cli("usage", "--job", acct["jobs"][0].id, "--since", "1h", "--chart-file", str(svg))
    assert r.code == 0, r.err
    assert f"wrote {svg}" in r.err
    root = ET.fromstring(svg.read_text())
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == f"{ns}svg" and len(root.findall(f"{ns}polyline")) == 3
    assert w.cli("usage", "--chart-file", str(tmp_path / "x.png")).code == cli.EXIT_USAGE


@pytest.mark.parametrize(("argv", "code", "text"), [
    (["usage", "--by", "month"], cli.EXIT_USAGE, "invalid choice"),
    (["usage", "--since", "yesterday"], cli.EXIT_USAGE, "invalid time"),
    (["usage", "--since", "1h", "--until", "2h"], cli.EXIT_USAGE, "must be before"),
    (["usage", "--job", "xyz"], cli.EXIT_USAGE, "invalid job id"),
    (["usage", "--user", "no body"], cli.EXIT_USAGE, "login name"),
    (["usage", "--job", "0123456789"], cli.EXIT_NOT_FOUND, "no job 0123456789"),
    (["usage", "--group", "BAD"], cli.EXIT_FAILURE, "group name"),
    (["usage", "--since", "30d", "--step", "1"], cli.EXIT_FAILURE, "give a larger step"),
    (["-o", "csv", "group", "list"], cli.EXIT_USAGE, "-o csv is available for `jobnet usage` only"),
])
def test_usage_errors(w: World, argv: list[str], code: int, text: str) -> None:  # noqa: F811
    r = w.cli(*argv)
    assert r.code == code and text in r.err, (r.code, r.err)


def test_job_run_sends_the_user_and_show_prints_the_network(w: World, acct: dict[str, Any]) -> None:  # noqa: F811
    r = w.cli("job", "run", "--group", "acct", "--node", "n1", "--", "x")
    assert r.code == 0, r.err
    me = getpass.getuser()
    assert w.stub.GetJob(pb.GetJobRequest(id=r.out.strip())).user == (me if cli._USER_RE.match(me) else "unknown")
    r = w.cli("job", "run", "--group", "acct", "--node", "n1", "--user", "bob", "--", "x")
    assert w.stub.GetJob(pb.GetJobRequest(id=r.out.strip())).user == "bob"
    r = w.cli("job", "run", "--group", "acct", "--node", "n1", "--user", "b o b", "--", "x")
    assert r.code == cli.EXIT_USAGE and "login name" in r.err
    job = acct["jobs"][0]
    c = acct["last"][job.id]
    r = w.cli("job", "show", job.id)
    assert "User: alice" in r.fields()
    sent = cli.human_bytes(sum(c[0:6:2]))
    assert f"Net sent: {sent} (local {cli.human_bytes(c[0])}, overlay {cli.human_bytes(c[2])}, " \
           f"external {cli.human_bytes(c[4])})" in r.fields(), r.out
    j = w.cli("-o", "json", "job", "show", job.id).json()
    assert j["net"]["tx"]["overlay"]["bytes"] == c[2] and j["user"] == "alice"
