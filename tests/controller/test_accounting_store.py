"""The accounting store's hourly raw tables (thinned and dropped whole, migrated from schema 1) and the eviction
of purged jobs from the controller's memory, in process. Expectations are computed here from the samples
written, independently of the store's code."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from controller.accounting import BUCKET_MS, COUNTERS, Accounting, JobUsage, WriteBatch, sample_row, totals_row
from controller.accounting_sqlite import HOUR_MS, SqliteAccountingStore
from controller.core import Config, Controller
from controller.metrics import accounting_metrics
from controller.store import MemoryStore
from protos.jobnet.v1 import jobnet_pb2 as pb

STEP = 300_000
T0 = 1_764_000_000_000 // HOUR_MS * HOUR_MS  # an hour boundary


def hours_of(path: Path) -> list[int]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return sorted(int(n[4:]) for (n,) in con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name GLOB 'raw_[0-9]*'"))
    finally:
        con.close()


def fill(store: SqliteAccountingStore, hours: int, nodes: int = 3, jobs: int = 4) -> dict[tuple[int, int], list]:
    """Samples of nodes x jobs over `hours` hours from T0 (job k every 10 + 5k s, a little jitter): what was
    written, per (node, job), as [(t, counters)]."""
    out: dict[tuple[int, int], list[tuple[int, tuple[int, ...]]]] = {}
    batch = WriteBatch(nodes=[(n, f"n{n}") for n in range(1, nodes + 1)])
    for n in range(1, nodes + 1):
        for k in range(jobs):
            j = JobUsage(f"{n:05x}{k:05x}", n, n * 0x100000 + k, "g", f"n{n}", "u")
            c = [0] * len(COUNTERS)
            samples = []
            for t in range(T0 + 500 + 1234 * k, T0 + hours * HOUR_MS, (10 + 5 * k) * 1000):  # none on a step
                c = [v + (i + 1) * (n + k + 1) for i, v in enumerate(c)]
                samples.append((t, tuple(c)))
            out[(j.node_ix, j.job_int)] = samples
            j.seq, j.first_t, j.last_t, j.counters = len(samples), samples[0][0], samples[-1][0], samples[-1][1]
            batch.new_jobs.append(totals_row(j))
            batch.samples += [(t // BUCKET_MS, j.node_ix, j.job_int, t, i + 1, *cs)
                              for i, (t, cs) in enumerate(samples)]
    batch.samples.sort()
    store.write(batch)
    return out


def at(samples: list[tuple[int, tuple[int, ...]]], t: int) -> tuple[int, ...] | None:
    best = None
    for st, c in samples:
        if st <= t:
            best = c
    return best


def test_hours_are_thinned_in_chunks_and_dropped_whole(tmp_path: Path) -> None:
    store = SqliteAccountingStore(tmp_path / "a.db")
    try:
        written = fill(store, hours=3)
        h0 = T0 // HOUR_MS
        assert hours_of(tmp_path / "a.db") == [h0, h0 + 1, h0 + 2]
        raw0, _ = store.sample_count()
        cut = T0 + 2 * HOUR_MS + 600_000  # inside the third hour: the first two are thinned, the third stays raw
        calls = 0
        while store.compact(cut, STEP, max_rows=100):
            calls += 1
        assert calls > 8, "small chunks: a transaction each"
        assert hours_of(tmp_path / "a.db") == [h0 + 2], "the two hours before the cut are gone whole"
        raw, thinned = store.sample_count()
        third = sum(1 for s in written.values() for t, _ in s if t >= T0 + 2 * HOUR_MS)
        assert raw == third and raw0 - raw == sum(1 for s in written.values() for t, _ in s if t < T0 + 2 * HOUR_MS)
        assert thinned == sum(len({t // STEP for t, _ in s if t < T0 + 2 * HOUR_MS}) for s in written.values())
        # Every step boundary (and the totals) as the raw samples say; series points are the last of each step.
        for (node, job), samples in written.items():
            first = samples[0][0]
            for b in range(T0, T0 + 3 * HOUR_MS + 1, STEP):
                assert store.value_at(node, job, b, first) == at(samples, b), (node, job, b)
            got = store.samples(node, job, T0 - 1, T0 + 3 * HOUR_MS, first)
            want = [(t, c) for t, c in samples if t >= T0 + 2 * HOUR_MS]
            want += [max((s for s in samples if s[0] // STEP == st), key=lambda s: s[0])
                     for st in sorted({t // STEP for t, _ in samples if t < T0 + 2 * HOUR_MS})]
            assert got == sorted(want)
        # Nothing left before the cut: a second pass does nothing.
        assert store.compact(cut, STEP) == 0
    finally:
        store.close()


def test_thinning_interrupted_starts_the_hour_again_with_the_same_result(tmp_path: Path) -> None:
    a, b = SqliteAccountingStore(tmp_path / "a.db"), SqliteAccountingStore(tmp_path / "b.db")
    try:
        fill(a, hours=2)
        fill(b, hours=2)
        for _ in range(5):  # part of the first hour, then a "restart"
            assert a.compact(T0 + 2 * HOUR_MS, STEP, max_rows=100)
        a.close()
        a = SqliteAccountingStore(tmp_path / "a.db")
        while a.compact(T0 + 2 * HOUR_MS, STEP, max_rows=100):
            pass
        while b.compact(T0 + 2 * HOUR_MS, STEP):
            pass
        rows = [sorted(s.db.execute("SELECT * FROM thinned").fetchall()) for s in (a, b)]
        assert rows[0] == rows[1] and rows[0]
        assert hours_of(tmp_path / "a.db") == hours_of(tmp_path / "b.db") == []
    finally:
        a.close()
        b.close()


def test_thinning_waits_for_replay_from_and_expiry_drops_hours(tmp_path: Path) -> None:
    store = SqliteAccountingStore(tmp_path / "a.db")
    try:
        fill(store, hours=3)
        h0 = T0 // HOUR_MS
        store.write(WriteBatch(replay_from=T0 + HOUR_MS + 5))  # samples of the 2nd hour may be ahead of totals
        while store.compact(T0 + 3 * HOUR_MS, STEP):
            pass
        assert hours_of(tmp_path / "a.db") == [h0 + 1, h0 + 2], "not past replay_from"
        store.write(WriteBatch(replay_from=None))
        gone = store.expire(T0 + 2 * HOUR_MS + 1, [])
        assert hours_of(tmp_path / "a.db") == [h0 + 2] and gone > 0
    finally:
        store.close()


V1_SCHEMA = [
    "CREATE TABLE nodes (ix INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
    "CREATE TABLE totals (node INTEGER NOT NULL, job INTEGER NOT NULL, job_id TEXT NOT NULL, "
    "job_group TEXT NOT NULL, job_node TEXT NOT NULL, job_user TEXT NOT NULL, seq INTEGER NOT NULL, "
    "first_t INTEGER NOT NULL, last_t INTEGER NOT NULL, final INTEGER NOT NULL, "
    "expired_t INTEGER NOT NULL DEFAULT 0, " + ", ".join(f"{c} INTEGER NOT NULL" for c in COUNTERS)
    + ", PRIMARY KEY (node, job)) WITHOUT ROWID",
    "CREATE TABLE samples (b INTEGER NOT NULL, node INTEGER NOT NULL, job INTEGER NOT NULL, t INTEGER NOT NULL, "
    "seq INTEGER NOT NULL, " + ", ".join(f"{c} INTEGER NOT NULL" for c in COUNTERS)
    + ", PRIMARY KEY (b, node, job, t)) WITHOUT ROWID",
    "CREATE TABLE thinned (node INTEGER NOT NULL, job INTEGER NOT NULL, step INTEGER NOT NULL, t INTEGER NOT NULL, "
    "seq INTEGER NOT NULL, " + ", ".join(f"{c} INTEGER NOT NULL" for c in COUNTERS)
    + ", PRIMARY KEY (node, job, step)) WITHOUT ROWID",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER)",
    "INSERT INTO meta (key, value) VALUES ('replay_from', NULL)",
    "PRAGMA user_version=1",
]


def test_a_schema_1_file_is_migrated_to_hourly_tables(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    con = sqlite3.connect(path)
    for sql in V1_SCHEMA:
        con.execute(sql)
    con.execute("INSERT INTO nodes VALUES (1, 'n1')")
    j = JobUsage("00000000aa", 1, 0xAA, "g", "n1", "u", seq=3, first_t=T0 + 5, last_t=T0 + HOUR_MS + 7,
                 counters=(3,) * 12)
    con.execute(f"INSERT INTO totals VALUES ({', '.join('?' * 23)})", (*totals_row(j)[:10], 0, *j.counters))
    rows = [(t // BUCKET_MS, 1, 0xAA, t, i + 1, *(i + 1,) * 12)
            for i, t in enumerate((T0 + 5, T0 + 600_000, T0 + HOUR_MS + 7))]
    con.executemany(f"INSERT INTO samples VALUES ({', '.join('?' * 17)})", rows)
    con.commit()
    con.close()
    store = SqliteAccountingStore(path)
    try:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert hours_of(path) == [T0 // HOUR_MS, T0 // HOUR_MS + 1]
        assert sorted(store.db.execute("SELECT * FROM samples").fetchall()) == rows, "the view shows them all"
        _, jobs, _, _ = store.recover()
        assert [(x.job_id, x.counters) for x in jobs] == [(j.job_id, j.counters)]
        assert store.value_at(1, 0xAA, T0 + HOUR_MS, T0) == (2,) * 12
    finally:
        store.close()
    SqliteAccountingStore(path).close()  # opens again as version 2


# ---------------------------------------------------------------- eviction of purged jobs


def report(job: str, seq: int, t_ms: int, v: int, final: bool = False) -> pb.JobUsageReport:
    r = pb.JobUsageReport(job_id=job, seq=seq, counters=[v * (i + 1) for i in range(12)], final=final)
    r.sampled.FromMilliseconds(t_ms)
    return r


def metric_values(acct: Accounting) -> dict[tuple[str, ...], float]:
    return {(m.name, *s.labels.values()): s.value for m in accounting_metrics(acct) if m.name.startswith("jobnet_net")
            for s in m.samples}


def test_purged_jobs_leave_memory_and_queries_still_count_them(tmp_path: Path) -> None:
    clock = [time.time()]
    core = Controller(MemoryStore(), Config(job_retention_s=86400, clock=lambda: clock[0]))
    core.register_node(pb.RegisterNodeRequest(name="n1", underlay_ip="198.18.5.11", boot_id="b1"))
    for g in ("a", "b"):
        core.create_group(pb.CreateGroupRequest(name=g))
    old = core.create_job(pb.CreateJobRequest(group="a", node="n1", command=["x"], user="alice"))
    keep = core.create_job(pb.CreateJobRequest(group="a", node="n1", command=["x"], user="bob"))
    other = core.create_job(pb.CreateJobRequest(group="b", node="n1", command=["x"], user="alice"))
    t0 = int(clock[0] * 1000) - 600_000

    async def main() -> None:
        acct = Accounting(core, SqliteAccountingStore(tmp_path / "a.db"))
        await acct.start()
        try:
            for k, j in enumerate((old, keep, other)):
                n = 5 if j is old else 8
                res = acct.ingest(pb.ReportUsageRequest(node="n1", boot_id="b1", reports=[
                    report(j.id, s, t0 + s * 60_000, (k + 1) * s, final=(j is old and s == n))
                    for s in range(1, n + 1)]))
                await acct.wait_durable(res)
                acct.record_finals(res.finals)
            core.report_job_status(pb.ReportJobStatusRequest(node="n1", boot_id="b1", job_id=old.id,
                                                             state=pb.JOB_STATE_FINISHED))
            queries = [pb.QueryUsageRequest(by=by, **flt) for by in ("job", "group", "user", "all")  # type: ignore[arg-type]
                       for flt in ({}, {"group": "a"}, {"user": "alice"}, {"job_id": old.id})]
            mid = pb.QueryUsageRequest(by="group", step_s=60)
            mid.start.FromMilliseconds(t0 + 150_000)
            mid.end.FromMilliseconds(t0 + 550_000)
            queries.append(mid)
            late = pb.QueryUsageRequest(by="all")
            late.start.FromMilliseconds(t0 + 400_000)  # after the purged job's last report
            queries.append(late)
            before = [await acct.query(q) for q in queries]
            metrics_before = metric_values(acct)
            assert before[-1].rows[0].total_bytes < before[12].rows[0].total_bytes

            clock[0] += 2 * 86400
            assert core.purge_finished() == 1 and old.id not in core.c.jobs
            assert await acct.evict() == 1
            assert old.id not in acct.jobs and keep.id in acct.jobs
            assert metric_values(acct) == metrics_before, "the per-group counters do not go down"
            for q, want in zip(queries, before, strict=True):
                got = await acct.query(q)
                want.end.CopyFrom(got.end)
                assert got == want, q
        finally:
            await acct.close()
        # A restart does not load it again, and still counts it.
        acct = Accounting(core, SqliteAccountingStore(tmp_path / "a.db"))
        await acct.start()
        try:
            assert old.id not in acct.jobs
            assert metric_values(acct) == metrics_before, "nor after a restart"
            got = await acct.query(pb.QueryUsageRequest(job_id=old.id))
            assert got.rows[0].key == old.id and got.rows[0].net.tx.local.bytes == 5
            with pytest.raises(Exception, match="no job"):
                await acct.query(pb.QueryUsageRequest(job_id="ffffffffff"))
        finally:
            await acct.close()

    asyncio.run(main())


def test_sample_row_shape() -> None:
    j = JobUsage("00000000aa", 1, 0xAA, "g", "n1", "u", seq=2, last_t=T0 + 12_345, counters=(7,) * 12)
    assert sample_row(j) == ((T0 + 12_345) // BUCKET_MS, 1, 0xAA, T0 + 12_345, 2, *(7,) * 12)
