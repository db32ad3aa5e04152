"""The fork server. `JobRuntime` starts it with fork+exec of a fresh `python -S` (safe even if the agent already
has threads or gRPC channels), so the zygote is a single-threaded process that has imported only the stdlib
and this package's child side: forking it per job costs well under a millisecond and the child may run Python.

It keeps one spare child forked ahead of time with unshare(CLONE_NEWPID); fork(); setns(back to its own PID
namespace): the spare is PID 1 of a new PID namespace and waits for a launch; per spawn request the zygote hands
the plan and fds to the spare, which runs `launcher.run_init`, and forks the next spare after replying.
The zygote reaps its children (the job inits).
When the agent goes away (EOF on the control socket) the zygote stays alive only as long as it still has job
inits to reap, then exits: jobs keep running across an agent restart.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys

from . import launcher, linux, protocol
from .plan import ChildPlan


def _reap() -> int:
    """Reap finished children without blocking; return how many children are still alive."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return 0
        if pid == 0:
            return 1


class _Spare:
    """A child forked ahead of time, already PID 1 of a fresh PID namespace, blocked until it gets a launch:
    the fork (the slowest part of a spawn, ~1.5 ms for a Python process) happens off the critical path."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock


def _fork_pidns(own_pidns: int) -> int:
    """fork() into a new PID namespace (the child is its PID 1); the zygote stays in its own."""
    linux.unshare(linux.CLONE_NEWPID)
    try:
        return os.fork()
    finally:
        if os.getpid() != 1:
            linux.setns(own_pidns, linux.CLONE_NEWPID, "own pid namespace")


def _make_spare(own_pidns: int, last_cap: int, agent: socket.socket) -> _Spare | None:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = _fork_pidns(own_pidns)
    except OSError as e:
        print(f"zygote: cannot fork a spare: {e}", file=sys.stderr)
        mine.close()
        theirs.close()
        return None
    if pid == 0:
        try:
            agent.close()
            mine.close()
            # nothing else of the zygote's: it may hold the ends of other launches' control sockets right now
            # (a warm hand-over forks the next spare), and a copy kept here would hide their EOF
            linux.close_fds_except({theirs.fileno()})
            msg, fds = protocol.recv(theirs)
            if msg is None:
                os._exit(0)
            if msg.get("warm"):
                # handed to the agent as a warm slot: the launch comes straight from the agent on the ctl
                theirs.close()
                ctl = socket.socket(fileno=fds[0])
                msg, more = protocol.recv(ctl)
                if msg is None:
                    os._exit(0)
                ctl.detach()
                fds = [fds[0], *more]
            plan = ChildPlan.from_json(str(msg["plan"]))
            job_fds = launcher.JobFds(fds)
        except BaseException:
            os._exit(1)
        launcher.run_init(plan, job_fds, last_cap)
    theirs.close()
    return _Spare(pid, mine)


def _hand_warm(ctl_fd: int, own_pidns: int, last_cap: int, sock: socket.socket, spare: _Spare | None) -> None:
    """Give a spare to the agent as a warm slot: its pid on the ctl, and the ctl to the spare (which then waits
    for the launch from the agent directly). The caller closes its copy of ctl_fd."""
    ctl = socket.socket(fileno=os.dup(ctl_fd))
    try:
        for _ in range(2):
            if spare is None:
                spare = _make_spare(own_pidns, last_cap, sock)
                if spare is None:
                    protocol.send(ctl, {"error": "spawn", "cause": "cannot fork"})
                    return
            try:
                protocol.send(spare.sock, {"warm": True}, [ctl_fd])
            except OSError:  # that spare died: fork another
                spare.sock.close()
                spare = None
                continue
            spare.sock.close()
            with contextlib.suppress(OSError):
                protocol.send(ctl, {"pid": spare.pid})
            return
    finally:
        with contextlib.suppress(OSError):
            ctl.close()


def serve(sock: socket.socket) -> None:
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    spare = _make_spare(own_pidns, last_cap, sock)
    protocol.send(sock, {"hello": os.getpid()})
    sock.settimeout(1.0)
    while True:
        if spare is None:
            spare = _make_spare(own_pidns, last_cap, sock)
        try:
            msg, fds = protocol.recv(sock)
        except TimeoutError:
            _reap()
            continue
        except OSError:
            msg, fds = None, []
        if msg is None:
            break
        try:
            spare = _spawn(msg, fds, own_pidns, last_cap, sock, spare)
        except Exception as e:  # never let one bad request take the fork server down
            print(f"zygote: spawn failed: {e!r}", file=sys.stderr)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        _reap()
    # The agent is gone: linger as the reaper of our job inits, then leave.
    sock.close()
    if spare is not None:
        spare.sock.close()  # the spare sees EOF and exits
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return


def _spawn(msg: dict[str, object], fds: list[int], own_pidns: int, last_cap: int, sock: socket.socket,
           spare: _Spare | None) -> _Spare | None:
    """Hand the launch to the spare (or fork one now); report the init's pid. Returns the spare left."""
    if not fds:
        return spare
    if msg.get("warm"):
        _hand_warm(fds[0], own_pidns, last_cap, sock, spare)
        return None  # the spare (if any) went to the agent
    ctl = socket.socket(fileno=os.dup(fds[0]))
    try:
        pid = 0
        if spare is not None:
            try:
                protocol.send(spare.sock, {"plan": msg["plan"]}, fds)
                pid = spare.pid
            except OSError:
                pid = 0
            spare.sock.close()
            spare = None
        if pid == 0:
            try:
                plan = ChildPlan.from_json(str(msg["plan"]))
                job_fds = launcher.JobFds(fds)
                pid = _fork_pidns(own_pidns)
            except Exception as e:  # report to the waiting agent rather than die
                with contextlib.suppress(OSError):
                    protocol.send(ctl, {"error": "spawn", "cause": str(e)})
                return spare
            if pid == 0:
                ctl.detach()
                sock.detach()
                launcher.run_init(plan, job_fds, last_cap)
        with contextlib.suppress(OSError):  # the agent may have given up on this launch already
            protocol.send(ctl, {"pid": pid})
    finally:
        with contextlib.suppress(OSError):
            ctl.close()
    return spare


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # reap job inits as soon as they exit: on cgroup v1 a zombie still counts in its cgroup, so a late reap
    # would delay removing that cgroup (children reset SIGCHLD to the default)
    signal.signal(signal.SIGCHLD, lambda _s, _f: _reap())
    fd = int(sys.argv[1])
    serve(socket.socket(fileno=fd))


if __name__ == "__main__":
    main()
