"""The agent's desired-state model: snapshots replace, deltas patch, stale deltas are refused, and the
persisted form round-trips."""

from __future__ import annotations

import pytest

from nodeagent.desired import Changes, DesiredState, StaleDelta
from protos.jobnet.v1 import jobnet_pb2 as pb


def _snapshot() -> pb.NodeStateUpdate:
    return pb.NodeStateUpdate(
        revision=5, snapshot=True,
        upsert=pb.NodeDesiredState(
            groups=[pb.GroupSpec(name="a", vni=7, subnet="10.200.0.0/24", gateway="10.200.0.1", mtu=1450)],
            jobs=[pb.LocalJob(id="aaaaaaaaaa", group="a", ip="10.200.0.2", mac="02:00:00:00:00:02",
                              command=["sleep", "1"], desired_running=True)],
            endpoints=[pb.RemoteEndpoint(group="a", job_id="bbbbbbbbbb", node="n2", underlay_ip="198.18.0.12",
                                         ip="10.200.0.3", mac="02:00:00:00:00:03")],
        ),
    )


def test_snapshot_then_delta() -> None:
    s = DesiredState().apply_update(_snapshot())
    assert s.revision == 5 and s.groups["a"].prefixlen == 24 and s.jobs["aaaaaaaaaa"].command == ("sleep", "1")
    d = s.apply_update(pb.NodeStateUpdate(revision=7, from_revision=5, removed_endpoints=["bbbbbbbbbb"],
                                          upsert=pb.NodeDesiredState(jobs=[pb.LocalJob(
                                              id="aaaaaaaaaa", group="a", ip="10.200.0.2",
                                              mac="02:00:00:00:00:02", command=["sleep", "1"],
                                              desired_running=False)])))
    assert d.revision == 7 and not d.endpoints and d.jobs["aaaaaaaaaa"].desired_running is False
    assert s.endpoints, "the old state is not modified"
    # what the delta touched, for the reconciler (a snapshot says nothing: compared whole)
    assert s.changes is None
    assert d.changes == Changes(5, frozenset({"aaaaaaaaaa"}), frozenset({"bbbbbbbbbb"}))


def test_delta_from_another_revision_is_refused() -> None:
    s = DesiredState().apply_update(_snapshot())
    with pytest.raises(StaleDelta):
        s.apply_update(pb.NodeStateUpdate(revision=9, from_revision=6))


def test_json_round_trip() -> None:
    s = DesiredState().apply_update(_snapshot())
    assert DesiredState.from_json(s.to_json()) == s
