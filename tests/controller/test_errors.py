"""Bad input gets the right status code and a message that says what to do (real controller process)."""

from __future__ import annotations

import grpc
import pytest

from protos.jobnet.v1 import jobnet_pb2 as pb
from tests.controller.conftest import ControllerProc, code_of

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(("req", "code", "words"), [
    (dict(name="bad_name"), INVALID, "1-15 characters"),
    (dict(name="a-very-long-group-name"), INVALID, "interface name"),
    (dict(name="Upper"), INVALID, "starting with a letter"),
    (dict(name="g", cidr="10.200.0.0"), INVALID, "not a CIDR"),
    (dict(name="g", cidr="banana/24"), INVALID, "not a CIDR"),
    (dict(name="g", cidr="10.200.1.7/24"), INVALID, "did you mean 10.200.1.0/24"),
    (dict(name="g", cidr="fd00::/64"), INVALID, "IPv6"),
    (dict(name="g", cidr="10.201.0.0/24"), INVALID, "outside the controller's pool"),
    (dict(name="g", cidr="169.254.0.0/24"), INVALID, "link-local"),
    (dict(name="g", cidr="10.200.0.0/30"), INVALID, "too small"),
    (dict(name="g", prefix_len=8), INVALID, "prefix length /8 is out of range"),
    (dict(name="g", cidr="10.200.0.0/24", prefix_len=24), INVALID, "not both"),
    (dict(name="g", vni=0), INVALID, "VNI 0 is out of range"),
    (dict(name="g", vni=1 << 24), INVALID, "out of range"),
    (dict(name="g", mtu=1451), INVALID, "between 576 and 1450"),
    (dict(name="g", mtu=100), INVALID, "between 576 and 1450"),
])
def test_create_group_rejects(ctl: ControllerProc, req: dict[str, object], code: grpc.StatusCode, words: str) -> None:
    got, msg = code_of(ctl.stub.CreateGroup, pb.CreateGroupRequest(**req))  # type: ignore[arg-type]
    assert got == code and words in msg, msg


def test_subnet_overlapping_the_underlay_is_refused(tmp_path: object) -> None:
    from pathlib import Path

    c = ControllerProc(Path(str(tmp_path)), "--pool", "10.0.0.0/8", "--underlay", "10.1.0.0/16")
    c.start()
    try:
        got, msg = code_of(c.stub.CreateGroup, pb.CreateGroupRequest(name="g", cidr="10.1.2.0/24"))
        assert got == INVALID and "underlay" in msg
        # allocation skips the underlay: every automatic /16 is clear of it
        subnets = [c.stub.CreateGroup(pb.CreateGroupRequest(name=f"g{i}", prefix_len=16)).subnet for i in range(3)]
        assert "10.1.0.0/16" not in subnets and len(set(subnets)) == 3
    finally:
        c.stop()


def test_duplicates_overlaps_and_exhaustion(ctl: ControllerProc) -> None:
    s = ctl.stub
    a = s.CreateGroup(pb.CreateGroupRequest(name="a", vni=77))
    assert (a.subnet, a.gateway, a.vni, a.mtu) == ("10.200.0.0/24", "10.200.0.1", 77, 1450)
    assert code_of(s.CreateGroup, pb.CreateGroupRequest(name="a"))[0] == grpc.StatusCode.ALREADY_EXISTS
    got, msg = code_of(s.CreateGroup, pb.CreateGroupRequest(name="b", vni=77))
    assert got == grpc.StatusCode.ALREADY_EXISTS and "group a's" in msg
    got, msg = code_of(s.CreateGroup, pb.CreateGroupRequest(name="b", cidr="10.200.0.128/25"))
    assert got == grpc.StatusCode.ALREADY_EXISTS and "overlaps group a's subnet 10.200.0.0/24" in msg
    # a /17 fits beside it (10.200.128.0/17); then no /17 is left
    assert s.CreateGroup(pb.CreateGroupRequest(name="b", prefix_len=17)).subnet == "10.200.128.0/17"
    got, msg = code_of(s.CreateGroup, pb.CreateGroupRequest(name="c", prefix_len=17))
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED and "no free /17" in msg and "--prefix-len 18" in msg
    assert s.CreateGroup(pb.CreateGroupRequest(name="c", prefix_len=18)).subnet == "10.200.64.0/18"


