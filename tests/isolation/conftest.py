"""Fixtures for the job runtime tests: a throwaway network namespace (lo up only), the real cgroup manager
(nodeagent.isolation.cgroups, v1 or v2 as the machine has it) under a `jn-iso-*` parent (job cgroups
`<hierarchy>/<parent>/jn-<job_id>`), a JobRuntime whose state and scratch live under /var/lib/jn-iso-* (not under
/tmp: /tmp is mounted under scratch inside jobs), and a minimal busybox rootfs. Everything is removed in
finalizers."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.isolation import IsolationSpec, JobExit, JobRuntime, LaunchRequest, RuntimeSettings
from nodeagent.isolation.cgroups import CgroupLimits, CgroupManager, detect

BUSYBOX = "/usr/bin/busybox"
PYTHON = "/usr/bin/python3"
PROBE = str(Path(__file__).with_name("probe.py"))
# The probe's source, run with `python -c`: the job's mount namespace hides the host's /tmp (a private one
# from its scratch dir), so a checkout under /tmp is not there for the job to read.
PROBE_SOURCE = Path(PROBE).read_text()
BUSYBOX_APPLETS = ("sh", "ls", "cat", "echo", "id", "ip", "mount", "touch", "sleep", "readlink", "test", "kill")


def rand(n: int = 6) -> str:
    return uuid.uuid4().hex[:n]


def make_cgroups(parent: str) -> CgroupManager:
    return detect(parent=parent)


def limits(**kw: Any) -> CgroupLimits:
    return CgroupLimits(**kw)


def default_limits() -> CgroupLimits:
    return limits()


@pytest.fixture
def netns() -> Iterator[Path]:
    name = f"jn-iso-{rand()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield Path("/run/netns") / name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path("/var/lib") / f"jn-iso-{rand()}"
    d.mkdir(mode=0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_settings(workdir: Path, parent: str, **kw: Any) -> RuntimeSettings:
    return RuntimeSettings(state_dir=workdir / "state", scratch_root=workdir / "scratch", cgroup_parent=parent,
                           defaults=IsolationSpec(limits=default_limits()), **kw)


def remove_parent(parent: str) -> None:
    """Safety net: the (empty) parent cgroup in every hierarchy, whatever the manager's close() does."""
    end = time.monotonic() + 3
    for hier in Path("/sys/fs/cgroup").iterdir():
        d = hier / parent
        for sub in [*(p for p in d.iterdir() if p.is_dir()), d] if d.is_dir() else []:
            while True:
                try:
                    sub.rmdir()
                    break
                except OSError:
                    if time.monotonic() > end:
                        raise
                    time.sleep(0.05)


@pytest.fixture
def parent() -> Iterator[str]:
    name = f"jn-iso-{rand()}"
    yield name
    remove_parent(name)


@pytest.fixture(params=[1, 0], ids=["warm", "cold"])
def runtime(request: pytest.FixtureRequest, workdir: Path, parent: str) -> Iterator[JobRuntime]:
    """Both launch paths: through a warm slot (pre-forked init in a pre-made cgroup) and cold (fork, create,
    attach at launch time). With "warm" the slot is ready before the test starts, so the test's first launch
    with the default limits goes through it."""
    mgr = make_cgroups(parent)
    rt = JobRuntime(make_settings(workdir, parent, warm_slots=request.param), cgroups=mgr)
    zygote = rt.zygote_pid
    assert rt.wait_warm(10.0) == request.param, "the warm slot was not prepared"
    try:
        yield rt
    finally:
        for job_id in [*rt.running(), *(n for n in os.listdir(workdir / "state") if not n.startswith("."))]:
            rt.cleanup(job_id)
        rt.close()
        assert _gone(zygote), "the zygote outlived close() with no job left"
        mgr.close()


def _gone(pid: int, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    for d in ("tmp", "var/tmp", "proc", "dev", "scratch", "etc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    tmp_path.chmod(0o755)
    return root


_SEEN: weakref.WeakKeyDictionary[JobRuntime, dict[str, JobExit]] = weakref.WeakKeyDictionary()


def wait_exit(rt: JobRuntime, job_id: str, timeout: float = 10.0) -> JobExit:
    """Poll until `job_id` ends; exits of other jobs seen meanwhile are kept for their own wait_exit."""
    seen = _SEEN.setdefault(rt, {})
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        seen.update({ex.job_id: ex for ex in rt.poll()})
        if job_id in seen:
            return seen.pop(job_id)
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} did not end within {timeout}s")


def run(rt: JobRuntime, netns: Path, command: tuple[str, ...], timeout: float = 10.0,
        **spec: Any) -> tuple[JobExit, str, str]:
    job_id = f"t{rand(8)}"
    rt.start(LaunchRequest(job_id, command, netns, IsolationSpec(**spec)))
    ex = wait_exit(rt, job_id, timeout)
    scratch = rt.settings.scratch_root / job_id
    return ex, (scratch / "stdout").read_text(), (scratch / "stderr").read_text()


def cgroup_procs_of(parent: str, warm: bool = False) -> list[str]:
    """Every process whose cgroup path (any hierarchy) lies under `parent`; without the runtime's warm launch
    slots (cgroups named jn-w<hex>: an idle pre-forked init each) unless `warm`."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            text = (p / "cgroup").read_text()
            if f"/{parent}/" in text and (warm or f"/{parent}/jn-w" not in text):
                found.append(p.name)
        except OSError:
            continue
    return found


def asdict(x: Any) -> dict[str, Any]:
    return dataclasses.asdict(x)
