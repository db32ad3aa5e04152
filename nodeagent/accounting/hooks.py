"""Where the counting programs hang on the job's eth0: tcx (Linux 6.6+) or classic tc (a clsact qdisc with
cls_bpf direct-action filters, any kernel since 4.5). The same programs, the same map, the same bytes.

"auto" (the default) is tcx wherever the kernel has it: its per-frame cost is under half of classic tc's
(bench/README: 0.6-0.7 % of a TCP stream's CPU against 1.4-2.3 % on tc, i.e. throughput on/off ~0.993 against
0.980-0.987; the old nftables chains took 2.7-3.2 %), which is what keeps the accounting within 2 % of a
CPU-bound stream. Its price is on the kernel's control path: every tcx attach, detach and uninstall waits for
an RCU grace period with the RTNL held (~10 ms here), two when a job's counters are set up and two more when
its namespace is destroyed, where a cls_bpf filter comes and goes in well under a millisecond. Spare job
namespaces get their programs ahead of time (nodeagent.kernel.spares), which hides the first two; the other
two come when the namespace is destroyed. Left to the kernel's namespace cleanup, which destroys many at once,
one after the other, jobs ending together would hold the RTNL ~25 ms each in one stretch and every netlink
change on the node would wait: 100 jobs, 2.5 s (bench/teardown_stall.py; 40-80 ms on tc or without programs).
So on tcx the agent releases the networks of jobs that are gone one at a time from a thread of its own
(nodeagent.kernel.releaser, NetSettings.paced_release): the node's next netlink change waits ~60 ms at most,
and releasing takes ~50 ms per job in the background. Classic tc needs none of that.

All functions act on the CALLING thread's network namespace (ifindex and netlink are per namespace).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from dataclasses import dataclass
from functools import cache

from nodeagent.accounting import bpf
from nodeagent.kernel import rawnl
from nodeagent.kernel.errors import AlreadyExists, KernelError

KINDS = ("tcx", "tc")
TC_PRIO = {"rx": 1, "tx": 0xFFF0}  # classic tc: rx first, tx last (lower prio numbers run first)


@dataclass
class Attached:
    """One program on a hook: an fd of it (the caller closes it), its description and how to detach it."""

    fd: int
    info: bpf.ProgInfo
    kind: str
    filter: rawnl.BpfFilter | None = None  # classic tc: the filter that runs it


@cache
def tcx_supported() -> bool:
    """Whether the kernel has tcx (an unknown attach type is EINVAL; lo exists in every namespace)."""
    try:
        bpf.tcx_query(1, "tx")
        return True
    except bpf.BpfError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise


def resolve(kind: str) -> str:
    """"auto" -> "tcx" where the kernel has it, else "tc"; "tcx" on a kernel without it: ValueError."""
    if kind == "auto":
        return "tcx" if tcx_supported() else "tc"
    if kind == "tcx" and not tcx_supported():
        raise ValueError("this kernel has no tcx hooks (Linux 6.6+): use --accounting-hook tc (or auto)")
    if kind not in KINDS:
        raise ValueError(f"unknown accounting hook {kind!r}: one of auto, {', '.join(KINDS)}")
    return kind


class Hooks:
    """The hooks of one namespace's devices, for one visit (opens a netlink socket there on first use)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _nl(self) -> socket.socket:
        if self._sock is None:
            self._sock = rawnl.route_socket()
        return self._sock

    def programs(self, kind: str, ifindex: int, direction: str) -> list[Attached]:
        """Every program on the hook, in the order they run. Programs that went meanwhile are left out."""
        out: list[Attached] = []
        if kind == "tcx":
            if not tcx_supported():
                return []
            for prog_id in bpf.tcx_query(ifindex, direction):
                if (a := _open(prog_id, kind)) is not None:
                    out.append(a)
        else:
            for f in rawnl.bpf_filters(self._nl(), ifindex, direction, "job"):
                if (a := _open(f.prog_id, kind)) is not None:
                    a.filter = f
                    out.append(a)
        return out

    def attach(self, kind: str, ifindex: int, prog_fd: int, direction: str, name: str) -> None:
        if kind == "tcx":
            bpf.tcx_attach(ifindex, prog_fd, direction, bpf.TCX_POSITION[direction])
            return
        with contextlib.suppress(AlreadyExists):
            rawnl.send(self._nl(), [rawnl.clsact_add(ifindex)], "job")
        rawnl.send(self._nl(), [rawnl.bpf_filter_add(ifindex, direction, TC_PRIO[direction], prog_fd, name)], "job")

    def detach(self, ifindex: int, a: Attached, direction: str) -> None:
        """Take the program off its hook (gone already: fine)."""
        try:
            if a.kind == "tcx":
                bpf.tcx_detach(ifindex, a.fd, direction)
            elif a.filter is not None:
                rawnl.send(self._nl(), [rawnl.bpf_filter_del(ifindex, direction, a.filter.handle, a.filter.info)],
                           "job")
        except bpf.BpfError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                raise
        except KernelError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                raise


def _open(prog_id: int, kind: str) -> Attached | None:
    try:
        fd = bpf.prog_fd_by_id(prog_id)
    except bpf.BpfError:
        return None  # detached and freed meanwhile
    try:
        return Attached(fd, bpf.prog_info(fd), kind)
    except BaseException:
        os.close(fd)
        raise
