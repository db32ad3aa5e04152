"""The controller's in-memory picture of the cluster, rebuilt from the store at start-up and updated by
the same transactions that are written to it (so memory and disk never disagree).

Records are the API's own protobuf messages (Group, Node, Job); the store holds them as JSON with the
proto field names.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from typing import Any, TypeVar

from google.protobuf.json_format import MessageToDict, ParseDict
from google.protobuf.message import Message

from controller.store import Contents, Record, Txn
from protos.jobnet.v1 import jobnet_pb2 as pb

M = TypeVar("M", bound=Message)

KINDS: dict[str, Any] = {"group": pb.Group, "node": pb.Node, "job": pb.Job}


def to_record(msg: Message) -> Record:
    return MessageToDict(msg, preserving_proto_field_name=True)


def from_record(kind: str, rec: Record) -> Any:
    return ParseDict(rec, KINDS[kind](), ignore_unknown_fields=True)


def is_live(job: pb.Job) -> bool:
    return job.state != pb.JOB_STATE_FINISHED


class Cluster:
    def __init__(self) -> None:
        self.revision = 0
        self.groups: dict[str, pb.Group] = {}
        self.nodes: dict[str, pb.Node] = {}
        self.jobs: dict[str, pb.Job] = {}
        self.quarantine: dict[str, float] = {}  # IP -> unix time it may be handed out again
        self.counters: dict[str, int] = {}
        self.noderev: dict[str, Record] = {}
        self.live_by_group: dict[str, set[str]] = defaultdict(set)
        self.live_by_node: dict[str, set[str]] = defaultdict(set)

    @classmethod
    def load(cls, contents: Contents) -> Cluster:
        c = cls()
        c.revision = contents.revision
        for kind in ("group", "node", "job"):
            for key, rec in contents.kind(kind).items():
                c._put(kind, key, rec)
        for key, rec in contents.kind("quarantine").items():
            c.quarantine[key] = float(rec["until"])
        for key, rec in contents.kind("counter").items():
            c.counters[key] = int(rec["value"])
        c.noderev = dict(contents.kind("noderev"))
        return c

    def apply(self, txn: Txn) -> None:
        """Apply a committed transaction to memory."""
        for kind, key in txn.deletes:
            self._delete(kind, key)
        for kind, key, rec in txn.puts:
            self._put(kind, key, rec)
        if txn.revision is not None:
            self.revision = txn.revision

    def _put(self, kind: str, key: str, rec: Record) -> None:
        if kind == "group":
            self.groups[key] = from_record(kind, rec)
        elif kind == "node":
            self.nodes[key] = from_record(kind, rec)
        elif kind == "job":
            self._unindex(key)
            job = from_record(kind, rec)
            self.jobs[key] = job
            if is_live(job):
                self.live_by_group[job.group].add(key)
                self.live_by_node[job.node].add(key)
        elif kind == "quarantine":
            self.quarantine[key] = float(rec["until"])
        elif kind == "counter":
            self.counters[key] = int(rec["value"])
        elif kind == "noderev":
            self.noderev[key] = rec

    def _delete(self, kind: str, key: str) -> None:
        if kind == "group":
            self.groups.pop(key, None)
        elif kind == "node":
            self.nodes.pop(key, None)
        elif kind == "job":
            self._unindex(key)
            self.jobs.pop(key, None)
        elif kind == "quarantine":
            self.quarantine.pop(key, None)
        elif kind == "noderev":
            self.noderev.pop(key, None)

    def _unindex(self, job_id: str) -> None:
        old = self.jobs.get(job_id)
        if old is not None:
            self.live_by_group[old.group].discard(job_id)
            self.live_by_node[old.node].discard(job_id)

    # ---------------------------------------------------------------- queries

    def live_jobs(self, group: str | None = None, node: str | None = None) -> list[pb.Job]:
        if group is not None and node is not None:
            ids = self.live_by_group.get(group, set()) & self.live_by_node.get(node, set())
        elif group is not None:
            ids = self.live_by_group.get(group, set())
        elif node is not None:
            ids = self.live_by_node.get(node, set())
        else:
            ids = {j for s in self.live_by_group.values() for j in s}
        return [self.jobs[i] for i in sorted(ids)]

    def nodes_of_group(self, group: str) -> set[str]:
        return {self.jobs[j].node for j in self.live_by_group.get(group, set())}

    def groups_of_node(self, node: str) -> set[str]:
        return {self.jobs[j].group for j in self.live_by_node.get(node, set())}

    def subnets(self) -> dict[str, ipaddress.IPv4Network]:
        return {name: ipaddress.IPv4Network(g.subnet) for name, g in self.groups.items()}

    def quarantined(self, now: float) -> set[ipaddress.IPv4Address]:
        return {ipaddress.IPv4Address(ip) for ip, until in self.quarantine.items() if until > now}

    def node_ips(self) -> set[ipaddress.IPv4Address]:
        return {ipaddress.IPv4Address(n.underlay_ip) for n in self.nodes.values()}
