"""Job network namespaces released one at a time, off the reconciler's thread (NetSettings.paced_release).

Normally a job's network goes with its namespace file (apply.Applier: the file is unmounted and the kernel's
namespace cleanup destroys the namespace and its veth later, in batches). With tcx accounting programs on the
job's eth0 that cleanup holds the RTNL for two more RCU grace periods per namespace, one namespace after the
other: 100 jobs ending together blocked every netlink change on the node for ~2.5 s (bench/teardown_stall.py).

With paced release the applier opens the namespace (the fd keeps it alive), removes its file as before and
hands fd and host veth to a `Releaser`, whose thread ("jn-release") deletes the veth pair (synchronously: the
RTNL is held for one namespace's grace periods at a time, and the reconciler's next change waits at most that
long, ~60 ms in the bench) and then closes the fd, which leaves the kernel an empty namespace to destroy.
A veth waiting here is not the reconciler's business: `pending` names them, and observation leaves them out
(no DeleteLink for them). The job's IP is not reused meanwhile: the controller quarantines released addresses.

The thread opens nothing itself: its netlink socket is made by the constructor, in the CALLING thread's network
namespace (the node's). `close()` hands whatever is still waiting to the kernel at once (its batched cleanup).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time

from nodeagent.kernel import rawnl
from nodeagent.kernel.errors import GONE_ERRNOS, KernelError

log = logging.getLogger(__name__)


class Releaser:
    def __init__(self, label: str) -> None:
        self._label = label
        self._sock = rawnl.route_socket()  # in the calling thread's namespace
        self._q: queue.SimpleQueue[tuple[str, int, int] | None] = queue.SimpleQueue()
        self._pending: dict[str, tuple[int, int]] = {}  # host veth -> (its ifindex, the namespace's fd)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="jn-release", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> frozenset[str]:
        """Host veths not released yet."""
        with self._lock:
            return frozenset(self._pending)

    def release(self, host_ifname: str, ifindex: int, netns_fd: int) -> None:
        """Queue a job's network for release: delete its host veth (`host_ifname`, deleted by its index
        `ifindex`: a new veth of the same name is not touched; the peer in the namespace goes with it), then
        close `netns_fd` (taken over: closed here, whatever happens)."""
        with self._lock:
            if self._closed:
                os.close(netns_fd)
                return
            old = self._pending.pop(host_ifname, None)
            self._pending[host_ifname] = (ifindex, netns_fd)
        if old is not None:  # (the same name queued twice: the first namespace goes to the kernel now)
            os.close(old[1])
        self._q.put((host_ifname, ifindex, netns_fd))

    def take(self, host_ifname: str) -> tuple[int, int] | None:
        """Take a veth back before its turn, as (ifindex, namespace fd), the caller now owning both: a job of
        the same id is being made again and needs the name."""
        with self._lock:
            got = self._pending.pop(host_ifname, None)
            if not self._pending:
                self._idle.notify_all()
            return got

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is waiting to be released (tests, benches)."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    def close(self) -> None:
        """Stop the thread; what still waits goes to the kernel's batched cleanup now (fds closed)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            left = [fd for _, fd in self._pending.values()]
            self._pending.clear()
            self._idle.notify_all()
        self._q.put(None)
        self._thread.join(timeout=5)
        for fd in left:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._sock.close()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            ifname, ifindex, fd = item
            with self._lock:
                if self._pending.get(ifname) != (ifindex, fd):  # closed, taken back or queued again since
                    continue
            t0 = time.perf_counter()
            try:
                rawnl.send(self._sock, [rawnl.link_delete(ifname, ifindex)], self._label)
            except (KernelError, OSError) as e:
                if not (isinstance(e, KernelError) and e.errno in GONE_ERRNOS):
                    log.warning("releasing the network of %s: %s (the kernel removes it with its namespace)",
                                ifname, e)
            finally:
                with self._lock:
                    if self._pending.get(ifname) == (ifindex, fd):
                        del self._pending[ifname]
                        os.close(fd)
                    if not self._pending:
                        self._idle.notify_all()
            log.debug("released the network of %s in %.1f ms", ifname, (time.perf_counter() - t0) * 1000)
