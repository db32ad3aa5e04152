"""The permanent neighbour entries on eth0 of every job namespace, kept known from the kernel's own
notifications instead of read anew by every full reconcile.

Why: the kernel keeps ONE IPv4 neighbour table for all network namespaces, and a dump in one namespace
walks all of it. A group of N jobs on a node holds N*(N-1) entries, so dumping every job namespace costs
O(N^3): ~0.6-1.3 s for 200 jobs of one group on a 2-vCPU VM, every full reconcile. Instead ONE netlink
socket in the agent's namespace listens to RTNLGRP_NEIGH of every namespace that has an id there
(NETLINK_LISTEN_ALL_NSID; each notification carries that id). A job namespace gets an id (RTM_NEWNSID)
when it is first watched; its table is then read whole once (a dump), and every change afterwards -
ours, the kernel's (a flush when eth0 goes down or changes its MAC), anyone's by hand - arrives as a
notification. Draining them costs O(changes); a full reconcile that changes nothing reads none.

Correctness of "dump once, then follow": the id is assigned and the socket listens BEFORE the dump, and
notifications are applied in order after the dump replaced the table, so the last word on every address
is the kernel's latest. A lost notification is not silent: the socket reports ENOBUFS, and then every
table is read whole again at the next full observation. Namespace ids are reused after a namespace dies;
notifications sent under an id are drained before the id is given to another job.

Our own changes are not read back: the agent's socket in every job namespace has the port id
rawnl.JOB_PORTID, the kernel stamps it on the notifications of the changes that socket asks for, and a
socket filter (classic BPF, run by the kernel) drops those before they are queued. The applier tells the
tables what it wrote instead (`applied`). Writing a group's 499 entries into its 500th job, and that job's
entry into the 499 others, would otherwise cost ~1,000 notifications parsed in Python per job. A change
of ours that races a change by someone else to the same entry can leave a table saying otherwise than
the kernel; the next full reconcile then writes that entry once more (the entry itself is right).

Also owns no kernel object: the ids are the kernel's, and they go with the namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nodeagent.kernel import rawnl
from nodeagent.kernel.errors import KernelError, from_oserror

log = logging.getLogger("jobnet.agent.kernel")

RTNLGRP_NEIGH = 3
NETLINK_ADD_MEMBERSHIP, NETLINK_LISTEN_ALL_NSID = 1, 8
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
RCVBUF = 32 << 20  # ~40k notifications (each costs ~800 bytes of buffer); drained after every batch we send
ANC_SIZE = socket.CMSG_SPACE(4)
SO_ATTACH_FILTER = 26
BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06


def _drop_own_filter() -> tuple[bytes, ctypes.Array[ctypes.c_char]]:
    """struct sock_fprog for: accept a message unless its nlmsg_pid (offset 12) is rawnl.JOB_PORTID. A
    classic BPF load reads big-endian; netlink headers are in host order."""
    pid_as_loaded = int.from_bytes(rawnl.JOB_PORTID.to_bytes(4, sys.byteorder), "big")
    prog = [(BPF_LD_W_ABS, 0, 0, 12), (BPF_JEQ_K, 0, 1, pid_as_loaded), (BPF_RET_K, 0, 0, 0),
            (BPF_RET_K, 0, 0, 0xFFFFFFFF)]
    code = b"".join(struct.pack("=HBBI", *insn) for insn in prog)
    buf = ctypes.create_string_buffer(code, len(code))  # must live until setsockopt has copied it
    return struct.pack("@HP", len(prog), ctypes.addressof(buf)), buf


@dataclass
class _Watched:
    nsid: int
    ino: int  # the namespace's inode: a new namespace under the same file name is another one
    eth0: int = 0  # eth0's ifindex; 0: not known (no table then)
    table: dict[bytes, bytes] = field(default_factory=dict)  # packed ip -> packed mac of PERMANENT entries
    known: bool = False  # the table is complete (read whole since the id was given, followed since)


class NeighWatch:
    """Created (and used) in the agent's network namespace, from one thread at a time."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
                                     socket.NETLINK_ROUTE)
        try:
            self._events.bind((0, 0))  # a port id: the kernel skips port 0 when it broadcasts its own notifications
            self._events.setsockopt(rawnl.SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, RTNLGRP_NEIGH)
            self._events.setsockopt(rawnl.SOL_NETLINK, NETLINK_LISTEN_ALL_NSID, 1)
            fprog, prog = _drop_own_filter()
            self._events.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
            del prog
            try:
                self._events.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except PermissionError:
                self._events.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            self._requests = rawnl.route_socket()
        except OSError as e:
            self._events.close()
            raise from_oserror("listen to neighbour notifications", "RTNLGRP_NEIGH", label, e) from e
        self._jobs: dict[str, _Watched] = {}
        self._by_nsid: dict[int, str] = {}
        self.lost = 0  # times notifications were lost (ENOBUFS)
        self.pauses = 0  # times the reconciler wrote into job namespaces without us listening
        self.events = 0  # notifications applied

    def close(self) -> None:
        self._events.close()
        self._requests.close()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Not listening to the job namespaces while the reconciler writes into them. Delivering a
        notification to a NETLINK_LISTEN_ALL_NSID socket costs the kernel a linear search of the
        namespace ids (`peernet_has_id`, `peernet2id`: O(job namespaces)), even for the notifications the
        filter drops: ~12 us per notification with 450 job namespaces, and adding the 450th job of a group
        writes ~900 entries (~11 ms). The price: a change by someone else in a job namespace while we
        write (milliseconds) is not seen; the sweep (a table or more read whole per full reconcile, round
        robin) finds it later. Our own changes are told to the tables (`applied`) as always."""
        self._events.setsockopt(rawnl.SOL_NETLINK, NETLINK_LISTEN_ALL_NSID, 0)
        self.pauses += 1
        try:
            yield
        finally:
            self._events.setsockopt(rawnl.SOL_NETLINK, NETLINK_LISTEN_ALL_NSID, 1)

    # -- following ------------------------------------------------------------------------------------

    def drain(self) -> None:
        """Apply every pending notification to the tables of the jobs they come from."""
        recvmsg, by_nsid, jobs = self._events.recvmsg, self._by_nsid, self._jobs
        while True:
            try:
                data, anc, _, _ = recvmsg(rawnl.RECV_SIZE, ANC_SIZE)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise from_oserror("receive neighbour notifications", "RTNLGRP_NEIGH", self.label, e) from e
                self._lose()
                continue
            job = None
            for level, kind, payload in anc:
                if level == rawnl.SOL_NETLINK and kind == NETLINK_LISTEN_ALL_NSID and len(payload) >= 4:
                    job = by_nsid.get(int.from_bytes(payload[:4], sys.byteorder, signed=True))
            if job is None:
                continue  # our own namespace's (the VXLAN devices'), or a namespace that is not a job's
            w = jobs[job]
            off = 0
            while off + 16 <= len(data):
                length = int.from_bytes(data[off:off + 4], sys.byteorder)
                if length < 16:
                    break
                ev = rawnl.neigh_event_v4(data, off, length)
                if ev is not None and ev[1] == w.eth0:
                    mtype, _, state, ip, mac = ev
                    if mtype == rawnl.RTM_NEWNEIGH and state & rawnl.NUD_PERMANENT and len(mac) == 6:
                        w.table[ip] = mac
                    else:
                        w.table.pop(ip, None)
                    self.events += 1
                off += (length + 3) & ~3

    def _lose(self) -> None:
        self.lost += 1
        log.warning("neighbour notifications were lost: every job's neighbour table is read whole again")
        for w in self._jobs.values():
            w.known = False

    # -- which namespaces -------------------------------------------------------------------------------

    def watch(self, job_id: str, path: Path) -> None:
        """Follow the namespace at `path` as job `job_id`'s (its table is not known until `set_table`)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise from_oserror("open netns", str(path), self.label, e) from e
        try:
            ino = os.fstat(fd).st_ino
            nsid = rawnl.nsid_of(self._requests, fd, self.label, str(path))
        finally:
            os.close(fd)
        self.drain()  # what was sent under this id before belongs to whoever had it then
        self.forget(job_id)
        old = self._by_nsid.pop(nsid, None)
        if old is not None:
            self._jobs.pop(old, None)
        self._by_nsid[nsid] = job_id
        self._jobs[job_id] = _Watched(nsid, ino)

    def forget(self, job_id: str) -> None:
        w = self._jobs.pop(job_id, None)
        if w is not None and self._by_nsid.get(w.nsid) == job_id:
            del self._by_nsid[w.nsid]

    def fresh(self, job_id: str, path: Path, eth0: int) -> None:
        """A namespace just made, with no neighbour entries yet."""
        self.watch(job_id, path)
        self.set_table(job_id, {}, eth0)

    def invalidate(self, job_id: str) -> None:
        """The job's table is to be read whole again (e.g. its eth0 was made anew: another ifindex)."""
        w = self._jobs.get(job_id)
        if w is not None:
            w.known = False

    def knows(self, job_id: str, ino: int, eth0: int | None = None) -> bool:
        """The table of the namespace `ino` of the job is known (and its eth0 is `eth0`, when given)."""
        w = self._jobs.get(job_id)
        return w is not None and w.known and w.ino == ino and (eth0 is None or w.eth0 == eth0)

    def watching(self, job_id: str, ino: int) -> bool:
        w = self._jobs.get(job_id)
        return w is not None and w.ino == ino

    def set_table(self, job_id: str, table: dict[bytes, bytes], eth0: int) -> None:
        """The job's table as read whole (after `watch`): notifications drained later apply on top."""
        w = self._jobs.get(job_id)
        if w is not None:
            w.table, w.eth0, w.known = table, eth0, True

    def applied(self, job_id: str, replaced: Iterable[tuple[bytes, bytes]] = (), deleted: Iterable[bytes] = ()) -> None:
        """Entries we wrote into the job's namespace (their notifications are filtered out)."""
        w = self._jobs.get(job_id)
        if w is not None and w.known:
            w.table.update(replaced)
            for ip in deleted:
                w.table.pop(ip, None)

    def table(self, job_id: str) -> dict[bytes, bytes]:
        return self._jobs[job_id].table

    def retain(self, job_ids: set[str]) -> None:
        """Forget every job not in `job_ids` (their namespace files are gone)."""
        for job_id in [j for j in self._jobs if j not in job_ids]:
            self.forget(job_id)


def watch_or_none(label: str) -> NeighWatch | None:
    """A NeighWatch, or None (logged) where the kernel or our privileges do not allow one: full reconciles
    then read every job's neighbour table whole."""
    try:
        return NeighWatch(label)
    except KernelError as e:
        log.warning("no neighbour notifications (%s): full reconciles dump every job namespace's table", e)
        return None
