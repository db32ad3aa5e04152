"""Typed errors of the kernel layer. Every kernel failure is translated here, once, into an exception that
names the operation, the object and the network namespace it happened in (and the kernel's ext_ack text
when the kernel gave one)."""

from __future__ import annotations

import errno as errno_mod
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nodeagent.kernel.steps import Step

# errnos that mean "the object is already gone" on a delete; nothing else is tolerated.
GONE_ERRNOS = frozenset({errno_mod.ENODEV, errno_mod.ENOENT, errno_mod.EADDRNOTAVAIL, errno_mod.ESRCH})


class KernelError(Exception):
    """A kernel operation failed: `op` on `obj` in network namespace `netns`."""

    def __init__(self, op: str, obj: str, netns: str, errno: int, detail: str = "") -> None:
        self.op = op
        self.obj = obj
        self.netns = netns
        self.errno = errno
        self.detail = detail or (os.strerror(errno) if errno > 0 else "")
        super().__init__(f"{op} {obj!r} in netns {netns!r}: {self.detail} (errno {errno})")


class AlreadyExists(KernelError):
    """EEXIST."""


class NotFound(KernelError):
    """ENODEV, ENOENT, EADDRNOTAVAIL, ESRCH: the object (or one it refers to) does not exist."""


class Busy(KernelError):
    """EBUSY."""


class InvalidArgument(KernelError):
    """EINVAL, ERANGE, EOPNOTSUPP: the kernel refused the request's content."""


class NotPermitted(KernelError):
    """EPERM, EACCES."""


class DumpInterrupted(KernelError):
    """A dump kept being interrupted by concurrent changes (NLM_F_DUMP_INTR), beyond the retry bound."""


_BY_ERRNO: dict[int, type[KernelError]] = {
    errno_mod.EEXIST: AlreadyExists,
    errno_mod.EBUSY: Busy,
    errno_mod.EINVAL: InvalidArgument,
    errno_mod.ERANGE: InvalidArgument,
    errno_mod.EOPNOTSUPP: InvalidArgument,
    errno_mod.EPERM: NotPermitted,
    errno_mod.EACCES: NotPermitted,
    **{e: NotFound for e in GONE_ERRNOS},
}


def from_errno(op: str, obj: str, netns: str, errno: int, detail: str = "") -> KernelError:
    """The typed exception for `errno` (KernelError itself for errnos without a class of their own)."""
    return _BY_ERRNO.get(errno, KernelError)(op, obj, netns, errno, detail)


def from_oserror(op: str, obj: str, netns: str, exc: OSError) -> KernelError:
    return from_errno(op, obj, netns, exc.errno or 0, exc.strerror or str(exc))


class DependencyFailed(Exception):
    """A step was not attempted because a device it needs failed to be made earlier in the same pass."""


class StepFailed(Exception):
    """One plan step failed; `cause` is the typed kernel error (or other exception) behind it."""

    def __init__(self, step: Step, cause: BaseException) -> None:
        self.step = step
        self.cause = cause
        super().__init__(f"step {step} failed: {cause}")


class ReconcileError(Exception):
    """Some steps of a reconcile failed. The others were applied (`applied`); a full reconcile retries."""

    def __init__(self, failures: Sequence[StepFailed], applied: Sequence[Step]) -> None:
        self.failures = list(failures)
        self.applied = list(applied)
        first = "; ".join(str(f) for f in self.failures[:3])
        more = f" (+{len(self.failures) - 3} more)" if len(self.failures) > 3 else ""
        super().__init__(f"{len(self.failures)} of {len(self.failures) + len(self.applied)} step(s) failed: "
                         f"{first}{more}")
