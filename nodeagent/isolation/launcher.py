"""Child side of a launch: the job's init (PID 1 of the job's PID namespace) and the job process it execs.

Runs in a process forked from the single-threaded zygote, never in the agent. Each step is a flat call whose
failure is reported to the agent as {error: <step>, cause} and recorded in the status file; the order matters:

  1. netns           setns into the network namespace the agent's network reconciler made
  2. mount-ns        unshare(CLONE_NEWNS); make every mount private (and, without a rootfs, read-only) so
                     nothing propagates back to the host and the job cannot write outside its scratch
  3. mount-rootfs    bind the rootfs onto itself read-only (pivot_root needs a mount point)
  4. mount-scratch   bind scratch/<name> onto /tmp, /var/tmp, ... (MOUNT_UNDER_SCRATCH) and the scratch dir
     mount-hide      (no rootfs) scratch_root and the state dir covered by an empty read-only tmpfs: the job
                     sees its own scratch dir and nothing of other jobs'
  5. mount-dev       (rootfs only) a tmpfs /dev with null, zero, full, random, urandom, tty bound from the host
     mount-shm       a private tmpfs /dev/shm (charged to the job's memory cgroup)
  6. mount-proc      a fresh /proc for the job's PID namespace (must be mounted from inside it: we are PID 1)
     mount-sys       a read-only sysfs of the job's network namespace
  7. pivot-root      (rootfs only) pivot_root(".", ".") then umount2(MNT_DETACH) of the old root
  8. barrier         report {ready}; wait for {go}: the agent has attached us to the cgroup meanwhile
  9. drop-privileges the init itself drops to the job's identity: bounding set, ambient, groups, gid, uid,
                     capset 0, no_new_privs, not dumpable (so the job cannot ptrace or forge its init)
 10. chdir, exec     posix_spawn (vfork+exec) the job in its own session, stdio on the scratch files, every
                     other fd close-on-exec
Then init reaps every zombie, forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to the job's process
group, enforces the wall time (SIGKILL of every process in the namespace) and, when the job's main process
ends, writes the status file and exits, which makes the kernel kill whatever is left in the namespace.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, NoReturn

from . import linux, protocol
from .plan import DEV_NODES, ChildPlan

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


class StepError(Exception):
    def __init__(self, step: str, cause: str) -> None:
        self.step = step
        self.cause = cause
        super().__init__(f"{step}: {cause}")


TIMINGS: dict[str, float] = {}  # step -> ms, reported with {ready} (debug aid; one launch per process)


def _step(name: str, fn: Callable[[], None]) -> None:
    t0 = time.perf_counter()
    try:
        fn()
    except StepError:
        raise
    except Exception as e:  # any failure of a kernel step becomes a named step error
        cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise StepError(name, cause) from e
    TIMINGS[name] = round((time.perf_counter() - t0) * 1000, 3)


class JobFds:
    """The fds the zygote hands to the init, in protocol order."""

    ORDER = ("ctl", "netns", "stdin", "stdout", "stderr", "status")

    def __init__(self, fds: list[int]) -> None:
        if len(fds) != len(self.ORDER):
            raise ValueError(f"expected {len(self.ORDER)} fds, got {len(fds)}")
        self.ctl, self.netns, self.stdin, self.stdout, self.stderr, self.status = fds

    def all(self) -> set[int]:
        return {self.ctl, self.netns, self.stdin, self.stdout, self.stderr, self.status}


def write_status(fd: int, **status: Any) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, json.dumps(status).encode())


# -- the init --------------------------------------------------------------------------------------------


def run_init(plan: ChildPlan, fds: JobFds, last_cap: int) -> NoReturn:
    """Entry point in the freshly forked PID 1. Never returns."""
    code = 0
    try:
        code = _init(plan, fds, last_cap)
    except BaseException as e:  # PID 1 must always record why it stops
        write_status(fds.status, end_reason="setup-failed", message=f"init: {e!r}")
        code = 1
    os._exit(code)


def _init(plan: ChildPlan, fds: JobFds, last_cap: int) -> int:
    os.setsid()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    linux.close_fds_except(fds.all())
    for fd in fds.all():
        os.set_inheritable(fd, False)  # fds passed by SCM_RIGHTS arrive without close-on-exec
    ctl = socket.socket(fileno=fds.ctl)
    try:
        _setup_namespaces(plan, fds)
    except StepError as e:
        write_status(fds.status, end_reason="setup-failed", message=f"{e.step}: {e.cause}")
        with contextlib.suppress(OSError):
            protocol.send(ctl, {"error": e.step, "cause": e.cause})
        return 1

    # -- barrier: nothing of the job runs before the agent says go ---------------------------------------
    protocol.send(ctl, {"ready": True, "ms": TIMINGS})
    msg, _ = protocol.recv(ctl)
    if not msg or not msg.get("go"):
        write_status(fds.status, end_reason="setup-failed", message="barrier: the agent went away before go")
        return 1

    state: dict[str, Any] = {"main": 0, "timed_out": False, "deadline": float("inf")}

    def forward(sig: int, _frame: object) -> None:
        if state["main"]:
            with contextlib.suppress(OSError):  # a signal handler of PID 1 must never raise
                os.kill(-state["main"], sig)

    def on_timeout(_sig: int, _frame: object) -> None:
        # the job runs as our uid and could send us SIGALRM itself: only the real deadline counts
        if not plan.wall_time_s:
            return
        left = state["deadline"] - time.monotonic()
        if left > 0:  # a forged or early SIGALRM (or one before the timer is even armed): ignore / re-arm
            if left != float("inf"):
                signal.setitimer(signal.ITIMER_REAL, max(left, 0.002))
            return
        state["timed_out"] = True
        with contextlib.suppress(OSError):
            os.kill(-1, signal.SIGKILL)  # from PID 1: every process of the namespace but us

    for sig in FORWARDED:
        signal.signal(sig, forward)
    signal.signal(signal.SIGALRM, on_timeout)

    try:
        pid = _spawn_job(plan, fds, last_cap)
    except StepError as e:
        write_status(fds.status, end_reason="setup-failed", message=f"{e.step}: {e.cause}")
        with contextlib.suppress(OSError):
            protocol.send(ctl, {"error": e.step, "cause": e.cause})
        return 1
    state["main"] = pid
    if plan.wall_time_s:
        state["deadline"] = time.monotonic() + plan.wall_time_s
        signal.setitimer(signal.ITIMER_REAL, plan.wall_time_s)
    with contextlib.suppress(OSError):
        protocol.send(ctl, {"exec": "ok"})
    ctl.close()
    for fd in (fds.stdin, fds.stdout, fds.stderr):
        os.close(fd)

    # -- reaper ------------------------------------------------------------------------------------------
    while True:
        try:
            wpid, status = os.wait()
        except ChildProcessError:  # main already reaped by a race we do not expect; be safe
            write_status(fds.status, end_reason="exited", exit_code=0, message="init: lost the main process")
            return 0
        if wpid != pid:
            continue
        break
    if state["timed_out"]:
        write_status(fds.status, end_reason="timeout", signal=signal.SIGKILL,
                     message=f"wall time {plan.wall_time_s}s exceeded")
    elif os.WIFSIGNALED(status):
        termsig = os.WTERMSIG(status)
        write_status(fds.status, end_reason="signalled", signal=termsig,
                     message=f"killed by {signal.Signals(termsig).name}")
    else:
        write_status(fds.status, end_reason="exited", exit_code=os.WEXITSTATUS(status))
    return 0


def _setup_namespaces(plan: ChildPlan, fds: JobFds) -> None:
    _step("netns", lambda: linux.setns(fds.netns, linux.CLONE_NEWNET, "network namespace"))
    os.close(fds.netns)
    _step("mount-ns", lambda: linux.unshare(linux.CLONE_NEWNS))
    if plan.rootfs is None:
        _step("mount-private", lambda: linux.mount_setattr(
            "/", recursive=True, attr_set=linux.MOUNT_ATTR_RDONLY, propagation=linux.MS_PRIVATE))
        root = ""
    else:
        _step("mount-private", lambda: linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE))
        root = plan.rootfs.rstrip("/")
        _step("mount-rootfs", lambda: _bind_rootfs(root))
    sources: list[int] = []
    try:
        # open every bind source first: hiding scratch_root or binding /tmp may cover the host paths
        _step("mount-scratch", lambda: sources.extend(_open_sources(plan)))
        if not root:
            _step("mount-hide", lambda: _hide(plan))
        _step("mount-scratch", lambda: _bind_scratch(plan, root, sources))
    finally:
        for fd in sources:
            os.close(fd)
    if root:
        _step("mount-dev", lambda: _mount_dev(root))
    _step("mount-shm", lambda: linux.mount("tmpfs", _mountpoint(root, "/dev/shm"), "tmpfs",
                                           linux.MS_NOSUID | linux.MS_NODEV,
                                           f"mode=1777,size={plan.dev_shm_size}"))
    _step("mount-proc", lambda: _mount_proc(root))
    # a sysfs of the job's own network namespace (read-only): /sys/class/net lists the job's links only
    _step("mount-sys", lambda: linux.mount("sysfs", _mountpoint(root, "/sys"), "sysfs",
                                           linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC))
    if root:
        _step("pivot-root", lambda: _pivot_root(root))


def _bind_rootfs(root: str) -> None:
    linux.mount(root, root, None, linux.MS_BIND | linux.MS_REC)
    linux.mount(None, root, None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY)


def _mountpoint(root: str, target: str) -> str:
    path = root + target
    if root and not os.path.isdir(path):
        # a missing mount point in a (writable) rootfs: create it on the rootfs itself, before it went read-only
        raise OSError(2, f"mount point {target} missing in rootfs {root}")
    return path


def _bind_rw(source: str, target: str) -> None:
    linux.mount(source, target, None, linux.MS_BIND)
    linux.mount_setattr(target, recursive=False, attr_clr=linux.MOUNT_ATTR_RDONLY,
                        attr_set=linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NODEV)


def _bind_pairs(plan: ChildPlan) -> list[tuple[str, str]]:
    return [(plan.scratch_dir, plan.scratch_in_job)] + [(b.source, b.target) for b in plan.binds]


def _open_sources(plan: ChildPlan) -> list[int]:
    fds: list[int] = []
    try:
        for src, _ in _bind_pairs(plan):
            fds.append(os.open(src, os.O_PATH | os.O_CLOEXEC | os.O_DIRECTORY))
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _hide(plan: ChildPlan) -> None:
    """Cover scratch_root, the state dir (and the site's hidden paths) with an empty read-only tmpfs; only the
    job's own scratch dir gets a mount point in it."""
    for path in plan.hide:
        linux.mount("tmpfs", path, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC, "mode=755,size=16k")
        if plan.scratch_in_job.startswith(path.rstrip("/") + "/"):
            os.makedirs(plan.scratch_in_job, mode=0o755, exist_ok=True)
        linux.mount_setattr(path, recursive=False, attr_set=linux.MOUNT_ATTR_RDONLY)


def _bind_scratch(plan: ChildPlan, root: str, sources: list[int]) -> None:
    for fd, (_, target) in zip(sources, _bind_pairs(plan), strict=True):
        _bind_rw(f"/proc/self/fd/{fd}", _mountpoint(root, target))


def _mount_dev(root: str) -> None:
    dev = _mountpoint(root, "/dev")
    linux.mount("tmpfs", dev, "tmpfs", linux.MS_NOSUID | linux.MS_NOEXEC, "mode=755,size=64k")
    for node in DEV_NODES:
        path = f"{dev}/{node}"
        with open(path, "w"):
            pass
        linux.mount(f"/dev/{node}", path, None, linux.MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(f"{dev}/shm", 0o755)


def _mount_proc(root: str) -> None:
    linux.mount("proc", _mountpoint(root, "/proc"), "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)


def _pivot_root(root: str) -> None:
    os.chdir(root)
    linux.pivot_root(".", ".")
    linux.umount2(".", linux.MNT_DETACH)
    os.chdir("/")


# -- the job process -------------------------------------------------------------------------------------


def _drop_privileges(plan: ChildPlan, last_cap: int) -> None:
    """Make this process (the init, after the barrier) what the job will be: no capability in any set, the
    job's uid/gid and no supplementary groups, no_new_privs, not dumpable (the job cannot ptrace its init)."""
    linux.drop_bounding_set(last_cap)
    linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_CLEAR_ALL, what="PR_CAP_AMBIENT_CLEAR_ALL")
    os.setgroups([])
    os.setresgid(plan.gid, plan.gid, plan.gid)
    os.setresuid(plan.uid, plan.uid, plan.uid)
    linux.capset_zero()
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1, what="PR_SET_NO_NEW_PRIVS")
    linux.prctl(linux.PR_SET_DUMPABLE, 0, what="PR_SET_DUMPABLE")


def _resolve(plan: ChildPlan) -> str:
    cmd = plan.command[0]
    if "/" in cmd:
        return cmd
    found = shutil.which(cmd, path=plan.env.get("PATH", ""))
    if found is None:
        raise OSError(errno.ENOENT, f"{cmd}: command not found in PATH")
    return found


def _spawn_job(plan: ChildPlan, fds: JobFds, last_cap: int) -> int:
    """Drop the init's privileges, then posix_spawn (vfork+exec: no Python runs in the child) the job in its own
    session with stdio on the scratch files. Every other fd of the init is close-on-exec. Returns its pid
    once it has exec'd."""
    _step("drop-privileges", lambda: _drop_privileges(plan, last_cap))
    _step("chdir", lambda: os.chdir(plan.cwd))
    path = ""

    def resolve() -> None:
        nonlocal path
        path = _resolve(plan)

    _step("exec", resolve)
    pid = 0

    def spawn() -> None:
        nonlocal pid
        pid = os.posix_spawn(
            path, list(plan.command), plan.env, setsid=True,
            setsigdef=(*FORWARDED, signal.SIGALRM, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD),
            file_actions=[(os.POSIX_SPAWN_DUP2, fds.stdin, 0), (os.POSIX_SPAWN_DUP2, fds.stdout, 1),
                          (os.POSIX_SPAWN_DUP2, fds.stderr, 2)],
        )

    try:
        spawn()
    except OSError as e:
        raise StepError("exec", f"{plan.command[0]}: {e.strerror or e}") from e
    return pid
