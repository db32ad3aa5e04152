"""The gRPC face of the controller (jobnet.v1.Controller on grpc.aio): thin handlers over
`controller.core.Controller`, errors turned into status codes, and the WatchNode streams."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from controller import topology, validate
from controller.accounting import Accounting
from controller.core import Controller
from controller.errors import ApiError, Unavailable
from controller.identity import identify
from controller.metrics import RPCS
from protos.jobnet.v1 import jobnet_pb2 as pb
from protos.jobnet.v1 import jobnet_pb2_grpc as pbg

log = logging.getLogger("jobnet.controller.service")

T = TypeVar("T")
Handler = Callable[..., Awaitable[T]]


def rpc(fn: Handler[T]) -> Handler[T]:
    """Map ApiError to its status code; anything else is INTERNAL, logged with its traceback."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> T:
        try:
            result = await fn(self, request, context)
            RPCS[(fn.__name__, "OK")] += 1
            return result
        except ApiError as e:
            RPCS[(fn.__name__, e.code.name)] += 1
            log.debug("%s from %s: %s %s", fn.__name__, identify(context), e.code.name, e.message)
            await context.abort(e.code, e.message)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if isinstance(e, grpc.aio.AbortError):
                raise
            RPCS[(fn.__name__, "INTERNAL")] += 1
            log.exception("%s failed", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {fn.__name__}: {e}; "
                                "see the controller's log")
        raise AssertionError("unreachable")

    return wrapper


class ControllerService(pbg.ControllerServicer):
    def __init__(self, core: Controller, accounting: Accounting) -> None:
        self.core = core
        self.acct = accounting
        self._agent_channels: dict[str, grpc.aio.Channel] = {}

    # ---------------------------------------------------------------- groups
    @rpc
    async def CreateGroup(self, request: pb.CreateGroupRequest, context: Any) -> pb.Group:
        return self.core.create_group(request)

    @rpc
    async def GetGroup(self, request: pb.GetGroupRequest, context: Any) -> pb.Group:
        return self.core.get_group(request.name)

    @rpc
    async def ListGroups(self, request: pb.ListGroupsRequest, context: Any) -> pb.ListGroupsResponse:
        return pb.ListGroupsResponse(groups=self.core.list_groups())

    @rpc
    async def DeleteGroup(self, request: pb.DeleteGroupRequest, context: Any) -> pb.DeleteGroupResponse:
        self.core.delete_group(request.name, request.force)
        return pb.DeleteGroupResponse()

    # ---------------------------------------------------------------- nodes
    @rpc
    async def RegisterNode(self, request: pb.RegisterNodeRequest, context: Any) -> pb.RegisterNodeResponse:
        node, rev = self.core.register_node(request)
        return pb.RegisterNodeResponse(node=node, revision=rev,
                                       heartbeat_interval_ms=self.core.cfg.heartbeat_interval_ms)

    @rpc
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatResponse:
        return pb.HeartbeatResponse(revision=self.core.heartbeat(request))

    @rpc
    async def ListNodes(self, request: pb.ListNodesRequest, context: Any) -> pb.ListNodesResponse:
        return pb.ListNodesResponse(nodes=self.core.list_nodes())

    # ---------------------------------------------------------------- jobs
    @rpc
    async def CreateJob(self, request: pb.CreateJobRequest, context: Any) -> pb.Job:
        return self.core.create_job(request)

    # Jobs go out with their network totals (Job.net) from the accounting.
    @rpc
    async def GetJob(self, request: pb.GetJobRequest, context: Any) -> pb.Job:
        return self.acct.job_out(self.core.get_job(request.id))

    @rpc
    async def ListJobs(self, request: pb.ListJobsRequest, context: Any) -> pb.ListJobsResponse:
        return pb.ListJobsResponse(jobs=[self.acct.job_out(j) for j in self.core.list_jobs(request)])

    @rpc
    async def StopJob(self, request: pb.StopJobRequest, context: Any) -> pb.Job:
        return self.acct.job_out(self.core.stop_job(request.id))

    @rpc
    async def ReportJobStatus(self, request: pb.ReportJobStatusRequest, context: Any) -> pb.ReportJobStatusResponse:
        self.core.report_job_status(request)
        return pb.ReportJobStatusResponse()

    @rpc
    async def GetTopology(self, request: pb.GetTopologyRequest, context: Any) -> pb.Topology:
        if request.group:
            self.core.get_group(request.group)
        return topology.to_proto(topology.build(self.core.c, request.group), self.core.c.revision)

    @rpc
    async def ReadJobLog(self, request: pb.ReadJobLogRequest, context: Any) -> pb.ReadJobLogResponse:
        job, address = self.core.job_agent_address(request.job_id)
        ch = self._agent_channels.get(address)
        if ch is None:
            ch = self._agent_channels[address] = grpc.aio.insecure_channel(address)
        try:
            stub = pbg.NodeAgentStub(ch)
            resp: pb.ReadJobLogResponse = await stub.ReadJobLog(request, timeout=10)
            return resp
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                await context.abort(e.code(), e.details() or "")
            raise Unavailable(f"could not read the log of job {job.id} from node {job.node}'s agent at "
                              f"{address}: {e.code().name}: {e.details()}") from None

    # ---------------------------------------------------------------- accounting (issue 4)
    @rpc
    async def ReportUsage(self, request: pb.ReportUsageRequest, context: Any) -> pb.ReportUsageResponse:
        res = self.acct.ingest(request)
        await self.acct.wait_durable(res)  # group commit: acknowledged means on disk
        if res.finals:
            self.acct.record_finals(res.finals)
        return pb.ReportUsageResponse(accepted=res.accepted, duplicates=res.duplicates, unknown_jobs=res.unknown,
                                      reads_counters=True)

    @rpc
    async def QueryUsage(self, request: pb.QueryUsageRequest, context: Any) -> pb.QueryUsageResponse:
        return await self.acct.query(request)

    # ---------------------------------------------------------------- watch
    async def WatchNode(self, request: pb.WatchNodeRequest, context: Any) -> AsyncIterator[pb.NodeStateUpdate]:
        try:
            self.core._known_node(validate.node_name(request.node), request.boot_id)
        except ApiError as e:
            await context.abort(e.code, e.message)
        sub = self.core.hub.subscribe(request.node, request.boot_id, request.revision)
        try:
            while True:
                update = await sub.queue.get()
                if update is None:
                    return
                yield update
        finally:
            self.core.hub.unsubscribe(sub)

    async def close(self) -> None:
        self.core.hub.close_all()
        for ch in self._agent_channels.values():
            await ch.close(None)
