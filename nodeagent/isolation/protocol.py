"""The typed messages between the runtime (agent), the zygote and a job's init. One JSON object per
SOCK_SEQPACKET datagram; file descriptors ride along as SCM_RIGHTS.

    agent                         zygote                        job init (PID 1 of the job's PID ns)
      | --- spawn {plan} + fds -----> |
      |     fds: ctl, netns, stdin,   | unshare(NEWPID); fork ---------> |
      |     stdout, stderr, status    | setns(back)                      |
      | <-------------- {pid} (on ctl) |                                  | setns(netns)      step "netns"
      | [cgroup attach pid]                                              | unshare(NEWNS), mounts,
      |                                                                  | /proc, pivot_root  steps "mount-*"
      | <------------------------------------------------- {ready} ------ |
      | [accounting ready]                                               |
      | --- {go} --------------------------------------------------------> |  barrier released
      |                                                                  | fork job: setsid, drop privileges,
      |                                                                  | close fds, chdir, exec
      | <------------------------------------------- {exec: ok} ---------- |  (EOF of a CLOEXEC pipe)
      |                                                                  | reap, forward signals, wall time,
      |                                                                  | status file, exit
    any side may instead send {error: step, cause}; EOF of ctl before {go} aborts the launch.
"""

from __future__ import annotations

import array
import json
import socket
from typing import Any

MAX_MSG = 1 << 16
MAX_FDS = 16


def send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(msg).encode()
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(data)


def recv(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and its fds; (None, []) on EOF."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(MAX_MSG, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
    if not data:
        return None, list(fds)
    msg: dict[str, Any] = json.loads(data)
    return msg, list(fds)
