"""Small, typed file operations on cgroupfs: each raises CgroupIOError naming the path; removals tolerate
exactly "already gone" (ENOENT) and retry EBUSY briefly."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from .errors import CgroupIOError

GONE = (errno.ENOENT,)


def write(path: Path, value: str) -> None:
    """One write(2) of `value` (cgroupfs parses each write as one command)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CgroupIOError(str(path), "open", e) from e
    try:
        os.write(fd, value.encode())
    except OSError as e:
        raise CgroupIOError(str(path), "write", e, value) from e
    finally:
        os.close(fd)


def read(path: Path) -> str | None:
    """The file's text, or None if the file (or its cgroup) does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read().decode()
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ENODEV, errno.ENOENT):
            return None
        raise CgroupIOError(str(path), "read", e) from e


def read_int(path: Path, default: int = 0) -> int:
    text = read(path)
    if text is None:
        return default
    text = text.strip()
    if not text or text == "max":
        return default
    return int(text.split()[0])


def read_keyed(path: Path) -> dict[str, int]:
    """A flat-keyed file ("key value" lines: cpu.stat, memory.events, memory.oom_control)."""
    out: dict[str, int] = {}
    for line in (read(path) or "").splitlines():
        k, _, v = line.partition(" ")
        try:
            out[k] = int(v.strip())
        except ValueError:
            continue
    return out


def mkdir(path: Path) -> bool:
    """Make the directory; False if it existed already (idempotent)."""
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        raise CgroupIOError(str(path), "mkdir", e) from e


def rmdir(path: Path, busy_timeout: float = 0.5) -> None:
    """Remove a cgroup directory; gone already is fine; EBUSY (tasks still leaving) is retried until busy_timeout."""
    end = time.monotonic() + busy_timeout
    delay = 0.001
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() >= end:
                raise CgroupIOError(str(path), "rmdir", e) from e
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def rename(src: Path, dst: Path) -> None:
    """rename(2) of a cgroup directory within its parent (v1 only); fails with EEXIST rather than replace."""
    try:
        os.rename(src, dst)
    except OSError as e:
        raise CgroupIOError(str(src), "rename", e, str(dst)) from e


def pids_in(path: Path) -> list[int]:
    """The pids in cgroup.procs of a cgroup directory ([] if it is gone)."""
    return [int(x) for x in (read(path / "cgroup.procs") or "").split()]
