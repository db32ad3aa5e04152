"""Job network namespaces without helper processes.

A namespace is made by the calling thread itself: unshare(CLONE_NEWNET) (per-thread), sysctls written
through /proc/sys/net (which shows the netns of the writing thread), bind mount of
/proc/thread-self/ns/net onto `<netns_dir>/jnj-<job>` (the file keeps the namespace alive), a netlink
socket opened there (a socket stays bound to the namespace it was created in), then setns back to the
agent's namespace (an fd held open), in a `finally`. A worker thread per namespace, as before, cost a
thread start and a hand-off per job: 1-2 ms of a ~3 ms setup once the machine is busy. Should the way back
ever fail (setns on an open namespace fd as root fails only for lack of memory), this object refuses all
further work and says why, and the reconciler refuses to run outside its namespace. Python 3.11's `os` has
no unshare/setns/mount, hence ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import functools
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from nodeagent.kernel.errors import GONE_ERRNOS, KernelError, from_errno, from_oserror

_libc = ctypes.CDLL(None, use_errno=True)  # libc is loaded already (find_library would run ldconfig)

CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MNT_DETACH = 0x2
NETLINK_ROUTE = 0

T = TypeVar("T")


def _check(rc: int, op: str, obj: str, netns: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise from_errno(op, obj, netns, err)


def _setns(fd: int, obj: str) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(CLONE_NEWNET)), "setns", obj, obj)


def write_sysctl(key: str, value: str, netns: str) -> None:
    """Write /proc/sys/net/<key> of the CALLING thread's network namespace."""
    path = f"/proc/sys/net/{key}"
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise from_oserror("write sysctl", path, netns, e) from e


TMPFS_MAGIC = 0x01021994
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8


def fs_type(path: Path) -> int:
    """statfs(2)'s f_type of the filesystem holding `path` (OSError if it cannot be read)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type is the first long
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return int(ctypes.c_long.from_buffer(buf).value)


def tmpfs_for_netns_dir(path: Path) -> str:
    """Put a small tmpfs of its own on the (existing) directory where job namespace files are bind-mounted,
    unless it is on a tmpfs already (as /run is on a systemd host) or holds anything (never hide a live job's
    namespace file, e.g. after an agent restart on an older layout). Every job creates and removes a file
    there: on ext4 the inode allocation of those files grew with the live jobs (bench/README, job_setup:
    flatness 1.25 -> 1.04 with a tmpfs). Returns what it did, for the log; OSError when mounting fails."""
    if fs_type(path) == TMPFS_MAGIC:
        return "on a tmpfs already"
    if any(path.iterdir()):
        return "not on a tmpfs, but not empty: left as it is"
    rc = _libc.mount(b"jobnet-netns", os.fsencode(path), b"tmpfs", ctypes.c_ulong(MS_NOSUID | MS_NODEV | MS_NOEXEC),
                     b"mode=0755,size=1m")
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs on {path}: {os.strerror(err)}")
    return "a tmpfs mounted on it"


@functools.cache
def _kernel_has_ipv6() -> bool:
    # Once per process: a path lookup under /proc/sys/net slows down as network namespaces accumulate
    # (measured: 0.04 ms with a few, 0.4 ms with 500 job namespaces).
    return os.path.isdir("/proc/sys/net/ipv6")


def ipv6_off(ifname: str, netns: str) -> None:
    """disable_ipv6 on one link of the calling thread's namespace (no-op on a kernel without IPv6)."""
    if _kernel_has_ipv6():
        write_sysctl(f"ipv6/conf/{ifname}/disable_ipv6", "1", netns)


