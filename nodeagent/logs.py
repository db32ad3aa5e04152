"""The agent's NodeAgent service: reads a job's stdout/stderr from its scratch dir for the controller.

The files are written by the job itself (the runtime points its stdout and stderr at
<scratch_root>/<job_id>/stdout and .../stderr), so reading them needs no cooperation from the job. When the
job is cleaned up, the agent keeps a copy under <state_dir>/logs/<job_id>/ for 24 hours.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import grpc

from protos.jobnet.v1 import jobnet_pb2 as pb
from protos.jobnet.v1 import jobnet_pb2_grpc as pbg

MAX_CHUNK = 1 << 20
JOB_ID = re.compile(r"^[0-9a-f]{10}$")


class NodeAgentService(pbg.NodeAgentServicer):
    def __init__(self, roots: list[Path], is_finished: Callable[[str], bool]) -> None:
        self._roots = roots  # the live scratch root first, then where finished jobs' output is kept
        self._is_finished = is_finished

    async def ReadJobLog(
        self, request: pb.ReadJobLogRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ReadJobLogResponse:
        if not JOB_ID.match(request.job_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"job id {request.job_id!r} is not a jobnet job id (10 hex characters)")
        stream = request.stream or "stdout"
        if stream not in ("stdout", "stderr"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"stream {stream!r}: choose stdout or stderr")
        fd = -1
        for root in self._roots:
            try:
                fd = os.open(root / request.job_id / stream, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                break
            except FileNotFoundError:
                continue
        if fd < 0:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"job {request.job_id} has no {stream} on this node (it did not start here, "
                                "or its output is older than the retention of 24 h)")
        try:
            size = os.fstat(fd).st_size
            offset = request.offset if request.offset >= 0 else max(0, size + request.offset)
            want = min(request.max_bytes or MAX_CHUNK, MAX_CHUNK)
            data = os.pread(fd, want, offset)
        finally:
            os.close(fd)
        return pb.ReadJobLogResponse(data=data, offset=offset, size=size,
                                     finished=self._is_finished(request.job_id))
