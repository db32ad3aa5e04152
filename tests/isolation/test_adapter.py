"""nodeagent.runtime.RuntimeAdapter end to end (real namespaces, the real cgroup manager): a LocalJob's
isolation_json (jobnet.v1.Isolation as MessageToDict JSON with proto field names: uint64 as strings) plus a
site config file become a job with those limits, env, cwd and wall time; the site maximum refuses a request
with "setup-failed: validate: ..." naming the limit; stdout/stderr land in the scratch dir and are kept in the
agent's logs dir after cleanup."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.agent import JobExitLike
from nodeagent.config import AgentSettings
from nodeagent.desired import LocalJob
from nodeagent.isolation import SetupFailed
from nodeagent.runtime import RuntimeAdapter, make_runtime

from .conftest import rand

pytestmark = pytest.mark.root

SITE = """
[defaults]
memory_max = "256M"
pids_max = 256

[max]
memory_max = "512M"
pids_max = 1024
wall_time_s = 60
"""


@pytest.fixture
def agent_settings(workdir: Path, parent: str) -> AgentSettings:
    # AgentSettings.cgroup_parent is "jn-<name>": the `parent` fixture's name, removed after the test
    return AgentSettings(name=parent.removeprefix("jn-"), controller="unix:/nonexistent", underlay_ip="192.0.2.1",
                         underlay_ifname="jn-none", state_dir=workdir / "agent", scratch_root=workdir / "scratch")


@pytest.fixture
def adapter(agent_settings: AgentSettings, workdir: Path) -> Iterator[RuntimeAdapter]:
    site = workdir / "site.toml"
    site.write_text(SITE)
    ad = make_runtime(agent_settings, site)
    try:
        yield ad
    finally:
        for job_id in [*ad.running(), *ad.known_jobs()]:
            ad.cleanup(job_id)
        ad.close()


def _job(command: tuple[str, ...], isolation: dict[str, Any]) -> LocalJob:
    return LocalJob(id=f"a{rand(9)}", group="g", ip="10.0.0.2", mac="02:00:00:00:00:02", command=command,
                    isolation_json=json.dumps(isolation, sort_keys=True))


def _wait(ad: RuntimeAdapter, job_id: str, timeout: float = 10.0) -> JobExitLike:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for ex in ad.poll():
            if ex.job_id == job_id:
                return ex
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} did not end within {timeout}s")


def _memory_limit(pid: int) -> int:
    """The memory limit of the cgroup process `pid` is in (v1 memory.limit_in_bytes or v2 memory.max)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if "memory" in ctrls.split(","):
            return int(Path("/sys/fs/cgroup/memory", path.lstrip("/"), "memory.limit_in_bytes").read_text())
        if ctrls == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            return int(Path("/sys/fs/cgroup", path.lstrip("/"), "memory.max").read_text())
    raise AssertionError(f"no memory cgroup for {pid}")


def test_limits_env_cwd_wall_time_and_logs(adapter: RuntimeAdapter, agent_settings: AgentSettings,
                                           netns: Path) -> None:
    s = agent_settings
    other_log = s.state_dir / "logs" / "other" / "stdout"  # a finished job's kept output: not for this job
    other_log.parent.mkdir(parents=True)
    other_log.write_text("secret\n")
    iso = {"resources": {"memory_max_bytes": str(128 << 20), "wall_time_s": 2},
           "env": ["GREETING=hello world", "EMPTY="], "cwd": "/tmp"}
    job = _job(("sh", "-c", f'echo "$GREETING|$EMPTY|$JOBNET_JOB_ID"; pwd; echo to-err >&2; ls -A {s.state_dir}; '
                            f"cat {other_log} 2>/dev/null || echo hidden; sleep 30"), iso)
    t0 = time.monotonic()
    pid = adapter.start_job(job, netns)
    assert adapter.running() == {job.id: pid} and adapter.known_jobs() == {job.id}
    assert _memory_limit(pid) == 128 << 20
    ex = _wait(adapter, job.id, timeout=10)
    assert 1.5 < time.monotonic() - t0 < 8
    assert (ex.end_reason, ex.signal) == ("timeout", 9), ex
    assert ex.usage["cpu_seconds"] > 0 and ex.usage["memory_peak_bytes"] > 0
    scratch = s.scratch_root / job.id
    out = f"hello world||{job.id}\n/tmp\nhidden\n"  # the agent's state dir is an empty tmpfs for the job
    assert (scratch / "stdout").read_text() == out
    assert (scratch / "stderr").read_text() == "to-err\n"
    adapter.cleanup(job.id)
    assert not scratch.exists() and adapter.known_jobs() == set()
    kept = s.state_dir / "logs" / job.id
    assert (kept / "stdout").read_text() == out and (kept / "stderr").read_text() == "to-err\n"
    assert (s.state_dir / "logs").stat().st_mode & 0o777 == 0o700


