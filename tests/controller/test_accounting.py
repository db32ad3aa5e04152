"""Network accounting against a real controller process: fake nodes registered through RegisterNode report
through ReportUsage as an agent would; every query is checked against an expectation computed here, from the raw
samples sent, independently of the controller's code."""

from __future__ import annotations

import random
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from protos.jobnet.v1 import jobnet_pb2 as pb
from tests.controller.conftest import ControllerProc, code_of

COUNTERS = [f"{d}_{c}_{k}" for d in ("tx", "rx") for c in ("local", "overlay", "external")
            for k in ("bytes", "packets")]
ZERO = [0] * 12


def net(c: Sequence[int]) -> pb.NetUsage:
    out = pb.NetUsage()
    for i, name in enumerate(COUNTERS):
        d, cls, k = name.split("_")
        setattr(getattr(getattr(out, d), cls), k, c[i])
    return out


def flat(n: pb.NetUsage) -> list[int]:
    out = []
    for name in COUNTERS:
        d, cls, k = name.split("_")
        out.append(getattr(getattr(getattr(n, d), cls), k))
    return out


def total_bytes(c: Sequence[int]) -> int:
    return sum(c[0:12:2])


def report(job: str, seq: int, t: float, c: Sequence[int], final: bool = False) -> pb.JobUsageReport:
    r = pb.JobUsageReport(job_id=job, seq=seq, net=net(c), final=final)
    r.sampled.FromMilliseconds(round(t * 1000))
    return r


def window(start: float | None = None, end: float | None = None, **kw: object) -> pb.QueryUsageRequest:
    q = pb.QueryUsageRequest(**kw)  # type: ignore[arg-type]
    if start is not None:
        q.start.FromMilliseconds(round(start * 1000))
    if end is not None:
        q.end.FromMilliseconds(round(end * 1000))
    return q


@dataclass
class Job:
    id: str
    group: str
    node: str
    user: str
    samples: list[tuple[float, list[int]]] = field(default_factory=list)  # accepted (t, cumulative)

    def at(self, t: float | None) -> list[int]:
        """Cumulative counters at the last sample <= t (zeros when none; None: the beginning)."""
        if t is None:
            return ZERO
        best = ZERO
        for st, c in self.samples:
            if st <= t + 1e-9:
                best = c
        return best

    def within(self, start: float | None, end: float) -> list[int]:
        return [a - b for a, b in zip(self.at(end), self.at(start), strict=True)]


class Cluster:
    """A controller with nodes, groups and jobs, and the reports sent to it."""

    def __init__(self, ctl: ControllerProc) -> None:
        self.ctl = ctl
        self.boots: dict[str, str] = {}
        self.jobs: dict[str, Job] = {}

    def node(self, name: str, ip: str, boot: str) -> None:
        self.ctl.node(name, ip, boot)
        self.boots[name] = boot

    def job(self, group: str, node: str, user: str) -> Job:
        s = self.ctl.stub
        if group not in {g.name for g in s.ListGroups(pb.ListGroupsRequest()).groups}:
            s.CreateGroup(pb.CreateGroupRequest(name=group))
        j = s.CreateJob(pb.CreateJobRequest(group=group, node=node, command=["sleep", "1"], user=user))
        self.jobs[j.id] = Job(j.id, group, node, j.user)
        return self.jobs[j.id]

    def send(self, node: str, reports: list[pb.JobUsageReport], boot: str | None = None) -> pb.ReportUsageResponse:
        resp: pb.ReportUsageResponse = self.ctl.stub.ReportUsage(
            pb.ReportUsageRequest(node=node, boot_id=boot or self.boots[node], reports=reports), timeout=10)
        return resp

    def play(self, node: str, job: Job, samples: list[tuple[float, list[int]]], final_last: bool = False) -> None:
        """Send samples (seq 1, 2, ...; up to 500 reports a request, as an agent catching up would) and remember
        them as accepted."""
        seq0 = len(job.samples)
        reps = [report(job.id, seq0 + i + 1, t, c, final_last and i == len(samples) - 1)
                for i, (t, c) in enumerate(samples)]
        for i in range(0, len(reps), 500):
            r = self.send(node, reps[i:i + 500])
            assert r.accepted == len(reps[i:i + 500]), r
        job.samples += [(t, list(c)) for t, c in samples]

    def query(self, req: pb.QueryUsageRequest) -> pb.QueryUsageResponse:
        resp: pb.QueryUsageResponse = self.ctl.stub.QueryUsage(req, timeout=20)
        return resp

    def expect(self, start: float | None, end: float, by: str = "job", **flt: str) -> dict[str, list[int]]:
        """Rows as the controller must compute them, from the raw samples."""
        rows: dict[str, list[int]] = {}
        for j in self.jobs.values():
            if any(getattr(j, "id" if k == "job_id" else k) != v for k, v in flt.items() if v):
                continue
            if not j.samples or j.samples[0][0] > end or (start is not None and j.samples[-1][0] <= start):
                continue
            key = {"job": j.id, "group": j.group, "node": j.node, "user": j.user, "all": "all"}[by]
            acc = rows.setdefault(key, [0] * 12)
            for i, v in enumerate(j.within(start, end)):
                acc[i] += v
        return rows


