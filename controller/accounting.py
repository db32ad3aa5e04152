"""Network accounting (issue 4): the node agents' cumulative per-job counters, stored durably and queried per
job, group, node or user within a window.

Two layers:
  * `AccountingStore`, where per-job totals and samples live: an interface, so that an etcd or TSDB backend
    can follow the SQLite one (controller/accounting_sqlite.py);
  * `Accounting`, the engine: the per-job state in memory (last seq, latest counters: dedupe and totals without
    touching the disk), ingest with group commit, queries, retention.

Ingest (ReportUsage). Each report carries a job's counters (packed in `counters`, or in `net` from agents that
predate it), cumulative since the job started, with a per-job
sequence number. A report whose job is not a job of the reporting node is dropped and counted as unknown (not an
error: the agent must just not resend it); seq <= the stored one is a duplicate (a resend after a lost
acknowledgement: harmless); a counter lower than the stored one under a higher seq is logged and the stored
maximum kept (counters never go backwards). Sample times are the agent's (`sampled`), kept strictly increasing per
job (a clock that steps back is clamped to 1 ms after the previous sample; a time in the future or unset becomes
the controller's clock).

Group commit: handlers append their rows to the pending batch and await its flush; a flusher task writes the
batch in one transaction (every `commit_interval_s`, or at once when it holds `max_batch_rows` rows) on a writer
thread, then wakes the handlers. An acknowledgement therefore means durable, and the disk sees tens of
transactions a second, not one per report. Per report the hot path builds one row (the raw sample); the
per-job totals are written at a job's first and final report and otherwise checkpointed in slices, every job at
most once per `checkpoint_s`: the store keeps a "replay from" time in the same transactions, and after a crash
the raw samples from there are replayed onto the totals (120 s: at 10,000 reports/s a checkpoint row costs
~13 us of writer time, so every 30 s cost ~4 us per report; the price is a replay of up to ~4 min of samples when
the controller starts after a crash). If a write fails, every handler waiting on it (and on the
batch behind it) gets UNAVAILABLE, the in-memory state is recovered from the store, and the agents' resends are
taken as new.

Queries (QueryUsage). Traffic of a job within [start, end] = its cumulative counters at its last sample <= end
minus those at its last sample <= start (zero when it has none, i.e. a job that started inside the window counts
from 0). Rows sum jobs by job, group, node, user or all; `top` keeps the rows with the most bytes; a series gives
per-step deltas (the steps sum to the row). The latest sample of every job is in memory, so the common windows
(ending now) read one sample per job from the store, at the window's start.

Retention (a background task): samples older than `raw_s` are thinned to the last one of each `step_s` step
(aligned to the epoch), which keeps every total and every window whose bounds fall on step boundaries exact;
the store thins whole hours (an hour once all of it is older than `raw_s`). Samples older than `keep_s` are
deleted. Totals are kept forever. Windows reaching back past `keep_s` count from the oldest kept sample.

Purged jobs (`evict`): a job purged from the controller's state (--job-retention-days) leaves this memory; its
totals row is written and marked gone in the store, where queries still find it (by job id, and within every
group/node/user/all query whose window reaches back to its traffic).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import operator
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import ge
from typing import TYPE_CHECKING, Any, Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from controller import validate
from controller.errors import InvalidArgument, NotFound, Unavailable
from protos.jobnet.v1 import jobnet_pb2 as pb

if TYPE_CHECKING:
    from controller.core import Controller

log = logging.getLogger("jobnet.controller.accounting")

# The 12 counters of a NetUsage, in this order everywhere (memory, store rows, CSV).
DIRECTIONS = ("tx", "rx")
CLASSES = ("local", "overlay", "external")
COUNTERS = tuple(f"{d}_{c}_{k}" for d in DIRECTIONS for c in CLASSES for k in ("bytes", "packets"))
Counters = tuple[int, ...]
ZERO: Counters = (0,) * len(COUNTERS)
BYTE_INDEXES = (0, 2, 4, 6, 8, 10)

MAX_REPORTS = 10_000        # per ReportUsage request
MAX_POINTS = 10_000         # per series
MAX_COUNTER = (1 << 63) - 1  # what a signed 64-bit integer column holds (9.2 EB: no real counter gets there)
MAX_SKEW_MS = 5_000          # a sample time further ahead of the controller's clock is taken as "now"
BUCKET_MS = 10_000           # raw samples are stored by 10-second bucket of their time (see the SQLite store)
BY = ("job", "group", "node", "user", "all")
INF = 1 << 62


def counters_of(n: pb.NetUsage) -> Counters:
    tx, rx = n.tx, n.rx
    a, b, c, d, e, f = tx.local, tx.overlay, tx.external, rx.local, rx.overlay, rx.external
    return (a.bytes, a.packets, b.bytes, b.packets, c.bytes, c.packets,
            d.bytes, d.packets, e.bytes, e.packets, f.bytes, f.packets)


def net_of(c: Sequence[int]) -> pb.NetUsage:
    def cls(i: int) -> pb.NetClassCounters:
        return pb.NetClassCounters(local=pb.NetCounters(bytes=c[i], packets=c[i + 1]),
                                   overlay=pb.NetCounters(bytes=c[i + 2], packets=c[i + 3]),
                                   external=pb.NetCounters(bytes=c[i + 4], packets=c[i + 5]))
    return pb.NetUsage(tx=cls(0), rx=cls(6))


def total_bytes(c: Sequence[int]) -> int:
    return c[0] + c[2] + c[4] + c[6] + c[8] + c[10]


def sub(a: Counters, b: Counters) -> Counters:
    return tuple(map(operator.sub, a, b))


def add_into(acc: list[int], c: Sequence[int]) -> None:
    for i, v in enumerate(c):
        acc[i] += v


NICE_STEPS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


def nice_step(window_ms: int, points: int) -> int:
    """The smallest round step (1 s, 2 s, 5 s, ... 1 min, 2 min, 5 min, ... 1 h, ... days) that covers the window
    in at most `points` steps, in ms."""
    need = window_ms / points / 1000
    for s in NICE_STEPS_S:
        if s >= need:
            return s * 1000
    return math.ceil(need / 86400) * 86400 * 1000


def _ts(ms: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts


def _ms(ts: Timestamp) -> int:
    return ts.seconds * 1000 + ts.nanos // 1_000_000


# ---------------------------------------------------------------- the store interface


@dataclass(slots=True)
class JobUsage:
    """A job's accounting totals: what the store keeps per job forever, and what the engine keeps in memory.
    Times are Unix milliseconds. (node_ix, job_int) is the job's key in the store: the reporting node's number
    (assigned here, so that one agent's reports are stored next to each other) and the job id as an integer
    (job ids are 10 hex digits)."""

    job_id: str
    node_ix: int
    job_int: int
    group: str
    node: str
    user: str
    seq: int = 0
    first_t: int = 0
    last_t: int = 0
    final: bool = False
    counters: Counters = ZERO
    expired_t: int = 0   # thinned samples before this time have been deleted


# A sample row: (t // BUCKET_MS, node_ix, job_int, t_ms, seq, *counters). It doubles as the totals update of its
# job (seq, last_t, counters), so the hot path builds nothing else.
SampleRow = tuple[int, ...]


def totals_row(j: JobUsage) -> tuple[Any, ...]:
    """(node_ix, job_int, job_id, group, node, user, seq, first_t, last_t, final, *counters)"""
    return (j.node_ix, j.job_int, j.job_id, j.group, j.node, j.user, j.seq, j.first_t, j.last_t, int(j.final),
            *j.counters)


def sample_row(j: JobUsage) -> SampleRow:
    return (j.last_t // BUCKET_MS, j.node_ix, j.job_int, j.last_t, j.seq, *j.counters)


@dataclass
class WriteBatch:
    """One transaction."""

    nodes: list[tuple[int, str]] = field(default_factory=list)       # new node numbers: (ix, name)
    new_jobs: list[tuple[Any, ...]] = field(default_factory=list)    # a job's first report: totals_row()
    samples: list[SampleRow] = field(default_factory=list)
    checkpoint: list[SampleRow] = field(default_factory=list)        # totals updates: a job's latest row
    finals: list[SampleRow] = field(default_factory=list)            # final reports: totals update + final flag
    replay_from: int | None = None  # after this transaction, samples with t >= this may be ahead of the totals


class AccountingStore(Protocol):
    """Durable accounting data. `write`, `compact` and `expire` are called from one writer thread, one call at a
    time, and must be atomic and durable when they return (or raise and change nothing); `recover` and the read
    methods may be called from other threads, concurrently with them, and see committed data only."""

    def recover(self) -> tuple[dict[str, int], list[JobUsage], set[str], int | None]:
        """Node name -> number; every job's totals with the samples since the last `replay_from` applied; the ids
        of the jobs whose stored totals are behind those; the stored replay_from."""
        ...

    def write(self, batch: WriteBatch) -> None: ...

    def compact(self, before_ms: int, step_ms: int) -> int:
        """Thin some raw samples older than before_ms to the last of each step (a bounded amount per call);
        returns how many raw samples went (0: none are left)."""
        ...

    def expire(self, before_ms: int, jobs: Sequence[tuple[int, int]]) -> int:
        """Delete samples older than before_ms (raw ones of every job, thinned ones of these jobs)."""
        ...

    def gone(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Write these totals rows (totals_row()) and mark their jobs gone: purged from the controller's state,
        no longer loaded by `recover` (writer thread)."""
        ...

    def gone_jobs(self, job_id: str = "", group: str = "", node: str = "", user: str = "",
                  start: int | None = None, end: int | None = None) -> list[JobUsage]:
        """Jobs marked gone with traffic within (start, end] (first_t <= end, last_t > start), filtered."""
        ...

    def gone_sums(self) -> dict[str, Counters]:
        """The counters of the jobs marked gone, summed per group."""
        ...

    def value_at(self, node_ix: int, job_int: int, t_ms: int, lo_ms: int) -> Counters | None:
        """The job's counters at its last sample with t <= t_ms (it has none before lo_ms); None: no sample."""
        ...

    def samples(self, node_ix: int, job_int: int, after_ms: int, until_ms: int,
                lo_ms: int) -> list[tuple[int, Counters]]:
        """The job's samples with after_ms < t <= until_ms, oldest first (it has none before lo_ms)."""
        ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- the engine


@dataclass(frozen=True)
class Retention:
    raw_s: float = 24 * 3600.0          # samples older than this are thinned (0: never)
    step_s: float = 300.0               # ... to one per step
    keep_s: float = 30 * 24 * 3600.0    # samples older than this are deleted (0: never)
    interval_s: float = 300.0           # how often retention runs
    chunk_jobs: int = 500               # jobs per retention transaction (flushes run in between)


@dataclass
class Ingested:
    accepted: int = 0
    duplicates: int = 0
    unknown: int = 0
    finals: list[JobUsage] = field(default_factory=list)  # final reports to write into the job records
    durable: asyncio.Future[None] | None = None           # resolves when what was accepted is on disk


class _Batch:
    __slots__ = ("born", "finals", "future", "min_t", "new", "nodes", "samples")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.samples: list[SampleRow] = []
        self.min_t = INF  # the oldest sample time in the batch
        self.new: list[JobUsage] = []
        self.finals: list[SampleRow] = []
        self.nodes: list[tuple[int, str]] = []
        self.future: asyncio.Future[None] = loop.create_future()
        self.born = loop.time()


@dataclass
class _QueryJob:
    key: str
    node_ix: int
    job_int: int
    first_t: int
    last_t: int
    counters: Counters


@dataclass
class _Plan:
    by: str
    top: int
    start: int | None
    end: int
    step: int
    jobs: list[_QueryJob]
    gone: tuple[str, str, str] | None = None     # also the store's gone jobs with these group, node, user filters
    skip: set[str] = field(default_factory=set)  # ... except these (in `jobs` already: being evicted)


@dataclass
class Stats:
    accepted: int = 0
    duplicates: int = 0
    unknown: int = 0
    backwards: int = 0
    flushes: int = 0
    flushed_rows: int = 0
    flush_seconds: float = 0.0
    ingest_cpu_s: float = 0.0   # CPU of ingest() on the event loop
    write_cpu_s: float = 0.0    # CPU of the store's writes on the writer thread
    checkpointed: int = 0
    thinned: int = 0   # raw samples thinned
    expired: int = 0   # samples deleted


class Accounting:
    def __init__(self, core: Controller, store: AccountingStore, retention: Retention | None = None,
                 commit_interval_s: float = 0.05, max_batch_rows: int = 5000, checkpoint_s: float = 120.0,
                 readers: int = 2) -> None:
        self.core = core
        self.store = store
        self.retention = retention or Retention()
        self.commit_interval_s = commit_interval_s
        self.max_batch_rows = max_batch_rows
        self.checkpoint_s = checkpoint_s
        self.stats = Stats()
        self.jobs: dict[str, JobUsage] = {}
        self.node_ix: dict[str, int] = {}
        self._evicting: list[JobUsage] = []  # being marked gone in the store: still answered from memory
        self.gone_by_group: dict[str, list[int]] = {}  # totals of the jobs marked gone, per group (metrics)
        # Totals checkpoint: rows of jobs reported since the current cycle began (`_dirty`), the snapshot being
        # written in slices (`_cycle`), and the oldest sample time since the previous / current cycle began.
        self._dirty: dict[str, SampleRow] = {}
        self._cycle: list[SampleRow] = []
        self._slice = 0
        self._cycle_began = 0.0
        self._min_prev = INF
        self._min_cur = INF
        self._force = False               # the next batch writes every totals row not yet written
        self._replay_from: int | None = None  # as last written
        self._recover()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="acct-write")
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="acct-read")
        self._pending: _Batch | None = None
        self._inflight: _Batch | None = None
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._last_backwards_log = 0.0
        log.info("accounting loaded: %d job(s) on %d node(s)", len(self.jobs), len(self.node_ix))

    def _recover(self) -> None:
        """Memory := what the store holds (totals + the raw samples newer than their checkpoint); the jobs whose
        stored totals are behind start the next checkpoint cycle."""
        self.node_ix, jobs, behind, replay_from = self.store.recover()
        self.jobs = {j.job_id: j for j in jobs}
        self.gone_by_group = {g: list(c) for g, c in self.store.gone_sums().items()}
        self._dirty = {}
        self._cycle = sorted(sample_row(self.jobs[jid]) for jid in behind)
        self._slice = max(100, math.ceil(len(self._cycle) / 100))
        self._cycle_began = time.monotonic()
        self._min_prev = INF if replay_from is None else replay_from
        self._min_cur = INF
        self._replay_from = replay_from
        if behind:
            log.info("accounting: %d job(s) had reports newer than their stored totals (replayed)", len(behind))

    # ---------------------------------------------------------------- life cycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._pending = _Batch(loop)
        self._tasks = [asyncio.create_task(self._flusher(), name="accounting-flush")]
        if self.retention.raw_s or self.retention.keep_s:
            self._tasks.append(asyncio.create_task(self._retainer(), name="accounting-retention"))
        # A final report stored but not yet in its job record (the controller stopped in between): write it now.
        missing = [(j.job_id, net_of(j.counters)) for j in self.jobs.values()
                   if j.final and j.job_id in self.core.c.jobs and not self.core.c.jobs[j.job_id].HasField("net")]
        if missing:
            n = self.core.record_final_net(missing)
            log.info("wrote the network totals of %d finished job(s) into their records", n)

    async def close(self) -> None:
        """Flush what is pending with a full totals checkpoint (the next start has nothing to replay), stop the
        background tasks, close the store."""
        self._closing = True
        for t in self._tasks[1:]:
            t.cancel()
        for t in self._tasks[1:]:
            with contextlib.suppress(BaseException):
                await t
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.checkpoint(), 30)
        st = self.stats
        log.info("accounting: %d report(s) accepted, %d duplicate(s), %d unknown, %d lower counter(s); %d flush(es) "
                 "of %d sample(s), %d totals checkpointed; CPU: ingest %.2f s, writes %.2f s", st.accepted,
                 st.duplicates, st.unknown, st.backwards, st.flushes, st.flushed_rows, st.checkpointed,
                 st.ingest_cpu_s, st.write_cpu_s)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self.store.close()

    async def checkpoint(self) -> None:
        """Write every totals row not yet written, with what is pending; after it nothing needs a replay."""
        self._force = True
        b = self._pending
        assert b is not None
        self._wake.set()
        self._full.set()
        await asyncio.shield(b.future)

    # ---------------------------------------------------------------- ingest

    def ingest(self, req: pb.ReportUsageRequest) -> Ingested:
        """Validate and take a ReportUsage request into the pending batch (synchronously, on the event loop);
        the caller awaits `durable` before acknowledging."""
        cpu0 = time.thread_time()
        try:
            return self._ingest(req)
        finally:
            self.stats.ingest_cpu_s += time.thread_time() - cpu0

    def _ingest(self, req: pb.ReportUsageRequest) -> Ingested:
        if not req.boot_id:
            raise InvalidArgument("boot_id is required: the agent sends the boot id it registered with")
        self.core._known_node(req.node, req.boot_id)
        name = req.node
        reports = req.reports
        if len(reports) > MAX_REPORTS:
            raise InvalidArgument(f"{len(reports)} reports in one request: send at most {MAX_REPORTS} per request")
        # Pass 1: read and check everything before anything changes, so a bad request changes nothing.
        parsed: list[tuple[str, int, int, Counters, bool]] = []
        append = parsed.append
        for r in reports:
            cs: Counters = tuple(r.counters)  # the packed form: no Python object per nested message
            if len(cs) != len(COUNTERS):
                cs = self._nested(r, cs)
            seq = r.seq
            if not seq or seq > MAX_COUNTER or max(cs) > MAX_COUNTER:
                self._bad_report(r, cs)
            s = r.sampled
            append((r.job_id, seq, s.seconds * 1000 + s.nanos // 1_000_000, cs, r.final))
        # Pass 2: dedupe and apply.
        out = Ingested()
        batch = self._pending
        assert batch is not None, "Accounting.start() was not called"
        jobs = self.jobs
        cluster_jobs = self.core.c.jobs
        now = int(self.core.now() * 1000)
        latest = now + MAX_SKEW_MS
        nix = self.node_ix.get(name)
        samples = batch.samples
        dirty = self._dirty
        min_t = batch.min_t
        accepted = dup = unknown = 0
        for jid, seq, t, cs, final in parsed:
            st = jobs.get(jid)
            if st is None:
                job = cluster_jobs.get(jid)
                if job is None or job.node != name:
                    unknown += 1
                    continue
                if nix is None:
                    nix = self._new_node(name, batch)
                st = JobUsage(jid, nix, int(jid, 16), job.group, name, job.user or validate.UNKNOWN_USER)
                jobs[jid] = st
                batch.new.append(st)
            elif st.node != name:
                unknown += 1
                continue
            if seq <= st.seq or st.final:
                dup += 1
                if st.final and jid in cluster_jobs and not cluster_jobs[jid].HasField("net"):
                    out.finals.append(st)  # stored, but not yet in the job record: try that again
                continue
            if t <= 0 or t > latest:
                t = now
            if t <= st.last_t:
                t = st.last_t + 1
            if not all(map(ge, cs, st.counters)):
                cs = self._backwards(st, seq, cs)
            if not st.seq:
                st.first_t = t
            st.seq, st.last_t, st.counters = seq, t, cs
            row = (t // BUCKET_MS, st.node_ix, st.job_int, t, seq, *cs)
            samples.append(row)
            dirty[jid] = row
            if t < min_t:
                min_t = t
            if final:
                st.final = True
                out.finals.append(st)
                batch.finals.append(row)
            accepted += 1
        batch.min_t = min_t
        out.accepted, out.duplicates, out.unknown = accepted, dup, unknown
        self.stats.accepted += accepted
        self.stats.duplicates += dup
        self.stats.unknown += unknown
        if accepted:
            self._wake.set()
            if len(samples) >= self.max_batch_rows:
                self._full.set()
        if accepted or dup:
            out.durable = self._barrier()
        return out

    @staticmethod
    def _nested(r: pb.JobUsageReport, cs: Counters) -> Counters:
        """The counters of a report without the packed form (an agent older than it): from `net`."""
        if cs:
            raise InvalidArgument(f"the report for job {r.job_id!r} (seq {r.seq}) has {len(cs)} packed counters: "
                                  f"send all {len(COUNTERS)} or none (nothing of this request was stored)")
        return counters_of(r.net)

    def _bad_report(self, r: pb.JobUsageReport, cs: Counters) -> None:
        if not r.seq:
            raise InvalidArgument(f"the report for job {r.job_id!r} has seq 0: sequence numbers start at 1 and grow "
                                  "with every report of a job (nothing of this request was stored)")
        if r.seq > MAX_COUNTER:
            raise InvalidArgument(f"the report for job {r.job_id!r} has seq {r.seq}, above {MAX_COUNTER} "
                                  "(nothing of this request was stored)")
        name = COUNTERS[cs.index(max(cs))]
        raise InvalidArgument(f"the report for job {r.job_id!r} (seq {r.seq}) has {name} = {max(cs)}, above "
                              f"{MAX_COUNTER}: the counter is corrupt (nothing of this request was stored)")

    def _backwards(self, st: JobUsage, seq: int, cs: Counters) -> Counters:
        """Counters lower than the stored ones under a higher seq: keep the maximum of each."""
        self.stats.backwards += 1
        now = time.monotonic()
        if now - self._last_backwards_log > 10:
            self._last_backwards_log = now
            lower = [COUNTERS[i] for i, (x, y) in enumerate(zip(cs, st.counters, strict=True)) if x < y]
            log.warning("job %s on %s: report seq %d has lower %s than seq %d; keeping the maximum "
                        "(%d such report(s) so far)", st.job_id, st.node, seq, ", ".join(lower), st.seq,
                        self.stats.backwards)
        return tuple(map(max, cs, st.counters))

    def _new_node(self, name: str, batch: _Batch) -> int:
        ix = max(self.node_ix.values(), default=0) + 1
        self.node_ix[name] = ix
        batch.nodes.append((ix, name))
        return ix

    def _barrier(self) -> asyncio.Future[None] | None:
        """A future that resolves when everything accepted so far is durable (None: it is already)."""
        if self._pending is not None and (self._pending.samples or self._pending.nodes):
            return self._pending.future
        if self._inflight is not None:
            return self._inflight.future
        return None

    async def wait_durable(self, res: Ingested) -> None:
        if res.durable is not None:
            await asyncio.shield(res.durable)

    def record_finals(self, finals: Iterable[JobUsage]) -> None:
        self.core.record_final_net([(j.job_id, net_of(j.counters)) for j in finals])

    # ---------------------------------------------------------------- group commit

    def _checkpoint_slice(self, b: _Batch) -> tuple[list[SampleRow], int | None]:
        """The totals rows this batch writes and the replay_from it leaves behind.

        A cycle snapshots the rows of the jobs reported since the previous cycle began and writes them, sorted,
        in slices spread over about a third of `checkpoint_s`; a new cycle begins at most every `checkpoint_s`.
        Until a cycle's last slice is written, the totals may lag for any sample since the previous cycle began
        (`_min_prev`); after it, only for samples since this cycle began (`_min_cur`)."""
        self._min_prev = min(self._min_prev, b.min_t)
        self._min_cur = min(self._min_cur, b.min_t)
        now = time.monotonic()
        if self._force:
            self._force = False
            latest = {(r[1], r[2]): r for r in self._cycle}
            latest.update({(r[1], r[2]): r for r in self._dirty.values()})
            self._cycle, self._dirty = [], {}
            self._min_prev = self._min_cur = INF
            self._cycle_began = now
            return sorted(latest.values(), key=lambda r: (r[1], r[2])), None
        if not self._cycle and self._dirty and now - self._cycle_began >= self.checkpoint_s:
            self._cycle = sorted(self._dirty.values(), key=lambda r: (r[1], r[2]))
            self._dirty = {}
            slices = max(1, int(self.checkpoint_s / 3 / self.commit_interval_s))
            self._slice = max(100, math.ceil(len(self._cycle) / slices))
            self._min_prev, self._min_cur = self._min_cur, INF
            self._cycle_began = now
        if not self._cycle:
            return [], None if self._min_cur >= INF else self._min_cur
        rows, self._cycle = self._cycle[:self._slice], self._cycle[self._slice:]
        lag = self._min_prev if self._cycle else self._min_cur
        return rows, None if lag >= INF else lag

    async def _flusher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            b = self._pending
            assert b is not None
            if not (b.samples or b.nodes or self._force):
                self._wake.clear()
                await self._wake.wait()
                continue
            delay = b.born + self.commit_interval_s - loop.time()
            if delay > 0 and len(b.samples) < self.max_batch_rows and not self._closing and not self._force:
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), delay)
            self._pending = _Batch(loop)
            self._inflight = b
            checkpoint, replay_from = self._checkpoint_slice(b)
            wb = WriteBatch(nodes=b.nodes, new_jobs=[totals_row(j) for j in b.new], samples=b.samples,
                            checkpoint=checkpoint, finals=b.finals, replay_from=replay_from)
            t0 = time.perf_counter()
            try:
                self.stats.write_cpu_s += await loop.run_in_executor(self._writer, self._write, wb)
            except Exception as e:
                self._inflight = None
                self._failed(b, e)
                continue
            self._inflight = None
            self._replay_from = replay_from
            self.stats.flushes += 1
            self.stats.flushed_rows += len(b.samples)
            self.stats.checkpointed += len(checkpoint)
            self.stats.flush_seconds += time.perf_counter() - t0
            b.future.set_result(None)

    def _write(self, wb: WriteBatch) -> float:
        """On the writer thread: write, and return the CPU it took."""
        cpu0 = time.thread_time()
        self.store.write(wb)
        return time.thread_time() - cpu0

    def _failed(self, b: _Batch, e: Exception) -> None:
        """A write failed: fail its waiters and those of the batch behind it (built on the same memory), and
        recover the memory from the store before anything else is ingested (synchronously, committed data)."""
        log.error("could not store %d usage report(s): %s", len(b.samples), e)
        behind = self._pending
        assert behind is not None
        self._pending = _Batch(asyncio.get_running_loop())
        err = Unavailable(f"the controller could not store the usage reports ({e}): resend them")
        for batch in (b, behind):
            batch.future.set_exception(err)
            batch.future.add_done_callback(lambda f: f.exception())  # retrieved even when nobody waits
        try:
            self._recover()
        except Exception:
            log.exception("could not reload the accounting state after a failed write; restart the controller")

    # ---------------------------------------------------------------- purged jobs

    async def evict(self, job_ids: Iterable[str] | None = None) -> int:
        """Forget the accounting state of jobs purged from the controller's state (these, or every job in
        memory that is no longer in the state): their totals rows are written and marked gone in the store, where
        queries still find them. Returns how many went."""
        cluster = self.core.c.jobs
        ids = list(self.jobs) if job_ids is None else job_ids
        out = [self.jobs.pop(jid) for jid in ids if jid in self.jobs and jid not in cluster]
        if not out:
            return 0
        self._evicting += out
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._writer, self.store.gone, [totals_row(j) for j in out])
        except BaseException:
            for j in out:  # not marked: keep them in memory
                self.jobs.setdefault(j.job_id, j)
            raise
        else:
            for j in out:
                add_into(self.gone_by_group.setdefault(j.group, [0] * len(COUNTERS)), j.counters)
        finally:
            gone = {id(j) for j in out}
            self._evicting = [j for j in self._evicting if id(j) not in gone]
        log.info("accounting: %d purged job(s) no longer kept in memory (their totals stay in the store)", len(out))
        return len(out)

    def evicting(self) -> list[JobUsage]:
        """Jobs out of `jobs` whose gone mark is being written (still counted from memory)."""
        return list(self._evicting)

    # ---------------------------------------------------------------- job records

    def job_out(self, job: pb.Job) -> pb.Job:
        """The job with its network totals (the latest report) in `net`."""
        st = self.jobs.get(job.id)
        if st is None:
            return job
        out = pb.Job()
        out.CopyFrom(job)
        out.net.CopyFrom(net_of(st.counters))
        return out

    # ---------------------------------------------------------------- queries

    def plan(self, req: pb.QueryUsageRequest, gone: JobUsage | None = None) -> _Plan:
        """Validate a query and take what it needs from memory (on the event loop). `gone`: the job asked for,
        read from the store (purged from the state, no longer in memory)."""
        if req.job_id:
            validate.job_id(req.job_id)
            if req.job_id not in self.jobs and req.job_id not in self.core.c.jobs and gone is None:
                raise NotFound(f"no job {req.job_id}: `jobnet job list --all` shows jobs, finished ones included")
        if req.group:
            validate.group_name(req.group)
        if req.node:
            validate.node_name(req.node)
        if req.user:
            validate.user_name(req.user)
        by = req.by or "job"
        if by not in BY:
            raise InvalidArgument(f"cannot group usage by {req.by!r}: use one of {', '.join(BY)}")
        if req.step_s and req.points:
            raise InvalidArgument("give either step_s or points for a series, not both")
        if req.points > MAX_POINTS:
            raise InvalidArgument(f"{req.points} points are too many for a series: at most {MAX_POINTS}")
        now = int(self.core.now() * 1000)
        start = _ms(req.start) if req.HasField("start") else None
        end = min(_ms(req.end), now) if req.HasField("end") else now
        if start is not None and start >= end:
            raise InvalidArgument(f"the window is empty: start {_iso(start)} is not before end {_iso(end)}"
                                  + (" (now)" if end == now else ""))
        jobs = []
        if req.job_id:
            one = self.jobs.get(req.job_id) or gone
            cands: Iterable[JobUsage] = [one] if one is not None else []
        else:
            cands = self.jobs.values()
        g, n, u = req.group, req.node, req.user
        for j in cands:
            if (g and j.group != g) or (n and j.node != n) or (u and j.user != u):
                continue
            if j.first_t > end or (start is not None and j.last_t <= start):
                continue  # no traffic within the window
            jobs.append(_QueryJob(self._key(j, by), j.node_ix, j.job_int, j.first_t, j.last_t, j.counters))
        step = req.step_s * 1000
        if (step or req.points) and start is None:
            # Since the beginning: the series starts on the whole second before the first sample.
            first = min((j.first_t for j in jobs), default=end - 1000)
            start = min(end - 1000, (first // 1000 - 1) * 1000)
        if req.points:
            assert start is not None
            step = nice_step(end - start, req.points)
        if step:
            assert start is not None
            points = math.ceil((end - start) / step)
            if points > MAX_POINTS:
                raise InvalidArgument(f"a series of {points} points (a step of {req.step_s} s over "
                                      f"{_iso(start)} .. {_iso(end)}) is too long: at most {MAX_POINTS}; "
                                      "give a larger step or a shorter window")
        return _Plan(by=by, top=req.top, start=start, end=end, step=step, jobs=jobs,
                     gone=None if req.job_id else (g, n, u), skip={j.job_id for j in self._evicting})

    @staticmethod
    def _key(j: JobUsage, by: str) -> str:
        return j.job_id if by == "job" else j.group if by == "group" else j.node if by == "node" else \
            j.user if by == "user" else "all"

    async def query(self, req: pb.QueryUsageRequest) -> pb.QueryUsageResponse:
        loop = asyncio.get_running_loop()
        gone = None
        if req.job_id and req.job_id not in self.jobs and req.job_id not in self.core.c.jobs:
            validate.job_id(req.job_id)
            found = await loop.run_in_executor(self._readers, lambda: self.store.gone_jobs(job_id=req.job_id))
            gone = found[0] if found else None
        plan = self.plan(req, gone)
        return await loop.run_in_executor(self._readers, self.run_query, plan)

    def run_query(self, p: _Plan) -> pb.QueryUsageResponse:
        """Compute a planned query (on a reader thread: it reads the store)."""
        store = self.store
        if p.gone is not None:
            # Jobs purged from the state are no longer in memory: their totals rows (those being evicted right
            # now are in the plan from memory)
            g, n, u = p.gone
            p.jobs += [_QueryJob(self._key(j, p.by), j.node_ix, j.job_int, j.first_t, j.last_t, j.counters)
                       for j in store.gone_jobs(group=g, node=n, user=u, start=p.start, end=p.end)
                       if j.job_id not in p.skip]
        rows: dict[str, list[int]] = {}
        members: dict[str, list[_QueryJob]] = {}
        for j in p.jobs:
            at_end = j.counters if p.end >= j.last_t else \
                store.value_at(j.node_ix, j.job_int, p.end, j.first_t) or ZERO
            at_start = ZERO
            if p.start is not None and j.first_t <= p.start:
                at_start = store.value_at(j.node_ix, j.job_int, p.start, j.first_t) or ZERO
            acc = rows.get(j.key)
            if acc is None:
                acc = rows[j.key] = [0] * len(COUNTERS)
                members[j.key] = []
            add_into(acc, sub(at_end, at_start))
            members[j.key].append(j)
        total = [0] * len(COUNTERS)
        for acc in rows.values():
            add_into(total, acc)
        order = sorted(rows, key=lambda k: (-total_bytes(rows[k]), k))
        if p.top:
            order = order[:p.top]
        out = pb.QueryUsageResponse(total=net_of(total), end=_ts(p.end), step_s=p.step // 1000)
        if p.start is not None:
            out.start.CopyFrom(_ts(p.start))
        for key in order:
            row = out.rows.add(key=key, net=net_of(rows[key]), total_bytes=total_bytes(rows[key]))
            if p.step:
                assert p.start is not None
                self._series(row, members[key], p.start, p.end, p.step)
        return out

    def _series(self, row: pb.UsageRow, jobs: list[_QueryJob], start: int, end: int, step: int) -> None:
        bounds = [*range(start + step, end, step), end]
        acc = [[0] * len(COUNTERS) for _ in bounds]
        for j in jobs:
            cum = ZERO
            if j.first_t <= start:
                cum = self.store.value_at(j.node_ix, j.job_int, start, j.first_t) or ZERO
            samples = self.store.samples(j.node_ix, j.job_int, start, min(end, j.last_t), j.first_t)
            if start < j.last_t <= end and (not samples or samples[-1][0] < j.last_t):
                samples.append((j.last_t, j.counters))  # the latest report may not be flushed yet
            i = 0
            for k, b in enumerate(bounds):
                prev = cum
                while i < len(samples) and samples[i][0] <= b:
                    cum = samples[i][1]
                    i += 1
                if cum is not prev:
                    add_into(acc[k], sub(cum, prev))
        for b, c in zip(bounds, acc, strict=True):
            row.series.add(t=_ts(b), net=net_of(c))

    # ---------------------------------------------------------------- retention

    async def _retainer(self) -> None:
        while True:
            await asyncio.sleep(self.retention.interval_s)
            try:
                await self.retain_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("usage retention failed; it runs again in %.0f s", self.retention.interval_s)

    async def retain_once(self) -> tuple[int, int]:
        """Thin raw samples older than `raw_s` and delete samples older than `keep_s`, a bounded amount of work
        per writer call (flushes run in between); returns (samples thinned, samples deleted)."""
        r = self.retention
        loop = asyncio.get_running_loop()
        now = int(self.core.now() * 1000)
        thinned = expired = 0
        if r.raw_s:
            step = int(r.step_s * 1000)
            cut = (now - int(r.raw_s * 1000)) // step * step
            if self._replay_from is not None and self._replay_from < cut:
                # Samples that old arrived since the last checkpoint (an agent catching up): checkpoint the
                # totals first, since thinning may not move samples a restart would have to replay.
                await self.checkpoint()
            while not self._closing:
                moved = await loop.run_in_executor(self._writer, self.store.compact, cut, step)
                if not moved:
                    break
                thinned += moved
        if r.keep_s and not self._closing:
            before = now - int(r.keep_s * 1000)
            todo = [j for j in self.jobs.values()
                    if j.first_t < before and j.expired_t < before and j.last_t >= j.expired_t]
            for i in range(0, max(len(todo), 1), r.chunk_jobs):
                chunk = todo[i:i + r.chunk_jobs]
                expired += await loop.run_in_executor(self._writer, self.store.expire, before,
                                                      [(j.node_ix, j.job_int) for j in chunk])
                for j in chunk:
                    j.expired_t = before
        if thinned or expired:
            log.info("usage retention: %d raw sample(s) thinned, %d sample(s) deleted", thinned, expired)
        self.stats.thinned += thinned
        self.stats.expired += expired
        return thinned, expired


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))