def _new_file(path: Path, label: str) -> None:
    """An empty file at `path` to bind-mount a namespace onto; AlreadyExists (typed) if there is one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    except OSError as e:
        raise from_oserror("create netns file", str(path), label, e) from e
    os.close(fd)


def _netlink_socket() -> int:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    return s.detach()


class Namespaces:
    """Creates, enters (the calling thread, for the time of one call) and removes job network namespace
    files. `own_fd` is the agent's own network namespace, opened at construction: the thread returns there."""

    def __init__(self, label: str = "agent") -> None:
        self.label = label
        self.own_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._stuck: KernelError | None = None

    def close(self) -> None:
        if self.own_fd >= 0:
            os.close(self.own_fd)
            self.own_fd = -1

    def _in_thread(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the calling thread (which it may move into another network namespace), then move
        the thread back into the agent's namespace."""
        if self._stuck is not None:
            raise self._stuck
        try:
            return fn()
        finally:
            for attempt in range(3):
                try:
                    _setns(self.own_fd, self.label)
                    break
                except KernelError as e:
                    if attempt == 2:
                        self._stuck = KernelError("setns back", self.label, self.label, e.errno,
                                                  f"this thread could not return to the agent's network namespace: {e}")
                        raise self._stuck from e

    def create(self, path: Path, sysctls: Mapping[str, str], setup: Callable[[int], None] | None = None) -> None:
        """Create a new network namespace pinned at `path`, write `sysctls` in it, then run `setup` inside
        it (on the calling thread, inside; its argument is an fd of the agent's namespace). AlreadyExists if `path`
        exists; on any failure the half-made namespace file is removed again."""
        name = path.name

        def work() -> None:
            _new_file(path, self.label)
            try:
                _check(_libc.unshare(ctypes.c_int(CLONE_NEWNET)), "unshare(CLONE_NEWNET) for", name, name)
                for key, value in sysctls.items():
                    write_sysctl(key, value, name)
                _check(_libc.mount(b"/proc/thread-self/ns/net", os.fsencode(path), None,
                                   ctypes.c_ulong(MS_BIND), None), "bind mount netns onto", str(path), name)
                if setup is not None:
                    setup(self.own_fd)
            except BaseException:
                _libc.umount2(os.fsencode(path), MNT_DETACH)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise

        self._in_thread(work)

    def enter(self, path: Path, sysctls: Mapping[str, str] | None = None) -> int:
        """Return the fd of a netlink route socket bound to the namespace at `path` (after writing
        `sysctls` there). NotFound when the file is missing; InvalidArgument when it is not a netns."""

        def work() -> int:
            for key, value in (sysctls or {}).items():
                write_sysctl(key, value, path.name)
            return _netlink_socket()

        return self.run_in(path, work)

    def run_in(self, path: Path, fn: Callable[[], T]) -> T:
        """Run `fn` inside the namespace at `path` (on the calling thread). NotFound when the file is missing;
        InvalidArgument when it is not a network namespace (any more)."""

        def work() -> T:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise from_oserror("open netns", str(path), self.label, e) from e
            try:
                _setns(fd, path.name)
            finally:
                os.close(fd)
            return fn()

        return self._in_thread(work)

    def run_in_each(self, paths: Mapping[str, Path], fn: Callable[[str, Path], T]) -> dict[str, T | KernelError]:
        """`fn(key, path)` inside each namespace in turn (the calling thread goes from one to the next; a full reconcile
        visits every job namespace). A namespace that cannot be entered yields its KernelError instead
        (NotFound: the file is gone; InvalidArgument: it is not a network namespace)."""

        def work() -> dict[str, T | KernelError]:
            out: dict[str, T | KernelError] = {}
            for key, path in paths.items():
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    out[key] = from_oserror("open netns", str(path), self.label, e)
                    continue
                try:
                    _setns(fd, path.name)
                except KernelError as e:
                    out[key] = e
                    continue
                finally:
                    os.close(fd)
                out[key] = fn(key, path)
            return out

        return self._in_thread(work)

    def move(self, src: Path, dst: Path) -> None:
        """Pin the namespace of the file `src` at `dst` instead (a new file, bind-mounted; AlreadyExists if
        `dst` exists), and remove `src`. On failure `src` is left as it was and `dst` is not there."""
        _new_file(dst, self.label)
        try:
            _check(_libc.mount(os.fsencode(src), os.fsencode(dst), None, ctypes.c_ulong(MS_BIND), None),
                   "bind mount netns onto", str(dst), self.label)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(dst)
            raise
        self.remove(src)

    def remove(self, path: Path) -> None:
        """Unmount and unlink the namespace file; an already missing file or mount is fine. The namespace
        (and the veth in it) dies once no process or socket holds it any more."""
        for _ in range(4):  # a file mounted over more than once needs as many unmounts
            if _libc.umount2(os.fsencode(path), ctypes.c_int(MNT_DETACH)) != 0:
                err = ctypes.get_errno()
                if err in (errno_mod.EINVAL, *GONE_ERRNOS):  # EINVAL: not (any more) a mount point
                    break
                raise from_errno("umount netns", str(path), self.label, err)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise from_oserror("unlink netns", str(path), self.label, e) from e
