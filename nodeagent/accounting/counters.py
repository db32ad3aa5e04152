"""Per-job counters: install (idempotently), verify, repair, read.

A job's counters are a per-CPU array map of six (bytes, packets) values, counted by two small BPF programs
on the job's `eth0`, on the device's tcx hooks where the kernel has them, else classic tc (hooks.py; egress:
"tx", ingress: "rx"; see bpf.program for the instructions and rules.py for the meaning). On tcx they are
attached with BPF_PROG_ATTACH, not as links, on tc as cls_bpf filters: either way they belong to the
device, outlive the agent (a SIGKILLed agent finds them, and the map through them, after its restart) and go
with the device. The agent also holds every live job's map open, so that the counts survive `eth0` being
deleted and made again (a network repair): the programs are attached again to the same map at the next
ensure/read ("repaired").

Every operation enters the job's network namespace the way nodeagent.kernel does it (Namespaces.run_in_each:
the calling thread setns()es there and back): hooks are found by ifindex in the caller's namespace.
`read` visits many namespaces in one go.

The job itself cannot change its counters: bpf() needs CAP_BPF/CAP_SYS_ADMIN in the host's user namespace
(unprivileged BPF is off by default: kernel.unprivileged_bpf_disabled), and the job has no capability.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from nodeagent.accounting import bpf
from nodeagent.accounting.hooks import KINDS, Attached, Hooks, resolve
from nodeagent.accounting.rules import (
    BASE,
    DEVICE,
    KEYS,
    MAP_NAME,
    PROG_NAMES,
    NetTotals,
    expected_tags,
    mac_prefix,
    mac_prefix_of,
)
from nodeagent.accounting.sockets import wait_tcp_drained
from nodeagent.kernel.errors import KernelError
from nodeagent.kernel.namespaces import Namespaces

log = logging.getLogger("jobnet.agent.accounting")

VALUE = struct.Struct("=QQ")  # bytes, packets


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
    totals: NetTotals          # frame bytes (see rules.py), cumulative since the counters were created
    sampled_ns: int            # time.time_ns() right after the counters were read
    action: str                # "ok", "created" (there were no counters: totals are 0) or "repaired"
    problems: tuple[str, ...] = ()
    drained: bool = True       # final reads: no TCP socket could still send when the counters were read
    waited_s: float = 0.0


@dataclass
class _Map:
    fd: int
    id: int


class NetAccounting:
    def __init__(self, namespaces: Namespaces | None = None, hook: str = "auto") -> None:
        """`hook`: where the programs go, "tcx", "tc" or "auto" (tcx where the kernel has it); see hooks.py.
        ValueError for "tcx" on a kernel without it."""
        self.hook = resolve(hook)
        # Namespaces() remembers the namespace of the constructing thread: build this in the agent's.
        self._ns = namespaces or Namespaces("agent")
        self._own_ns = namespaces is None
        self._maps: dict[str, _Map] = {}  # job id -> its counters' map, held open (see the module's doc)

    def close(self) -> None:
        for job_id in list(self._maps):
            self.release(job_id)
        if self._own_ns:
            self._ns.close()

    def release(self, job_id: str) -> None:
        """Stop holding the job's map (after its final reading; the programs keep it while eth0 lives)."""
        m = self._maps.pop(job_id, None)
        if m is not None:
            os.close(m.fd)

    def retain(self, job_ids: Iterable[str]) -> None:
        """Release the maps of every job not in `job_ids` (jobs that went without a final reading)."""
        keep = set(job_ids)
        for job_id in [j for j in self._maps if j not in keep]:
            self.release(job_id)

    @property
    def held(self) -> int:
        return len(self._maps)

    # ------------------------------------------------------------------ public

    def ensure(self, job_id: str, netns: Path, mac: str) -> Reading:
        """Make sure the job's counters are there and right (create or repair them). AccountingError otherwise."""
        try:
            mac_prefix(mac)
        except ValueError as e:
            raise AccountingError(str(e)) from e
        out = self.read({job_id: JobNet(netns, mac)})[job_id]
        if isinstance(out, AccountingError):
            raise out
        return out

    def read(self, jobs: Mapping[str, JobNet], *, drain_s: float = 0.0) -> dict[str, Reading | AccountingError]:
        """Counters of every job (verified, created or repaired when it has a MAC), one thread for all of them.
        `drain_s` > 0 (final reads): first wait up to that long until no TCP socket of the namespace can still
        send."""
        if not jobs:
            return {}
        paths = {job_id: j.netns for job_id, j in jobs.items()}

        def visit(job_id: str, _path: Path) -> Reading | AccountingError:
            try:
                return self._visit(job_id, jobs[job_id].mac, drain_s)
            except AccountingError as e:
                return e
            except (OSError, ValueError) as e:
                return AccountingError(str(e))
            except Exception as e:  # one job's odd state must not stop the reading of the others
                log.exception("job %s: reading its network counters failed", job_id)
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

    def prepare_here(self, mac_prefix: str) -> None:
        """Install counters for a job to come, inside the CALLING thread's namespace (a spare's, whose eth0
        exists; see nodeagent/kernel/spares.py): a new map and both programs for this node's MAC prefix
        ("02:NN:NN"). Nothing is held: the programs keep the map, the job's first ensure finds it ("ok")."""
        prefix = mac_prefix_of(mac_prefix)
        ifindex = socket.if_nametoindex(DEVICE)
        m = bpf.map_create_percpu_array(MAP_NAME, VALUE.size, len(KEYS))
        try:
            with Hooks() as hooks:
                for d, name in PROG_NAMES.items():
                    fd = bpf.prog_load_sched_cls(name, bpf.program(m, d, prefix, BASE[d]))
                    try:
                        hooks.attach(self.hook, ifindex, fd, d, name)
                    finally:
                        os.close(fd)
        finally:
            os.close(m)

    # ------------------------------------------------------------------ inside the job's namespace

    def _visit(self, job_id: str, mac: str | None, drain_s: float) -> Reading:
        drained, waited = True, 0.0
        if drain_s > 0:
            drained, waited = wait_tcp_drained(drain_s)
        try:
            ifindex = socket.if_nametoindex(DEVICE)
        except OSError:
            ifindex = 0
        with Hooks() as hooks:
            # ours on the configured hook; on the other one too when verifying (both would count twice)
            kinds = [self.hook] + ([k for k in KINDS if k != self.hook] if mac is not None else [])
            attached = {d: [p for k in kinds for p in hooks.programs(k, ifindex, d) if p.info.name == PROG_NAMES[d]]
                        if ifindex else [] for d in PROG_NAMES}
            try:
                held = self._maps.get(job_id)
                if held is None:
                    held = self._adopt(job_id, attached)
                if mac is None:
                    if held is None:
                        raise AccountingError(f"no accounting programs on {DEVICE} in the job's network namespace")
                    return Reading(_totals(held.fd), time.time_ns(), "ok", drained=drained, waited_s=waited)
                if not ifindex:
                    raise AccountingError(f"no {DEVICE} in the job's network namespace: nothing to count on")
                prefix = mac_prefix(mac)
                created = held is None
                if held is None:
                    fd = bpf.map_create_percpu_array(MAP_NAME, VALUE.size, len(KEYS))
                    held = _Map(fd, bpf.map_info(fd).id)
                    self._maps[job_id] = held
                found: list[str] = []
                for d, progs in attached.items():
                    found += self._fix(hooks, ifindex, d, progs, held, prefix)
                if created:
                    found = []  # nothing was wrong: there was nothing yet
                totals = NetTotals() if created else _totals(held.fd)
                action = "created" if created else ("repaired" if found else "ok")
                return Reading(totals, time.time_ns(), action, tuple(found), drained, waited)
            finally:
                for progs in attached.values():
                    for p in progs:
                        os.close(p.fd)

    def _adopt(self, job_id: str, attached: dict[str, list[Attached]]) -> _Map | None:
        """The map our programs on eth0 count into (after an agent restart), held from now on; None if none."""
        for progs in attached.values():
            for p in progs:
                for map_id in p.info.map_ids:
                    fd = bpf.map_fd_by_id(map_id)
                    if _usable(fd):
                        m = _Map(fd, map_id)
                        self._maps[job_id] = m
                        return m
                    os.close(fd)
        return None

    def _fix(self, hooks: Hooks, ifindex: int, direction: str, progs: list[Attached], m: _Map,
             prefix: int) -> list[str]:
        """Exactly one right program of ours on the configured hook, counting into `m`: keep it, detach any
        other of ours (a duplicate, or one on the other hook, would count twice), attach one if none is right.
        Returns what was wrong."""
        name = PROG_NAMES[direction]
        tags = expected_tags(direction, prefix)

        def right(p: Attached) -> bool:
            return p.info.tag in tags and p.info.map_ids == (m.id,)

        keep = next((p for p in progs if p.kind == self.hook and right(p)), None)
        problems: list[str] = []
        for p in progs:
            if p is keep:
                continue
            why = ("on the other hook" if p.kind != self.hook else "a duplicate" if right(p) else
                   "counting into another map" if p.info.tag in tags else "not the program we load (other code)")
            problems.append(f"{direction}: program {name} id {p.info.id} ({p.kind}) detached: {why}")
            hooks.detach(ifindex, p, direction)
        if keep is None:
            problems.append(f"{direction}: program {name} was not on {DEVICE} ({self.hook}): attached")
            fd = bpf.prog_load_sched_cls(name, bpf.program(m.fd, direction, prefix, BASE[direction]))
            try:
                hooks.attach(self.hook, ifindex, fd, direction, name)
            finally:
                os.close(fd)
        return problems


def _usable(map_fd: int) -> bool:
    i = bpf.map_info(map_fd)
    return (i.type, i.key_size, i.value_size, i.max_entries, i.name) == (
        bpf.MAP_TYPE_PERCPU_ARRAY, 4, VALUE.size, len(KEYS), MAP_NAME)


def _totals(map_fd: int) -> NetTotals:
    b: list[int] = []
    p: list[int] = []
    for key in range(len(KEYS)):
        nb = np = 0
        for raw in bpf.percpu_lookup(map_fd, key, VALUE.size):
            x, y = VALUE.unpack(raw)
            nb += x
            np += y
        b.append(nb)
        p.append(np)
    return NetTotals(tuple(b), tuple(p))
