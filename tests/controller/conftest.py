"""A real jobnet-controller process on a unix socket with its own SQLite file, per test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from protos.jobnet.v1 import jobnet_pb2 as pb
from protos.jobnet.v1 import jobnet_pb2_grpc as pbg

ROOT = Path(__file__).resolve().parents[2]


class ControllerProc:
    def __init__(self, tmp: Path, *args: str) -> None:
        self.tmp, self.args = tmp, args
        self.sock = tmp / "c.sock"
        self.db = tmp / "c.db"
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> None:
        with open(self.tmp / "controller.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "controller.main", "--listen", f"unix:{self.sock}", "--db", str(self.db),
                 *self.args], cwd=ROOT, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.channel = grpc.insecure_channel(f"unix:{self.sock}")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.tmp / "controller.log").read_text())
            try:
                grpc.channel_ready_future(self.channel).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                continue
        raise TimeoutError("controller did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self, sig: int = signal.SIGKILL) -> None:
        self.stop(sig)
        self.start()

    @property
    def stub(self) -> pbg.ControllerStub:
        assert self.channel is not None
        return pbg.ControllerStub(self.channel)

    def node(self, name: str = "n1", ip: str = "198.18.5.11", boot: str = "b1") -> pb.RegisterNodeResponse:
        return self.stub.RegisterNode(pb.RegisterNodeRequest(name=name, underlay_ip=ip, boot_id=boot,
                                                             agent_address=f"{ip}:7401"))


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[ControllerProc]:
    c = ControllerProc(tmp_path, "--underlay", "198.18.5.0/24")
    c.start()
    try:
        yield c
    finally:
        c.stop()


def code_of(fn: object, *args: object) -> tuple[grpc.StatusCode, str]:
    try:
        fn(*args)  # type: ignore[operator]
    except grpc.RpcError as e:
        return e.code(), e.details()
    raise AssertionError("the call succeeded")
