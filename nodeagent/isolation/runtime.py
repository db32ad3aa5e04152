"""JobRuntime: the parent (agent) side of the launch pipeline, and the job lifecycle.

    rt = JobRuntime(settings)        # starts the zygote (fork+exec of `python -S`, see zygote.py)
    pid = rt.start(LaunchRequest(job_id, command, netns_path, spec))
    rt.stop(job_id, grace_s=10.0)    # SIGTERM now, SIGKILL of the whole cgroup after the grace (done by poll())
    rt.poll() -> list[JobExit]       # call periodically (e.g. every 100-200 ms); also enforces stop deadlines
    rt.recover() -> list[JobExit]    # after an agent restart: adopt running jobs, report the ones that died
    rt.cleanup(job_id)               # idempotent: cgroup, scratch, state gone
    rt.close()                       # the zygote leaves once its job inits are gone; jobs keep running

A launch is a `LaunchPlan` (data, built and validated first) executed as ordered host-side steps, each with
its undo; the in-namespace steps run in the job's init (launcher.py) behind the barrier. Any failure rolls back
every step done and raises `SetupFailed(step, cause)`. The zygote is started with fork+exec, so the runtime can
be constructed at any time, even after threads or gRPC channels exist; it only needs its own process to stay
the zygote's parent (do not construct it in a process that then forks without exec).

Warm slots (settings.warm_slots, default 2): a background thread ("jn-warm") keeps pre-forked inits already
attached to a cgroup with the site's default limits, each with its state and scratch dirs made ahead; a job with
the default limits launches through one (no fork, no cgroup creation or migration, no inode creation on its
path). The thread refills only when no launch ran for WARM_QUIET_S.

Thread safety: every public method may be called from any thread; launches run concurrently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import queue
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import linux, protocol
from .plan import LaunchPlan, build_plan
from .spec import (
    DEFAULT_MOUNT_UNDER_SCRATCH,
    JobExit,
    LaunchRequest,
    RuntimeSettings,
    SetupFailed,
    SpecError,
    UnknownJob,
    ZygoteError,
    job_defaults,
    scratch_name,
)
from .state import InitIdentity, JobState, list_job_ids

log = logging.getLogger(__name__)

NS_GET_NSTYPE = 0xB703
WARM_QUIET_S = 0.005  # warm slots are refilled only after this long without a launch
_WARM_NAME = re.compile(r"w[0-9a-f]{10}")  # the cgroup (and hidden dir) names of warm launch slots
REAPERS = 4  # at most this many threads finish cleanups (mostly waiting on cgroupfs and the file system)
_PKG_PARENT = str(Path(__file__).resolve().parents[2])
_BOOT = (
    "import sys; sys.path.insert(0, {path!r}); "
    "from nodeagent.isolation.zygote import main; main()"
)


class JobCgroupLike(Protocol):
    """What the runtime uses of nodeagent.isolation.cgroups.JobCgroup."""

    def attach(self, pid: int, /) -> None: ...
    def usage(self) -> Any: ...
    def oom_killed(self) -> bool: ...
    def kill_all(self) -> None: ...
    def wait_empty(self, timeout: float, /) -> Any: ...
    def rename(self, job_id: str, /) -> None: ...  # called only if the manager's `can_rename` is true
    def destroy(self) -> None: ...


class CgroupManagerLike(Protocol):
    """What the runtime uses of nodeagent.isolation.cgroups.CgroupManager (and its `can_rename`, if present)."""

    def create(self, job_id: str, limits: Any, /) -> Any: ...
    def open(self, job_id: str, /) -> Any: ...
    def list_jobs(self) -> Any: ...
    def close(self) -> None: ...


@dataclass
class _Job:
    job_id: str
    pid: int
    pidfd: int
    cgroup: JobCgroupLike | None
    state: JobState
    scratch_dir: Path
    stop_deadline: float | None = None
    killed: bool = False
    exited: bool = False
    started_at: float = field(default_factory=time.monotonic)
    cgroup_name: str = ""
    warm_slot: str = ""  # the warm slot it was launched through (its name stays reserved until start() returns)


@dataclass
class _Skeleton:
    """A job's state and scratch dirs made ahead of time (hidden names `.w<hex>`), files already open: a launch
    renames them into place instead of creating ~8 inodes (each 0.1-0.5 ms on a busy ext4)."""

    state_dir: Path
    scratch_dir: Path
    mount_dirs: tuple[str, ...]  # names of the MOUNT_UNDER_SCRATCH dirs made in scratch_dir
    plan_fd: int
    pid_fd: int
    status_fd: int
    stdio: list[int]  # stdin (/dev/null), stdout, stderr

    def close(self) -> None:
        """Idempotent (fd numbers are never closed twice: another thread may have reused them)."""
        for fd in (self.plan_fd, self.pid_fd, self.status_fd, *self.stdio):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.plan_fd = self.pid_fd = self.status_fd = -1
        self.stdio = []

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)
        shutil.rmtree(self.scratch_dir, ignore_errors=True)


@dataclass
class _Warm:
    """A pre-forked job init (PID 1 of its own PID ns) already attached to a cgroup with the site's default
    limits, waiting for a launch on `ctl`. Saves the fork, the cgroup creation and, above all, the cgroup
    migration (on cgroup v1 an RCU grace period: 10-40 ms when migrations are rare) on the launch path."""

    cg_name: str
    cgroup: JobCgroupLike
    pid: int
    pidfd: int
    ctl: socket.socket
    skel: _Skeleton | None = None

    def discard(self) -> None:
        if self.skel is not None:
            self.skel.discard()
        with contextlib.suppress(OSError):
            self.ctl.close()
        _kill_and_wait(self.pidfd)
        with contextlib.suppress(OSError):
            os.close(self.pidfd)
        with contextlib.suppress(Exception):
            _destroy_cgroup(self.cgroup)


@dataclass
class _Reap:
    """What cleanup() leaves to the reaper threads: a killed init, the job's cgroup, its dirs (renamed to hidden
    tomb names, so no listing sees the job any more)."""

    job_id: str
    init_killed: bool  # the init got SIGKILL (or had exited): its PID namespace empties by itself
    cgroup: JobCgroupLike | None
    cgroup_name: str
    dirs: list[Path]
    attempts: int = 0
    kernel_done: bool = False  # processes and cgroup gone; the dirs (already invisible under their names) next


class _Rollback:
    """Ordered steps with undo: `do(step, fn, undo)`; on failure, undo everything done in reverse order."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.undo: list[tuple[str, Callable[[], None]]] = []

    def do(self, step: str, fn: Callable[[], Any], undo: Callable[[], None] | None = None) -> Any:
        try:
            result = fn()
        except SetupFailed:
            raise
        except Exception as e:
            raise SetupFailed(step, _cause(e), self.job_id) from e
        if undo is not None:
            self.undo.append((step, undo))
        return result

    def rollback(self) -> None:
        for step, fn in reversed(self.undo):
            try:
                fn()
            except Exception:
                log.exception("job %s: undo of step %s failed", self.job_id, step)
        self.undo.clear()


