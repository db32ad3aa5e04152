"""A real lab for the e2e tests: a controller and 3 agents, each a real process in its own network
namespace on an underlay bridge (deploy/lab.py). One lab per test module; torn down even on failure."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.lab import Lab, wait_running
from protos.jobnet.v1 import jobnet_pb2 as pb

PROBE = str(Path(__file__).with_name("probe.py"))
METRICS_PORT = 9401  # each agent serves /metrics inside its own node namespace


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    with running_lab(request, "jnt", ("--metrics-listen", f"0.0.0.0:{METRICS_PORT}")) as lab:
        yield lab


@contextlib.contextmanager
def running_lab(request: pytest.FixtureRequest, prefix: str, agent_args: tuple[str, ...] = ()) -> Iterator[Lab]:
    """A 3-node lab named <prefix><pid>, its logs kept as artifacts, torn down even on failure."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"{prefix}{os.getpid() % 10000}"
    lab = Lab(name=name, nodes=3, dir=Path(f"/run/jobnet/test-{name}"),
              agent_args=("--resync-interval", "2", "--log-level", "DEBUG", *agent_args))
    try:
        lab.up()
        yield lab
    finally:
        artifacts = Path(os.environ.get("JOBNET_ARTIFACTS", "/tmp/jobnet-artifacts")) / request.node.name
        artifacts.mkdir(parents=True, exist_ok=True)
        for log in lab.dir.rglob("*.log"):
            (artifacts / f"{log.parent.name}-{log.name}").write_bytes(log.read_bytes())
        lab.down()


def run_jobs(lab: Lab, layout: list[tuple[str, str]]) -> list[Any]:
    jobs = [lab.stub().CreateJob(pb.CreateJobRequest(group=g, node=n, command=["sleep", "3600"]))
            for g, n in layout]
    wait_running(lab, [j.id for j in jobs])
    return [lab.stub().GetJob(pb.GetJobRequest(id=j.id)) for j in jobs]


def ping(lab: Lab, src: Any, ip: str) -> bool:
    return lab.in_job(src.node, src.id, ["ping", "-c1", "-W1", "-q", ip]).returncode == 0


class TcpServers:
    """One TCP listener per job, inside the job's network namespace."""

    def __init__(self, lab: Lab, port: int = 7001) -> None:
        self.lab, self.port, self.procs = lab, port, []

    def start(self, job: Any) -> None:
        p = subprocess.Popen(["nsenter", f"--net={self.lab.job_netns(job.node, job.id)}", sys.executable,
                              PROBE, "serve", str(self.port)], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "listening"
        self.procs.append(p)

    def connect(self, src: Any, ip: str, timeout: float = 2.0) -> bool:
        r = self.lab.in_job(src.node, src.id, [sys.executable, PROBE, "connect", ip, str(self.port), str(timeout)])
        return r.returncode == 0

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def eventually(fn: Any, timeout: float = 15.0, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    return last


def scrape_agent(lab: Lab, node: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """An agent's /metrics, fetched from inside its node namespace, parsed with the Prometheus parser."""
    from prometheus_client.parser import text_string_to_metric_families

    r = lab.in_node(node, [sys.executable, "-c", "import urllib.request,sys; sys.stdout.write(urllib.request."
                           f"urlopen('http://{lab.underlay_ip(node)}:{METRICS_PORT}/metrics', timeout=5).read()"
                           ".decode())"])
    assert r.returncode == 0, r.stderr
    out = {}
    for fam in text_string_to_metric_families(r.stdout):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out
