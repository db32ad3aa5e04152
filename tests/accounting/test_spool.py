"""The usage spool: durable across a SIGKILL in the middle of an append, acknowledged records leave without a
rewrite per ack, duplicates after a crash are recognisable (same seq), and when full it coalesces (newest
cumulative sample per job + every final) with an alarm, never dropping a job's totals."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nodeagent.accounting import NetTotals, UsageSpool
from nodeagent.accounting.spool import coalesce

REPO = Path(__file__).resolve().parents[2]


def tot(n: int) -> NetTotals:
    """Cumulative totals that grow with n."""
    return NetTotals((n, 2 * n, 0, n, 0, 3 * n), (n // 100, n // 50, 0, n // 100, 0, n // 30))


def add(spool: UsageSpool, job: str, n: int, final: bool = False) -> int:
    return spool.add([(job, time.time_ns(), final, tot(n))])[0].seq


def test_records_survive_reopen_until_acked(tmp_path: Path) -> None:
    s = UsageSpool(tmp_path)
    seqs = [add(s, f"j{i % 3}", i) for i in range(10)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 10
    s.close()
    again = UsageSpool(tmp_path)
    assert [r.seq for r in again.pending()] == seqs
    assert again.pending()[4].totals == tot(4) and again.pending()[4].job_id == "j1"
    assert again.ack(seqs[:6]) == 6
    again.close()
    third = UsageSpool(tmp_path)
    assert [r.seq for r in third.pending()] == seqs[6:]
    new = add(third, "j9", 99)
    assert new > seqs[-1], "a reopened spool never reuses or goes below a seq"
    assert third.stats["torn"] == 0 and third.stats["duplicates"] == 0


def test_acks_delete_whole_segments_without_rewriting(tmp_path: Path) -> None:
    s = UsageSpool(tmp_path, segment_entries=4)
    seqs = [add(s, "j", i) for i in range(10)]  # segments of 4, 4, 2
    segs = sorted(p.name for p in tmp_path.glob("seg-*.jsonl"))
    assert len(segs) == 3
    inode = {p.name: p.stat().st_ino for p in tmp_path.glob("seg-*.jsonl")}
    s.ack(seqs[:3])
    assert sorted(p.name for p in tmp_path.glob("seg-*.jsonl")) == segs, "a partly acked segment stays as it is"
    assert {p.name: p.stat().st_ino for p in tmp_path.glob("seg-*.jsonl")} == inode
    s.ack(seqs[3:5])
    assert sorted(p.name for p in tmp_path.glob("seg-*.jsonl")) == segs[1:]
    s.ack(seqs[5:])
    assert list(tmp_path.glob("seg-*.jsonl")) == [] and len(s) == 0
    assert json.loads((tmp_path / "marks").read_text()) == {"hw": seqs[-1], "acked_below": seqs[-1] + 1}
    assert add(s, "j", 11) > seqs[-1]


def test_seq_increases_even_when_the_clock_steps_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = UsageSpool(tmp_path)
    first = add(s, "j", 1)
    s.ack([first])
    s.close()
    monkeypatch.setattr(time, "time_ns", lambda: 1_000)  # the clock jumped back ~56 years
    again = UsageSpool(tmp_path)
    second = again.add([("j", 1_000, False, tot(2))])[0].seq
    assert second == first + 1


def test_torn_record_from_a_crash_is_skipped_and_never_appended_after(tmp_path: Path) -> None:
    s = UsageSpool(tmp_path)
    seqs = [add(s, "j", i) for i in range(3)]
    s.close()
    seg = next(tmp_path.glob("seg-*.jsonl"))
    with open(seg, "ab") as f:
        f.write(b'{"job":"j","seq":99999999999999999999,"t":1,"fin')  # what a kill mid-write leaves
    again = UsageSpool(tmp_path)
    assert [r.seq for r in again.pending()] == seqs and again.stats["torn"] == 1
    add(again, "j", 4)
    assert seg.read_bytes().endswith(b'"fin'), "the old segment is never appended to"
    assert len(list(tmp_path.glob("seg-*.jsonl"))) == 2


CHILD = """
import sys, time
from pathlib import Path
from nodeagent.accounting import NetTotals, UsageSpool
s = UsageSpool(Path(sys.argv[1]), max_entries=10_000_000)
B = int(sys.argv[2])
TEAR_AFTER = int(sys.argv[3]) if len(sys.argv) > 3 else -1
i = 0
while True:
    if i == TEAR_AFTER * B:  # the kill lands inside write(2): half the batch reached the file
        import os, signal
        def torn_write(fd, data):
            n = real_write(fd, bytes(data[: len(data) // 2]))
            os.kill(os.getpid(), signal.SIGKILL)
        real_write = os.write
        os.write = torn_write
    batch = [("job%d" % (k % 50), time.time_ns(), k % 97 == 0, NetTotals((i + k,) * 6, (k,) * 6)) for k in range(B)]
    recs = s.add(batch)
    i += B
    print(recs[0].seq, recs[-1].seq, flush=True)   # after add() returned: durable
"""


def test_sigkill_mid_append_loses_nothing_that_was_added(tmp_path: Path) -> None:
    """A child appends batches of B records (~0.6 MB, one write) as fast as it can and prints each batch's
    seqs once add() returned; SIGKILL at varying moments (inside write, fdatasync or the Python around
    them). Every printed batch is on disk, intact; at most the batch in flight is partly there (a torn last
    line is skipped); the spool works on after reopening."""
    batch = 5000
    torn = partial = 0
    for round_ in range(10):
        d = tmp_path / f"r{round_}"
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(d), str(batch)], stdout=subprocess.PIPE, text=True,
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert p.stdout is not None
        done: list[tuple[int, int]] = []
        deadline = time.monotonic() + 0.3 + round_ * 0.037
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            a, b = line.split()
            done.append((int(a), int(b)))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        done += [tuple(int(x) for x in line.split()) for line in p.stdout.read().splitlines()  # type: ignore[misc]
                 if len(line.split()) == 2]
        assert done, "the child appended something"
        s = UsageSpool(d, max_entries=10_000_000)
        have = {r.seq: r for r in s.pending()}
        for a, b in done:
            assert len([q for q in have if a <= q <= b]) == batch, f"an acknowledged batch {a}..{b} is incomplete"
        acked_max = max(b for _, b in done)
        beyond = [q for q in have if q > acked_max]
        assert len(beyond) <= batch, "at most the batch in flight is (partly) there"
        assert len(have) == batch * len(done) + len(beyond)
        torn += s.stats["torn"]
        partial += 0 < len(beyond) < batch
        assert s.stats["duplicates"] == 0
        print(f"round {round_}: {len(done)} batches acknowledged, {len(beyond)} records of the one in flight, "
              f"{s.stats['torn']} torn")
        # it keeps working: new records after the reopen, old ones acked and gone
        new = s.add([("after", time.time_ns(), True, tot(1))])[0]
        assert new.seq > max(have)
        s.ack(list(have))
        s.close()
        assert [r.job_id for r in UsageSpool(d).pending()] == ["after"]
    print(f"{torn} torn line(s), {partial} partly written batch(es) in 10 kills")


def test_kill_inside_write_leaves_a_torn_batch_that_is_skipped(tmp_path: Path) -> None:
    """Deterministic: the child is SIGKILLed inside its write of the 4th batch, after half of it reached the
    file. The 3 acknowledged batches are intact; the whole records of the torn one are there (they were
    never acknowledged: harmless, the next sample supersedes them), the torn line is skipped."""
    p = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), "1000", "3"], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert p.returncode == -signal.SIGKILL
    done = [tuple(int(x) for x in line.split()) for line in p.stdout.splitlines()]
    assert len(done) == 3
    s = UsageSpool(tmp_path)
    have = sorted(r.seq for r in s.pending())
    assert s.stats["torn"] == 1
    assert 3000 < len(have) < 4000, "3 batches and the whole lines of the torn one"
    for a, b in done:
        assert len([q for q in have if a <= q <= b]) == 1000


def test_interrupted_compaction_leaves_recognisable_duplicates(tmp_path: Path) -> None:
    """A compaction writes the new segment before deleting the old ones; a crash in between leaves both:
    loading keeps each seq once (the controller would see the same seq again: a duplicate, dropped)."""
    s = UsageSpool(tmp_path)
    seqs = [add(s, "j", i) for i in range(5)]
    s.close()
    seg = next(tmp_path.glob("seg-*.jsonl"))
    (tmp_path / "seg-9999999999.jsonl").write_bytes(seg.read_bytes())
    again = UsageSpool(tmp_path)
    assert [r.seq for r in again.pending()] == seqs and again.stats["duplicates"] == 5
    again.ack(seqs)
    assert list(tmp_path.glob("seg-*.jsonl")) == []


def test_full_spool_coalesces_keeps_totals_and_raises_the_alarm(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    s = UsageSpool(tmp_path, max_entries=100)
    newest: dict[str, int] = {}
    finals: list[int] = []
    for i in range(1, 96):  # 95 records: 5 jobs, j0 ends at i=40 (final), j1 at 90
        job = f"j{i % 5}"
        final = (job == "j0" and i == 40) or (job == "j1" and i == 90)
        if job == "j0" and i > 40:
            job = "j5"  # j0 has ended; a new job samples instead
        seq = add(s, job, i, final)
        newest[job] = i
        if final:
            finals.append(seq)
    assert s.stats["alarm"] == 0 and len(s) == 95
    with caplog.at_level(logging.ERROR, logger="jobnet.agent.accounting"):
        for i in range(96, 111):  # over the bound
            add(s, f"j{i % 5 + 1}", i)
            newest[f"j{i % 5 + 1}"] = i
    assert s.stats["alarm"] == 1 and s.stats["coalesce_runs"] >= 1 and s.stats["coalesced"] > 50
    assert any("ALARM" in r.message and "coalesced" in r.message for r in caplog.records)
    assert len(s) <= 100
    pending = s.pending()
    assert {r.seq for r in pending} >= set(finals), "every final record is kept"
    by_job: dict[str, NetTotals] = {}
    for r in pending:
        by_job[r.job_id] = r.totals  # seq order: the last one is the newest
    assert by_job == {j: tot(n) for j, n in newest.items()}, "each job's newest cumulative totals are kept"
    # durable: the same after a reopen
    s.close()
    again = UsageSpool(tmp_path, max_entries=100)
    assert [r.seq for r in again.pending()] == [r.seq for r in pending]
    # the alarm clears once the controller took enough of it
    again.stats["alarm"] = 1
    again.ack([r.seq for r in pending])
    assert again.stats["alarm"] == 0


def test_more_jobs_than_the_bound_grows_past_it_dropping_nothing(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    s = UsageSpool(tmp_path, max_entries=10)
    with caplog.at_level(logging.ERROR, logger="jobnet.agent.accounting"):
        for i in range(25):
            add(s, f"job{i}", i, final=True)
    assert len(s) == 25 and s.stats["over_bound"] == 15 and s.stats["alarm"] == 1
    assert any("nothing dropped" in r.message for r in caplog.records)
    assert sorted(r.job_id for r in s.pending()) == sorted(f"job{i}" for i in range(25))


def test_coalesce_is_pure_and_keeps_finals_and_the_newest() -> None:
    from nodeagent.accounting import UsageRecord

    recs = [UsageRecord("a", 1, 1, False, tot(1)), UsageRecord("b", 2, 2, False, tot(2)),
            UsageRecord("a", 3, 3, False, tot(3)), UsageRecord("a", 4, 4, True, tot(4)),
            UsageRecord("b", 5, 5, False, tot(5))]
    assert [r.seq for r in coalesce(recs)] == [4, 5]


def test_records_are_json_lines_a_human_can_read(tmp_path: Path) -> None:
    s = UsageSpool(tmp_path)
    add(s, "jobx", 7, final=True)
    line = next(tmp_path.glob("seg-*.jsonl")).read_text().splitlines()[0]
    d = json.loads(line)
    assert d["job"] == "jobx" and d["final"] is True and d["tx"] == [7, 0, 14, 0, 0, 0]
