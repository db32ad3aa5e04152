"""From kernel readings to the cumulative totals reported for a job: never backwards.

Normally a job's totals are its kernel counters as they are (they start at 0 with the map, before the
job's first process, and only grow). Should the counters have to be created again while the job runs
(someone with root detached the programs while the agent was down, or eth0 was deleted then) or a counter go
down (someone wrote the map), the totals continue from the last
value reported (a per-job base, persisted in the state dir): what was counted since the last sample before
the loss is lost, and logged at ERROR, but the reported totals never decrease.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from nodeagent.accounting.counters import Reading
from nodeagent.accounting.rules import NetTotals
from nodeagent.state import write_atomic

log = logging.getLogger("jobnet.agent.accounting")


class UsageMeter:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._last: dict[str, NetTotals] = {}
        self._base: dict[str, NetTotals] = {}
        try:
            for job_id, d in json.loads(path.read_text()).items():
                self._base[job_id] = NetTotals.from_lists(d)
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, AttributeError):
            log.error("unreadable %s: counting every job from its kernel counters alone", path)

    def seed(self, job_id: str, totals: NetTotals) -> None:
        """The last totals reported for a job before a restart (from the spool)."""
        with self._lock:
            self._last.setdefault(job_id, totals)

    def last(self, job_id: str) -> NetTotals | None:
        with self._lock:
            return self._last.get(job_id)

    def observe(self, job_id: str, reading: Reading) -> NetTotals:
        with self._lock:
            base = self._base.get(job_id, NetTotals())
            value = base + reading.totals
            last = self._last.get(job_id)
            if last is not None and (reading.action == "created" or value.below(last)):
                # per counter: where we went below the last report, continue from it
                b = tuple(lb if (reading.action == "created" or v < lb) else bb
                          for v, lb, bb in zip(value.bytes, last.bytes, base.bytes, strict=True))
                p = tuple(lp if (reading.action == "created" or v < lp) else bp
                          for v, lp, bp in zip(value.packets, last.packets, base.packets, strict=True))
                base = NetTotals(b, p)
                value = base + reading.totals
                self._base[job_id] = base
                self._save_locked()
                log.error("job %s: its accounting counters were %s while it ran: traffic since the sample "
                          "before is lost; its totals continue from the last reported ones",
                          job_id, "lost (created again)" if reading.action == "created" else "reset")
            self._last[job_id] = value
            return value

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._last.pop(job_id, None)
            if self._base.pop(job_id, None) is not None:
                self._save_locked()

    def _save_locked(self) -> None:
        write_atomic(self._path, json.dumps({j: t.to_lists() for j, t in self._base.items()}))