def rows_of(resp: pb.QueryUsageResponse) -> dict[str, list[int]]:
    return {r.key: flat(r.net) for r in resp.rows}


def grow(rng: random.Random, c: Sequence[int], scale: int = 100_000) -> list[int]:
    return [v + rng.randrange(scale if i % 2 == 0 else 100) for i, v in enumerate(c)]


@pytest.fixture
def cl(ctl: ControllerProc) -> Iterator[Cluster]:
    c = Cluster(ctl)
    c.node("n1", "198.18.5.11", "b1")
    c.node("n2", "198.18.5.12", "b2")
    yield c


# ---------------------------------------------------------------- ingest


def test_same_report_twice_counts_once_and_older_seq_is_ignored(cl: Cluster) -> None:
    j = cl.job("a", "n1", "alice")
    now = time.time()
    req = [report(j.id, 1, now - 20, [10] * 12), report(j.id, 2, now - 10, [20] * 12)]
    first = cl.send("n1", req)
    assert (first.accepted, first.duplicates, first.unknown_jobs) == (2, 0, 0)
    again = cl.send("n1", req)  # a resend after a lost acknowledgement
    assert (again.accepted, again.duplicates, again.unknown_jobs) == (0, 2, 0)
    assert flat(cl.query(pb.QueryUsageRequest()).total) == [20] * 12
    # An older seq arriving late (out of order) changes nothing, even with other counters.
    late = cl.send("n1", [report(j.id, 1, now - 5, [99] * 12)])
    assert (late.accepted, late.duplicates) == (0, 1)
    got = cl.ctl.stub.GetJob(pb.GetJobRequest(id=j.id))
    assert flat(got.net) == [20] * 12
    # A higher seq with a counter that went backwards is taken, keeping the maximum of each counter.
    back = [30] * 12
    back[3] = 5
    assert cl.send("n1", [report(j.id, 3, now, back)]).accepted == 1
    expected = [30] * 12
    expected[3] = 20
    assert flat(cl.ctl.stub.GetJob(pb.GetJobRequest(id=j.id)).net) == expected
    assert "keeping the maximum" in (cl.ctl.tmp / "controller.log").read_text()


def test_packed_counters_are_the_same_as_nested_ones(cl: Cluster) -> None:
    """JobUsageReport.counters (12 values, COUNTERS order) and `net` say the same; a report may carry either;
    the controller says it reads the packed form; a packed list of another length is refused."""
    a, b = cl.job("a", "n1", "alice"), cl.job("a", "n1", "alice")
    now = time.time()
    c1, c2 = list(range(1, 13)), list(range(101, 113))
    packed = pb.JobUsageReport(job_id=b.id, seq=1, counters=c1)
    packed.sampled.FromMilliseconds(round(now * 1000))
    r = cl.send("n1", [report(a.id, 1, now, c1), packed])
    assert (r.accepted, r.reads_counters) == (2, True)
    later = pb.JobUsageReport(job_id=a.id, seq=2, counters=c2)
    later.sampled.FromMilliseconds(round(now * 1000) + 1000)
    assert cl.send("n1", [later, report(b.id, 2, now + 1, c2)]).accepted == 2
    for j in (a, b):
        assert flat(cl.ctl.stub.GetJob(pb.GetJobRequest(id=j.id)).net) == c2
    assert {k: v for k, v in rows_of(cl.query(window(now - 1, now + 0.5))).items()} == {a.id: c1, b.id: c1}
    short = pb.JobUsageReport(job_id=a.id, seq=3, counters=c2[:5])
    code, details = code_of(cl.send, "n1", [short])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "5 packed counters" in details


