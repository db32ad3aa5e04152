"""A node's desired state, computed from the cluster, and the difference between two of them.

What node N must realise:
  * jobs: every live job placed on N (desired_running false = stop it; it stays until its end is reported);
  * groups: every group with a live job on N;
  * endpoints: every live job of those groups that runs on another node (its node's underlay address,
    its IP and MAC), for the static FDB and neighbour entries.
A change to a group therefore reaches only the nodes that host the group.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from controller.cluster import Cluster
from protos.jobnet.v1 import jobnet_pb2 as pb


@dataclass(frozen=True)
class View:
    groups: dict[str, pb.GroupSpec] = field(default_factory=dict)
    jobs: dict[str, pb.LocalJob] = field(default_factory=dict)
    endpoints: dict[str, pb.RemoteEndpoint] = field(default_factory=dict)

    def digest(self) -> str:
        h = hashlib.sha256()
        for section in (self.groups, self.jobs, self.endpoints):
            for key in sorted(section):
                h.update(key.encode() + b"\0" + section[key].SerializeToString(deterministic=True))
            h.update(b"\1")
        return h.hexdigest()[:32]

    def snapshot(self, revision: int) -> pb.NodeStateUpdate:
        return pb.NodeStateUpdate(
            revision=revision, snapshot=True,
            upsert=pb.NodeDesiredState(groups=list(self.groups.values()), jobs=list(self.jobs.values()),
                                       endpoints=list(self.endpoints.values())))


def node_view(c: Cluster, node: str) -> View:
    jobs: dict[str, pb.LocalJob] = {}
    for j in c.live_jobs(node=node):
        jobs[j.id] = pb.LocalJob(id=j.id, group=j.group, ip=j.ip, mac=j.mac, command=j.command,
                                 desired_running=j.desired_running, name=j.name, isolation=j.isolation)
    groups: dict[str, pb.GroupSpec] = {}
    endpoints: dict[str, pb.RemoteEndpoint] = {}
    for name in sorted({j.group for j in jobs.values()}):
        g = c.groups.get(name)
        if g is None:
            continue
        groups[name] = pb.GroupSpec(name=g.name, vni=g.vni, subnet=g.subnet, gateway=g.gateway, mtu=g.mtu)
        for j in c.live_jobs(group=name):
            if j.node == node:
                continue
            peer = c.nodes.get(j.node)
            if peer is None:
                continue
            endpoints[j.id] = pb.RemoteEndpoint(group=j.group, job_id=j.id, node=j.node,
                                                underlay_ip=peer.underlay_ip, ip=j.ip, mac=j.mac)
    return View(groups, jobs, endpoints)


def delta(old: View, new: View, from_revision: int, revision: int) -> pb.NodeStateUpdate | None:
    """The update that turns `old` into `new`, or None when they are equal."""
    upd = pb.NodeStateUpdate(revision=revision, snapshot=False, from_revision=from_revision)
    changed = False
    for name, g in new.groups.items():
        if old.groups.get(name) != g:
            upd.upsert.groups.append(g)
            changed = True
    for jid, lj in new.jobs.items():
        if old.jobs.get(jid) != lj:
            upd.upsert.jobs.append(lj)
            changed = True
    for jid, ep in new.endpoints.items():
        if old.endpoints.get(jid) != ep:
            upd.upsert.endpoints.append(ep)
            changed = True
    for name in old.groups.keys() - new.groups.keys():
        upd.removed_groups.append(name)
        changed = True
    for jid in old.jobs.keys() - new.jobs.keys():
        upd.removed_jobs.append(jid)
        changed = True
    for jid in old.endpoints.keys() - new.endpoints.keys():
        upd.removed_endpoints.append(jid)
        changed = True
    return upd if changed else None
