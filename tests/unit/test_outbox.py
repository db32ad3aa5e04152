"""The agent's durable outbox: reports survive a crash (a new Outbox on the same file sees them), acked
reports are gone, and a torn last line from a crash mid-write does not lose the others."""

from __future__ import annotations

from pathlib import Path

from nodeagent.outbox import Outbox


def test_reports_survive_a_restart_until_acked(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    box = Outbox(path)
    box.put({"job_id": "a", "state": 4})
    box.put({"job_id": "b", "state": 2})
    again = Outbox(path)
    assert [i["job_id"] for i in again.pending()] == ["a", "b"]
    again.ack(again.pending()[0]["seq"])
    third = Outbox(path)
    assert [i["job_id"] for i in third.pending()] == ["b"]
    third.put({"job_id": "c", "state": 4})
    assert len({i["seq"] for i in third.pending()}) == 2, "sequence numbers stay unique after a restart"


def test_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    box = Outbox(path)
    box.put({"job_id": "a", "state": 4})
    with open(path, "a") as f:
        f.write('{"job_id": "b", "sta')
    assert [i["job_id"] for i in Outbox(path).pending()] == ["a"]
