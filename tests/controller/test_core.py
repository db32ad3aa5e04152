"""The controller's core without gRPC, on the memory store with a settable clock."""

from __future__ import annotations

from controller.core import Config, Controller
from controller.store import MemoryStore
from protos.jobnet.v1 import jobnet_pb2 as pb


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def test_finished_jobs_are_forgotten_after_the_retention_live_ones_never() -> None:
    clock = Clock()
    core = Controller(MemoryStore(), Config(clock=clock, job_retention_s=86400, quarantine_s=600))
    core.register_node(pb.RegisterNodeRequest(name="n1", underlay_ip="198.18.5.11", boot_id="b1"))
    core.create_group(pb.CreateGroupRequest(name="a"))
    done = core.create_job(pb.CreateJobRequest(group="a", node="n1", command=["true"]))
    live = core.create_job(pb.CreateJobRequest(group="a", node="n1", command=["sleep", "1"]))
    core.report_job_status(pb.ReportJobStatusRequest(node="n1", boot_id="b1", job_id=done.id,
                                                     state=pb.JOB_STATE_FINISHED))
    assert core.purge_finished() == 0
    clock.t += 86400 + 1
    assert core.purge_finished() == 1
    ids = {j.id for j in core.list_jobs(pb.ListJobsRequest(include_finished=True))}
    assert ids == {live.id}
    assert not core.c.quarantine, "expired quarantine entries go too"
    # and it is durable: a controller on the same store agrees
    again = Controller(core.store, Config(clock=clock))
    assert {j.id for j in again.list_jobs(pb.ListJobsRequest(include_finished=True))} == {live.id}