def _cause(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e) or type(e).__name__


def _usage_dict(u: Any) -> dict[str, Any]:
    if u is None:
        return {}
    if dataclasses.is_dataclass(u) and not isinstance(u, type):
        return dataclasses.asdict(u)
    if isinstance(u, dict):
        return dict(u)
    return dict(vars(u))


class JobRuntime:
    def __init__(self, settings: RuntimeSettings, cgroups: CgroupManagerLike | None = None) -> None:
        self.settings = settings
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        settings.scratch_root.mkdir(parents=True, exist_ok=True, mode=0o711)
        self._own_cg = cgroups is None  # close() closes the manager only if we made it
        if cgroups is None:
            from .cgroups import detect

            cgroups = detect(root=settings.cgroup_root, parent=settings.cgroup_parent)
        self._cg: CgroupManagerLike = cgroups
        self._lock = threading.Lock()
        self._zlock = threading.Lock()
        self._jobs: dict[str, _Job] = {}  # running (started or adopted)
        self._done: dict[str, _Job] = {}  # exited, not cleaned up yet
        self._launching: set[str] = set()
        self._zsock, self._zproc = self._start_zygote()
        self._warm: list[_Warm] = []
        self._warm_names: set[str] = set()  # cgroups of warm slots (being) made: not orphans for recover()
        self._warm_wake = threading.Event()
        self._last_launch = 0.0
        self._closed = False
        self._reaping: dict[str, _Reap] = {}  # cleaned up, not yet gone from the kernel and the disk
        self._reaped = threading.Condition(self._lock)
        # (stage, seq, item): every cgroup (stage 0) goes before any directory removal (stage 1); 2 = stop
        self._reap_q: queue.PriorityQueue[tuple[int, int, _Reap | None]] = queue.PriorityQueue()
        self._reap_seq = 0
        self._reap_errors: list[str] = []
        self._reapers: list[threading.Thread] = []
        try:  # the limits of a job that asks for nothing: what warm slots are made with
            self._default_limits = job_defaults(settings).limits
        except SpecError as e:
            log.error("the site defaults do not fit the site maximum (%s): jobs that rely on them will fail", e.cause)
            self._default_limits = settings.defaults.limits
        self._warm_thread: threading.Thread | None = None
        if settings.warm_slots > 0:
            self._warm_thread = threading.Thread(target=self._refill_loop, name="jn-warm", daemon=True)
            self._warm_thread.start()
            self._warm_wake.set()

    # -- zygote ------------------------------------------------------------------------------------------

    def _start_zygote(self) -> tuple[socket.socket, subprocess.Popen[bytes]]:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        python = self.settings.python or sys.executable
        try:
            proc = subprocess.Popen(
                [python, "-S", "-c", _BOOT.format(path=_PKG_PARENT), str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                start_new_session=True, close_fds=True,
            )
        except OSError as e:
            mine.close()
            raise ZygoteError(f"cannot start the zygote with {python}: {e}") from e
        finally:
            theirs.close()
        mine.settimeout(30.0)
        try:
            hello, _ = protocol.recv(mine)
        except OSError as e:
            hello = None
            log.error("zygote handshake failed: %s", e)
        if not hello or "hello" not in hello:
            proc.kill()
            proc.wait()
            mine.close()
            raise ZygoteError("the zygote did not start (no hello)")
        mine.settimeout(None)
        return mine, proc

    @property
    def zygote_pid(self) -> int:
        return self._zproc.pid

    def close(self) -> None:
        """Stop the zygote (it lingers only to reap the inits of still-running jobs). Jobs keep running."""
        self._closed = True
        self._warm_wake.set()
        if not self.wait_reaped(10.0):
            log.error("jobs still being cleaned up at close(): %s (recover() finishes them)", sorted(self._reaping))
        for _ in self._reapers:
            self._reap_q.put((2, 0, None))
        for t in self._reapers:
            t.join(timeout=5)
        if self._warm_thread is not None:
            self._warm_thread.join(timeout=5)
        with self._lock:
            warm, self._warm = self._warm, []
        for w in warm:
            w.discard()
        with self._zlock:
            self._zsock.close()
        with self._lock:
            jobs_alive = bool(self._jobs)
        if jobs_alive:  # the zygote stays to reap their inits: do not wait for it
            self._zproc.poll()
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._zproc.wait(timeout=0.5)
        with self._lock:
            for j in [*self._jobs.values(), *self._done.values()]:
                with contextlib.suppress(OSError):
                    os.close(j.pidfd)
            self._jobs.clear()
            self._done.clear()
        if self._own_cg:
            with contextlib.suppress(Exception):
                self._cg.close()

    # -- warm slots --------------------------------------------------------------------------------------

    def wait_warm(self, timeout: float = 5.0) -> int:
        """Wait until every warm slot is ready (at most `timeout` s); the number ready. For tests and benches."""
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                n = len(self._warm)
            if n >= self.settings.warm_slots or time.monotonic() >= end:
                return n
            time.sleep(0.005)

    def _refill_loop(self) -> None:
        while not self._closed:
            self._warm_wake.wait()
            self._warm_wake.clear()
            while not self._closed:
                with self._lock:
                    if len(self._warm) >= self.settings.warm_slots:
                        break
                    busy = bool(self._launching) or time.monotonic() - self._last_launch < WARM_QUIET_S
                if busy:
                    # refill in quiet moments only: a cgroup migration holds cgroup_mutex (on v1 for an RCU
                    # grace period), which would stall the cgroup steps of launches running now
                    time.sleep(WARM_QUIET_S)
                    continue
                try:
                    w = self._make_warm()
                except Exception as e:
                    log.warning("cannot prepare a warm launch slot: %s", e)
                    break
                with self._lock:
                    if self._closed:
                        w.discard()
                        return
                    self._warm.append(w)

    def _make_warm(self) -> _Warm:
        name = f"w{os.urandom(5).hex()}"  # (what _WARM_NAME matches)
        with self._lock:
            self._warm_names.add(name)
        limits = self._default_limits if self._default_limits is not None else _default_cgroup_limits()
        cg: JobCgroupLike = self._cg.create(name, limits)
        ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pidfd = -1
        try:
            ctl.settimeout(self.settings.setup_timeout_s)
            try:
                self._send_zygote({"warm": True}, [theirs.fileno()])
            finally:
                theirs.close()
            msg, _ = protocol.recv(ctl)
            if not msg or "pid" not in msg:
                raise ZygoteError(f"no warm spare from the zygote: {msg}")
            pid = int(msg["pid"])
            pidfd = os.pidfd_open(pid)
            cg.attach(pid)
            skel = self._make_skeleton(name)
            if skel is None:
                raise OSError(f"cannot prepare the state and scratch dirs of warm slot {name}")
            return _Warm(name, cg, pid, pidfd, ctl, skel)
        except BaseException:
            ctl.close()
            if pidfd >= 0:
                _kill_and_wait(pidfd)
                os.close(pidfd)
            _destroy_cgroup(cg)
            with self._lock:
                self._warm_names.discard(name)
            raise

    def _make_skeleton(self, name: str) -> _Skeleton | None:
        mus = self.settings.defaults.mount_under_scratch
        mount_dirs = tuple(scratch_name(d) for d in (mus if mus is not None else DEFAULT_MOUNT_UNDER_SCRATCH))
        state_dir = self.settings.state_dir / f".{name}"
        scratch = self.settings.scratch_root / f".{name}"
        fds: list[int] = []
        try:
            state_dir.mkdir(mode=0o700)
            scratch.mkdir(mode=0o700)
            for d in mount_dirs:
                os.mkdir(scratch / d, 0o1777)
                os.chmod(scratch / d, 0o1777)
            wflags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
            for path, mode in ((state_dir / "plan.json", 0o600), (state_dir / "pid.json", 0o600),
                               (state_dir / "status", 0o600)):
                fds.append(os.open(path, wflags, mode))
            fds.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
            for n in ("stdout", "stderr"):
                fds.append(os.open(scratch / n, wflags | os.O_APPEND, 0o644))
        except OSError as e:
            for fd in fds:
                os.close(fd)
            shutil.rmtree(state_dir, ignore_errors=True)
            shutil.rmtree(scratch, ignore_errors=True)
            log.warning("cannot prepare a launch skeleton: %s", e)
            return None
        return _Skeleton(state_dir, scratch, mount_dirs, fds[0], fds[1], fds[2], fds[3:])

    def _take_warm(self, plan: LaunchPlan) -> _Warm | None:
        """A warm slot if the job runs with the site's default cgroup limits (the slot's cgroup has those).
        A slot whose init died while it waited (killed by someone, out of memory) is discarded, not used: the
        job takes the next slot or the cold path instead of failing on a dead init."""
        if plan.spec.limits != self._default_limits:
            return None
        self._warm_wake.set()
        while True:
            with self._lock:
                w = self._warm.pop() if self._warm else None
            if w is None or not _exited(w.pidfd):
                return w
            log.warning("warm launch slot %s: its init (pid %d) died before a launch; discarded", w.cg_name, w.pid)
            self._drop_warm(w)

    def _drop_warm(self, w: _Warm) -> None:
        w.discard()
        with self._lock:
            self._warm_names.discard(w.cg_name)

    # -- start -------------------------------------------------------------------------------------------

    def start(self, req: LaunchRequest) -> int:
        """Launch a job; return its init's pid once the job has passed the barrier and exec'd."""
        plan = build_plan(self.settings, req)
        with self._lock:
            # the same id again right after its cleanup(): wait until the old cgroup and dirs are gone
            self._reaped.wait_for(lambda: req.job_id not in self._reaping, timeout=self.settings.setup_timeout_s)
            if req.job_id in self._reaping:
                raise SpecError(f"job {req.job_id} is still being cleaned up", req.job_id)
            if req.job_id in self._jobs or req.job_id in self._done or req.job_id in self._launching:
                raise SpecError(f"job {req.job_id} already exists", req.job_id)
            self._launching.add(req.job_id)
            self._last_launch = time.monotonic()
        rb = _Rollback(req.job_id)
        try:
            job = self._launch(plan, rb)
        except BaseException:
            rb.rollback()
            with self._lock:
                self._launching.discard(req.job_id)
                self._last_launch = time.monotonic()
            raise
        with self._lock:  # one step: recover() must always find the job's cgroup under one of these names
            self._launching.discard(req.job_id)
            self._last_launch = time.monotonic()
            self._jobs[req.job_id] = job
            self._warm_names.discard(job.warm_slot)
        return job.pid

    def _launch(self, plan: LaunchPlan, rb: _Rollback) -> _Job:
        st = JobState(self.settings.state_dir, plan.job_id)
        warm = self._take_warm(plan)
        if warm is not None:
            rb.undo.append(("warm", lambda: self._drop_warm(warm)))
        # a warm slot's cgroup gets the job's name where the hierarchy allows a rename (v1); else it keeps its own
        rename = warm is not None and bool(getattr(self._cg, "can_rename", False))
        cg_name = warm.cg_name if warm is not None and not rename else plan.job_id
        plan_json = {"job_id": plan.job_id, "scratch_dir": str(plan.scratch_dir), "netns_path": str(plan.netns_path),
                     "command": list(plan.child.command), "cgroup": cg_name}
        if warm is not None:
            plan_json["warm_slot"] = warm.cg_name
        if warm is not None and warm.skel is not None:
            return self._launch_warm(plan, rb, st, warm, warm.skel, plan_json, rename)
        rb.do("state", lambda: st.create(plan_json), st.remove)
        fds: list[int] = []

        def close_fds() -> None:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            fds.clear()

        rb.undo.append(("fds", close_fds))
        rb.do("scratch", lambda: fds.extend(self._make_scratch(plan)),
              lambda: shutil.rmtree(plan.scratch_dir, ignore_errors=True))
        if plan.child.rootfs is not None:
            rb.do("rootfs", lambda: self._check_rootfs(plan))
        rb.do("netns", lambda: fds.insert(0, _open_netns(plan.netns_path)))
        fds.append(rb.do("status-file", lambda: os.open(
            st.status_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)))
        limits = plan.spec.limits if plan.spec.limits is not None else _default_cgroup_limits()
        cg: JobCgroupLike = rb.do("cgroup", lambda: self._cg.create(plan.job_id, limits))
        rb.undo.append(("cgroup", lambda: _destroy_cgroup(cg)))

        # spawn: the zygote forks the job's init into new PID ns; it reports the pid on our ctl socket.
        ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        rb.undo.append(("ctl", ctl.close))
        ctl.settimeout(self.settings.setup_timeout_s)
        try:
            rb.do("spawn", lambda: self._send_zygote({"plan": plan.child.to_json()}, [theirs.fileno(), *fds]))
        finally:
            theirs.close()
            close_fds()
        stash: list[dict[str, Any]] = []
        msg = self._expect(ctl, "spawn", "pid", plan, stash)
        pid = int(msg["pid"])
        try:
            pidfd: int = rb.do("spawn", lambda: os.pidfd_open(pid))
        except SetupFailed:
            self._init_error(ctl, stash, plan)  # the init died already: report its own reason if it sent one
            raise
        rb.undo.append(("spawn", lambda: _kill_and_wait(pidfd)))
        starttime = linux.proc_starttime(pid)
        rb.do("spawn", lambda: st.write_init(InitIdentity(pid, starttime or 0)))
        try:
            rb.do("cgroup-attach", lambda: cg.attach(pid))
        except SetupFailed:
            self._init_error(ctl, stash, plan)
            raise
        ready = self._expect(ctl, "mount", "ready", plan, stash)
        log.debug("job %s: in-namespace steps (ms): %s", plan.job_id, ready.get("ms"))
        rb.do("barrier", lambda: protocol.send(ctl, {"go": True}))
        self._expect(ctl, "exec", "exec", plan, stash)
        rb.undo.clear()
        ctl.close()
        return _Job(plan.job_id, pid, pidfd, cg, st, plan.scratch_dir, cgroup_name=plan.job_id)

    def _launch_warm(self, plan: LaunchPlan, rb: _Rollback, st: JobState, warm: _Warm, skel: _Skeleton,
                     plan_json: dict[str, Any], rename: bool) -> _Job:
        """The launch through a warm slot: the init exists and sits in its cgroup, the state and scratch dirs
        exist with their files open; they are renamed into place and the init gets the plan directly. With
        `rename` (cgroup v1) the slot's cgroup is renamed to the job's while the init sets up its namespaces,
        so the job runs in `<parent>/jn-<job_id>` from its first instruction; plan.json names the cgroup
        (written before the rename: after a crash, recover() finds it under either name)."""
        rb.do("state", lambda: linux.rename_noreplace(skel.state_dir, st.dir), st.remove)
        rb.do("state", lambda: os.write(skel.plan_fd, json.dumps(plan_json).encode()))
        rb.do("scratch", lambda: linux.rename_noreplace(skel.scratch_dir, plan.scratch_dir),
              lambda: shutil.rmtree(plan.scratch_dir, ignore_errors=True))
        rb.do("scratch", lambda: _own_scratch(plan, skel.mount_dirs))
        if plan.child.rootfs is not None:
            rb.do("rootfs", lambda: self._check_rootfs(plan))
        netns_fd: int = rb.do("netns", lambda: _open_netns(plan.netns_path))
        ctl = warm.ctl
        try:
            rb.do("spawn", lambda: protocol.send(ctl, {"plan": plan.child.to_json()},
                                                 [netns_fd, *skel.stdio, skel.status_fd]))
        finally:
            os.close(netns_fd)
        rb.do("spawn", lambda: os.write(skel.pid_fd, json.dumps(
            {"pid": warm.pid, "starttime": linux.proc_starttime(warm.pid) or 0}).encode()))
        skel.close()
        if rename:  # the undo (warm.discard) destroys the cgroup under whatever name it has by then
            rb.do("cgroup-rename", lambda: warm.cgroup.rename(plan.job_id))
        stash: list[dict[str, Any]] = []
        ready = self._expect(ctl, "mount", "ready", plan, stash)
        log.debug("job %s: in-namespace steps (ms): %s", plan.job_id, ready.get("ms"))
        rb.do("barrier", lambda: protocol.send(ctl, {"go": True}))
        self._expect(ctl, "exec", "exec", plan, stash)
        rb.undo.clear()
        ctl.close()
        return _Job(plan.job_id, warm.pid, warm.pidfd, warm.cgroup, st, plan.scratch_dir,
                    cgroup_name=str(plan_json["cgroup"]), warm_slot=warm.cg_name)

    def _send_zygote(self, msg: dict[str, Any], fds: list[int]) -> None:
        with self._zlock:
            try:
                protocol.send(self._zsock, msg, fds)
                return
            except OSError as e:
                if self._zsock.fileno() < 0:  # close() was called
                    raise ZygoteError("the runtime is closed") from e
                log.error("the zygote (pid %d) is gone (%s): starting a new one", self._zproc.pid, _cause(e))
            self._zsock.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._zproc.wait(timeout=0.1)
            self._zsock, self._zproc = self._start_zygote()
            try:
                protocol.send(self._zsock, msg, fds)
            except OSError as e:
                raise ZygoteError(f"the zygote is gone: {_cause(e)}") from e

    def _expect(self, ctl: socket.socket, step: str, key: str, plan: LaunchPlan,
                stash: list[dict[str, Any]]) -> dict[str, Any]:
        """The next message carrying `key`. The zygote's {pid} and the init's {ready} come from two processes
        and may arrive in either order: messages that are not yet wanted wait in `stash`."""
        while True:
            for i, m in enumerate(stash):
                if key in m:
                    return stash.pop(i)
            try:
                msg, extra = protocol.recv(ctl)
            except TimeoutError as e:
                raise SetupFailed(step, f"timed out after {self.settings.setup_timeout_s}s", plan.job_id) from e
            except OSError as e:
                raise SetupFailed(step, _cause(e), plan.job_id) from e
            for fd in extra:
                os.close(fd)
            if msg is None:
                raise SetupFailed(step, "the job's init exited unexpectedly", plan.job_id)
            stash.append(msg)
            if "error" in msg:
                raise SetupFailed(str(msg["error"]), str(msg.get("cause", "")), plan.job_id)

    def _init_error(self, ctl: socket.socket, stash: list[dict[str, Any]], plan: LaunchPlan) -> None:
        """After a host-side step failed because the init is gone: raise the init's own error if it sent one
        (e.g. "mount-scratch: ..."), else return and let the caller raise its own."""
        ctl.settimeout(0.5)
        with contextlib.suppress(SetupFailed):
            self._expect(ctl, "spawn", "\0never", plan, stash)
        for m in stash:
            if "error" in m:
                raise SetupFailed(str(m["error"]), str(m.get("cause", "")), plan.job_id)

    def _make_scratch(self, plan: LaunchPlan) -> list[int]:
        """Create scratch_root/<job>/ (owned by the job's uid, 0700) with one dir per MOUNT_UNDER_SCRATCH
        entry; open stdin (/dev/null), stdout and stderr. Returns [stdin, stdout, stderr]."""
        uid, gid = plan.child.uid, plan.child.gid
        plan.scratch_dir.mkdir(mode=0o700)
        os.chown(plan.scratch_dir, uid, gid)
        for b in plan.child.binds:
            os.mkdir(b.source, 0o1777)
            os.chmod(b.source, 0o1777)
            os.chown(b.source, uid, gid)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_APPEND
        out: list[int] = []
        try:
            out.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
            out.append(os.open(plan.stdout_path, flags, 0o644))
            out.append(os.open(plan.stderr_path, flags, 0o644))
        except OSError:
            for fd in out:
                os.close(fd)
            raise
        return out

    def _check_rootfs(self, plan: LaunchPlan) -> None:
        root = Path(plan.child.rootfs or "")
        if not root.is_dir():
            raise FileNotFoundError(2, "rootfs is not a directory", str(root))
        for target in [b.target for b in plan.child.binds] + [plan.child.scratch_in_job, "/proc", "/dev", "/sys"]:
            (root / target.lstrip("/")).mkdir(parents=True, exist_ok=True)

    # -- lifecycle ---------------------------------------------------------------------------------------

    def running(self) -> dict[str, int]:
        with self._lock:
            return {j.job_id: j.pid for j in self._jobs.values()}

    def stop(self, job_id: str, grace_s: float = 10.0) -> None:
        """SIGTERM to the job now (its init forwards it to the job's process group); SIGKILL once the grace has
        passed (enforced by poll()), at once with grace 0. Non-blocking; idempotent."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                if job_id in self._done:
                    return
                raise UnknownJob(job_id)
        job.stop_deadline = job.state.request_stop(time.time() + max(grace_s, 0.0))
        if grace_s <= 0:
            self._kill(job)
            return
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(job.pidfd, signal.SIGTERM)

    def _kill(self, job: _Job) -> None:
        """SIGKILL of the job's init, PID 1 of the job's PID namespace: the kernel then kills every process of
        the namespace, and with it every process of the job (a job process cannot leave its PID namespace, nor,
        unprivileged, its cgroup), before the init is reported exited. The cgroup's own kill (freeze, kill,
        thaw) runs in the reaper after cleanup() as a safety net."""
        job.killed = True
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(job.pidfd, signal.SIGKILL)

    def exit_fds(self) -> dict[str, int]:
        """job_id -> pidfd of its init (readable once the job ended): for an event loop that wants to wake
        up instead of polling."""
        with self._lock:
            return {j.job_id: j.pidfd for j in self._jobs.values()}

    def poll(self) -> list[JobExit]:
        """Jobs that ended since the last call (each reported once). Also enforces stop deadlines."""
        with self._lock:
            jobs = list(self._jobs.values())
        if not jobs:
            return []
        now = time.time()
        for j in jobs:
            if j.stop_deadline is not None and now >= j.stop_deadline and not j.killed:
                self._kill(j)
        p = select.poll()
        by_fd = {j.pidfd: j for j in jobs}
        for fd in by_fd:
            p.register(fd, select.POLLIN)
        exits: list[JobExit] = []
        for fd, _ev in p.poll(0):
            j = by_fd[fd]
            exits.append(self._finish(j))
        return exits

    def _finish(self, j: _Job) -> JobExit:
        ex = _exit_of(j.job_id, j.state, j.cgroup, j.stop_deadline is not None)
        with self._lock:
            self._jobs.pop(j.job_id, None)
            j.exited = True
            self._done[j.job_id] = j
        return ex

    def recover(self) -> list[JobExit]:
        """Adopt the jobs a previous agent left running (poll/stop track them from now on) and report the ones
        that died meanwhile (clean them up with cleanup()). Removes cgroups and scratch dirs without a job."""
        exits: list[JobExit] = []
        ids = list_job_ids(self.settings.state_dir)
        for job_id in ids:
            with self._lock:
                if job_id in self._jobs or job_id in self._done or job_id in self._launching:
                    continue
            st = JobState(self.settings.state_dir, job_id)
            plan = st.plan() or {}
            scratch = Path(plan.get("scratch_dir") or self.settings.scratch_root / job_id)
            cg = self._open_cgroup(str(plan.get("cgroup") or job_id))
            ident = st.init()
            pidfd = _adopt(ident)
            if ident is not None and pidfd is not None:
                job = _Job(job_id, ident.pid, pidfd, cg, st, scratch, stop_deadline=st.stop_deadline(),
                           cgroup_name=str(plan.get("cgroup") or job_id))
                with self._lock:
                    self._jobs[job_id] = job
                log.info("job %s: adopted running init %d", job_id, ident.pid)
                continue
            if cg is not None:
                with contextlib.suppress(Exception):
                    cg.kill_all()
            ex = _exit_of(job_id, st, cg, st.stop_deadline() is not None)
            if ident is None and ex.end_reason != "setup-failed":
                ex = JobExit(job_id, "setup-failed", message="the agent stopped during setup", usage=ex.usage)
            with self._lock:
                self._done[job_id] = _Job(job_id, ident.pid if ident else 0, -1, cg, st, scratch, exited=True)
            exits.append(ex)
        known = set(ids)
        known_cgroups = {str((JobState(self.settings.state_dir, j).plan() or {}).get("cgroup") or j) for j in ids}
        try:
            listed = list(self._cg.list_jobs())
            # What to keep is read after the listing: a warm slot (being) made or a launch running now has its
            # name in _warm_names / _launching before its cgroup exists and until it is a job in _jobs, so every
            # cgroup the listing saw of theirs is kept (read before the listing, the warm thread's first slot,
            # made while an agent starts, was taken for an orphan and its init killed).
            with self._lock:
                keep = (known_cgroups | self._warm_names | self._launching
                        | {j.cgroup_name for j in [*self._jobs.values(), *self._done.values()]}
                        | {r.cgroup_name for r in self._reaping.values()})
            orphans = [j for j in listed if j not in keep]
        except Exception:
            log.exception("listing job cgroups failed")
            orphans = []
        for job_id in orphans:
            cg = self._open_cgroup(job_id)
            if cg is not None:
                if _WARM_NAME.fullmatch(job_id):  # expected after the agent was killed: not worth a warning
                    log.info("removing the warm launch slot %s of a previous agent", job_id)
                else:
                    log.warning("job %s: removing a cgroup without a job", job_id)
                try:
                    _destroy_cgroup(cg)
                except Exception:  # one stuck cgroup must not stop the recovery of the others
                    log.exception("cgroup %s: cannot remove it", job_id)
        for root in (self.settings.scratch_root, self.settings.state_dir):
            with contextlib.suppress(FileNotFoundError):
                for d in root.iterdir():
                    if d.name in known or not d.is_dir():
                        continue
                    with self._lock:
                        busy = (d.name in self._launching or d.name in self._jobs
                                or d.name.lstrip(".") in self._warm_names
                                or any(d in r.dirs for r in self._reaping.values()))
                    if not busy and (root == self.settings.scratch_root or d.name.startswith(".")):
                        shutil.rmtree(d, ignore_errors=True)
        return exits

    def _open_cgroup(self, job_id: str) -> JobCgroupLike | None:
        try:
            cg: JobCgroupLike = self._cg.open(job_id)
        except Exception:
            return None
        return cg

    def cleanup(self, job_id: str) -> None:
        """Kill whatever is left of the job and release its cgroup, scratch dir and state. Idempotent.

        Returns once the job's init is SIGKILLed (the kernel kills the rest of its PID namespace) and its state
        and scratch dirs are renamed to hidden tomb names (no listing, known job or new launch sees them): the
        waiting for the processes to die, the cgroup's kill and removal and the removal of the dirs run in the
        reaper threads ("jn-reap<n>", up to REAPERS). `wait_reaped()` waits for that; `close()` does too; a
        failure is retried, logged and listed in `reap_errors()`; after an agent crash `recover()` removes
        whatever is left.
        """
        with self._lock:
            job = self._jobs.pop(job_id, None) or self._done.pop(job_id, None)
            if job is None and job_id in self._reaping:
                return
            item = self._reaping[job_id] = _Reap(job_id, False, None, job_id, [])  # a start() of it waits now
        st = job.state if job is not None else JobState(self.settings.state_dir, job_id)
        plan = (st.plan() or {}) if job is None or not job.cgroup_name else {}
        cg_name = job.cgroup_name if job is not None and job.cgroup_name else str(plan.get("cgroup") or job_id)
        cg = job.cgroup if job is not None and job.cgroup is not None else self._open_cgroup(cg_name)
        init_killed = job is not None and (job.exited or job.pidfd >= 0)
        if job is not None and job.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(job.pidfd, signal.SIGKILL)
            # closed now, not by the reaper: an open pidfd pins the init's struct pid and with it the job's
            # PID namespace (the zygote reaps the init)
            os.close(job.pidfd)
            job.pidfd = -1
        dirs = {st.dir, self.settings.scratch_root / job_id}
        if job is not None:
            dirs.add(job.scratch_dir)
        tag = os.urandom(5).hex()
        tombs: list[Path] = []
        for d in sorted(dirs):
            tomb = d.parent / f".z{tag}-{d.name}"  # hidden: not a job for list_job_ids(), recover() removes it
            try:
                os.rename(d, tomb)
                tombs.append(tomb)
            except FileNotFoundError:
                continue
            except OSError as e:
                log.warning("job %s: cannot rename %s (%s): removed by the reaper under its name", job_id, d, e)
                tombs.append(d)
        with self._lock:
            item.init_killed, item.cgroup, item.cgroup_name, item.dirs = init_killed, cg, cg_name, tombs
            if len(self._reapers) < min(REAPERS, len(self._reaping)):  # more when cleanups pile up
                t = threading.Thread(target=self._reap_loop, name=f"jn-reap{len(self._reapers)}", daemon=True)
                t.start()
                self._reapers.append(t)
        self._reap_put(item)

    def _reap_put(self, item: _Reap) -> None:
        with self._lock:
            self._reap_seq += 1
            seq = self._reap_seq
        self._reap_q.put((1 if item.kernel_done else 0, seq, item))

    def wait_reaped(self, timeout: float = 5.0) -> bool:
        """Wait until every cleaned-up job is gone (processes, cgroup, dirs); False after `timeout`."""
        with self._lock:
            return self._reaped.wait_for(lambda: not self._reaping, timeout=timeout)

    def reap_errors(self) -> list[str]:
        """Cleanups the reaper gave up on (each also logged): what recover() at the next start will remove."""
        with self._lock:
            return list(self._reap_errors)

    def _reap_loop(self) -> None:
        while True:
            _, _, item = self._reap_q.get()
            if item is None:
                return
            try:
                if not item.kernel_done:
                    self._reap_kernel(item)
                    item.kernel_done, item.attempts = True, 0
                    self._reap_put(item)  # the dirs after every pending cgroup
                    continue
                self._reap_dirs(item)
            except Exception as e:
                item.attempts += 1
                if item.attempts < 5 and not self._closed:
                    log.warning("job %s: cleanup failed (%s), retrying", item.job_id, _cause(e))
                    threading.Timer(0.2 * item.attempts, self._reap_put, (item,)).start()
                    continue
                log.exception("job %s: cleanup failed, giving up", item.job_id)
                with self._lock:
                    self._reap_errors.append(f"{item.job_id}: {_cause(e)}")
            with self._lock:
                if self._reaping.get(item.job_id) is item:
                    del self._reaping[item.job_id]
                self._reaped.notify_all()

    def _reap_kernel(self, item: _Reap) -> None:
        if item.cgroup is not None:
            if item.init_killed and item.attempts == 0:  # the kernel empties the PID namespace: no freezing
                with contextlib.suppress(Exception):
                    item.cgroup.wait_empty(2.0)
            _destroy_cgroup(item.cgroup)  # kill_all (a safety net: normally empty by now), rmdir

    def _reap_dirs(self, item: _Reap) -> None:
        for d in item.dirs:
            shutil.rmtree(d, ignore_errors=True)
        left = [str(d) for d in item.dirs if d.exists()]
        if left:
            raise OSError(f"not removed: {', '.join(left)}")


# -- helpers ---------------------------------------------------------------------------------------------


def _own_scratch(plan: LaunchPlan, made: tuple[str, ...]) -> None:
    """Give a pre-made scratch dir to the job's uid/gid; make the MOUNT_UNDER_SCRATCH dirs it lacks."""
    uid, gid = plan.child.uid, plan.child.gid
    os.chown(plan.scratch_dir, uid, gid)
    for b in plan.child.binds:
        if Path(b.source).name not in made:
            os.mkdir(b.source, 0o1777)
            os.chmod(b.source, 0o1777)
        os.chown(b.source, uid, gid)


