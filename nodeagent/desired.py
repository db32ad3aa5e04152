"""The node's desired state as plain, immutable data.

Built from the controller's `NodeStateUpdate` stream (`DesiredState.apply_update`) and persisted in the
agent's state dir so that a restarted agent can ask for the delta since the revision it last applied.
Nothing here touches the kernel or the network: the reconciler compares this with what the kernel has.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from google.protobuf.json_format import MessageToDict

from protos.jobnet.v1 import jobnet_pb2 as pb


@dataclass(frozen=True)
class GroupSpec:
    """A group present on this node: one bridge + one VXLAN device."""

    name: str
    vni: int
    subnet: str  # CIDR
    gateway: str
    mtu: int

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen


@dataclass(frozen=True)
class LocalJob:
    """A job this node runs (or must stop, when desired_running is false)."""

    id: str
    group: str
    ip: str
    mac: str
    command: tuple[str, ...]
    desired_running: bool = True
    name: str = ""
    isolation_json: str = "{}"  # jobnet.v1.Isolation as canonical JSON (proto field names)


@dataclass(frozen=True)
class RemoteEndpoint:
    """A job of one of our groups that runs on another node."""

    group: str
    job_id: str
    node: str
    underlay_ip: str
    ip: str
    mac: str


@dataclass(frozen=True)
class Changes:
    """What a delta touched, relative to the state of revision `base`: the ids of the jobs and endpoints it
    upserted or removed (a superset of what differs). Lets the reconciler compare only those instead of every
    job and endpoint of the node."""

    base: int
    jobs: frozenset[str]
    endpoints: frozenset[str]


@dataclass(frozen=True)
class DesiredState:
    revision: int = 0
    groups: dict[str, GroupSpec] = field(default_factory=dict)
    jobs: dict[str, LocalJob] = field(default_factory=dict)
    endpoints: dict[str, RemoteEndpoint] = field(default_factory=dict)  # by job_id
    changes: Changes | None = field(default=None, compare=False)  # None: unknown (a snapshot, a state made whole)

    # -- building from the wire -------------------------------------------------------------------

    def apply_update(self, update: pb.NodeStateUpdate) -> DesiredState:
        """Return the state after `update` (a snapshot replaces, a delta patches).

        Raises `StaleDelta` when a delta does not start from our revision: the caller then asks for
        a snapshot.
        """
        if update.snapshot:
            groups: dict[str, GroupSpec] = {}
            jobs: dict[str, LocalJob] = {}
            endpoints: dict[str, RemoteEndpoint] = {}
        else:
            if update.from_revision != self.revision:
                raise StaleDelta(
                    f"delta from revision {update.from_revision} but we hold {self.revision}"
                )
            groups, jobs, endpoints = dict(self.groups), dict(self.jobs), dict(self.endpoints)
            for name in update.removed_groups:
                groups.pop(name, None)
            for job_id in update.removed_jobs:
                jobs.pop(job_id, None)
            for job_id in update.removed_endpoints:
                endpoints.pop(job_id, None)
        for g in update.upsert.groups:
            groups[g.name] = GroupSpec(g.name, g.vni, g.subnet, g.gateway, g.mtu)
        for j in update.upsert.jobs:
            iso = json.dumps(MessageToDict(j.isolation, preserving_proto_field_name=True), sort_keys=True)
            jobs[j.id] = LocalJob(j.id, j.group, j.ip, j.mac, tuple(j.command), j.desired_running, j.name, iso)
        for e in update.upsert.endpoints:
            endpoints[e.job_id] = RemoteEndpoint(e.group, e.job_id, e.node, e.underlay_ip, e.ip, e.mac)
        changes = None if update.snapshot else Changes(
            self.revision,
            frozenset(update.removed_jobs).union(j.id for j in update.upsert.jobs),
            frozenset(update.removed_endpoints).union(e.job_id for e in update.upsert.endpoints))
        return DesiredState(update.revision, groups, jobs, endpoints, changes)

    # -- persistence ------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(
            {
                "revision": self.revision,
                "groups": [asdict(g) for g in self.groups.values()],
                "jobs": [asdict(j) for j in self.jobs.values()],
                "endpoints": [asdict(e) for e in self.endpoints.values()],
            },
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> DesiredState:
        d: dict[str, Any] = json.loads(text)
        return cls(
            revision=int(d["revision"]),
            groups={g["name"]: GroupSpec(**g) for g in d["groups"]},
            jobs={j["id"]: replace(LocalJob(**j), command=tuple(j["command"])) for j in d["jobs"]},
            endpoints={e["job_id"]: RemoteEndpoint(**e) for e in d["endpoints"]},
        )


class StaleDelta(Exception):
    """A delta that does not apply to the revision we hold."""
