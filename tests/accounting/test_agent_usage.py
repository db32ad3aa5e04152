"""The agent's side of accounting, with a fake runtime, network, accounting and controller stub: the table is
installed before the job's first process (a failure is the job's setup-failed), samples of live jobs go to the
spool, a job's end puts its final totals in the spool BEFORE its status in the outbox, and ReportUsage
delivery keeps the spool on UNIMPLEMENTED/UNAVAILABLE, acknowledges per batch, drops only a refused report."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest

from nodeagent.accounting import AccountingError, JobNet, NetTotals, Reading
from nodeagent.agent import Agent, JobExitLike
from nodeagent.config import AgentSettings
from nodeagent.desired import DesiredState, GroupSpec, LocalJob
from protos.jobnet.v1 import jobnet_pb2 as pb


class Log(list[str]):
    pass


class FakeRuntime:
    def __init__(self, log: Log) -> None:
        self.log = log
        self.jobs: dict[str, int] = {}
        self.exits: list[JobExitLike] = []

    def start_job(self, job: LocalJob, netns_path: Path) -> int:
        self.log.append(f"start {job.id}")
        self.jobs[job.id] = 100 + len(self.jobs)
        return self.jobs[job.id]

    def stop(self, job_id: str, grace_s: float) -> None: ...

    def poll(self) -> list[JobExitLike]:
        out, self.exits = self.exits, []
        for ex in out:
            self.jobs.pop(ex.job_id, None)
        return out

    def running(self) -> dict[str, int]:
        return dict(self.jobs)

    def recover(self) -> list[JobExitLike]:
        return []

    def cleanup(self, job_id: str) -> None: ...

    def known_jobs(self) -> set[str]:
        return set(self.jobs)

    def close(self) -> None: ...


class FakeNetwork:
    def __init__(self, log: Log | None = None) -> None:
        self.log = log if log is not None else Log()
        self.next_steps: list[Any] = []  # what the next reconcile reports it did

    def reconcile(self, desired: DesiredState, full: bool = False) -> list[Any]:
        self.log.append("network reconcile")
        steps, self.next_steps = self.next_steps, []
        return steps

    def job_netns_path(self, job_id: str) -> Path:
        return Path("/nonexistent/jnj-" + job_id)

    def refill_spares(self, limit: int | None = None, prepare: Callable[[], None] | None = None) -> int:
        return 0

    def close(self) -> None: ...


class FakeAccounting:
    def __init__(self, log: Log) -> None:
        self.log = log
        self.counts: dict[str, int] = {}
        self.fail_ensure: dict[str, str] = {}
        self.released: list[str] = []
        self.retained: set[str] | None = None

    def ensure(self, job_id: str, netns: Path, mac: str) -> Reading:
        self.log.append(f"ensure {job_id} {mac}")
        if job_id in self.fail_ensure:
            raise AccountingError(self.fail_ensure[job_id])
        self.counts.setdefault(job_id, 0)
        return Reading(NetTotals(), 1, "created")

    def read(self, jobs: Mapping[str, JobNet], *, drain_s: float = 0.0) -> dict[str, Reading | AccountingError]:
        out: dict[str, Reading | AccountingError] = {}
        for j, net in jobs.items():
            self.log.append(f"read {j} {'final' if net.mac is None else 'sample'}")
            if j not in self.counts:
                out[j] = AccountingError("no accounting programs on eth0 in the job's network namespace")
                continue
            self.counts[j] += 1000
            n = self.counts[j]
            out[j] = Reading(NetTotals((n, 0, 0, n // 2, 0, 0), (n // 100, 0, 0, n // 200, 0, 0)), 1, "ok")
        return out

    def release(self, job_id: str) -> None:
        self.released.append(job_id)

    def prepare_here(self, mac_prefix: str) -> None:
        self.log.append(f"prepare {mac_prefix}")

    def retain(self, job_ids: Iterable[str]) -> None:
        self.retained = set(job_ids)

    def close(self) -> None: ...


def _err(code: grpc.StatusCode, details: str = "") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class FakeStub:
    def __init__(self) -> None:
        self.usage_error: grpc.StatusCode | None = grpc.StatusCode.UNIMPLEMENTED
        self.refuse_seq: set[int] = set()
        self.usage: list[pb.ReportUsageRequest] = []
        self.reads_counters = False
        self.status: list[pb.ReportJobStatusRequest] = []

    async def ReportUsage(self, req: pb.ReportUsageRequest, timeout: float = 0) -> pb.ReportUsageResponse:
        if self.usage_error is not None:
            raise _err(self.usage_error, "not now")
        if any(r.seq in self.refuse_seq for r in req.reports):
            raise _err(grpc.StatusCode.INVALID_ARGUMENT, "bad report")
        self.usage.append(req)
        return pb.ReportUsageResponse(accepted=len(req.reports), reads_counters=self.reads_counters)

    async def ReportJobStatus(self, req: pb.ReportJobStatusRequest, timeout: float = 0) -> pb.ReportJobStatusResponse:
        self.status.append(req)
        return pb.ReportJobStatusResponse()


def job(i: int) -> LocalJob:
    return LocalJob(f"{i:010x}", "g", f"10.9.0.{i + 2}", f"02:00:01:00:00:{i:02x}", ("sleep", "1"))


@pytest.fixture
def agent(tmp_path: Path) -> tuple[Agent, Log, FakeRuntime, FakeAccounting, FakeStub]:
    log = Log()
    rt, acct, stub = FakeRuntime(log), FakeAccounting(log), FakeStub()
    s = AgentSettings(name="n1", controller="unix:/nonexistent", underlay_ip="198.18.0.11", underlay_ifname="x",
                      state_dir=tmp_path / "state", usage_interval_s=0.1)
    a = Agent(s, rt, FakeNetwork(log), accounting=acct)
    a._stub = stub  # type: ignore[assignment]
    orig_add, orig_put = a.usage.add, a.outbox.put

    def add(items: Any) -> Any:
        log.extend(f"spool {j} {'final' if f else 'sample'}" for j, _, f, _ in items)
        return orig_add(items)

    def put(item: dict[str, Any]) -> None:
        log.append(f"outbox {item['job_id']} {item['state']}")
        orig_put(item)

    a.usage.add = add  # type: ignore[method-assign]
    a.outbox.put = put  # type: ignore[method-assign]
    return a, log, rt, acct, stub


def desired(*jobs: LocalJob) -> DesiredState:
    return DesiredState(1, {"g": GroupSpec("g", 7, "10.9.0.0/24", "10.9.0.1", 1450)}, {j.id: j for j in jobs})


def test_table_before_first_process_and_failure_is_setup_failed(agent: Any) -> None:
    a, log, _rt, acct, _ = agent
    j1, j2 = job(1), job(2)
    acct.fail_ensure[j2.id] = "loading the BPF program jn_acct_tx: Operation not permitted"
    a._reconcile_sync(desired(j1, j2), True)
    assert log.index(f"ensure {j1.id} {j1.mac}") < log.index(f"start {j1.id}")
    assert f"start {j2.id}" not in log
    ended = [i for i in a.outbox.pending() if i["job_id"] == j2.id]
    assert ended[0]["state"] == pb.JOB_STATE_FINISHED and ended[0]["end_reason"] == pb.END_REASON_SETUP_FAILED
    assert ended[0]["message"] == ("setup-failed: accounting: loading the BPF program jn_acct_tx: "
                                   "Operation not permitted")
    assert j2.id in a.finished
    assert not [r for r in a.usage.pending() if r.job_id == j2.id], "a job that never ran has no usage report"


def test_samples_then_final_before_the_status(agent: Any) -> None:
    a, log, rt, acct, _ = agent
    j1 = job(1)
    a.desired = desired(j1)
    a._reconcile_sync(a.desired, True)
    a._sample_usage_sync()
    a._sample_usage_sync()
    assert acct.retained == {j1.id} and not acct.released, "a live job's counters stay held"
    rt.exits.append(JobExitLike(j1.id, "exited", 0, 0, ""))
    log.clear()
    a._poll_sync()
    assert log == [f"read {j1.id} final", f"spool {j1.id} final", f"outbox {j1.id} {pb.JOB_STATE_FINISHED}"]
    assert acct.released == [j1.id], "the map is let go after the final reading"
    recs = a.usage.pending()
    assert [r.final for r in recs] == [False, False, True]
    assert [r.totals.get("tx_local")[0] for r in recs] == [1000, 2000, 3000], "cumulative, increasing"
    assert [r.seq for r in recs] == sorted(r.seq for r in recs)
    a._sample_usage_sync()  # the ended job is not sampled again
    assert len(a.usage.pending()) == 3
    assert acct.retained == set()
    # a second end report of the same job (a restart) changes nothing
    a._job_ended(JobExitLike(j1.id, "exited", 0, 0, ""))
    assert len(a.usage.pending()) == 3


def test_job_removed_while_running_is_read_before_its_namespace_goes(agent: Any) -> None:
    """A running job the controller no longer wants is killed, and the same pass deletes its namespace: its
    counters are read first, so its final report (the namespace is gone by then) is not a stale sample."""
    a, log, rt, acct, _ = agent
    j1 = job(1)
    a._reconcile_sync(desired(j1), True)
    log.clear()
    a._reconcile_sync(desired(), True)
    assert log[:3] == [f"read {j1.id} final", f"spool {j1.id} sample", "network reconcile"]
    del acct.counts[j1.id]  # the namespace is gone
    rt.exits.append(JobExitLike(j1.id, "signalled", 0, 9, ""))
    a._poll_sync()
    final = a.usage.pending()[-1]
    assert final.final and final.totals.get("tx_local")[0] == 1000


def test_unreadable_final_falls_back_to_the_last_sample(agent: Any) -> None:
    a, _log, rt, acct, _ = agent
    j1 = job(1)
    a.desired = desired(j1)
    a._reconcile_sync(a.desired, True)
    a._sample_usage_sync()
    del acct.counts[j1.id]  # the namespace is gone
    rt.exits.append(JobExitLike(j1.id, "signalled", 0, 9, ""))
    a._poll_sync()
    final = a.usage.pending()[-1]
    assert final.final and final.totals.get("tx_local")[0] == 1000


def test_delivery_keeps_the_spool_until_acknowledged(agent: Any, tmp_path: Path) -> None:
    a, _log, _rt, _acct, stub = agent
    jobs = [job(i) for i in range(1, 4)]
    a.desired = desired(*jobs)
    a._reconcile_sync(a.desired, True)
    for _ in range(3):
        a._sample_usage_sync()
    assert len(a.usage) == 9

    async def flush() -> None:
        await a._flush_usage()

    asyncio.run(flush())  # UNIMPLEMENTED: kept, and not retried before the usage interval
    assert len(a.usage) == 9 and stub.usage == [] and a._usage_retry_at > 0
    stub.usage_error = grpc.StatusCode.UNAVAILABLE
    a._usage_retry_at = 0
    asyncio.run(flush())
    assert len(a.usage) == 9
    stub.usage_error = None
    a._usage_retry_at = 0
    bad = a.usage.pending()[4].seq
    stub.refuse_seq = {bad}
    asyncio.run(flush())  # the batch is halved until the refused report is alone; only it is dropped
    assert len(a.usage) == 0 and a.stats["usage_rejected"] == 1
    sent = [r.seq for req in stub.usage for r in req.reports]
    assert bad not in sent and len(sent) == 8 and len(set(sent)) == 8
    assert all(req.node == "n1" and req.boot_id == a.boot_id for req in stub.usage)
    final_of = {r.job_id: r for req in stub.usage for r in req.reports}
    assert final_of[jobs[0].id].net.tx.local.bytes == 3000


def test_spool_survives_an_agent_restart(agent: Any, tmp_path: Path) -> None:
    a, _log, _rt, _acct, _stub = agent
    j1 = job(1)
    a.desired = desired(j1)
    a._reconcile_sync(a.desired, True)
    a._sample_usage_sync()
    pending = [r.seq for r in a.usage.pending()]
    b = Agent(a.s, FakeRuntime(Log()), FakeNetwork(), accounting=FakeAccounting(Log()))
    assert [r.seq for r in b.usage.pending()] == pending
    assert b.meter.last(j1.id) == a.usage.pending()[0].totals, "the meter is seeded from the spool"


def test_packed_counters_once_the_controller_reads_them(agent: Any) -> None:
    """`net` until a response says the controller reads JobUsageReport.counters, then only the packed form (the
    same values, in COUNTERS order); back to `net` if a controller stops saying so."""
    a, _log, _rt, _acct, stub = agent
    stub.usage_error = None
    stub.reads_counters = True
    a.desired = desired(job(1))
    a._reconcile_sync(a.desired, True)

    def send() -> pb.JobUsageReport:
        a._sample_usage_sync()
        asyncio.run(a._flush_usage())
        return stub.usage[-1].reports[-1]

    first = send()
    assert first.HasField("net") and not first.counters
    second = send()
    assert not second.HasField("net") and len(second.counters) == 12
    # tx local bytes, packets, tx overlay .., tx external .., rx local .., rx overlay .., rx external ..
    assert list(second.counters) == [2000, 20, 0, 0, 0, 0, 1000, 10, 0, 0, 0, 0]
    assert (first.net.tx.local.bytes, first.net.tx.local.packets, first.net.rx.local.bytes) == (1000, 10, 500)
    stub.reads_counters = False
    send()
    assert send().HasField("net"), "an older controller again: the nested form"


def test_counting_goes_back_on_a_remade_eth0_in_the_same_pass(agent: Any) -> None:
    """A pass that made a running job's eth0 again (its programs went with the old device) puts the counters
    back at once: the job's ensure runs right after the network reconcile, not at the next sample."""
    from nodeagent.kernel.steps import ConfigureJob, JobNetSpec, SetJobPort

    a, log, _rt, _acct, _ = agent
    j1, j2 = job(1), job(2)
    a._reconcile_sync(desired(j1, j2), True)

    def spec(j: LocalJob) -> JobNetSpec:
        return JobNetSpec(j.id, f"jnj-{j.id}", f"jnv{j.id}", "jnb7", j.mac, j.ip, 24, "10.9.0.1", 1450)

    a.network.next_steps = [ConfigureJob(spec(j1), recreate_veth=True), SetJobPort(spec(j2))]
    log.clear()
    a._reconcile_sync(desired(j1, j2), False)
    assert log[:2] == ["network reconcile", f"ensure {j1.id} {j1.mac}"], log
    assert f"ensure {j2.id} {j2.mac}" not in log, "a port fix leaves eth0 (and its programs) alone"