def test_subnet_exhaustion_and_unknown_objects(ctl: ControllerProc) -> None:
    s = ctl.stub
    ctl.node()
    s.CreateGroup(pb.CreateGroupRequest(name="tiny", cidr="10.200.9.0/29"))  # gateway + 5 jobs
    ips = [s.CreateJob(pb.CreateJobRequest(group="tiny", node="n1", command=["true"])).ip for _ in range(5)]
    assert ips == [f"10.200.9.{i}" for i in range(2, 7)]
    got, msg = code_of(s.CreateJob, pb.CreateJobRequest(group="tiny", node="n1", command=["true"]))
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED and "10.200.9.0/29 has no free address" in msg
    assert s.GetGroup(pb.GetGroupRequest(name="tiny")).free_addresses == 0
    for req, code, words in [
        (pb.CreateJobRequest(group="nope", node="n1", command=["true"]), grpc.StatusCode.NOT_FOUND, "group create"),
        (pb.CreateJobRequest(group="tiny", node="n9", command=["true"]), grpc.StatusCode.NOT_FOUND, "node list"),
        (pb.CreateJobRequest(group="tiny", node="n1"), INVALID, "no command"),
        (pb.CreateJobRequest(group="tiny", node="n1", command=["x"], name="bad name"), INVALID, "job name"),
        (pb.CreateJobRequest(group="tiny", node="N_1", command=["x"]), INVALID, "node name"),
        (pb.CreateJobRequest(group="tiny", node="n1", command=["x"], isolation=pb.Isolation(
            resources=pb.Resources(memory_max_bytes=1 << 30, memory_high_bytes=2 << 30))), INVALID, "soft limit"),
        (pb.CreateJobRequest(group="tiny", node="n1", command=["x"], isolation=pb.Isolation(
            resources=pb.Resources(cpu_weight=20000))), INVALID, "1..10000"),
        (pb.CreateJobRequest(group="tiny", node="n1", command=["x"], isolation=pb.Isolation(
            env=["NOEQUALS"])), INVALID, "KEY=VALUE"),
        (pb.CreateJobRequest(group="tiny", node="n1", command=["x"], isolation=pb.Isolation(
            rootfs="relative/dir")), INVALID, "absolute"),
    ]:
        got, msg = code_of(s.CreateJob, req)
        assert got == code and words in msg, (req, msg)
    assert code_of(s.GetJob, pb.GetJobRequest(id="0123456789"))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(s.GetJob, pb.GetJobRequest(id="xyz"))[0] == INVALID
    assert code_of(s.GetGroup, pb.GetGroupRequest(name="nope"))[0] == grpc.StatusCode.NOT_FOUND
    got, msg = code_of(s.DeleteGroup, pb.DeleteGroupRequest(name="tiny"))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "--force" in msg


def test_node_registration_checks(ctl: ControllerProc) -> None:
    s = ctl.stub
    ctl.node("n1", "198.18.5.11")
    for req, code, words in [
        (pb.RegisterNodeRequest(name="n2", underlay_ip="198.18.5.11", boot_id="x"), grpc.StatusCode.ALREADY_EXISTS,
         "already node n1's"),
        (pb.RegisterNodeRequest(name="n2", underlay_ip="10.9.9.9", boot_id="x"), INVALID, "outside the underlay"),
        (pb.RegisterNodeRequest(name="n2", underlay_ip="nonsense", boot_id="x"), INVALID, "not an IP address"),
        (pb.RegisterNodeRequest(name="n2", underlay_ip="198.18.5.12"), INVALID, "boot_id"),
        (pb.RegisterNodeRequest(name="-n2", underlay_ip="198.18.5.12", boot_id="x"), INVALID, "host name"),
    ]:
        got, msg = code_of(s.RegisterNode, req)
        assert got == code and words in msg, (req, msg)
    got, msg = code_of(s.Heartbeat, pb.HeartbeatRequest(name="n1", boot_id="old"))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "register again" in msg
    assert code_of(s.Heartbeat, pb.HeartbeatRequest(name="n7", boot_id="b"))[0] == grpc.StatusCode.NOT_FOUND
