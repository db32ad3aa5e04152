"""Typed ctypes facade over the Linux syscalls Python 3.11's `os` lacks: unshare, setns, mount, umount2,
pivot_root, mount_setattr, prctl, capset, close_range.

Every wrapper raises `OSError(errno, "<call> <object>: <strerror>")` naming the call and its object, so a
failed launch step can say exactly what broke. Stdlib only: this module is imported by the zygote, which runs
with `python -S`.
"""

from __future__ import annotations

import ctypes
import os
import platform

# the libc this process already has mapped: ctypes.util.find_library("c") would run `ldconfig -p` (a fork+exec
# per import, in the agent and in every zygote)
_libc = ctypes.CDLL(None, use_errno=True)

# clone / unshare / setns flags
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount(2) flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2

# mount_setattr(2)
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4

# prctl(2)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_CHILD_SUBREAPER = 36

_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {"pivot_root": 155, "mount_setattr": 442, "close_range": 436, "capset": 126, "renameat2": 316},
    "aarch64": {"pivot_root": 41, "mount_setattr": 442, "close_range": 436, "capset": 91, "renameat2": 276},
}
_NR = _SYSCALLS.get(platform.machine(), _SYSCALLS["x86_64"])


def _check(rc: int, what: str) -> None:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(path: str | os.PathLike[str] | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")


def setns(fd: int, nstype: int, what: str = "") -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), f"setns {what or fd}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    rc = _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data))
    _check(rc, f"mount {source or fstype or ''} on {target}")


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), f"umount2 {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    rc = _libc.syscall(ctypes.c_long(_NR["pivot_root"]), _b(new_root), _b(put_old))
    _check(rc, f"pivot_root {new_root}")


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr(path: str, *, recursive: bool, attr_set: int = 0, attr_clr: int = 0, propagation: int = 0) -> None:
    """Change mount attributes (read-only, nosuid, propagation) of one mount or a whole tree in one call."""
    attr = _MountAttr(attr_set, attr_clr, propagation, 0)
    flags = AT_RECURSIVE if recursive else 0
    rc = _libc.syscall(
        ctypes.c_long(_NR["mount_setattr"]), ctypes.c_int(AT_FDCWD), _b(path), ctypes.c_uint(flags),
        ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(rc, f"mount_setattr {path}")


def prctl(option: int, arg2: int = 0, arg3: int = 0, what: str = "") -> None:
    rc = _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(0),
                     ctypes.c_ulong(0))
    _check(rc, f"prctl {what or option}")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def capset_zero() -> None:
    """Empty the effective, permitted and inheritable capability sets of the calling thread."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.syscall(ctypes.c_long(_NR["capset"]), ctypes.byref(hdr), data), "capset")


def drop_bounding_set(last_cap: int) -> None:
    for cap in range(last_cap + 1):
        rc = _libc.prctl(ctypes.c_int(PR_CAPBSET_DROP), ctypes.c_ulong(cap), ctypes.c_ulong(0), ctypes.c_ulong(0),
                         ctypes.c_ulong(0))
        if rc < 0 and ctypes.get_errno() != 22:  # EINVAL: capability unknown to this kernel
            _check(rc, f"prctl PR_CAPBSET_DROP {cap}")


def close_range(first: int, last: int) -> None:
    if first > last:
        return
    _check(_libc.syscall(ctypes.c_long(_NR["close_range"]), ctypes.c_uint(first), ctypes.c_uint(last),
                         ctypes.c_uint(0)), "close_range")


def close_fds_except(keep: set[int]) -> None:
    """Close every fd >= 3 that is not in `keep`."""
    lo = 3
    for fd in sorted(k for k in keep if k >= 3):
        close_range(lo, fd - 1)
        lo = fd + 1
    close_range(lo, 0x7FFFFFFF)


def proc_starttime(pid: int) -> int | None:
    """The process start time (clock ticks since boot, /proc/<pid>/stat field 22), None if gone or a zombie.

    Together with the pid it identifies a process across pid reuse.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = data[data.rindex(b")") + 2:].split()
    if rest[0] in (b"Z", b"X"):
        return None
    return int(rest[19])


RENAME_NOREPLACE = 1


def rename_noreplace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """rename(2) that fails with EEXIST instead of replacing `dst`."""
    rc = _libc.syscall(ctypes.c_long(_NR["renameat2"]), ctypes.c_int(AT_FDCWD), _b(src), ctypes.c_int(AT_FDCWD),
                       _b(dst), ctypes.c_uint(RENAME_NOREPLACE))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(dst))