def _open_netns(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as e:
        os.close(fd)
        raise OSError(e.errno, "not a namespace file", str(path)) from e
    if kind != linux.CLONE_NEWNET:
        os.close(fd)
        raise OSError(22, "not a network namespace", str(path))
    return fd


def _adopt(ident: InitIdentity | None) -> int | None:
    """A pidfd for the init if it is still the same live process, else None."""
    if ident is None or linux.proc_starttime(ident.pid) != ident.starttime:
        return None
    try:
        fd = os.pidfd_open(ident.pid)
    except ProcessLookupError:
        return None
    if linux.proc_starttime(ident.pid) != ident.starttime:  # reused between the check and the open
        os.close(fd)
        return None
    return fd


def _exited(pidfd: int) -> bool:
    """The process of `pidfd` has exited (a pidfd polls readable then)."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


def _kill_and_wait(pidfd: int, timeout: float = 2.0) -> None:
    with contextlib.suppress(ProcessLookupError, OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    p.poll(int(timeout * 1000))


def _default_cgroup_limits() -> Any:
    from .cgroups import CgroupLimits

    return CgroupLimits()


def _destroy_cgroup(cg: JobCgroupLike, timeout: float = 3.0) -> None:
    """Kill what is left, wait for the cgroup to empty (a killed process stays in a v1 cgroup until reaped),
    remove it; retried until `timeout`, then the last error is raised."""
    end = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            cg.kill_all()
        with contextlib.suppress(Exception):
            cg.wait_empty(0.5)
        try:
            cg.destroy()
            return
        except Exception:
            if time.monotonic() > end:
                raise
            time.sleep(0.02)


def _exit_of(job_id: str, st: JobState, cg: JobCgroupLike | None, stop_requested: bool) -> JobExit:
    """The end of a job from its init's status file, the stop request and the cgroup's OOM counter."""
    status = st.status() or {}
    usage: dict[str, Any] = {}
    oom = False
    if cg is not None:
        try:
            usage = _usage_dict(cg.usage())
            oom = bool(cg.oom_killed())
        except Exception:
            log.exception("job %s: reading cgroup usage failed", job_id)
    reason = str(status.get("end_reason", ""))
    code = status.get("exit_code")
    sig = status.get("signal")
    message = str(status.get("message", ""))
    if reason in ("setup-failed", "timeout"):
        pass
    elif stop_requested:
        reason = "stopped"
    elif oom and (not reason or sig == signal.SIGKILL or (isinstance(code, int) and code != 0)):
        # The kernel OOM-killed a process of the job and the job failed: a shell whose child was killed
        # exits 137, a supervisor may exit 1; either way the memory limit is why (HTCondor reports the same).
        reason, message = "oom", message or "killed by the kernel: memory limit"
        sig = sig or signal.SIGKILL
    elif not reason:
        reason, sig, message = "signalled", signal.SIGKILL, "the job's init was killed"
    return JobExit(job_id, reason, exit_code=code if isinstance(code, int) else None,
                   signal=sig if isinstance(sig, int) else None, message=message, usage=usage)