def test_reports_of_jobs_that_are_not_the_nodes_are_dropped_and_counted(cl: Cluster) -> None:
    mine = cl.job("a", "n1", "alice")
    theirs = cl.job("a", "n2", "bob")
    now = time.time()
    resp = cl.send("n1", [report(mine.id, 1, now, [1] * 12), report(theirs.id, 1, now, [2] * 12),
                          report("0123456789", 1, now, [3] * 12), report("not-a-job", 1, now, [4] * 12)])
    assert (resp.accepted, resp.duplicates, resp.unknown_jobs) == (1, 0, 3)
    assert cl.query(pb.QueryUsageRequest(job_id=theirs.id)).rows == []
    assert flat(cl.query(pb.QueryUsageRequest()).total) == [1] * 12
    # The right node may still report it afterwards.
    assert cl.send("n2", [report(theirs.id, 1, now, [2] * 12)]).accepted == 1


def test_bad_reports_are_refused_with_a_status_and_change_nothing(cl: Cluster) -> None:
    j = cl.job("a", "n1", "alice")
    s = cl.ctl.stub
    now = time.time()
    ok = report(j.id, 1, now, [1] * 12)
    code, msg = code_of(s.ReportUsage, pb.ReportUsageRequest(node="n1", boot_id="old-boot", reports=[ok]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "registered again" in msg and "register again" in msg
    code, msg = code_of(s.ReportUsage, pb.ReportUsageRequest(node="n9", boot_id="b9", reports=[ok]))
    assert code == grpc.StatusCode.NOT_FOUND and "not registered" in msg
    code, msg = code_of(s.ReportUsage, pb.ReportUsageRequest(node="n1", reports=[ok]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "boot_id is required" in msg
    code, msg = code_of(s.ReportUsage, pb.ReportUsageRequest(node="N 1", boot_id="b1", reports=[ok]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "node name" in msg
    code, msg = code_of(s.ReportUsage, pb.ReportUsageRequest(node="n1", boot_id="b1",
                                                             reports=[ok, report(j.id, 0, now, [2] * 12)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "seq 0" in msg and "nothing of this request" in msg
    huge = [1] * 12
    huge[8] = 1 << 63
    code, msg = code_of(s.ReportUsage, pb.ReportUsageRequest(node="n1", boot_id="b1",
                                                             reports=[ok, report(j.id, 2, now, huge)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "rx_overlay_bytes" in msg
    code, msg = code_of(s.ReportUsage, pb.ReportUsageRequest(node="n1", boot_id="b1",
                                                             reports=[ok] * 10_001))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "at most 10000" in msg
    # Nothing of the refused requests was stored: the good report is still new.
    assert cl.send("n1", [ok]).accepted == 1


def test_sample_times_are_kept_increasing_and_future_ones_become_now(cl: Cluster) -> None:
    j = cl.job("a", "n1", "alice")
    now = time.time()
    cl.send("n1", [report(j.id, 1, now - 100, [1] * 12), report(j.id, 2, now - 200, [2] * 12),  # clock stepped back
                   report(j.id, 3, now + 3600, [3] * 12)])  # a clock an hour ahead
    before = cl.query(window(end=now - 99.5))
    assert flat(before.total) == [2] * 12, "seq 2 is clamped to 1 ms after seq 1"
    r = cl.query(window(start=now - 99, step_s=10))
    assert sum(total_bytes(flat(p.net)) for p in r.rows[0].series) == 6
    last = r.rows[0].series[-1]
    assert total_bytes(flat(last.net)) == 6, "the future sample was taken as received now"
    # unset sampled: the controller's clock (after seq 3, itself "now")
    assert cl.send("n1", [pb.JobUsageReport(job_id=j.id, seq=4, net=net([4] * 12))]).accepted == 1
    assert flat(cl.query(window(start=now - 50)).total) == [4 - 2] * 12
    assert flat(cl.query(window(end=now - 50)).total) == [2] * 12


# ---------------------------------------------------------------- queries


@pytest.fixture
def history(cl: Cluster) -> tuple[Cluster, float]:
    """Six jobs over the last hour with samples every 60 s: two groups, two nodes, three users; one starts
    late, one ends early (with a final report), one reports irregularly."""
    rng = random.Random(4)
    t0 = time.time() - 3600
    specs = [("a", "n1", "alice", 0, 60), ("a", "n2", "alice", 0, 60), ("a", "n1", "bob", 20, 60),
             ("b", "n2", "bob", 0, 30), ("b", "n1", "carol", 10, 50), ("b", "n2", "carol", 5, 60)]
    for k, (group, node, user, first, last) in enumerate(specs):
        j = cl.job(group, node, user)
        c = ZERO
        samples = []
        for m in range(first, last):
            if k == 5 and m % 7 == 3:
                continue  # irregular reports
            c = grow(rng, c, 100_000 * (k + 1))
            samples.append((t0 + m * 60 + 0.25 * k, c))
        cl.play(node, j, samples, final_last=(last < 60))
    return cl, t0


WINDOWS = [(None, 0.0), (None, -1800.0), (-3600.0, 0.0), (-1800.0, 0.0), (-1799.5, -600.3), (-2400, -1200),
           (-10, 0.0), (-3000, -2999), (-4000, -3500)]


@pytest.mark.parametrize("by", ["job", "group", "node", "user", "all"])
def test_rows_agree_with_the_raw_samples(history: tuple[Cluster, float], by: str) -> None:
    cl, t0 = history
    now = t0 + 3600
    for ws, we in WINDOWS:
        start = None if ws is None else now + ws
        end = now + we
        resp = cl.query(window(start, end if we else None, by=by))
        expected = cl.expect(start, end, by)
        assert rows_of(resp) == expected, (by, ws, we)
        total = [sum(v[i] for v in expected.values()) for i in range(12)]
        assert flat(resp.total) == total
        assert [r.key for r in resp.rows] == sorted(expected, key=lambda k: (-total_bytes(expected[k]), k))
        assert all(r.total_bytes == total_bytes(flat(r.net)) for r in resp.rows)


@pytest.mark.parametrize("flt", [{"group": "a"}, {"node": "n2"}, {"user": "carol"}, {"group": "b", "node": "n2"},
                                 {"group": "a", "user": "bob", "node": "n1"}, {"user": "nobody"}, {"group": "zz"}])
def test_filters_combine_and_agree(history: tuple[Cluster, float], flt: dict[str, str]) -> None:
    cl, t0 = history
    for ws, we in WINDOWS[:6]:
        start = None if ws is None else t0 + 3600 + ws
        end = t0 + 3600 + we
        for by in ("job", "user"):
            resp = cl.query(window(start, end, by=by, **flt))
            assert rows_of(resp) == cl.expect(start, end, by, **flt), (flt, ws, we, by)


def test_one_job_and_a_job_that_started_inside_the_window(history: tuple[Cluster, float]) -> None:
    cl, t0 = history
    late = next(j for j in cl.jobs.values() if j.samples[0][0] > t0 + 1000)  # started at minute 20
    resp = cl.query(window(t0 + 600, t0 + 3600, job_id=late.id))
    assert [r.key for r in resp.rows] == [late.id]
    assert flat(resp.rows[0].net) == late.samples[-1][1], "counts from 0: all its traffic is inside the window"
    assert flat(resp.rows[0].net) == late.within(t0 + 600, t0 + 3600)


def test_top_n_keeps_the_rows_with_most_bytes_and_the_total_counts_all(history: tuple[Cluster, float]) -> None:
    cl, t0 = history
    expected = cl.expect(t0 + 1200, t0 + 3000, "job")
    ranked = sorted(expected, key=lambda k: (-total_bytes(expected[k]), k))
    resp = cl.query(window(t0 + 1200, t0 + 3000, by="job", top=3))
    assert [r.key for r in resp.rows] == ranked[:3]
    assert flat(resp.total) == [sum(v[i] for v in expected.values()) for i in range(12)]
    assert len(cl.query(window(by="user", top=10)).rows) == 3


@pytest.mark.parametrize(("by", "step"), [("group", 300), ("all", 420), ("job", 60), ("user", 1000)])
def test_series_are_per_step_deltas(history: tuple[Cluster, float], by: str, step: int) -> None:
    cl, t0 = history
    start, end = t0 + 900.0, t0 + 3300.0
    resp = cl.query(window(start, end, by=by, step_s=step))
    assert resp.step_s == step
    bounds = [start + k * step for k in range(1, 10_000) if start + k * step < end] + [end]
    for row in resp.rows:
        assert [p.t.ToMilliseconds() for p in row.series] == [round(b * 1000) for b in bounds]
        prev = start
        for p, b in zip(row.series, bounds, strict=True):
            exp = cl.expect(prev, b, by).get(row.key, ZERO)
            assert flat(p.net) == exp, (row.key, prev, b)
            prev = b
        assert [sum(flat(p.net)[i] for p in row.series) for i in range(12)] == flat(row.net)


def test_series_with_points_picks_a_round_step_from_the_first_sample(history: tuple[Cluster, float]) -> None:
    cl, _t0 = history
    resp = cl.query(pb.QueryUsageRequest(group="a", by="all", points=50))
    assert resp.step_s in (60, 120, 300) and resp.step_s * 50 >= 3600, resp.step_s
    start = resp.start.ToMilliseconds() / 1000
    assert start < min(j.samples[0][0] for j in cl.jobs.values() if j.group == "a")
    row = resp.rows[0]
    assert len(row.series) <= 50
    assert [sum(flat(p.net)[i] for p in row.series) for i in range(12)] == flat(row.net)
    assert flat(row.net) == cl.expect(None, time.time(), "all", group="a")["all"]


def test_bad_queries_say_what_to_do(cl: Cluster) -> None:
    s = cl.ctl.stub
    now = time.time()
    for req, code, text in [
        (pb.QueryUsageRequest(by="month"), grpc.StatusCode.INVALID_ARGUMENT, "use one of job, group, node, user, all"),
        (window(now - 10, now - 20), grpc.StatusCode.INVALID_ARGUMENT, "the window is empty"),
        (pb.QueryUsageRequest(job_id="0123456789"), grpc.StatusCode.NOT_FOUND, "no job 0123456789"),
        (pb.QueryUsageRequest(job_id="xyz"), grpc.StatusCode.INVALID_ARGUMENT, "job id"),
        (pb.QueryUsageRequest(user="no body"), grpc.StatusCode.INVALID_ARGUMENT, "login name"),
        (pb.QueryUsageRequest(group="A"), grpc.StatusCode.INVALID_ARGUMENT, "group name"),
        (window(now - 86400, step_s=1), grpc.StatusCode.INVALID_ARGUMENT, "give a larger step"),
        (pb.QueryUsageRequest(step_s=10, points=10), grpc.StatusCode.INVALID_ARGUMENT, "not both"),
        (pb.QueryUsageRequest(points=20_000), grpc.StatusCode.INVALID_ARGUMENT, "at most 10000"),
    ]:
        got, msg = code_of(s.QueryUsage, req)
        assert got == code and text in msg, (req, got, msg)


# ---------------------------------------------------------------- job records


def test_job_user_is_validated_and_stored(cl: Cluster) -> None:
    s = cl.ctl.stub
    assert cl.job("a", "n1", "alice").user == "alice"
    assert cl.job("a", "n1", "").user == "unknown"
    assert cl.job("a", "n1", "svc_build-01.x$").user == "svc_build-01.x$"
    for bad in ("no body", "1abc", "a" * 33, "al/ice", "-x"):
        code, msg = code_of(s.CreateJob, pb.CreateJobRequest(group="a", node="n1", command=["x"], user=bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "login name" in msg, (bad, msg)
    cl.ctl.restart()
    jobs = cl.ctl.stub.ListJobs(pb.ListJobsRequest()).jobs
    assert {j.user for j in jobs} == {"alice", "unknown", "svc_build-01.x$"}


def test_final_report_goes_into_the_job_record_once(cl: Cluster) -> None:
    j = cl.job("a", "n1", "alice")
    other = cl.job("a", "n1", "alice")
    now = time.time()
    cl.play("n1", j, [(now - 20, [5] * 12), (now - 10, [7] * 12)])
    cl.send("n1", [report(other.id, 1, now - 5, [1] * 12)])
    assert flat(cl.ctl.stub.GetJob(pb.GetJobRequest(id=j.id)).net) == [7] * 12, "GetJob: the latest report"
    listed = {x.id: flat(x.net) for x in cl.ctl.stub.ListJobs(pb.ListJobsRequest()).jobs}
    assert listed == {j.id: [7] * 12, other.id: [1] * 12}
    cl.ctl.stub.ReportJobStatus(pb.ReportJobStatusRequest(node="n1", boot_id="b1", job_id=j.id,
                                                          state=pb.JOB_STATE_FINISHED,
                                                          usage=pb.Usage(cpu_seconds=2.5)))
    cl.play("n1", j, [(now - 1, [9] * 12)], final_last=True)
    # The job record itself (the controller's main store) carries the totals: remove the accounting file and the
    # finished job still has them, next to its CPU usage; the one without a final report has none.
    cl.ctl.stop()
    for f in cl.ctl.tmp.glob("accounting.db*"):
        f.unlink()
    cl.ctl.start()
    got = cl.ctl.stub.GetJob(pb.GetJobRequest(id=j.id))
    assert flat(got.net) == [9] * 12 and got.usage.cpu_seconds == 2.5 and got.state == pb.JOB_STATE_FINISHED
    assert not cl.ctl.stub.GetJob(pb.GetJobRequest(id=other.id)).HasField("net")
    # Once: reports after the final one do not change it.
    r = cl.send("n1", [report(j.id, 9, now, [11] * 12)])
    assert (r.accepted, r.duplicates) == (1, 0), "a fresh accounting file knows nothing of the job"
    r = cl.send("n1", [report(j.id, 10, now + 1, [12] * 12, final=True)])
    assert flat(cl.ctl.stub.GetJob(pb.GetJobRequest(id=j.id)).net) == [12] * 12, "GetJob shows the accounting"
    cl.ctl.restart()
    con = sqlite3.connect(f"file:{cl.ctl.db}?mode=ro", uri=True)
    import json
    rec = json.loads(con.execute("SELECT value FROM objects WHERE kind='job' AND key=?", (j.id,)).fetchone()[0])
    con.close()
    assert rec["net"]["tx"]["local"]["bytes"] == "9", "the record got the first final report, once"


# ---------------------------------------------------------------- retention


def test_thinning_keeps_totals_and_step_aligned_windows(tmp_path: Path) -> None:
    ctl = ControllerProc(tmp_path, "--underlay", "198.18.5.0/24", "--usage-raw-retention", "1h",
                         "--usage-downsample-step", "5m", "--usage-retention-interval", "0.5")
    ctl.start()
    try:
        cl = Cluster(ctl)
        cl.node("n1", "198.18.5.11", "b1")
        rng = random.Random(7)
        now = time.time()
        base = (now - 3 * 3600) // 300 * 300  # a step boundary three hours ago
        jobs = [cl.job("a", "n1", u) for u in ("alice", "bob")]
        for k, j in enumerate(jobs):
            c = ZERO
            samples = []
            for m in range(0, 150 * 60, 10 + 5 * k):  # 2.5 h every 10 s (15 s), up to 30 min ago
                c = grow(rng, c)
                samples.append((base + m + 0.5, c))
            for i in range(0, len(samples), 500):
                r = cl.send("n1", [report(j.id, len(j.samples) + n + 1, t, v)
                                   for n, (t, v) in enumerate(samples[i:i + 500])])
                assert r.accepted == len(samples[i:i + 500])
                j.samples += samples[i:i + 500]
        raw = len(jobs[0].samples) + len(jobs[1].samples)
        db = tmp_path / "accounting.db"

        def count() -> int:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                return sum(int(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in ("samples", "thinned"))
            finally:
                con.close()

        # Raw samples live in a table per hour; an hour is thinned and dropped once it lies entirely before the
        # cut (now - raw retention, on a step): the hour across the cut stays raw.
        cut = (time.time() - 3600) // 300 * 300
        cutoff = cut // 3600 * 3600
        kept_old = sum(1 for j in jobs for t, _ in j.samples if t >= cutoff)
        buckets = sum(len({int(t // 300) for t, _ in j.samples if t < cutoff}) for j in jobs)
        deadline = time.time() + 30
        while count() > kept_old + buckets + 30 and time.time() < deadline:  # the last sample of each 5 min
            time.sleep(0.2)
        assert count() <= kept_old + buckets + 30, (count(), raw)
        assert count() < raw * 0.75
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            hours = sorted(int(n[4:]) for (n,) in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name GLOB 'raw_[0-9]*'"))
        finally:
            con.close()
        assert hours and hours[0] == int(cutoff // 3600), "the hours before the cut are dropped whole"
        assert int(base // 3600) not in hours
        # Totals and windows on step boundaries are exactly what the raw samples say.
        end = time.time()
        for start in (None, base, base + 300, base + 3000, cutoff - 600):
            for by in ("job", "all"):
                assert rows_of(cl.query(window(start, end, by=by))) == cl.expect(start, end, by), (start, by)
        resp = cl.query(window(base, base + 2 * 3600, by="all", step_s=300))
        prev = base
        for p in resp.rows[0].series:
            b = p.t.ToMilliseconds() / 1000
            assert flat(p.net) == cl.expect(prev, b, "all")["all"], (prev, b)
            prev = b
        for j in jobs:
            assert flat(ctl.stub.GetJob(pb.GetJobRequest(id=j.id)).net) == j.samples[-1][1]
        # Restart: thinning does not run again over what it thinned (and loses nothing).
        ctl.restart()
        assert rows_of(cl.query(window(None, end))) == cl.expect(None, end)
    finally:
        ctl.stop()


def test_expired_samples_are_deleted_and_totals_kept(tmp_path: Path) -> None:
    ctl = ControllerProc(tmp_path, "--underlay", "198.18.5.0/24", "--usage-raw-retention", "0",
                         "--usage-retention", "2h", "--usage-retention-interval", "0.5")
    ctl.start()
    try:
        cl = Cluster(ctl)
        cl.node("n1", "198.18.5.11", "b1")
        now = time.time()
        old, new = cl.job("a", "n1", "alice"), cl.job("a", "n1", "bob")
        cl.play("n1", old, [(now - 4 * 3600 + m * 60, [m + 1] * 12) for m in range(60)], final_last=True)
        cl.play("n1", new, [(now - 3 * 3600 + 30 + m * 60, [m + 1] * 12) for m in range(170)])
        deadline = time.time() + 20
        con = sqlite3.connect(f"file:{tmp_path / 'accounting.db'}?mode=ro", uri=True)
        while time.time() < deadline:
            left = con.execute("SELECT count(*) FROM samples").fetchone()[0]
            if left < 60 + 170 - 60:
                break
            time.sleep(0.2)
        time.sleep(1)
        left = con.execute("SELECT count(*) FROM samples").fetchone()[0]
        assert con.execute("SELECT count(*) FROM thinned").fetchone()[0] == 0, "raw retention 0: nothing thinned"
        con.close()
        assert left == 110, "the samples of the last 2 h (minutes 60..169 of `new`)"
        for j in (old, new):
            assert flat(ctl.stub.GetJob(pb.GetJobRequest(id=j.id)).net) == j.samples[-1][1]
        # Since the beginning: the totals, although the samples are gone.
        assert rows_of(cl.query(pb.QueryUsageRequest())) == {old.id: [60] * 12, new.id: [170] * 12}
        # Within the kept range windows are exact.
        start = now - 3600
        assert rows_of(cl.query(window(start, time.time()))) == cl.expect(start, time.time())
    finally:
        ctl.stop()


# ---------------------------------------------------------------- durability


def test_sigkill_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """Agents report concurrently (many in one group commit); the controller is SIGKILLed mid-stream. Every
    acknowledged report is there after the restart: its seq is a duplicate, its counters at most the stored."""
    ctl = ControllerProc(tmp_path, "--underlay", "198.18.5.0/24")
    ctl.start()
    cl = Cluster(ctl)
    for i in range(4):
        cl.node(f"n{i}", f"198.18.5.{20 + i}", f"b{i}")
    jobs = {f"n{i}": [cl.job("a", f"n{i}", "alice") for _ in range(10)] for i in range(4)}
    acked: dict[str, tuple[int, list[int]]] = {}
    lock = threading.Lock()
    stop = threading.Event()
    channels = []

    def agent(node: str) -> None:
        ch = grpc.insecure_channel(f"unix:{ctl.sock}")
        channels.append(ch)
        from protos.jobnet.v1 import jobnet_pb2_grpc as pbg
        stub = pbg.ControllerStub(ch)
        seq = 0
        while not stop.is_set():
            seq += 1
            reps = [report(j.id, seq, time.time(), [seq * 100 + k] * 12) for k, j in enumerate(jobs[node])]
            try:
                r = stub.ReportUsage(pb.ReportUsageRequest(node=node, boot_id=cl.boots[node], reports=reps),
                                     timeout=5)
            except grpc.RpcError:
                return
            assert r.accepted == len(reps)
            with lock:
                for k, j in enumerate(jobs[node]):
                    acked[j.id] = (seq, [seq * 100 + k] * 12)

    threads = [threading.Thread(target=agent, args=(n,)) for n in jobs]
    for t in threads:
        t.start()
    time.sleep(1.5)
    assert ctl.proc is not None
    ctl.proc.send_signal(signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(10)
    for ch in channels:
        ch.close()
    snapshot = dict(acked)
    assert len(snapshot) == 40 and min(s for s, _ in snapshot.values()) > 3, "reports flowed before the kill"
    ctl.proc.wait()
    ctl.proc = None
    ctl.start()
    try:
        for node, js in jobs.items():
            for j in js:
                seq, c = snapshot[j.id]
                got = flat(ctl.stub.GetJob(pb.GetJobRequest(id=j.id)).net)
                assert all(g >= v for g, v in zip(got, c, strict=True)), (j.id, got, c)
                r = cl.send(node, [report(j.id, seq, time.time(), c)])
                assert r.duplicates == 1, "the acknowledged seq is stored"
        got = {j.id: flat(ctl.stub.GetJob(pb.GetJobRequest(id=j.id)).net) for js in jobs.values() for j in js}
        ctl.stop()  # SIGTERM: a clean stop writes every totals row, nothing is left to replay
        con = sqlite3.connect(f"file:{tmp_path / 'accounting.db'}?mode=ro", uri=True)
        try:
            assert con.execute("SELECT value FROM meta WHERE key = 'replay_from'").fetchone()[0] is None
            cols = ", ".join(COUNTERS)
            stored = {row[0]: list(row[1:]) for row in con.execute(f"SELECT job_id, {cols} FROM totals")}
        finally:
            con.close()
        assert stored == got
    finally:
        ctl.stop()


def test_a_failed_write_fails_its_reports_and_the_resend_is_taken(tmp_path: Path) -> None:
    """In process: the accounting store refuses one write (say, a full disk). The agents waiting on it get
    UNAVAILABLE, the memory goes back to what is stored, and the resent reports are accepted, not duplicates."""
    import asyncio

    from controller.accounting import Accounting, WriteBatch
    from controller.accounting_sqlite import SqliteAccountingStore
    from controller.core import Controller
    from controller.errors import Unavailable
    from controller.store import MemoryStore

    class Flaky(SqliteAccountingStore):
        fail = False

        def write(self, batch: WriteBatch) -> None:
            if self.fail:
                self.fail = False
                raise OSError("No space left on device")
            super().write(batch)

    async def main() -> None:
        core = Controller(MemoryStore())
        core.register_node(pb.RegisterNodeRequest(name="n1", underlay_ip="198.18.5.11", boot_id="b1"))
        core.create_group(pb.CreateGroupRequest(name="a"))
        j = core.create_job(pb.CreateJobRequest(group="a", node="n1", command=["x"]))
        store = Flaky(tmp_path / "acct.db")
        acct = Accounting(core, store)
        await acct.start()
        try:
            now = time.time()

            def req(seq: int, v: int) -> pb.ReportUsageRequest:
                return pb.ReportUsageRequest(node="n1", boot_id="b1", reports=[report(j.id, seq, now + seq, [v] * 12)])

            ok = acct.ingest(req(1, 10))
            await acct.wait_durable(ok)
            store.fail = True
            bad = acct.ingest(req(2, 20))
            with pytest.raises(Unavailable, match="No space left on device"):
                await acct.wait_durable(bad)
            assert acct.jobs[j.id].seq == 1, "memory is back to what is stored"
            again = acct.ingest(req(2, 20))
            assert (again.accepted, again.duplicates) == (1, 0)
            await acct.wait_durable(again)
            _, stored, _, _ = store.recover()
            assert [x.counters for x in stored] == [(20,) * 12]
        finally:
            await acct.close()

    asyncio.run(main())
