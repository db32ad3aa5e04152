"""Per-job accounting tables: install (idempotently), verify, repair, read.

Every operation enters the job's network namespace the way nodeagent.kernel does it: a short-lived worker
thread setns()es into the namespace file (NetworkReconciler.job_netns_path), opens its libnftables
context there (the context's netlink socket belongs to that namespace), does its work, frees the context
and returns to the agent's namespace; the calling thread (the agent's kernel worker) never changes
namespace. `read` visits many namespaces from ONE worker thread.

The job itself cannot change the table: it has no capability in its network namespace (its user owns
none), and CAP_NET_ADMIN is needed for any nftables change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent.accounting.nft import Nft, NftError
from nodeagent.accounting.rules import (
    FAMILY,
    TABLE,
    NetTotals,
    create_commands,
    frame_totals,
    mac_prefix,
    problems,
    raw_counters,
    repair_commands,
)
from nodeagent.accounting.sockets import wait_tcp_drained
from nodeagent.kernel.errors import KernelError
from nodeagent.kernel.namespaces import Namespaces

log = logging.getLogger("jobnet.agent.accounting")

LIST = f"list table {FAMILY} {TABLE}"


class AccountingError(Exception):
    """Accounting of one job failed; str() is the cause (no "setup-failed" prefix)."""


@dataclass(frozen=True)
class JobNet:
    """Where a job's counters live: its namespace file and its MAC (None: read only, never create or
    repair, e.g. at the end of a job whose MAC is no longer known)."""

    netns: Path
    mac: str | None


@dataclass(frozen=True)
class Reading:
    totals: NetTotals          # frame bytes (see rules.py), cumulative since the table was created
    sampled_ns: int            # time.time_ns() right after the counters were read
    action: str                # "ok", "created" (there was no table: totals are 0) or "repaired"
    problems: tuple[str, ...] = ()
    drained: bool = True       # final reads: no TCP socket could still send when the counters were read
    waited_s: float = 0.0


class NetAccounting:
    def __init__(self, namespaces: Namespaces | None = None) -> None:
        # Namespaces() remembers the namespace of the constructing thread: build this in the agent's.
        self._ns = namespaces or Namespaces("agent")
        self._own_ns = namespaces is None

    def close(self) -> None:
        if self._own_ns:
            self._ns.close()

    # ------------------------------------------------------------------ public

    def ensure(self, job_id: str, netns: Path, mac: str) -> Reading:
        """Make sure the job's table is there and right (create or repair it). AccountingError otherwise."""
        try:
            mac_prefix(mac)
        except ValueError as e:
            raise AccountingError(str(e)) from e
        out = self.read({job_id: JobNet(netns, mac)})[job_id]
        if isinstance(out, AccountingError):
            raise out
        return out

    def read(self, jobs: Mapping[str, JobNet], *, drain_s: float = 0.0) -> dict[str, Reading | AccountingError]:
        """Counters of every job (verified, created or repaired when it has a MAC), one worker thread for
        all of them. `drain_s` > 0 (final reads): first wait up to that long until no TCP socket of the
        namespace can still send."""
        if not jobs:
            return {}
        paths = {job_id: j.netns for job_id, j in jobs.items()}

        def visit(job_id: str, _path: Path) -> Reading | AccountingError:
            try:
                return _visit(jobs[job_id].mac, drain_s)
            except AccountingError as e:
                return e
            except (NftError, OSError, ValueError) as e:
                return AccountingError(str(e))
            except Exception as e:  # one job's odd table must not stop the reading of the others
                log.exception("job %s: reading its accounting table failed", job_id)
                return AccountingError(f"{type(e).__name__}: {e}")

        raw = self._ns.run_in_each(paths, visit)
        out: dict[str, Reading | AccountingError] = {}
        for job_id, r in raw.items():
            if isinstance(r, KernelError):
                out[job_id] = AccountingError(f"cannot enter the job's network namespace {paths[job_id]}: "
                                              f"{r.detail}")
            else:
                out[job_id] = r
        return out

    def run_in(self, netns: Path, fn: Callable[[Nft], Any]) -> Any:
        """`fn(nft)` inside the namespace (tests and tools)."""
        def work() -> Any:
            with Nft() as nft:
                return fn(nft)
        return self._ns.run_in(netns, work)


def _visit(mac: str | None, drain_s: float) -> Reading:
    """Inside the job's namespace (worker thread)."""
    drained, waited = True, 0.0
    if drain_s > 0:
        drained, waited = wait_tcp_drained(drain_s)
    with Nft() as nft:
        try:
            listing: list[dict[str, Any]] | None = nft.run(LIST)
        except NftError as e:
            if not e.not_found:
                raise
            listing = None
        if listing is None:
            if mac is None:
                raise AccountingError(f"no table {FAMILY} {TABLE} in the job's network namespace")
            prefix = mac_prefix(mac)
            try:
                nft.run(create_commands(prefix))
                return Reading(NetTotals(), time.time_ns(), "created", drained=drained, waited_s=waited)
            except NftError as e:
                if not e.exists:
                    raise
                listing = nft.run(LIST)  # made meanwhile (cannot happen from the agent): verify it below
        sampled = time.time_ns()
        totals = frame_totals(raw_counters(listing))
        found: list[str] = []
        if mac is not None:
            prefix = mac_prefix(mac)
            found = problems(listing, prefix)
            if found:
                nft.run(repair_commands(listing, prefix))  # keeps the counter objects and their values
        return Reading(totals, sampled, "repaired" if found else "ok", tuple(found), drained, waited)
