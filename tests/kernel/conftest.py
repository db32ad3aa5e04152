"""A tiny two-node world in real namespaces: node namespaces jn-t-n1 and jn-t-n2, each with a veth
(jnt-u1 / jnt-u2, 198.18.0.1-2/24) to an underlay bridge in jn-t-ul. A `Node` runs a NetworkReconciler
inside its node namespace on a dedicated worker thread (per-thread setns; the test process itself stays
where it is), with job namespace files under a temporary directory. Torn down even on failure: job
namespace files unmounted, node and underlay namespaces deleted (which removes every link in them)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from nodeagent.desired import DesiredState, GroupSpec, LocalJob, RemoteEndpoint
from nodeagent.kernel.reconciler import NetSettings, NetworkReconciler
from nodeagent.kernel.steps import Step

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
UNDERLAY = "jn-t-ul"
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def ipj(*cmd: str) -> Any:
    """`ip -j ...` / `bridge -j ...` as parsed JSON (the independent oracle)."""
    out = sh(*cmd).stdout
    return json.loads(out) if out.strip() else []


def _enter(netns: str) -> None:
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}")
    finally:
        os.close(fd)


@dataclass
class Node:
    name: str  # n1
    netns: str  # jn-t-n1
    underlay_ip: str
    netns_dir: Path
    jobs: dict[str, tuple[str, LocalJob]] = field(default_factory=dict)  # job id -> (group, job)
    _ex: ThreadPoolExecutor | None = None
    rec: NetworkReconciler | None = None

    def start(self, underlay_ifname: str | None = None, neigh_watch: bool = True, neigh_sweep: int = 1,
              paced_release: bool = False) -> None:
        self._ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"jn-{self.name}",
                                      initializer=_enter, initargs=(self.netns,))
        settings = NetSettings(netns_dir=self.netns_dir, underlay_ifname=underlay_ifname or f"jnt-u{self.name[1:]}",
                               underlay_ip=self.underlay_ip, neigh_watch=neigh_watch, neigh_sweep=neigh_sweep,
                               paced_release=paced_release)
        self.rec = self.call(lambda: NetworkReconciler(settings))

    def call(self, fn: Callable[[], T]) -> T:
        assert self._ex is not None
        return self._ex.submit(fn).result(timeout=120)

    def reconcile(self, desired: DesiredState, full: bool = False) -> list[Step]:
        rec = self.rec
        assert rec is not None
        return self.call(lambda: rec.reconcile(desired, full=full))

    def stop(self) -> None:
        if self._ex is not None:
            if self.rec is not None:
                rec = self.rec
                self.call(rec.close)
            self._ex.shutdown(wait=True)
            self._ex = None

    def job_ns(self, job_id: str) -> Path:
        return self.netns_dir / f"jnj-{job_id}"

    def in_job(self, job_id: str, *cmd: str) -> subprocess.CompletedProcess[str]:
        return sh("nsenter", f"--net={self.job_ns(job_id)}", *cmd, check=False)

    def ip(self, *args: str) -> Any:
        return ipj("ip", "-n", self.netns, "-j", *args)


@dataclass
class World:
    nodes: dict[str, Node]
    groups: dict[str, GroupSpec]

    def desired(self, node: str, rev: int = 1) -> DesiredState:
        """What the controller would send `node`: its jobs, their groups, the other jobs of those groups."""
        me = self.nodes[node]
        groups = {g: self.groups[g] for g, _ in me.jobs.values()}
        jobs = {j.id: j for _, j in me.jobs.values()}
        endpoints = {}
        for other in self.nodes.values():
            if other is me:
                continue
            for g, j in other.jobs.values():
                if g in groups:
                    endpoints[j.id] = RemoteEndpoint(g, j.id, other.name, other.underlay_ip, j.ip, j.mac)
        return DesiredState(rev, groups, jobs, endpoints)

    def add_job(self, node: str, group: str, index: int) -> LocalJob:
        g = self.groups[group]
        net = g.subnet.rsplit(".", 2)[0] + ".0"
        job_id = f"{g.vni:04x}{index:06x}"
        job = LocalJob(job_id, group, f"{net}.{10 + index}", f"02:00:00:{g.vni % 256:02x}:00:{index:02x}", ("true",))
        self.nodes[node].jobs[job_id] = (group, job)
        return job

    def reconcile_all(self, full: bool = False) -> dict[str, list[Step]]:
        return {n: node.reconcile(self.desired(n), full=full) for n, node in self.nodes.items()}


def _teardown(nodes: list[Node], dirs: list[Path]) -> None:
    for node in nodes:
        with contextlib.suppress(Exception):  # teardown goes on; the test already reported what failed
            node.stop()
    for d in dirs:
        if d.is_dir():
            for f in d.iterdir():
                sh("umount", "-l", str(f), check=False)
                f.unlink(missing_ok=True)
    for ns in ("jn-t-n1", "jn-t-n2", UNDERLAY):
        sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    nodes: list[Node] = []
    dirs = [tmp_path / "n1-netns", tmp_path / "n2-netns"]
    _teardown([], [])  # leftovers of an interrupted earlier run
    try:
        sh("ip", "netns", "add", UNDERLAY)
        sh("ip", "-n", UNDERLAY, "link", "add", "jnt-ulbr", "type", "bridge")
        sh("ip", "-n", UNDERLAY, "link", "set", "jnt-ulbr", "up")
        for i in (1, 2):
            ns = f"jn-t-n{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "add", f"jnt-u{i}", "type", "veth", "peer", "name", f"jnt-u{i}p",
               "netns", UNDERLAY)
            sh("ip", "-n", UNDERLAY, "link", "set", f"jnt-u{i}p", "master", "jnt-ulbr", "up")
            sh("ip", "-n", ns, "addr", "add", f"198.18.0.{i}/24", "dev", f"jnt-u{i}")
            sh("ip", "-n", ns, "link", "set", f"jnt-u{i}", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            nodes.append(Node(f"n{i}", ns, f"198.18.0.{i}", dirs[i - 1]))
        groups = {
            "a": GroupSpec("a", 100, "10.40.0.0/24", "10.40.0.1", 1450),
            "b": GroupSpec("b", 200, "10.41.0.0/24", "10.41.0.1", 1400),
            "c": GroupSpec("c", 300, "10.42.0.0/24", "10.42.0.1", 1450),
        }
        for n in nodes:
            n.start()
        yield World({n.name: n for n in nodes}, groups)
    finally:
        _teardown(nodes, dirs)
