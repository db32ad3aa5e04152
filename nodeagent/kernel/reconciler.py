"""The public API of the kernel networking layer, used by the node agent:

    rec = NetworkReconciler(NetSettings(netns_dir=..., underlay_ifname=..., underlay_ip=...))
    applied = rec.reconcile(desired)            # incremental: plans against the in-memory model
    applied = rec.reconcile(desired, full=True) # observes the kernel anew and repairs drift
    rec.job_netns_path(job_id)                  # the namespace file a job's processes setns into
    rec.close()

Works in the network namespace of the thread that constructs it; call it from ONE thread at a time, in
that same namespace. The model is what the last full observation saw, advanced by every step applied
since, so an incremental reconcile costs only the kernel work of what changed (plus a pure diff in
memory). After any failed step the model is dropped: the next reconcile observes the kernel anew. The
neighbour tables of job namespaces are not read by each observation but followed through the kernel's
notifications (neighwatch.py): N jobs of one group hold N*(N-1) entries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from nodeagent import names
from nodeagent.desired import DesiredState
from nodeagent.kernel.apply import ENTRY_STEPS, JOB_NEIGH_STEPS, JOB_SYSCTLS, Applier
from nodeagent.kernel.errors import DependencyFailed, KernelError, ReconcileError, StepFailed
from nodeagent.kernel.model import NetSettings, Observed
from nodeagent.kernel.namespaces import Namespaces
from nodeagent.kernel.neighwatch import watch_or_none
from nodeagent.kernel.netlink import Netlink
from nodeagent.kernel.observe import Sweep, job_netns_files, observe
from nodeagent.kernel.plan import Wanted, advance, plan_wanted, update_wanted, wanted
from nodeagent.kernel.releaser import Releaser
from nodeagent.kernel.spares import SparePool
from nodeagent.kernel.steps import (
    AddFloodEntry,
    ConfigureJob,
    CreateBridge,
    CreateJobNetwork,
    CreateVxlan,
    DeleteFdb,
    DeleteNeigh,
    ReplaceBridgeFdb,
    ReplaceFdb,
    ReplaceJobNeigh,
    ReplaceNeigh,
    SetJobPort,
    SetLink,
    SpreadJobNeigh,
    Step,
    WithdrawJobNeigh,
)

# (A SpreadJobNeigh needs nothing made in the same pass: a job made there gets all its entries from its own
# ReplaceJobNeigh, never from a spread.)
FAN_OUT_STEPS = (SpreadJobNeigh, WithdrawJobNeigh)

__all__ = ["NetSettings", "NetworkReconciler", "ReconcileError", "Step"]

log = logging.getLogger("jobnet.agent.kernel")


def _needs(step: Step) -> tuple[str, ...]:
    """The devices and job namespaces (made by earlier steps of the same pass) a step needs."""
    match step:
        case CreateVxlan(bridge=bridge):
            return (bridge,)
        case SetLink(master=master):
            return (master,) if master else ()
        case AddFloodEntry(dev=dev) | ReplaceFdb(dev=dev) | ReplaceNeigh(dev=dev) | DeleteFdb(dev=dev) | DeleteNeigh(
                dev=dev):
            return (dev,)
        case CreateJobNetwork(job=spec) | ConfigureJob(job=spec) | SetJobPort(job=spec):
            return (spec.bridge,)
        case ReplaceBridgeFdb(bridge=bridge, port=port):
            return (bridge, port)
        case ReplaceJobNeigh(netns=netns):
            return (netns,)
    return ()


def _makes(step: Step) -> tuple[str, ...]:
    """The devices and job namespace (with its eth0) a step makes (that later steps may need)."""
    match step:
        case CreateBridge(ifname=ifname) | CreateVxlan(ifname=ifname):
            return (ifname,)
        case CreateJobNetwork(job=spec) | ConfigureJob(job=spec):
            return (spec.netns, spec.host_ifname)
        case SetJobPort(job=spec):
            return (spec.host_ifname,)
    return ()


def _batch(step: Step) -> int:
    """Steps of the same batch kind in a row are applied together: 1 entries on our VXLAN devices and
    bridges; 0: one by one (a job neighbour step is a batch of its own: many entries in one namespace, or
    one entry in many)."""
    return 1 if isinstance(step, ENTRY_STEPS) else 0


class NetworkReconciler:
    def __init__(self, settings: NetSettings) -> None:
        settings.netns_dir.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        ns_id = os.readlink("/proc/thread-self/ns/net")  # e.g. net:[4026532301]
        self._label = f"{settings.label} ({ns_id})" if settings.label else ns_id  # names it in errors
        self._netns_ino = os.stat("/proc/thread-self/ns/net").st_ino
        self._ns = Namespaces(self._label)
        try:
            self._nl = Netlink(self._label)
        except BaseException:
            self._ns.close()
            raise
        self._watch = watch_or_none(self._label) if settings.neigh_watch else None
        self._spares = SparePool(settings.netns_dir, self._ns, settings.spare_namespaces, JOB_SYSCTLS)
        self._spares.clean()  # those a killed agent left
        self._releaser = Releaser(self._label) if settings.paced_release else None
        self._applier = Applier(settings, self._nl, self._ns, self._watch, self._spares, self._releaser)
        self._closed = False
        self._model: Observed | None = None
        self._want: Wanted | None = None
        self._desired: DesiredState | None = None  # the state `_want` was made for
        self._sweep = Sweep(settings.neigh_sweep)
        # Seconds the last reconcile spent writing peers' entries into the other jobs of their groups
        # (SpreadJobNeigh, WithdrawJobNeigh): the group's convergence on this node, not the new job's setup.
        self.last_fan_out_s = 0.0

    def job_netns_path(self, job_id: str) -> Path:
        return self.settings.netns_dir / names.job_netns(job_id)

    def wait_released(self, timeout: float = 30.0) -> bool:
        """With paced_release: wait until the networks of the jobs that went are released (tests, benches)."""
        return self._releaser is None or self._releaser.wait_idle(timeout)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._spares.clean()
            if self._releaser is not None:
                self._releaser.close()
            self._applier.close()
            if self._watch is not None:
                self._watch.close()
            self._nl.close()
            self._ns.close()

    def refill_spares(self, limit: int | None = None, prepare: Callable[[], None] | None = None) -> int:
        """Make spare job network namespaces up to `NetSettings.spare_namespaces` (at most `limit` now); the
        agent calls this when a pass is done. `prepare` runs inside each new one once its eth0 exists (see
        spares.py). Returns how many were made."""
        if os.stat("/proc/thread-self/ns/net").st_ino != self._netns_ino:
            raise RuntimeError(f"refill_spares called from another network namespace than {self._label}")
        return self._spares.refill(limit, prepare)

    @property
    def spares(self) -> SparePool:
        return self._spares

    def observed(self) -> Observed:
        """A copy of the current model (observing the kernel if there is none)."""
        return self._observe().copy() if self._model is None else self._model.copy()

    def _observe(self) -> Observed:
        """Observe the kernel anew. The neighbour entries of job namespaces come from the notifications
        (neighwatch.py) where their tables are known; the others are read whole (dumped), and so are those
        the sweep picks, as a cross-check."""
        self._model = None  # should observing fail, the next reconcile tries again
        files = job_netns_files(self.settings.netns_dir)
        watch = self._watch
        whole = None
        inos: dict[str, int] = {}
        if watch is not None:
            watch.drain()
            watch.retain(set(files))
            for job_id, path in files.items():
                try:
                    inos[job_id] = os.stat(path).st_ino
                    if not watch.watching(job_id, inos[job_id]):
                        watch.watch(job_id, path)
                except (OSError, KernelError) as e:  # not a namespace (any more): the plan replaces it
                    log.debug("not watching the neighbours of job %s: %s", job_id, e)
            swept = self._sweep.pick(files)

            def whole(job_id: str, eth0: int) -> bool:
                return job_id in swept or not watch.knows(job_id, inos.get(job_id, -1), eth0)

        if watch is None:
            for job_id, path in files.items():
                with contextlib.suppress(OSError):
                    inos[job_id] = os.stat(path).st_ino
        self._applier.retain_job_sockets(inos)
        obs, index, tables = observe(self._ns, files, whole)
        waiting = self._releaser.pending if self._releaser is not None else frozenset()
        if waiting:  # veths of jobs that are gone, waiting for the releaser: not ours to fix
            for ifname in waiting:
                obs.links.pop(ifname, None)
                index.pop(ifname, None)
            obs.bridge_fdb = {k: b for k, b in obs.bridge_fdb.items() if b.port not in waiting}
        if watch is not None:
            for job_id, table in tables.read.items():
                watch.set_table(job_id, table, tables.eth0[job_id])
            watch.drain()  # what changed since the ids were given or the tables read
            obs.job_neigh = {job_id: dict(watch.table(job_id)) if watch.knows(job_id, inos.get(job_id, -1), eth0)
                             else tables.read.get(job_id, {}) for job_id, eth0 in tables.eth0.items()}
        self._applier.reset_index(index)
        self._model = obs
        return obs

    def reconcile(self, desired: DesiredState, full: bool = False) -> list[Step]:
        """Make the kernel match `desired`; return the steps applied. Raises ReconcileError (carrying each
        failed step with its typed cause, and the steps that were applied) when some steps failed."""
        if os.stat("/proc/thread-self/ns/net").st_ino != self._netns_ino:
            raise RuntimeError(f"reconcile called from another network namespace than {self._label}")
        full = full or self._model is None
        keys = None
        if not full and self._want is not None and self._desired is not None:
            keys = update_wanted(self._want, self._desired, desired, self.settings)
        if keys is None:
            self._want = wanted(desired, self.settings)
        assert self._want is not None
        self._desired = desired
        if self._watch is not None:
            self._watch.drain()  # (cheap when nothing changed; keeps the socket's buffer small)
        model = self._observe() if full else self._model
        assert model is not None
        for job_id, why in self._want.rejected.items():
            if keys is None or job_id in keys.jobs:
                log.error("job %s gets no network: %s", job_id, why)
        for why in self._want.bad_peers.values():
            log.error("no neighbour entries for %s", why)  # (each reconcile: rare, and a controller bug)
        steps = plan_wanted(self._want, model, self.settings, keys)
        applied: list[Step] = []
        failures: list[StepFailed] = []
        broken: set[str] = set()

        def done(step: Step, error: Exception | None) -> None:
            if error is None:
                log.debug("network step %s applied", step)
                advance(model, step, self.settings)
                applied.append(step)
                return
            log.warning("network step %s failed: %s", step, error)
            failures.append(StepFailed(step, error))
            broken.update(_makes(step))

        pause = contextlib.nullcontext() if self._watch is None or not any(
            isinstance(s, JOB_NEIGH_STEPS) for s in steps) else self._watch.paused()
        with pause:
            self.last_fan_out_s = self._apply(steps, done, failures, broken)
        if failures:
            self._model = self._want = self._desired = None  # the next reconcile observes and plans in full
            raise ReconcileError(failures, applied)
        return applied

    def _apply(self, steps: list[Step], done: Callable[[Step, Exception | None], None], failures: list[StepFailed],
               broken: set[str]) -> float:
        """Apply the plan's steps in order (batches where they can be); returns the seconds spent on
        spreads and withdraws (FAN_OUT_STEPS)."""
        fan_out_s = 0.0
        i = 0
        while i < len(steps):
            # FDB / neighbour entries in a row go to the kernel in batches; everything else one by one.
            kind = _batch(steps[i])
            end = i + 1
            if kind:
                while end < len(steps) and _batch(steps[end]) == kind:
                    end += 1
            todo: list[Step] = []
            for step in steps[i:end]:
                missing = [d for d in _needs(step) if d in broken]
                if missing:
                    failures.append(StepFailed(step, DependencyFailed(f"{', '.join(missing)} could not be made")))
                    broken.update(_makes(step))
                else:
                    todo.append(step)
            i = end
            if todo and not kind:
                (step,) = todo
                t0 = time.perf_counter()
                try:
                    self._applier.apply(step)
                except Exception as e:
                    done(step, e)
                else:
                    done(step, None)
                if isinstance(step, FAN_OUT_STEPS):
                    fan_out_s += time.perf_counter() - t0
            elif todo:
                try:
                    outcomes = self._applier.apply_entries(todo)
                except Exception as e:
                    outcomes = [e] * len(todo)
                for step, outcome in zip(todo, outcomes, strict=True):
                    done(step, outcome)
        return fan_out_s
