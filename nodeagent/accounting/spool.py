"""The usage spool: every per-job usage report, durable until the controller acknowledged it.

On disk: `<dir>/seg-<n>.jsonl`, append-only segment files, one JSON record per line, each append
fdatasync'ed before `add` returns (a SIGKILL after that loses nothing; a SIGKILL during it leaves at most
a torn last line, which loading skips: that record's `add` never returned). Only the newest segment is
appended to, and a restarted spool always starts a new one (never writes after a torn line). Records
are acknowledged by seq; a segment whose records are all acknowledged is deleted, and no segment is ever
rewritten for an ack: each ack only replaces the tiny `<dir>/marks` ({"hw": highest seq ever given out,
so seqs keep increasing even if the clock steps back; "acked_below": every record below it is
acknowledged, so a reopened spool does not send those again}).

Records are cumulative and keyed by (job, seq): a record delivered twice (a crash between the controller's
acknowledgement and our deletion, or the overlap of a compaction) is a duplicate the controller drops.

Bounded: at most `max_entries` unacknowledged records. Adding beyond that first COALESCES: for each job
only the newest non-final record and every final record are kept (the counters are cumulative, so the
totals are never lost, only the time resolution between them), written as one new segment before the old
ones are deleted (a crash in between leaves duplicates, which loading drops by seq). If every remaining
record is still needed (more distinct jobs than the bound), the spool grows past the bound: nothing is
ever dropped. Both are alarms: logged at ERROR and visible in `stats`: `alarm` (1 from a coalescing until
the spool drained to half its bound), `coalesce_runs` and `coalesced` (records merged away: counters),
`over_bound` (records beyond the bound right now).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nodeagent.accounting.rules import NetTotals
from nodeagent.state import write_atomic

log = logging.getLogger("jobnet.agent.accounting")

SEGMENT_GLOB = "seg-*.jsonl"
MEMORY_ONLY = ""  # the "segment" of records that could not be written to disk


@dataclass(frozen=True)
class UsageRecord:
    job_id: str
    seq: int               # unique in the spool, increasing; time.time_ns() unless the clock stepped back
    sampled_ns: int        # when the counters were read
    final: bool
    totals: NetTotals

    def to_line(self) -> bytes:
        d = {"job": self.job_id, "seq": self.seq, "t": self.sampled_ns, "final": self.final, **self.totals.to_lists()}
        return (json.dumps(d, separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_line(cls, line: bytes) -> UsageRecord:
        d = json.loads(line)
        if not isinstance(d, dict) or not isinstance(d.get("job"), str) or not d["job"]:
            raise ValueError("not a usage record")
        return cls(d["job"], int(d["seq"]), int(d["t"]), bool(d["final"]), NetTotals.from_lists(d))


def coalesce(records: Iterable[UsageRecord]) -> list[UsageRecord]:
    """Per job: every final record and the newest non-final one (if newer than the job's last final),
    in seq order."""
    records = sorted(records, key=lambda r: r.seq)
    newest: dict[str, int] = {}
    last_final: dict[str, int] = {}
    for r in records:
        if r.final:
            last_final[r.job_id] = r.seq
        else:
            newest[r.job_id] = r.seq
    return [r for r in records
            if r.final or (newest[r.job_id] == r.seq and r.seq > last_final.get(r.job_id, -1))]


class UsageSpool:
    def __init__(self, directory: Path, max_entries: int = 100_000, segment_entries: int = 4096) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.dir = directory
        self.max_entries = max_entries
        self.segment_entries = segment_entries
        self._lock = threading.Lock()
        self._entries: dict[int, UsageRecord] = {}   # seq -> record, unacknowledged, in seq order
        self._seg_of: dict[int, str] = {}            # seq -> segment file name
        self._live: dict[str, set[int]] = {}         # segment -> its unacknowledged seqs
        self._active: str | None = None              # the segment we append to
        self._active_fd = -1
        self._active_count = 0
        self._next_seg = 1
        self._hw = 0
        self._coalesce_at = max_entries  # add() coalesces when the spool would grow past this
        self.stats: dict[str, int] = {
            "entries": 0, "segments": 0, "appended": 0, "acked": 0, "coalesced": 0, "coalesce_runs": 0,
            "alarm": 0, "over_bound": 0, "torn": 0, "duplicates": 0, "write_errors": 0,
        }
        directory.mkdir(parents=True, exist_ok=True)
        self._load()

    # ------------------------------------------------------------------ loading

    def _load(self) -> None:
        for tmp in self.dir.glob("*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        acked_below = 0
        try:
            marks = json.loads((self.dir / "marks").read_text())
            self._hw, acked_below = int(marks["hw"]), int(marks["acked_below"])
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError):
            log.error("usage spool %s: unreadable marks file: every record on disk is sent again", self.dir)
        loaded: list[tuple[UsageRecord, str]] = []
        for path in sorted(self.dir.glob(SEGMENT_GLOB)):
            with contextlib.suppress(ValueError):
                self._next_seg = max(self._next_seg, int(path.stem.split("-")[1]) + 1)
            self._live[path.name] = set()
            for line in path.read_bytes().splitlines():
                if not line.strip():
                    continue
                try:
                    loaded.append((UsageRecord.from_line(line), path.name))
                except (ValueError, KeyError, TypeError):
                    self.stats["torn"] += 1  # a record whose append never completed (crash mid-write)
        for rec, seg in sorted(loaded, key=lambda x: x[0].seq):
            self._hw = max(self._hw, rec.seq)
            if rec.seq < acked_below:
                continue  # acknowledged before the restart; its segment goes once it holds no other
            if rec.seq in self._entries:
                self.stats["duplicates"] += 1  # the overlap of an interrupted compaction
                continue
            self._entries[rec.seq] = rec
            self._seg_of[rec.seq] = seg
            self._live[seg].add(rec.seq)
        for seg in [s for s, seqs in self._live.items() if not seqs]:
            self._unlink(seg)
        if self.stats["torn"]:
            log.warning("usage spool %s: skipped %d torn record(s) (a crash during an append)", self.dir,
                        self.stats["torn"])
        self._update_stats()

    # ------------------------------------------------------------------ public

    def add(self, items: Sequence[tuple[str, int, bool, NetTotals]]) -> list[UsageRecord]:
        """Append records (job_id, sampled_ns, final, totals); returns them with their seqs. Durable when it
        returns (unless the disk failed: then logged at ERROR, counted in stats["write_errors"], and the
        records are still kept in memory and sent)."""
        if not items:
            return []
        with self._lock:
            if len(self._entries) + len(items) > self._coalesce_at:
                self._coalesce_locked(len(items))
            recs = []
            for job_id, sampled_ns, final, totals in items:
                self._hw = max(time.time_ns(), self._hw + 1)
                recs.append(UsageRecord(job_id, self._hw, sampled_ns, final, totals))
            self._append_locked(recs)
            self._update_stats()
            return recs

    def pending(self, limit: int | None = None) -> list[UsageRecord]:
        """Unacknowledged records, oldest first."""
        with self._lock:
            out = list(self._entries.values())
        return out if limit is None else out[:limit]

    def latest(self) -> dict[str, UsageRecord]:
        """The newest unacknowledged record of each job."""
        with self._lock:
            return {r.job_id: r for r in self._entries.values()}

    def ack(self, seqs: Iterable[int]) -> int:
        """Forget acknowledged records; delete segments left without any. Returns how many were pending."""
        with self._lock:
            touched: set[str] = set()
            n = 0
            for seq in seqs:
                if self._entries.pop(seq, None) is None:
                    continue
                n += 1
                seg = self._seg_of.pop(seq)
                self._live[seg].discard(seq)
                touched.add(seg)
            if n:
                self._write_marks()  # before a segment that carried the hw goes
            for seg in [seg for seg in touched if not self._live.get(seg)]:
                self._unlink(seg)
            self.stats["acked"] += n
            if len(self._entries) <= self.max_entries:
                self._coalesce_at = self.max_entries
            if self.stats["alarm"] and len(self._entries) <= self.max_entries // 2:
                self.stats["alarm"] = 0
                log.warning("usage spool: back to %d record(s) (bound %d): alarm cleared", len(self._entries),
                            self.max_entries)
            self._update_stats()
            return n

    def close(self) -> None:
        with self._lock:
            self._close_active()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # ------------------------------------------------------------------ internals

    def _update_stats(self) -> None:
        self.stats["entries"] = len(self._entries)
        self.stats["segments"] = len(self._live)
        self.stats["over_bound"] = max(0, len(self._entries) - self.max_entries)  # records beyond the bound now

    def _write_marks(self) -> None:
        floor = next(iter(self._entries)) if self._entries else self._hw + 1
        try:
            write_atomic(self.dir / "marks", json.dumps({"hw": self._hw, "acked_below": floor}))
        except OSError as e:  # then a restart sends acknowledged records again: duplicates, harmless
            self.stats["write_errors"] += 1
            log.error("usage spool %s: cannot write its marks (%s)", self.dir, e)

    def _close_active(self) -> None:
        if self._active_fd >= 0:
            os.close(self._active_fd)
        self._active_fd, self._active, self._active_count = -1, None, 0

    def _unlink(self, seg: str) -> None:
        if seg == self._active:
            self._close_active()
        if seg != MEMORY_ONLY:
            with contextlib.suppress(FileNotFoundError):
                (self.dir / seg).unlink()
        self._live.pop(seg, None)

    def _new_segment_name(self) -> str:
        name = f"seg-{self._next_seg:010d}.jsonl"
        self._next_seg += 1
        return name

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _append_locked(self, recs: list[UsageRecord]) -> None:
        if self._active is None or self._active_count >= self.segment_entries:
            self._close_active()
            name = self._new_segment_name()
            try:
                self._active_fd = os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                                          | os.O_CLOEXEC, 0o600)
                self._fsync_dir()
            except OSError:
                if self._active_fd >= 0:
                    os.close(self._active_fd)
                    self._active_fd = -1
                name = ""
            self._active = name or None
            self._live.setdefault(name or MEMORY_ONLY, set())
        seg = self._active or MEMORY_ONLY
        for r in recs:
            self._entries[r.seq] = r
            self._seg_of[r.seq] = seg
            self._live.setdefault(seg, set()).add(r.seq)
        self.stats["appended"] += len(recs)
        try:
            if self._active_fd < 0:
                raise OSError("no segment file could be created")
            data = b"".join(r.to_line() for r in recs)
            view = memoryview(data)
            while view:
                view = view[os.write(self._active_fd, view):]
            os.fdatasync(self._active_fd)
            self._active_count += len(recs)
        except OSError as e:
            self.stats["write_errors"] += 1
            log.error("usage spool %s: cannot write %d record(s) to disk (%s): they are kept in memory and sent, "
                      "but would not survive a crash", self.dir, len(recs), e)
            self._close_active()  # never append after a possibly torn line

    def _coalesce_locked(self, incoming: int) -> None:
        before = len(self._entries)
        keep = coalesce(self._entries.values())
        dropped = before - len(keep)
        if dropped:
            self._rewrite_locked(keep)
        self.stats["coalesce_runs"] += 1
        self.stats["coalesced"] += dropped
        self.stats["alarm"] = 1
        over = len(keep) + incoming - self.max_entries
        # Still over the bound: coalescing again at every add would cost O(n) each time for nothing; wait
        # until another tenth of the bound has come in.
        self._coalesce_at = max(self.max_entries, len(keep) + incoming + self.max_entries // 10)
        if over > 0:
            log.error("ALARM usage spool %s: full (%d records, bound %d) and every record is a final one or the "
                      "only sample of its job: growing past the bound by %d, nothing dropped; is the controller "
                      "unreachable?", self.dir, len(keep) + incoming, self.max_entries, over)
        else:
            log.error("ALARM usage spool %s: full (bound %d): coalesced %d sample(s) into the newest cumulative one "
                      "of each job (totals kept, time resolution lost); %d record(s) left; is the controller "
                      "unreachable?", self.dir, self.max_entries, dropped, len(keep))

    def _rewrite_locked(self, keep: list[UsageRecord]) -> None:
        """Replace every segment by one holding `keep`: the new file is complete and durable before any old
        one is deleted."""
        old = list(self._live)
        self._close_active()
        name = self._new_segment_name()
        tmp = self.dir / (name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(b"".join(r.to_line() for r in keep))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / name)
            self._fsync_dir()
        except OSError as e:
            self.stats["write_errors"] += 1
            log.error("usage spool %s: compaction could not be written (%s); old segments kept", self.dir, e)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            # Compact memory only; a segment is deleted once its kept records are acknowledged (its dropped
            # ones are superseded by newer cumulative records of the same jobs).
            kept = {r.seq for r in keep}
            for seq in [s for s in self._entries if s not in kept]:
                del self._entries[seq]
                self._live[self._seg_of.pop(seq)].discard(seq)
            for seg in [s for s, seqs in self._live.items() if not seqs]:
                self._unlink(seg)
            return
        for seg in old:
            self._unlink(seg)
        self._entries = {r.seq: r for r in keep}
        self._seg_of = {r.seq: name for r in keep}
        self._live = {name: set(self._entries)}
