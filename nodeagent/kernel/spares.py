"""Spare job network namespaces, made ahead of time while the agent is idle, so that setting up a job's
network does not pay for what is the same for every job: unshare(CLONE_NEWNET), the namespace's sysctls,
lo up, the veth pair (created from inside, its peer in the agent's namespace) and IPv6 off on the peer.
That is most of a job network's cost (~2 of ~3 ms on a quiet 2-vCPU VM, and the part that grows when the
machine is busy).

A spare:  <netns_dir>/jnp-<n>       a bind mount of the namespace (as a job's jnj-<job>)
          eth0 (ifindex 2), DOWN     in it, with a placeholder MAC; lo up; JOB_SYSCTLS written
          jnw<n>, DOWN               its veth peer in the agent's namespace, IPv6 off
          a netlink socket           the agent's (rawnl.job_socket), kept open: it becomes the job's
Taking one for a job (`take`): jnw<n> is renamed jnv<job> (a link can be renamed while down), the file is
bind-mounted onto jnj-<job> and its own mount removed; the caller then sets eth0's MAC and MTU, brings it
up, adds the address and the route, and attaches the host end to the group's bridge, as for a new one.

`refill(prepare=fn)` runs fn inside each new spare's namespace after its eth0 exists: the agent installs the
job's network accounting there ahead of time (its BPF programs, whose attach costs RCU grace periods). A
failing `prepare` is logged and the spare kept without it (the job's own set-up does that work then).

Nothing here is a job's until taken: a spare is never seen by observation (its file is not jnj-*, its link
not jnv*). `clean` removes every spare file and jnw* link in the agent's namespace (at start: those a
killed agent left; at close: ours). The pool is refilled by `refill`, which the agent calls after a pass;
when jobs come faster than that, a job's network is made the cold way (`Applier._create_job`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nodeagent import names
from nodeagent.kernel import rawnl
from nodeagent.kernel.errors import KernelError
from nodeagent.kernel.namespaces import Namespaces, ipv6_off

log = logging.getLogger("jobnet.agent.kernel")

SPARE_FILE_PREFIX = f"{names.PREFIX}p-"
SPARE_LINK_PREFIX = f"{names.PREFIX}w"
FRESH_NS_ETH0_INDEX = 2  # a new namespace has only lo (ifindex 1): eth0 is created with ifindex 2
PLACEHOLDER_MAC = "02:00:00:00:00:00"  # set to the job's own when taken


@dataclass
class Spare:
    n: int
    path: Path  # <netns_dir>/jnp-<n>
    ifname: str  # jnw<n>, in the agent's namespace
    sock: socket.socket  # in the spare's namespace
    ino: int  # the namespace's inode


class SparePool:
    """Used from the reconciler's thread only (like everything in the kernel layer)."""

    def __init__(self, netns_dir: Path, namespaces: Namespaces, size: int, sysctls: dict[str, str]) -> None:
        self.netns_dir = netns_dir
        self.ns = namespaces
        self.size = size
        self.sysctls = sysctls
        self._spares: list[Spare] = []
        self._next = 0
        self.taken = 0  # spares handed out
        self.made = 0  # spares made
        self.missed = 0  # jobs that found the pool empty

    def __len__(self) -> int:
        return len(self._spares)

    def take(self) -> Spare | None:
        if not self._spares:
            if self.size:
                self.missed += 1
            return None
        self.taken += 1
        return self._spares.pop(0)

    def refill(self, limit: int | None = None, prepare: Callable[[], None] | None = None) -> int:
        """Make spares until there are `size` (at most `limit` now); returns how many were made. A failure
        is logged and ends the refill (the next job is then made the cold way)."""
        made = 0
        while len(self._spares) < self.size and (limit is None or made < limit):
            try:
                self._spares.append(self._make(prepare))
            except (KernelError, OSError) as e:
                log.warning("could not make a spare job network namespace: %s", e)
                break
            made += 1
        self.made += made
        return made

    def _make(self, prepare: Callable[[], None] | None = None) -> Spare:
        n = self._next
        self._next += 1
        path = self.netns_dir / f"{SPARE_FILE_PREFIX}{n}"
        ifname = f"{SPARE_LINK_PREFIX}{n}"
        made: list[tuple[socket.socket, int]] = []

        def inside(agent_netns_fd: int) -> None:
            sock = rawnl.job_socket()
            try:
                rawnl.send(sock, [
                    rawnl.veth_here(names.JOB_IFNAME, FRESH_NS_ETH0_INDEX, PLACEHOLDER_MAC, 1500, ifname,
                                    agent_netns_fd),
                    rawnl.link_up("lo", 1),
                ], path.name)
                made.append((sock, os.stat("/proc/thread-self/ns/net").st_ino))
            except BaseException:
                sock.close()
                raise
            if prepare is not None:
                try:
                    prepare()
                except Exception as e:  # the spare is still good: the job's own set-up does it then
                    log.warning("spare job namespace %s: preparing it failed (done at the job's start "
                                "instead): %s", path.name, e)

        with contextlib.suppress(FileNotFoundError):  # (a file of an earlier run with this number)
            self.ns.remove(path)
        self.ns.create(path, self.sysctls, inside)
        sock, ino = made[0]
        try:
            ipv6_off(ifname, self.ns.label)
        except BaseException:
            sock.close()
            with contextlib.suppress(KernelError):
                self.ns.remove(path)
            raise
        return Spare(n, path, ifname, sock, ino)

    def discard(self, spare: Spare, links: list[str]) -> None:
        """Remove a spare (taken or not): its socket, file and host link (by any of `links`' names)."""
        spare.sock.close()
        with contextlib.suppress(KernelError):
            self.ns.remove(spare.path)
        _delete_links(links)

    def clean(self) -> None:
        """Remove every spare: ours, and any a previous agent left (files jnp-*, links jnw*)."""
        for spare in self._spares:
            spare.sock.close()
        self._spares.clear()
        with contextlib.suppress(FileNotFoundError), os.scandir(self.netns_dir) as it:
            stale = [Path(e.path) for e in it if e.name.startswith(SPARE_FILE_PREFIX)]
        for path in stale:
            with contextlib.suppress(KernelError):
                self.ns.remove(path)
        _delete_links([name for _, name in socket.if_nameindex() if name.startswith(SPARE_LINK_PREFIX)])


def _delete_links(ifnames: list[str]) -> None:
    """Delete these links of the calling thread's namespace; those already gone are fine."""
    if not ifnames:
        return
    with rawnl.route_socket() as sock:
        for ifname in ifnames:
            try:
                index = socket.if_nametoindex(ifname)
            except OSError:
                continue
            with contextlib.suppress(KernelError):
                rawnl.send(sock, [rawnl.link_delete(ifname, index)], "agent")
