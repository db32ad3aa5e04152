"""The agent puts a tmpfs of its own on an empty --netns-dir that is not on one (nodeagent.kernel.namespaces.
tmpfs_for_netns_dir): job namespace files are created and removed there all the time, which slows down with
the live jobs on ext4. It never mounts over a directory that holds anything (a live job's namespace file)."""

from __future__ import annotations

import ctypes
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.kernel.namespaces import TMPFS_MAGIC, fs_type, tmpfs_for_netns_dir

pytestmark = pytest.mark.root

BASE = Path(__file__).resolve().parent  # the checkout: a disk, not a tmpfs (else the test is skipped)


@pytest.fixture
def workdir() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if fs_type(BASE) == TMPFS_MAGIC:
        pytest.skip("the checkout is on a tmpfs: nothing to compare with")
    d = Path(tempfile.mkdtemp(prefix="jn-tmpfs-", dir=BASE))
    try:
        yield d
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        for sub in sorted(d.rglob("*"), key=lambda p: len(str(p)), reverse=True):
            libc.umount2(os.fsencode(sub), 2)
        for sub in sorted(d.rglob("*"), key=lambda p: len(str(p)), reverse=True):
            (sub.rmdir if sub.is_dir() else sub.unlink)()
        d.rmdir()


def test_an_empty_dir_gets_a_tmpfs_once(workdir: Path) -> None:
    netns = workdir / "netns"
    netns.mkdir()
    assert fs_type(netns) != TMPFS_MAGIC
    assert tmpfs_for_netns_dir(netns) == "a tmpfs mounted on it"
    assert fs_type(netns) == TMPFS_MAGIC
    (netns / "jnj-0000000001").write_text("")  # files come and go there as before
    assert tmpfs_for_netns_dir(netns) == "on a tmpfs already"  # an agent restarted: nothing mounted twice
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    assert mounts.count(str(netns)) == 1


def test_a_dir_with_files_is_never_mounted_over(workdir: Path) -> None:
    netns = workdir / "netns"
    netns.mkdir()
    (netns / "jnj-0000000002").write_text("")  # e.g. a live job's namespace file of an older agent
    assert tmpfs_for_netns_dir(netns) == "not on a tmpfs, but not empty: left as it is"
    assert fs_type(netns) != TMPFS_MAGIC and (netns / "jnj-0000000002").exists()
