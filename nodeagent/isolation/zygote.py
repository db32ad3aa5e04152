"""The fork server. `JobRuntime` starts it with fork+exec of a fresh `python -S` (safe even if the agent already
has threads or gRPC channels), so the zygote is a single-threaded process that has imported only the stdlib
and this package's child side: forking it per job costs well under a millisecond and the child may run Python.

Per spawn request it does unshare(CLONE_NEWPID); fork(); setns(back to its own PID namespace): the child is
PID 1 of a new PID namespace and runs `launcher.run_init`. The zygote reaps its children (the job inits).
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


def serve(sock: socket.socket) -> None:
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    protocol.send(sock, {"hello": os.getpid()})
    sock.settimeout(1.0)
    while True:
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
            _spawn(msg, fds, own_pidns, last_cap, sock)
        except Exception as e:  # never let one bad request take the fork server down
            print(f"zygote: spawn failed: {e!r}", file=sys.stderr)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        _reap()
    # The agent is gone: linger as the reaper of our job inits, then leave.
    sock.close()
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return


def _spawn(msg: dict[str, object], fds: list[int], own_pidns: int, last_cap: int, sock: socket.socket) -> None:
    if not fds:
        return
    ctl = socket.socket(fileno=os.dup(fds[0]))
    try:
        try:
            plan = ChildPlan.from_json(str(msg["plan"]))
            job_fds = launcher.JobFds(fds)
            linux.unshare(linux.CLONE_NEWPID)
            try:
                pid = os.fork()
            finally:
                if os.getpid() != 1:
                    linux.setns(own_pidns, linux.CLONE_NEWPID, "own pid namespace")
        except Exception as e:  # report to the waiting agent rather than die
            with contextlib.suppress(OSError):
                protocol.send(ctl, {"error": "spawn", "cause": str(e)})
            return
        if pid == 0:
            ctl.detach()
            sock.detach()
            launcher.run_init(plan, job_fds, last_cap)
        with contextlib.suppress(OSError):  # the agent may have given up on this launch already
            protocol.send(ctl, {"pid": pid})
    finally:
        with contextlib.suppress(OSError):
            ctl.close()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd = int(sys.argv[1])
    serve(socket.socket(fileno=fd))


if __name__ == "__main__":
    main()
