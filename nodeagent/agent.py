"""The node agent: keeps the controller's desired state for this node and makes the node match it.

Three parties, one direction of truth:

    controller --WatchNode--> desired state (persisted) --reconcile--> kernel (network) + runtime (jobs)
    runtime --poll--> job exits --outbox (durable)--> controller (ReportJobStatus)
    job netns counters --sample / final--> usage spool (durable) --> controller (ReportUsage)

Reconcile, don't script: every pass compares the whole desired state with what the kernel and the
runtime have and fixes the difference, so a restart, a missed message or an object deleted by hand heals
itself. A pass is cheap when little changed (the network reconciler keeps a model of the kernel); a
full pass that reads the kernel anew runs at start-up, every `resync_interval_s` and after any error.

Threads: the asyncio loop talks gRPC; every kernel and runtime call runs on ONE worker thread
(`self._kernel`), so netlink sockets and runtime state never see two callers at once. That includes the
network accounting (`nodeagent.accounting`): its counters are installed before a job's first process, they
are sampled every `usage_interval_s` and read a last time when the job's last process exited
(`_job_ended`, always on the kernel thread, so a final reading never races a sample).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

from nodeagent.accounting import AccountingError, JobNet, NetAccounting, Reading, UsageMeter, UsageSpool
from nodeagent.accounting.report import to_report
from nodeagent.config import AgentSettings
from nodeagent.desired import DesiredState, LocalJob, StaleDelta
from nodeagent.kernel.steps import ConfigureJob, CreateJobNetwork, Step
from nodeagent.logs import NodeAgentService
from nodeagent.metrics import AgentMetrics
from nodeagent.outbox import Outbox
from nodeagent.state import AgentState
from protos.jobnet.v1 import jobnet_pb2 as pb
from protos.jobnet.v1 import jobnet_pb2_grpc as pbg

log = logging.getLogger("jobnet.agent")

VERSION = "0.1.0"

END_REASONS = {
    "exited": pb.END_REASON_EXITED,
    "signalled": pb.END_REASON_SIGNALLED,
    "oom": pb.END_REASON_OOM,
    "timeout": pb.END_REASON_TIMEOUT,
    "stopped": pb.END_REASON_STOPPED,
    "setup-failed": pb.END_REASON_SETUP_FAILED,
    "lost": pb.END_REASON_LOST,
}


class NetworkReconcilerLike(Protocol):
    def reconcile(self, desired: DesiredState, full: bool = False) -> list[Any]: ...
    def refill_spares(self, limit: int | None = None, prepare: Callable[[], None] | None = None) -> int: ...
    def job_netns_path(self, job_id: str) -> Path: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class JobExitLike:
    job_id: str
    end_reason: str
    exit_code: int
    signal: int
    message: str
    usage: dict[str, Any] = field(default_factory=dict)


USAGE_FIELDS = ("cpu_seconds", "memory_peak_bytes", "io_read_bytes", "io_write_bytes", "pids_peak", "oom_kills")


class AccountingLike(Protocol):
    def ensure(self, job_id: str, netns: Path, mac: str) -> Reading: ...
    def read(self, jobs: Mapping[str, JobNet], *, drain_s: float = 0.0) -> dict[str, Reading | AccountingError]: ...
    def prepare_here(self, mac_prefix: str) -> None: ...
    def release(self, job_id: str) -> None: ...
    def retain(self, job_ids: Iterable[str]) -> None: ...
    def close(self) -> None: ...


USAGE_BATCH = 500          # reports per ReportUsage call
FINAL_DRAIN_S = 2.0        # at a job's end, wait up to this long for its orphan TCP sockets to stop sending


class RuntimeLike(Protocol):
    def start_job(self, job: LocalJob, netns_path: Path) -> int: ...
    def stop(self, job_id: str, grace_s: float) -> None: ...
    def poll(self) -> list[JobExitLike]: ...
    def running(self) -> dict[str, int]: ...
    def recover(self) -> list[JobExitLike]: ...
    def cleanup(self, job_id: str) -> None: ...
    def known_jobs(self) -> set[str]: ...
    def close(self) -> None: ...


class SetupFailedLike(Exception):
    """Raised by RuntimeLike.start_job; str() is 'setup-failed: <step>: <cause>'."""


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        runtime: RuntimeLike,
        network: NetworkReconcilerLike,
        setup_failed: tuple[type[BaseException], ...] = (SetupFailedLike,),
        accounting: AccountingLike | None = None,
    ) -> None:
        self.s = settings
        self.runtime = runtime
        self.network = network
        # Built here, in the agent's network namespace: it returns there after every visit to a job's.
        self.accounting: AccountingLike = accounting if accounting is not None else NetAccounting()
        self._setup_failed = setup_failed
        self.boot_id = uuid.uuid4().hex
        self.mac_prefix = ""  # "02:NN:NN", this node's job MACs' first octets: known once registered
        self.store = AgentState(settings.state_dir)
        self.desired = self.store.load_desired()
        self.finished = self.store.load_finished()
        self.outbox = Outbox(settings.state_dir / "outbox.jsonl")
        self.usage = UsageSpool(settings.state_dir / "usage", max_entries=settings.usage_spool_max)
        self.meter = UsageMeter(settings.state_dir / "usage-bases.json")
        for job_id, rec in self.usage.latest().items():
            if not rec.final:
                self.meter.seed(job_id, rec.totals)
        self._usage_batch = USAGE_BATCH
        # The controller reads JobUsageReport.counters (it said so in a ReportUsageResponse): send that form,
        # cheaper for both sides; until then `net`, which every controller reads.
        self._usage_packed = False
        self._usage_retry_at = 0.0
        self._usage_unreachable = ""     # the last reason ReportUsage failed (logged once per reason)
        self._usage_warned: set[str] = set()
        self.applied_revision = 0
        self._stopping_jobs: set[str] = set()
        self._ended_lock = threading.Lock()
        self.metrics = AgentMetrics()
        self._kernel = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jn-kernel")
        self._dirty = asyncio.Event()
        self._full_pending = True
        self._outbox_kick = asyncio.Event()
        self._stop = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None
        self._stub: pbg.ControllerAsyncStub | None = None
        self._registered = asyncio.Event()
        self._want_snapshot = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.heartbeat_interval_s = 2.0
        self.stats = {"reconciles": 0, "full_reconciles": 0, "steps": 0, "errors": 0,
                      "usage_samples": 0, "usage_read_errors": 0, "usage_repairs": 0, "usage_sample_ms": 0,
                      "usage_sent": 0, "usage_rejected": 0, "usage_finals": 0, "usage_finals_missing": 0}

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, stop_jobs_on_exit: bool = False) -> None:
        loop = self._loop = asyncio.get_running_loop()
        # 1. Jobs that ended while we were away: record and report them before anything else.
        exits = await loop.run_in_executor(self._kernel, self.runtime.recover)
        await loop.run_in_executor(self._kernel, self._jobs_ended, exits)
        # Adopted jobs are reported running again: a kill between a launch and its report would otherwise
        # leave the controller believing the job pending (a repeated report is a no-op there).
        for job_id, pid in (await loop.run_in_executor(self._kernel, self.runtime.running)).items():
            self.outbox.put({"job_id": job_id, "state": pb.JOB_STATE_RUNNING, "pid": pid})
        # 2. Make the kernel match what we last knew, even if the controller is unreachable.
        self._full_pending = True
        self._dirty.set()
        self._channel = _channel(self.s.controller)
        self._stub = pbg.ControllerStub(self._channel)  # typed as the async stub (aio channel)
        server = grpc.aio.server()
        pbg.add_NodeAgentServicer_to_server(
            NodeAgentService([self.s.scratch_root, self.s.state_dir / "logs"], lambda job_id: job_id in self.finished),
            server)
        server.add_insecure_port(self.s.agent_address)
        await server.start()
        tasks = [
            asyncio.create_task(self._guard("watch", self._watch_loop)),
            asyncio.create_task(self._guard("reconcile", self._reconcile_loop)),
            asyncio.create_task(self._guard("heartbeat", self._heartbeat_loop)),
            asyncio.create_task(self._guard("poll", self._poll_loop)),
            asyncio.create_task(self._guard("outbox", self._outbox_loop)),
            asyncio.create_task(self._guard("resync", self._resync_loop)),
            asyncio.create_task(self._guard("usage", self._usage_loop)),
        ]
        await self._stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if stop_jobs_on_exit:
            log.info("stopping every job and removing the node's network objects")
            await loop.run_in_executor(self._kernel, self._drain_sync)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush_usage(), timeout=3)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush_outbox(), timeout=3)
        await server.stop(grace=1)
        await self._channel.close(None)
        await loop.run_in_executor(self._kernel, self._close_sync)
        self._kernel.shutdown(wait=True)

    def request_stop(self) -> None:
        self._stop.set()

    async def _guard(self, name: str, fn: Any) -> None:
        """Keep a background loop alive: log an unexpected error, wait a little, start it again."""
        while not self._stop.is_set():
            try:
                await fn()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                self.stats["errors"] += 1
                log.exception("%s loop failed; restarting it in 1 s", name)
                await asyncio.sleep(1.0)

    # ------------------------------------------------------------------ controller side

    async def _register(self) -> None:
        assert self._stub is not None
        resp = await self._stub.RegisterNode(
            pb.RegisterNodeRequest(
                name=self.s.name,
                underlay_ip=self.s.underlay_ip,
                underlay_mtu=self.s.underlay_mtu,
                boot_id=self.boot_id,
                applied_revision=self.applied_revision,
                agent_version=VERSION,
                agent_address=self.s.agent_address,
            ),
            timeout=10,
        )
        if resp.heartbeat_interval_ms:
            self.heartbeat_interval_s = resp.heartbeat_interval_ms / 1000
        self.mac_prefix = resp.node.mac_prefix  # spares get this node's accounting programs ahead of time
        self._registered.set()
        log.info("registered as node %s (boot id %s), controller revision %d",
                 self.s.name, self.boot_id, resp.revision)

    async def _watch_loop(self) -> None:
        assert self._stub is not None
        backoff = 0.2
        while not self._stop.is_set():
            try:
                await self._register()
                self._outbox_kick.set()
                since = 0 if self._want_snapshot else self.desired.revision
                self._want_snapshot = False
                req = pb.WatchNodeRequest(node=self.s.name, boot_id=self.boot_id, revision=since)
                async for update in self._stub.WatchNode(req):
                    backoff = 0.2
                    try:
                        new = self.desired.apply_update(update)
                    except StaleDelta as e:
                        # Keep acting on what we hold until the snapshot replaces it.
                        log.warning("%s; asking for a snapshot", e)
                        self._want_snapshot = True
                        break
                    self.desired = new
                    self.store.save_desired(new)
                    if update.snapshot:
                        self._full_pending = True
                    self._dirty.set()
            except grpc.aio.AioRpcError as e:
                self._registered.clear()
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    log.error("controller refused this node: %s", e.details())
                    backoff = 5.0
                else:
                    log.warning("controller unreachable (%s: %s); retrying in %.1f s",
                                e.code().name, e.details(), backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _heartbeat_loop(self) -> None:
        assert self._stub is not None
        while not self._stop.is_set():
            await self._registered.wait()
            await asyncio.sleep(self.heartbeat_interval_s)
            try:
                await self._stub.Heartbeat(
                    pb.HeartbeatRequest(name=self.s.name, boot_id=self.boot_id,
                                        applied_revision=self.applied_revision),
                    timeout=5,
                )
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                    log.warning("heartbeat refused (%s); registering again", e.details())
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await self._register()

    async def _outbox_loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._outbox_kick.wait(), timeout=1.0)
            self._outbox_kick.clear()
            # Usage first: a job's final totals reach the controller before (or with) its end.
            await self._flush_usage()
            await self._flush_outbox()

    async def _flush_outbox(self) -> None:
        assert self._stub is not None
        for item in self.outbox.pending():
            req = pb.ReportJobStatusRequest(
                node=self.s.name,
                boot_id=self.boot_id,
                job_id=item["job_id"],
                state=item["state"],
                end_reason=item.get("end_reason", 0),
                exit_code=item.get("exit_code", 0),
                signal=item.get("signal", 0),
                message=item.get("message", ""),
                pid=item.get("pid", 0),
                usage=pb.Usage(**item.get("usage", {})),
            )
            try:
                await self._stub.ReportJobStatus(req, timeout=5)
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                    log.warning("controller rejected report for job %s (%s); dropping it",
                                item["job_id"], e.details())
                else:
                    return  # unreachable or refused for now: keep it, retry later
            self.outbox.ack(item["seq"])

    async def _flush_usage(self) -> None:
        """Send the spooled usage reports, oldest first, in batches; each acknowledged batch leaves the spool.
        Unreachable, UNIMPLEMENTED (a controller without accounting) or any refusal for now: keep them all and
        try again later (every usage interval for UNIMPLEMENTED)."""
        assert self._stub is not None
        if time.monotonic() < self._usage_retry_at:
            return
        while True:  # every pass acknowledges a batch or one refused report, or returns
            batch = self.usage.pending(self._usage_batch)
            if not batch:
                return
            req = pb.ReportUsageRequest(node=self.s.name, boot_id=self.boot_id,
                                        reports=[to_report(r, self._usage_packed) for r in batch])
            try:
                resp = await self._stub.ReportUsage(req, timeout=10)
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    if len(batch) > 1:  # find the one report it refuses: halve until it is alone
                        self._usage_batch = max(1, len(batch) // 2)
                        continue
                    log.error("controller refused usage report seq %d of job %s (%s): dropping that one report",
                              batch[0].seq, batch[0].job_id, e.details())
                    self.stats["usage_rejected"] += 1
                    self.usage.ack([batch[0].seq])
                    continue
                reason = f"{code.name}: {e.details()}"
                if reason != self._usage_unreachable:
                    log.warning("usage reports not delivered (%s); %d kept in the spool", reason, len(self.usage))
                    self._usage_unreachable = reason
                delay = self.s.usage_interval_s if code == grpc.StatusCode.UNIMPLEMENTED else 1.0
                self._usage_retry_at = time.monotonic() + delay
                return
            if self._usage_unreachable:
                log.info("usage reports delivered again (%d pending)", len(self.usage) - len(batch))
                self._usage_unreachable = ""
            if self._usage_packed and not resp.reads_counters:
                # A controller replaced by an older one: it took these reports' counters as zeros (and keeps
                # each job's maximum, so totals lag until the next report in the other form). Rare; say so.
                log.error("the controller does not read packed usage counters (an older controller?): %d "
                          "report(s) counted as zeros; sending the nested form from now on", len(batch))
            self._usage_packed = resp.reads_counters
            self.usage.ack([r.seq for r in batch])
            self.stats["usage_sent"] += len(batch)
            if resp.unknown_jobs:
                log.warning("controller dropped %d usage report(s) of jobs it does not know on this node",
                            resp.unknown_jobs)
            if self._usage_batch < USAGE_BATCH:
                self._usage_batch = min(USAGE_BATCH, self._usage_batch * 2)

    async def _usage_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            await asyncio.sleep(self.s.usage_interval_s)
            await loop.run_in_executor(self._kernel, self._sample_usage_sync)
            self._outbox_kick.set()

    def _sample_usage_sync(self) -> None:
        """Kernel thread: read the counters of every live job into the spool (one fsync for all)."""
        t0 = time.perf_counter()
        desired = self.desired
        jobs: dict[str, JobNet] = {}
        for job_id in self.runtime.running():
            job = desired.jobs.get(job_id)
            if job is None or job_id in self.finished:
                continue
            jobs[job_id] = JobNet(self.network.job_netns_path(job_id), job.mac)
        n = self._sample_jobs(jobs)
        self.accounting.retain(jobs)  # a job that went without its final reading: its map is not held forever
        self.stats["usage_sample_ms"] = round((time.perf_counter() - t0) * 1000)
        log.debug("usage: sampled %d job(s) in %.1f ms", n, (time.perf_counter() - t0) * 1000)

    def _sample_jobs(self, jobs: Mapping[str, JobNet]) -> int:
        readings = self.accounting.read(jobs)
        items = []
        for job_id, r in readings.items():
            if isinstance(r, AccountingError):
                self.stats["usage_read_errors"] += 1
                (log.warning if job_id not in self._usage_warned else log.debug)(
                    "job %s: cannot read its network counters: %s", job_id, r)
                self._usage_warned.add(job_id)
                continue
            self._usage_warned.discard(job_id)
            if r.action != "ok":
                self.stats["usage_repairs"] += 1
                log.warning("job %s: accounting counters %s: %s", job_id, r.action,
                            "; ".join(r.problems) or "were gone")
            items.append((job_id, r.sampled_ns, False, self.meter.observe(job_id, r)))
        self.usage.add(items)
        self.stats["usage_samples"] += len(items)
        return len(items)

    def _final_usage(self, ex: JobExitLike) -> None:
        """Kernel thread, at a job's end: its last counters into the spool as the final report. Read only (no
        counters are created or repaired now), after the job's orphan TCP sockets stopped sending (bounded)."""
        job_id = ex.job_id
        never_ran = ex.end_reason == "setup-failed" or ex.message == "stopped before it started"
        path = self.network.job_netns_path(job_id)
        try:
            r = self.accounting.read({job_id: JobNet(path, None)}, drain_s=0.0 if never_ran else FINAL_DRAIN_S)[job_id]
        finally:
            self.accounting.release(job_id)
        if isinstance(r, AccountingError):
            last = self.meter.last(job_id)
            if last is None:
                if not never_ran:
                    self.stats["usage_finals_missing"] += 1
                    log.error("job %s: no final network counters (%s) and no earlier sample", job_id, r)
                return
            log.error("job %s: final network counters unreadable (%s): its last sample is reported as final",
                      job_id, r)
            self.usage.add([(job_id, time.time_ns(), True, last)])
        else:
            if not r.drained:
                log.warning("job %s: TCP sockets still sending %.1f s after its end: final counters read anyway",
                            job_id, r.waited_s)
            self.usage.add([(job_id, r.sampled_ns, True, self.meter.observe(job_id, r))])
        self.stats["usage_finals"] += 1
        final = self.meter.last(job_id)
        job = self.desired.jobs.get(job_id)
        if final is not None and job is not None:
            self.metrics.job_traffic_ended(job.group, final)
        self.meter.forget(job_id)

    # ------------------------------------------------------------------ reconcile

    async def _reconcile_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            await self._dirty.wait()
            self._dirty.clear()
            desired, full = self.desired, self._full_pending
            self._full_pending = False
            try:
                await loop.run_in_executor(self._kernel, self._reconcile_sync, desired, full)
                self.applied_revision = desired.revision
            except Exception:
                self.stats["errors"] += 1
                log.exception("reconcile of revision %d failed; a full reconcile follows in 1 s",
                              desired.revision)
                await asyncio.sleep(1.0)
                self._full_pending = True
                self._dirty.set()
            self._outbox_kick.set()

    async def _resync_loop(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(self.s.resync_interval_s)
            self._full_pending = True
            self._dirty.set()

    async def _poll_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            await asyncio.sleep(self.s.poll_interval_s)
            exits = await loop.run_in_executor(self._kernel, self._poll_sync)
            if exits:
                self._dirty.set()  # stopped jobs may now be cleaned up

    def _poll_sync(self) -> list[JobExitLike]:
        exits = self.runtime.poll()
        self._jobs_ended(exits)
        return exits

    def _jobs_ended(self, exits: list[JobExitLike]) -> None:
        for ex in exits:
            self._job_ended(ex)

    def _recount_remade(self, desired: DesiredState, steps: list[Step], running: set[str]) -> None:
        """A running job whose eth0 this pass made again lost its counting programs with the old device: put
        them back now, onto the same map (the counts go on), rather than at the next sample."""
        remade = {s.job.job_id for s in steps
                  if isinstance(s, CreateJobNetwork) or (isinstance(s, ConfigureJob) and s.recreate_veth)}
        for job_id in sorted(remade & running):
            job = desired.jobs.get(job_id)
            if job is None:
                continue
            try:
                r = self.accounting.ensure(job_id, self.network.job_netns_path(job_id), job.mac)
                log.warning("job %s: eth0 made again: accounting counters %s (%s)", job_id, r.action,
                            "; ".join(r.problems) or "nothing to do")
            except AccountingError as e:
                log.error("job %s: eth0 made again, its accounting counters could not be put back: %s", job_id, e)

    def _reconcile_sync(self, desired: DesiredState, full: bool) -> None:
        """One pass. Order: stop what must not run, fix the network, start what must run, clean up."""
        t0 = time.perf_counter()
        running = self.runtime.running()
        doomed = []
        for job_id in running:
            job = desired.jobs.get(job_id)
            if job is None:
                log.info("job %s is no longer wanted on this node: killing it", job_id)
                self.runtime.stop(job_id, 0.0)
                doomed.append(job_id)
            elif not job.desired_running and job_id not in self._stopping_jobs:
                log.info("stopping job %s (grace %.0f s)", job_id, self.s.stop_grace_s)
                self.runtime.stop(job_id, self.s.stop_grace_s)
                self._stopping_jobs.add(job_id)
        if doomed:
            # The network reconcile below deletes their namespaces before poll() sees them exit: read their
            # counters now, so the final report (the last reading, see _final_usage) is not a stale sample.
            self._sample_jobs({j: JobNet(self.network.job_netns_path(j), None) for j in doomed})
        steps = self.network.reconcile(desired, full=full)
        self.stats["steps"] += len(steps)
        if full:
            # Logged even when nothing changed: "0 step(s)" is how an operator (and the restart test)
            # sees that the kernel already matched.
            log.info("full reconcile of revision %d: %d step(s) %s", desired.revision, len(steps),
                     ", ".join(sorted({type(s).__name__ for s in steps})))
        elif steps:
            log.info("reconcile of revision %d: %d step(s)", desired.revision, len(steps))
        self._recount_remade(desired, steps, set(running) - set(doomed))
        for job in desired.jobs.values():
            if job.id in running or job.id in self.finished:
                continue
            if not job.desired_running:
                self._job_ended(JobExitLike(job.id, "stopped", 0, 0, "stopped before it started"))
                continue
            netns = self.network.job_netns_path(job.id)
            try:
                # Counting starts before the job's first process exists (the runtime's barrier: network,
                # cgroup, accounting, then exec).
                acct = self.accounting.ensure(job.id, netns, job.mac)
            except AccountingError as e:
                msg = f"setup-failed: accounting: {e}"
                log.warning("job %s: %s", job.id, msg)
                self._job_ended(JobExitLike(job.id, "setup-failed", 0, 0, msg))
                continue
            if acct.action == "repaired":
                log.warning("job %s: accounting counters repaired before start: %s", job.id, "; ".join(acct.problems))
            t_launch = time.perf_counter()
            try:
                pid = self.runtime.start_job(job, netns)
                self.metrics.launch_seconds.observe(time.perf_counter() - t_launch)
            except self._setup_failed as e:
                log.warning("job %s: %s", job.id, e)
                self._job_ended(JobExitLike(job.id, "setup-failed", 0, 0, str(e)))
                continue
            log.info("job %s started, pid %d", job.id, pid)
            self.outbox.put({"job_id": job.id, "state": pb.JOB_STATE_RUNNING, "pid": pid})
        # Jobs the controller forgot (finished and acknowledged, or deleted): release what is left.
        running = self.runtime.running()
        for job_id in self.runtime.known_jobs() - set(desired.jobs) - set(running):
            self.runtime.cleanup(job_id)
        with self._ended_lock:
            gone = {j for j in self.finished if j not in desired.jobs}
            if gone:
                self.finished -= gone
                self._stopping_jobs -= gone
                self.store.save_finished(set(self.finished))
        # Spare job namespaces for the next jobs (kernel/spares.py), now that this pass's jobs run.
        try:
            prefix = self.mac_prefix
            self.network.refill_spares(
                prepare=(lambda: self.accounting.prepare_here(prefix)) if prefix else None)
        except Exception:
            log.exception("making spare job network namespaces failed")
        self.stats["reconciles"] += 1
        self.stats["full_reconciles"] += int(full)
        log.debug("reconcile of revision %d took %.1f ms", desired.revision,
                  (time.perf_counter() - t0) * 1000)

    def _job_ended(self, ex: JobExitLike) -> None:
        """Record a job's end: first its final network counters in the durable usage spool, then the report
        in the durable outbox, then the finished mark (a crash in between repeats them after the restart,
        which the controller ignores: the runtime reports an unfinished job's exit again; the other order
        could lose a report). Always called on the kernel thread (poll, recover, reconcile, drain); the lock
        also keeps the finished set consistent for readers on the loop thread."""
        with self._ended_lock:
            if ex.job_id in self.finished:
                return
            try:
                self._final_usage(ex)
            except Exception:  # never let accounting keep a job's end from being reported
                self.stats["errors"] += 1
                log.exception("job %s: final network accounting failed", ex.job_id)
            log.info("job %s ended: %s (exit %d, signal %d) %s", ex.job_id, ex.end_reason, ex.exit_code,
                     ex.signal, ex.message)
            self.outbox.put({
                "job_id": ex.job_id,
                "state": pb.JOB_STATE_FINISHED,
                "end_reason": END_REASONS.get(ex.end_reason, pb.END_REASON_UNSPECIFIED),
                "exit_code": ex.exit_code,
                "signal": ex.signal,
                "message": ex.message,
                "usage": {k: ex.usage[k] for k in USAGE_FIELDS if ex.usage.get(k) is not None},
            })
            self.finished.add(ex.job_id)
            self.store.save_finished(set(self.finished))
        if self._loop is not None:  # called from the kernel thread: wake the loop thread-safely
            self._loop.call_soon_threadsafe(self._outbox_kick.set)

    def _drain_sync(self) -> None:
        for job_id in self.runtime.running():
            self.runtime.stop(job_id, 0.0)
        deadline = time.monotonic() + 5
        while self.runtime.running() and time.monotonic() < deadline:
            self._poll_sync()
            time.sleep(0.05)
        self._poll_sync()
        for job_id in self.runtime.known_jobs():
            self.runtime.cleanup(job_id)
        self.network.reconcile(DesiredState(), full=True)

    def _close_sync(self) -> None:
        self.network.close()
        self.runtime.close()
        self.accounting.close()
        self.usage.close()


def _channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        address,
        options=[
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ],
    )