def test_site_defaults_apply_and_exit_code(adapter: RuntimeAdapter, netns: Path) -> None:
    job = _job(("sh", "-c", "sleep 1; exit 3"), {})
    pid = adapter.start_job(job, netns)
    assert _memory_limit(pid) == 256 << 20  # [defaults] memory_max
    ex = _wait(adapter, job.id)
    assert (ex.end_reason, ex.exit_code, ex.signal) == ("exited", 3, 0)


@pytest.mark.parametrize(("resources", "names"), [
    ({"memory_max_bytes": str(1 << 30)}, ("memory_max", str(1 << 30), str(512 << 20))),
    ({"pids_max": 5000}, ("pids_max", "5000", "1024")),
    ({"wall_time_s": 3600}, ("wall_time_s", "3600", "60")),
])
def test_site_maximum_refuses_with_the_limit_named(adapter: RuntimeAdapter, agent_settings: AgentSettings,
                                                   netns: Path, resources: dict[str, Any],
                                                   names: tuple[str, ...]) -> None:
    job = _job(("true",), {"resources": resources})
    with pytest.raises(SetupFailed) as ei:
        adapter.start_job(job, netns)
    msg = str(ei.value)
    assert msg.startswith("setup-failed: validate: "), msg
    assert all(n in msg for n in names), msg
    assert adapter.running() == {} and adapter.known_jobs() == set()
    assert not (agent_settings.scratch_root / job.id).exists()


@pytest.mark.parametrize(("isolation", "part"), [
    ({"resources": {"cpu_quota_millicores": 5}}, "malformed isolation request: cpu_quota_us"),
    ({"resources": {"io_limits": [{"device": "sda", "read_bps": "1"}]}}, "malformed isolation request"),
    ({"env": ["=x"]}, "environment variable"),
    ({"cwd": "relative"}, "cwd"),
    ({"uid": 0}, "root"),
])
def test_malformed_or_forbidden_requests(adapter: RuntimeAdapter, netns: Path, isolation: dict[str, Any],
                                         part: str) -> None:
    with pytest.raises(SetupFailed, match=r"^setup-failed: validate: ") as ei:
        adapter.start_job(_job(("true",), isolation), netns)
    assert part in str(ei.value)
    assert adapter.known_jobs() == set()


def test_open_limits_get_the_site_maximum_and_bad_site_configs_are_refused(tmp_path: Path) -> None:
    from nodeagent.isolation import LaunchRequest, RuntimeSettings
    from nodeagent.isolation.plan import build_plan
    from nodeagent.runtime import spec_from_isolation
    from nodeagent.site import SiteConfigError, load_site

    site = tmp_path / "site.toml"
    site.write_text('[max]\nmemory_max = "512M"\ncpu_quota_us = 200000\nwall_time_s = 60\n')
    defaults, smax = load_site(site)
    rs = RuntimeSettings(state_dir=Path("/var/lib/jn-x/st"), scratch_root=Path("/var/lib/jn-x/sc"),
                         cgroup_parent="jn-x", defaults=defaults, site_max=smax)  # build_plan touches no file
    plan = build_plan(rs, LaunchRequest("j1", ("true",), Path("/nonexistent"), spec_from_isolation({})))
    assert plan.spec.limits is not None and plan.spec.limits.memory_max == 512 << 20  # never unbounded
    assert plan.spec.limits.cpus == 2.0 and plan.child.wall_time_s == 60
    # the CPU quota is compared in CPUs: 1.5 CPUs fit under 2
    lim = build_plan(rs, LaunchRequest("j2", ("true",), Path("/x"),
                                       spec_from_isolation({"resources": {"cpu_quota_millicores": 1500}}))).spec.limits
    assert lim is not None and lim.cpus == 1.5
    with pytest.raises(SetupFailed, match=r"cpu_quota_us/cpu_period_us: the job asks for .*2\.5 CPUs"):
        build_plan(rs, LaunchRequest("j3", ("true",), Path("/x"),
                                     spec_from_isolation({"resources": {"cpu_quota_millicores": 2500}})))
    site.write_text('[defaults]\nmemory_max = "1G"\n[max]\nmemory_max = "512M"\n')
    with pytest.raises(SiteConfigError, match=r"\[defaults\] exceed \[max\]: memory_max"):
        load_site(site)
    site.write_text("[defaults]\ncpu_weight = 0\n")
    with pytest.raises(SiteConfigError, match=r"\[defaults\] cpu_weight=0"):
        load_site(site)
