"""The node agent: keeps the controller's desired state for this node and makes the node match it.

Three parties, one direction of truth:

    controller --WatchNode--> desired state (persisted) --reconcile--> kernel (network) + runtime (jobs)
    runtime --poll--> job exits --outbox (durable)--> controller (ReportJobStatus)

Reconcile, don't script: every pass compares the whole desired state with what the kernel and the
runtime have and fixes the difference, so a restart, a missed message or an object deleted by hand heals
itself. A pass is cheap when little changed (the network reconciler keeps a model of the kernel); a
full pass that reads the kernel anew runs at start-up, every `resync_interval_s` and after any error.

Threads: the asyncio loop talks gRPC; every kernel and runtime call runs on ONE worker thread
(`self._kernel`), so netlink sockets and runtime state never see two callers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

from nodeagent.config import AgentSettings
from nodeagent.desired import DesiredState, LocalJob, StaleDelta
from nodeagent.logs import NodeAgentService
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
    ) -> None:
        self.s = settings
        self.runtime = runtime
        self.network = network
        self._setup_failed = setup_failed
        self.boot_id = uuid.uuid4().hex
        self.store = AgentState(settings.state_dir)
        self.desired = self.store.load_desired()
        self.finished = self.store.load_finished()
        self.outbox = Outbox(settings.state_dir / "outbox.jsonl")
        self.applied_revision = 0
        self._stopping_jobs: set[str] = set()
        self._ended_lock = threading.Lock()
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
        self.stats = {"reconciles": 0, "full_reconciles": 0, "steps": 0, "errors": 0}

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, stop_jobs_on_exit: bool = False) -> None:
        loop = self._loop = asyncio.get_running_loop()
        # 1. Jobs that ended while we were away: record and report them before anything else.
        exits = await loop.run_in_executor(self._kernel, self.runtime.recover)
        for ex in exits:
            self._job_ended(ex)
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
        ]
        await self._stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if stop_jobs_on_exit:
            log.info("stopping every job and removing the node's network objects")
            await loop.run_in_executor(self._kernel, self._drain_sync)
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
            exits = await loop.run_in_executor(self._kernel, self.runtime.poll)
            for ex in exits:
                self._job_ended(ex)
            if exits:
                self._dirty.set()  # stopped jobs may now be cleaned up

    def _reconcile_sync(self, desired: DesiredState, full: bool) -> None:
        """One pass. Order: stop what must not run, fix the network, start what must run, clean up."""
        t0 = time.perf_counter()
        running = self.runtime.running()
        for job_id in running:
            job = desired.jobs.get(job_id)
            if job is None:
                log.info("job %s is no longer wanted on this node: killing it", job_id)
                self.runtime.stop(job_id, 0.0)
            elif not job.desired_running and job_id not in self._stopping_jobs:
                log.info("stopping job %s (grace %.0f s)", job_id, self.s.stop_grace_s)
                self.runtime.stop(job_id, self.s.stop_grace_s)
                self._stopping_jobs.add(job_id)
        steps = self.network.reconcile(desired, full=full)
        self.stats["steps"] += len(steps)
        if full:
            # Logged even when nothing changed: "0 step(s)" is how an operator (and the restart test)
            # sees that the kernel already matched.
            log.info("full reconcile of revision %d: %d step(s) %s", desired.revision, len(steps),
                     ", ".join(sorted({type(s).__name__ for s in steps})))
        elif steps:
            log.info("reconcile of revision %d: %d step(s)", desired.revision, len(steps))
        for job in desired.jobs.values():
            if job.id in running or job.id in self.finished:
                continue
            if not job.desired_running:
                self._job_ended(JobExitLike(job.id, "stopped", 0, 0, "stopped before it started"))
                continue
            try:
                pid = self.runtime.start_job(job, self.network.job_netns_path(job.id))
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
        self.stats["reconciles"] += 1
        self.stats["full_reconciles"] += int(full)
        log.debug("reconcile of revision %d took %.1f ms", desired.revision,
                  (time.perf_counter() - t0) * 1000)

    def _job_ended(self, ex: JobExitLike) -> None:
        """Record a job's end: first the report in the durable outbox, then the finished mark (a crash in
        between reports twice, which the controller ignores; the other order could lose the report).
        Called from the loop thread (poll) and the kernel thread (reconcile): serialised by a lock."""
        with self._ended_lock:
            if ex.job_id in self.finished:
                return
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
            for ex in self.runtime.poll():
                self._job_ended(ex)
            time.sleep(0.05)
        for ex in self.runtime.poll():
            self._job_ended(ex)
        for job_id in self.runtime.known_jobs():
            self.runtime.cleanup(job_id)
        self.network.reconcile(DesiredState(), full=True)

    def _close_sync(self) -> None:
        self.network.close()
        self.runtime.close()


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
