"""SQLite implementation of the accounting store: its own file (`--accounting-db`, by default accounting.db
next to the state file), WAL journal, every write durable when it returns (synchronous=FULL).

Schema (version 2), times in Unix milliseconds, counters in the order of `controller.accounting.COUNTERS`
(tx_local_bytes, tx_local_packets, tx_overlay_bytes, ..., rx_external_packets); `node` is the reporting node's
number (nodes.ix), `job` the job id read as a hexadecimal integer:

    nodes(ix INTEGER PRIMARY KEY, name TEXT UNIQUE)
    totals(node, job, job_id, job_group, job_node, job_user, seq, first_t, last_t, final, expired_t, <12 counters>,
           gone, PRIMARY KEY (node, job)) WITHOUT ROWID, indexes totals_job (job), totals_gone (last_t) WHERE gone
        -- one row per job, kept forever: latest cumulative counters, last seq, final flag; group, node and user
        -- copied from the job record so the table can be queried on its own. Written at a job's first report
        -- and at its final one, otherwise checkpointed (see meta.replay_from). gone = 1: the job was purged from
        -- the controller's state (--job-retention-days), so the controller no longer keeps it in memory;
        -- queries read such jobs from here.
    raw_<H>(b, node, job, t, seq, <12 counters>, PRIMARY KEY (b, node, job, t)) WITHOUT ROWID
        -- raw samples of hour H (H = t / 1 h), b = t / 10 s: one table per hour, keyed by time first, so an
        -- agent's reports are appended next to each other and a write touches a few pages, however many samples
        -- each job already has. Retention thins an hour once it is past the raw retention and drops its table
        -- whole (DROP TABLE): its cost is per hour, not per row.
    samples: a VIEW of every raw_<H> (UNION ALL), for people and tools; the code reads the tables.
    thinned(node, job, step, t, seq, <12 counters>, PRIMARY KEY (node, job, step)) WITHOUT ROWID
        -- samples older than the raw retention: the last one of each downsampling step (step = its start),
        -- keyed by job (written in bulk by retention, read per job by queries)
    meta(key TEXT PRIMARY KEY, value INTEGER)
        -- replay_from: raw samples with t >= this may be newer than their job's totals row (NULL: none are);
        -- the start-up replays them, and retention never moves them

Version 1 (one `samples` table) is migrated on open: its rows are moved into hourly tables, once.

Why this shape: keyed by job, a sample table makes every new sample land on its job's own page once jobs have
a few dozen samples, so each committed row rewrites a 4 KiB page (measured at 1000 nodes x 100 jobs: 33-52 us
CPU per row, against 8-10 us keyed by time).

A sample moves from raw_<H> to `thinned` by being copied (a transaction per chunk), and leaves raw_<H> only when
the whole table is dropped after the last chunk: at any moment it is in one or both, so readers that look at the
raw tables first and at `thinned` second (separate statements) never miss one.

For a person at the sqlite3 prompt:
    SELECT job_id, job_user, tx_overlay_bytes, rx_overlay_bytes FROM totals ORDER BY last_t DESC LIMIT 10;
    SELECT t, tx_overlay_bytes FROM samples JOIN totals USING (node, job) WHERE job_id = '1f3c0a9b2e' ORDER BY t;
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import Any

from controller.accounting import BUCKET_MS, COUNTERS, Counters, JobUsage, SampleRow, WriteBatch

log = logging.getLogger("jobnet.controller.accounting")

SCHEMA_VERSION = 2
_C = ", ".join(COUNTERS)
_Q12 = ", ".join("?" * len(COUNTERS))
_TOTALS_COLS = "node, job, job_id, job_group, job_node, job_user, seq, first_t, last_t, final"
_COUNTER_DEFS = ", ".join(f"{c} INTEGER NOT NULL" for c in COUNTERS)
MAX_STEP_MS = 86_400_000  # the largest downsampling step the queries expect
HOUR_MS = 3_600_000       # raw samples are partitioned by hour
_CHUNKS = (256, 64, 16, 4, 1)  # rows per INSERT statement (few distinct statements for the statement cache)
PART_B = HOUR_MS // BUCKET_MS  # buckets per hourly table


class SchemaError(Exception):
    pass


def _raw(h: int) -> str:
    return f"raw_{h}"


class SqliteAccountingStore:
    def __init__(self, path: Path, cache_mib: int = 64) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.cache_mib = cache_mib
        self.db = self._connect()
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SchemaError(f"{path} has schema version {version}, newer than this controller's "
                              f"{SCHEMA_VERSION}: run a newer jobnet-controller or restore a backup")
        if version == 0:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("CREATE TABLE IF NOT EXISTS nodes (ix INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS totals (node INTEGER NOT NULL, job INTEGER NOT NULL, job_id TEXT NOT NULL, "
                "job_group TEXT NOT NULL, job_node TEXT NOT NULL, job_user TEXT NOT NULL, seq INTEGER NOT NULL, "
                "first_t INTEGER NOT NULL, last_t INTEGER NOT NULL, final INTEGER NOT NULL, "
                f"expired_t INTEGER NOT NULL DEFAULT 0, {_COUNTER_DEFS}, gone INTEGER NOT NULL DEFAULT 0, "
                "PRIMARY KEY (node, job)) WITHOUT ROWID")
            self._indexes()
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS thinned (node INTEGER NOT NULL, job INTEGER NOT NULL, "
                f"step INTEGER NOT NULL, t INTEGER NOT NULL, seq INTEGER NOT NULL, {_COUNTER_DEFS}, "
                "PRIMARY KEY (node, job, step)) WITHOUT ROWID")
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER)")
            self.db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('replay_from', NULL)")
            self._parts: tuple[int, ...] = ()
            self._view()
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self.db.execute("COMMIT")
        elif version == 1:
            self._migrate_v1()
        self._parts = self._load_parts()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._insert_totals = (f"INSERT OR IGNORE INTO totals ({_TOTALS_COLS}, {_C}) "
                               f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {_Q12})")
        # Parameters: a sample row (b, node, job, t, seq, counters...), by number.
        self._update_totals = ("UPDATE totals SET last_t = ?4, seq = ?5, "
                               + ", ".join(f"{c} = ?{i + 6}" for i, c in enumerate(COUNTERS))
                               + " WHERE node = ?2 AND job = ?3 AND seq < ?5")
        self._final_totals = self._update_totals.replace("SET ", "SET final = 1, ", 1).replace(" AND seq < ?5", "")
        self._thin: tuple[int, int, int] | None = None  # thinning's place: (hour, step start, next node)
        self._thin_nodes = 16                           # nodes per thinning chunk (adapted to about max_rows)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, cached_statements=512)
        db.execute("PRAGMA busy_timeout=5000")
        db.execute(f"PRAGMA cache_size=-{self.cache_mib * 1024}")
        return db

    def _reader(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = self._connect()
            db.execute("PRAGMA query_only=1")
            self._local.db = db
            with self._lock:
                self._readers.append(db)
        return db

    # ---------------------------------------------------------------- the hourly tables

    def _load_parts(self) -> tuple[int, ...]:
        names = self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name GLOB 'raw_[0-9]*'")
        return tuple(sorted(int(n.split("_", 1)[1]) for (n,) in names))

    def _create_part(self, h: int) -> None:
        """In the writer's transaction. Readers may see the hour before the commit: a table they cannot find yet
        holds nothing their snapshot could see."""
        self.db.execute(f"CREATE TABLE IF NOT EXISTS {_raw(h)} (b INTEGER NOT NULL, node INTEGER NOT NULL, "
                        f"job INTEGER NOT NULL, t INTEGER NOT NULL, seq INTEGER NOT NULL, {_COUNTER_DEFS}, "
                        "PRIMARY KEY (b, node, job, t)) WITHOUT ROWID")
        self._parts = tuple(sorted({*self._parts, h}))
        self._view()

    def _drop_part(self, h: int) -> None:
        """In the writer's transaction; `self._parts` loses the hour after the commit (`_forget`)."""
        self.db.execute(f"DROP TABLE IF EXISTS {_raw(h)}")
        self._view(without=h)

    def _forget(self, hours: Sequence[int]) -> None:
        self._parts = tuple(h for h in self._parts if h not in hours)

    def _view(self, without: int | None = None) -> None:
        parts = [h for h in self._parts if h != without]
        self.db.execute("DROP VIEW IF EXISTS samples")
        body = " UNION ALL ".join(f"SELECT * FROM {_raw(h)}" for h in parts) or \
            f"SELECT {', '.join(['0'] * (5 + len(COUNTERS)))} WHERE 0"
        self.db.execute(f"CREATE VIEW samples (b, node, job, t, seq, {_C}) AS {body}")

    def _indexes(self) -> None:
        self.db.execute("CREATE INDEX IF NOT EXISTS totals_job ON totals (job)")
        self.db.execute("CREATE INDEX IF NOT EXISTS totals_gone ON totals (last_t) WHERE gone = 1")

    def _migrate_v1(self) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            self._parts = ()
            db.execute("ALTER TABLE samples RENAME TO samples_v1")  # the name goes to the view
            hours = [h for (h,) in db.execute(f"SELECT DISTINCT b / {PART_B} FROM samples_v1 ORDER BY 1")]
            for h in hours:
                self._create_part(h)
                db.execute(f"INSERT INTO {_raw(h)} SELECT * FROM samples_v1 WHERE b >= ? AND b < ?",
                           (h * PART_B, (h + 1) * PART_B))
            db.execute("DROP TABLE samples_v1")
            db.execute("ALTER TABLE totals ADD COLUMN gone INTEGER NOT NULL DEFAULT 0")
            self._indexes()
            self._view()
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        log.info("accounting store %s: schema 1 -> 2 (raw samples in %d hourly table(s))", self.path, len(hours))

    # ---------------------------------------------------------------- loading

    def recover(self) -> tuple[dict[str, int], list[JobUsage], set[str], int | None]:
        """Node numbers, every job's totals with the raw samples since meta.replay_from applied (the totals
        checkpoint may lag), the ids of the jobs whose stored totals are behind, and replay_from. Reads committed
        data only (a reader connection), so it may run while the writer is idle, from any thread."""
        db = self._reader()
        nodes = {name: ix for ix, name in db.execute("SELECT ix, name FROM nodes")}
        cols = f"{_TOTALS_COLS}, expired_t, {_C}"
        jobs: dict[tuple[int, int], JobUsage] = {}
        for row in db.execute(f"SELECT {cols} FROM totals WHERE gone = 0"):
            node, job, job_id, group, node_name, user, seq, first_t, last_t, final, expired = row[:11]
            jobs[(node, job)] = JobUsage(job_id, node, job, group, node_name, user, seq, first_t, last_t,
                                         bool(final), tuple(row[11:]), expired)
        replay_from = db.execute("SELECT value FROM meta WHERE key = 'replay_from'").fetchone()[0]
        behind: set[str] = set()
        if replay_from is not None:
            first_b = replay_from // BUCKET_MS
            for h in self._parts:
                if (h + 1) * PART_B <= first_b:
                    continue
                for row in self._read(db, f"SELECT node, job, t, seq, {_C} FROM {_raw(h)} WHERE b >= ? ORDER BY b",
                                      (first_b,)):
                    j = jobs.get((row[0], row[1]))
                    if j is not None and row[3] > j.seq:
                        j.seq, j.last_t, j.counters = row[3], row[2], tuple(row[4:])
                        behind.add(j.job_id)
        return nodes, list(jobs.values()), behind, replay_from

    # ---------------------------------------------------------------- writing (one writer thread)

    def write(self, batch: WriteBatch) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            if batch.nodes:
                db.executemany("INSERT INTO nodes (ix, name) VALUES (?, ?)", batch.nodes)
            if batch.new_jobs:
                db.executemany(self._insert_totals, batch.new_jobs)
            self._insert_samples(batch.samples)
            if batch.checkpoint:
                db.executemany(self._update_totals, batch.checkpoint)
            if batch.finals:
                db.executemany(self._final_totals, batch.finals)
            db.execute("UPDATE meta SET value = ? WHERE key = 'replay_from'", (batch.replay_from,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._parts = self._load_parts()  # an hour created in the transaction is not there
            raise

    def _insert_samples(self, rows: list[SampleRow]) -> None:
        if not rows:
            return
        h0, h1 = rows[0][0] // PART_B, rows[-1][0] // PART_B
        hours = {h0} if h0 == h1 and len(rows) < 2 else {r[0] // PART_B for r in rows}
        for h in hours:
            if h not in self._parts:
                self._create_part(h)
            part = rows if len(hours) == 1 else [r for r in rows if r[0] // PART_B == h]
            # Many rows per statement: one sqlite3_step (and one GIL release) per up to 256 rows instead of each.
            i, n = 0, len(part)
            for size in _CHUNKS:
                if n - i >= size:
                    sql = self._values_sql(h, size)
                    while n - i >= size:
                        self.db.execute(sql, list(chain.from_iterable(part[i:i + size])))
                        i += size

    def _values_sql(self, h: int, rows: int) -> str:
        return (f"INSERT OR IGNORE INTO {_raw(h)} (b, node, job, t, seq, {_C}) VALUES "
                + ", ".join([f"(?, ?, ?, ?, ?, {_Q12})"] * rows))

    def compact(self, before_ms: int, step_ms: int, max_rows: int = 20_000) -> int:
        """Thin the oldest hourly table that lies entirely before before_ms (and before meta.replay_from): copy
        the last sample of each step of each job into `thinned`, one chunk (a step's buckets x a range of nodes,
        about `max_rows` raw samples) per call and transaction, so flushes run in between; after its last chunk
        the table is dropped whole. Returns the raw samples thinned by this call (at least 1 while there is work
        left; 0: nothing left to do)."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            replay_from = db.execute("SELECT value FROM meta WHERE key = 'replay_from'").fetchone()[0]
            cut = before_ms if replay_from is None else min(before_ms, replay_from)
            if not self._parts or (self._parts[0] + 1) * HOUR_MS > cut:
                db.execute("COMMIT")
                return 0
            h = self._parts[0]
            lo_t, hi_t = h * HOUR_MS, (h + 1) * HOUR_MS
            if self._thin is None or self._thin[0] != h:
                self._thin = (h, lo_t // step_ms * step_ms, 0)
            _, step, node = self._thin
            max_node = db.execute("SELECT coalesce(max(ix), 0) FROM nodes").fetchone()[0]
            moved = 0
            while step < hi_t:
                b0, b1 = max(step, lo_t) // BUCKET_MS, (min(step + step_ms, hi_t) - 1) // BUCKET_MS
                buckets = ", ".join(map(str, range(b0, b1 + 1)))  # IN on b, then a range on node: index seeks
                hi = node + self._thin_nodes
                where = f"b IN ({buckets}) AND node >= ?1 AND node < ?2"
                rows = db.execute(f"SELECT count(*) FROM {_raw(h)} WHERE {where}", (node, hi)).fetchone()[0]
                if rows:
                    # max(t) makes the other columns those of the last sample of each step (partial steps merge
                    # into what an earlier chunk or run wrote: the later sample wins)
                    db.execute(
                        f"INSERT INTO thinned (node, job, step, t, seq, {_C}) "
                        f"SELECT node, job, (t / ?3) * ?3, max(t), seq, {_C} FROM {_raw(h)} "
                        f"WHERE {where} GROUP BY node, job, t / ?3 "
                        "ON CONFLICT (node, job, step) DO UPDATE SET t = excluded.t, seq = excluded.seq, "
                        + ", ".join(f"{c} = excluded.{c}" for c in COUNTERS) + " WHERE excluded.t > thinned.t",
                        (node, hi, step_ms))
                    self._thin_nodes = max(1, min(4096, int(self._thin_nodes * max_rows / rows)))
                node = hi
                if node > max_node:
                    step, node = step + step_ms, 0
                self._thin = (h, step, node)
                if rows:
                    moved = rows
                    break
            done = step >= hi_t
            if done:
                self._drop_part(h)
                self._thin = None
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._thin = None  # start the hour again (idempotent)
            raise
        if done:
            self._forget([h])
        return max(moved, 1)

    def expire(self, before_ms: int, jobs: Sequence[tuple[int, int]]) -> int:
        """Drop the hourly tables entirely before before_ms (delete the older raw samples of the one across it),
        and delete these jobs' thinned samples before it."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        dropped = []
        try:
            deleted = 0
            for h in self._parts:
                if (h + 1) * HOUR_MS <= before_ms:
                    deleted += db.execute(f"SELECT count(*) FROM {_raw(h)}").fetchone()[0]
                    self._drop_part(h)
                    dropped.append(h)
                    self._parts = tuple(x for x in self._parts if x != h)
                elif h * HOUR_MS < before_ms:
                    deleted += db.execute(f"DELETE FROM {_raw(h)} WHERE b < ?", (before_ms // BUCKET_MS,)).rowcount
            gone = db.execute("SELECT node, job FROM totals WHERE gone = 1 AND first_t < ? AND expired_t <= last_t",
                              (before_ms,)).fetchall()
            for node, job in [*jobs, *gone]:
                # t >= step: the step range is a seek, t drops the part of the last step after before_ms
                deleted += db.execute("DELETE FROM thinned WHERE node = ? AND job = ? AND step < ?3 AND t < ?3",
                                      (node, job, before_ms)).rowcount
                db.execute("UPDATE totals SET expired_t = max(expired_t, ?) WHERE node = ? AND job = ?",
                           (before_ms, node, job))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._parts = self._load_parts()
            raise
        if self._thin is not None and self._thin[0] in dropped:
            self._thin = None
        return deleted

    # ---------------------------------------------------------------- reading (any thread)

    @staticmethod
    def _read(db: sqlite3.Connection, sql: str, params: Sequence[int]) -> list[tuple[int, ...]]:
        """Rows of a raw table; none when it is gone (dropped since `_parts` was read: its samples are in
        `thinned`, or expired)."""
        try:
            return db.execute(sql, params).fetchall()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return []
            raise

    def value_at(self, node_ix: int, job_int: int, t_ms: int, lo_ms: int) -> Counters | None:
        db = self._reader()
        top_b, lo_b = t_ms // BUCKET_MS, lo_ms // BUCKET_MS
        # The raw buckets from t_ms back to the job's first sample (or the oldest raw hour); a job that reports
        # regularly is found in the first one or two.
        for h in reversed(self._parts):
            first, last = h * PART_B, (h + 1) * PART_B - 1
            if first > top_b:
                continue
            if last < lo_b:
                break
            sql = (f"SELECT {_C} FROM {_raw(h)} WHERE b = ? AND node = ? AND job = ? AND t <= ? "
                   "ORDER BY t DESC LIMIT 1")
            for b in range(min(top_b, last), max(first, lo_b) - 1, -1):
                rows = self._read(db, sql, (b, node_ix, job_int, t_ms))
                if rows:
                    return tuple(rows[0])
        row = db.execute(f"SELECT {_C} FROM thinned WHERE node = ? AND job = ? AND step <= ? AND t <= ? "
                         "ORDER BY step DESC LIMIT 1", (node_ix, job_int, t_ms, t_ms)).fetchone()
        return tuple(row) if row else None

    def samples(self, node_ix: int, job_int: int, after_ms: int, until_ms: int,
                lo_ms: int) -> list[tuple[int, Counters]]:
        db = self._reader()
        out: list[tuple[int, Counters]] = []
        lo_b, hi_b = max(after_ms, lo_ms) // BUCKET_MS, until_ms // BUCKET_MS
        for h in self._parts:  # raw first, then thinned: a sample being thinned is in one or both
            first, last = h * PART_B, (h + 1) * PART_B - 1
            if last < lo_b or first > hi_b:
                continue
            sql = (f"SELECT t, {_C} FROM {_raw(h)} WHERE b = ? AND node = ? AND job = ? AND t > ? AND t <= ? "
                   "ORDER BY t")
            for b in range(max(first, lo_b), min(last, hi_b) + 1):
                out += [(row[0], tuple(row[1:])) for row in self._read(db, sql, (b, node_ix, job_int, after_ms,
                                                                                 until_ms))]
        out += [(row[0], tuple(row[1:])) for row in db.execute(
            f"SELECT t, {_C} FROM thinned WHERE node = ? AND job = ? AND step > ? AND step <= ? AND t > ? AND t <= ? "
            "ORDER BY step", (node_ix, job_int, after_ms - MAX_STEP_MS, until_ms, after_ms, until_ms))]
        out.sort(key=lambda s: s[0])
        return [s for i, s in enumerate(out) if i == 0 or s[0] != out[i - 1][0]]

    def gone(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Mark jobs purged from the controller's state (their totals rows, as totals_row() makes them, written
        with it: the row is current whatever the checkpoint's state); `recover` no longer loads them."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("UPDATE totals SET gone = 1, seq = ?7, first_t = ?8, last_t = ?9, final = ?10, "
                           + ", ".join(f"{c} = ?{i + 11}" for i, c in enumerate(COUNTERS))
                           + " WHERE node = ?1 AND job = ?2", rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def gone_sums(self) -> dict[str, Counters]:
        """The counters of the jobs marked gone, summed per group."""
        db = self._reader()
        sums = ", ".join(f"sum({c})" for c in COUNTERS)
        return {row[0]: tuple(row[1:]) for row in db.execute(
            f"SELECT job_group, {sums} FROM totals WHERE gone = 1 GROUP BY job_group")}

    def gone_jobs(self, job_id: str = "", group: str = "", node: str = "", user: str = "",
                  start: int | None = None, end: int | None = None) -> list[JobUsage]:
        """Jobs marked gone with traffic within (start, end] (first_t <= end, last_t > start), filtered."""
        where: list[str] = ["gone = 1"]
        params: list[int | str] = []
        if start is not None:
            where.append("last_t > ?")
            params.append(start)
        if end is not None:
            where.append("first_t <= ?")
            params.append(end)
        if job_id:
            where.append("job = ? AND job_id = ?")
            params += [int(job_id, 16), job_id]
        for col, v in (("job_group", group), ("job_node", node), ("job_user", user)):
            if v:
                where.append(f"{col} = ?")
                params.append(v)
        db = self._reader()
        return [JobUsage(row[2], row[0], row[1], row[3], row[4], row[5], row[6], row[7], row[8], bool(row[9]),
                         tuple(row[11:]), row[10])
                for row in db.execute(f"SELECT {_TOTALS_COLS}, expired_t, {_C} FROM totals "
                                      f"WHERE {' AND '.join(where)}", params)]

    def sample_count(self) -> tuple[int, int]:
        """(raw samples, thinned samples)"""
        db = self._reader()
        raw = 0
        for h in self._parts:
            rows = self._read(db, f"SELECT count(*) FROM {_raw(h)}", ())
            raw += int(rows[0][0]) if rows else 0
        return raw, int(db.execute("SELECT count(*) FROM thinned").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            for db in self._readers:
                db.close()
            self._readers.clear()
        self.db.close()
