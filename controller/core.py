"""The controller's logic, independent of gRPC: validate, decide, write one transaction, apply it to
memory, publish the changed node views.

Every mutation follows the same path (`_commit`): the transaction is durable in the store before memory
changes and before any agent hears of it, so a crash at any point leaves either the old or the new state,
and what an agent has applied is never lost by the controller.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from controller import ipam, validate
from controller.cluster import Cluster, is_live, to_record
from controller.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from controller.store import Store, Txn
from controller.watch import WatchHub
from protos.jobnet.v1 import jobnet_pb2 as pb

log = logging.getLogger("jobnet.controller")

VXLAN_OVERHEAD_V4 = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
DEFAULT_POOL = ipaddress.IPv4Network("10.200.0.0/16")


@dataclass(frozen=True)
class Config:
    pool: ipaddress.IPv4Network = DEFAULT_POOL
    default_prefix: int = 24
    underlays: tuple[ipaddress.IPv4Network, ...] = ()
    underlay_mtu: int = 1500
    quarantine_s: float = 600.0
    node_timeout_s: float = 10.0
    job_retention_s: float = 7 * 86400.0  # finished jobs stay on record this long (0: forever)
    heartbeat_interval_ms: int = 2000
    overhead: int = VXLAN_OVERHEAD_V4
    clock: Callable[[], float] = field(default=time.time)


def _ts(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


class Controller:
    def __init__(self, store: Store, config: Config | None = None) -> None:
        self.cfg = config or Config()
        self.pool = ipam.Pool(self.cfg.pool, self.cfg.default_prefix, self.cfg.underlays)
        self.store = store
        self.c = Cluster.load(store.load())
        self.hub = WatchHub(self.c)
        self.hub.load()
        # Liveness is kept in memory: heartbeats are not written to disk. After a restart every node
        # has a full timeout to check in before it is marked lost.
        now = time.monotonic()
        self.last_seen: dict[str, float] = {n: now for n in self.c.nodes}
        self.applied: dict[str, int] = {n: node.applied_revision for n, node in self.c.nodes.items()}
        self.commits = 0
        log.info("state loaded: revision %d, %d group(s), %d node(s), %d job(s) (%d live)",
                 self.c.revision, len(self.c.groups), len(self.c.nodes), len(self.c.jobs),
                 sum(1 for j in self.c.jobs.values() if is_live(j)))

    def now(self) -> float:
        return self.cfg.clock()

    # ---------------------------------------------------------------- the one write path

    def _commit(self, txn: Txn, touched_groups: Iterable[str] = (), touched_nodes: Iterable[str] = ()) -> None:
        affected = set(touched_nodes)
        for g in touched_groups:
            affected |= self.c.nodes_of_group(g)  # before: nodes that host it now
        txn.revision = self.c.revision + 1
        self.store.commit(txn)
        self.c.apply(txn)
        self.commits += 1
        for g in touched_groups:
            affected |= self.c.nodes_of_group(g)  # after: nodes that host it now
        changed = self.hub.refresh(affected, self.c.revision)
        if changed:
            # Remember what each node was last sent (revision + digest): after a restart, agents whose
            # state is unchanged are told "you are current" instead of getting a snapshot. Not critical:
            # if this write is lost, the agents just get a snapshot.
            marks = Txn()
            for node, view in changed.items():
                marks.put("noderev", node, {"revision": self.c.revision, "digest": view.digest()})
            try:
                self.store.commit(marks)
                self.c.apply(marks)
            except Exception:
                log.exception("could not record the published revision of %s", sorted(changed))

    # ---------------------------------------------------------------- groups

    def group_out(self, g: pb.Group) -> pb.Group:
        out = pb.Group()
        out.CopyFrom(g)
        live = self.c.live_jobs(group=g.name)
        net = ipaddress.IPv4Network(g.subnet)
        out.live_jobs = len(live)
        out.free_addresses = ipam.free_count(net, {ipaddress.IPv4Address(j.ip) for j in live},
                                             self.c.quarantined(self.now()))
        return out

    def create_group(self, req: pb.CreateGroupRequest) -> pb.Group:
        name = validate.group_name(req.name)
        if req.cidr and req.prefix_len:
            raise InvalidArgument("give either a CIDR or a prefix length, not both")
        if name in self.c.groups:
            raise AlreadyExists(f"group {name} already exists ({self.c.groups[name].subnet}): pick another name, "
                                "or delete it first")
        used = self.c.subnets()
        if req.cidr:
            net = validate.cidr(req.cidr)
            self.pool.check(net, used, self.c.node_ips())
        else:
            net = self.pool.allocate(used, req.prefix_len or None, self.c.node_ips())
        used_vnis = {g.vni for g in self.c.groups.values()}
        if req.HasField("vni"):
            vni = validate.vni(req.vni)
            owner = next((g.name for g in self.c.groups.values() if g.vni == vni), None)
            if owner:
                raise AlreadyExists(f"VNI {vni} is already group {owner}'s: choose another or leave it unset")
        else:
            vni = ipam.allocate_vni(used_vnis, self.c.counters.get("vni", 0))
        mtu = self.cfg.underlay_mtu - self.cfg.overhead
        if req.HasField("mtu"):
            mtu = validate.mtu(req.mtu, self.cfg.underlay_mtu, self.cfg.overhead)
        if req.ipv6:
            raise InvalidArgument("IPv6 inside groups is not supported yet: create the group without ipv6")
        g = pb.Group(name=name, subnet=str(net), gateway=str(ipam.gateway(net)), vni=vni, mtu=mtu,
                     created=_ts(self.now()))
        txn = Txn()
        txn.put("group", name, to_record(g))
        if not req.HasField("vni"):
            txn.put("counter", "vni", {"value": vni})
        self._commit(txn)
        log.info("group %s created: %s, VNI %d, MTU %d", name, net, vni, mtu)
        return self.group_out(self.c.groups[name])

    def get_group(self, name: str) -> pb.Group:
        validate.group_name(name)
        g = self.c.groups.get(name)
        if g is None:
            raise NotFound(f"no group named {name}: `jobnet group list` shows the groups, "
                           f"`jobnet group create {name}` makes one")
        return self.group_out(g)

    def list_groups(self) -> list[pb.Group]:
        return [self.group_out(g) for _, g in sorted(self.c.groups.items())]

    def delete_group(self, name: str, force: bool) -> None:
        self.get_group(name)
        live = self.c.live_jobs(group=name)
        if live and not force:
            raise FailedPrecondition(
                f"group {name} has {len(live)} live job(s) ({', '.join(j.id for j in live[:5])}"
                f"{', ...' if len(live) > 5 else ''}): stop them first (`jobnet job stop ID`), or delete with "
                "--force, which stops them"
            )
        txn = Txn()
        now = self.now()
        for j in live:
            j2 = pb.Job()
            j2.CopyFrom(j)
            j2.state, j2.end_reason, j2.desired_running = pb.JOB_STATE_FINISHED, pb.END_REASON_STOPPED, False
            j2.message = f"stopped: group {name} was deleted"
            j2.finished.CopyFrom(_ts(now))
            j2.pid = 0
            txn.put("job", j.id, to_record(j2))
            txn.put("quarantine", j.ip, {"until": now + self.cfg.quarantine_s})
        txn.delete("group", name)
        self._commit(txn, touched_groups=[name])
        log.info("group %s deleted%s", name, f" (stopped {len(live)} job(s))" if live else "")

    # ---------------------------------------------------------------- nodes

    def node_out(self, n: pb.Node) -> pb.Node:
        out = pb.Node()
        out.CopyFrom(n)
        out.live_jobs = len(self.c.live_by_node.get(n.name, ()))
        out.applied_revision = self.applied.get(n.name, n.applied_revision)
        seen = self.last_seen.get(n.name)
        if seen is not None:
            out.last_heartbeat.CopyFrom(_ts(self.now() - (time.monotonic() - seen)))
        return out

    def register_node(self, req: pb.RegisterNodeRequest) -> tuple[pb.Node, int]:
        name = validate.node_name(req.name)
        ip = validate.ipv4(req.underlay_ip, "underlay address")
        if not req.boot_id:
            raise InvalidArgument("boot_id is required: the agent sends a new random one each time it starts")
        if self.cfg.underlays and not any(ip in u for u in self.cfg.underlays):
            raise InvalidArgument(f"underlay address {ip} is outside the underlay network(s) "
                                  f"{', '.join(map(str, self.cfg.underlays))} the controller was started with")
        for other in self.c.nodes.values():
            if other.name != name and other.underlay_ip == str(ip):
                raise AlreadyExists(f"underlay address {ip} is already node {other.name}'s: each node needs its "
                                    "own address")
        for gname, net in self.c.subnets().items():
            if ip in net:
                raise InvalidArgument(f"underlay address {ip} lies inside group {gname}'s subnet {net}")
        mtu = req.underlay_mtu or self.cfg.underlay_mtu
        if not 1280 <= mtu <= 65535:
            raise InvalidArgument(f"underlay MTU {mtu} is out of range 1280..65535")
        old = self.c.nodes.get(name)
        node = pb.Node()
        if old is not None:
            node.CopyFrom(old)
            if old.boot_id != req.boot_id:
                log.info("node %s restarted (boot id %s -> %s); it last applied revision %d, current %d",
                         name, old.boot_id[:8], req.boot_id[:8], req.applied_revision, self.hub.revs.get(name, 0))
        else:
            node.registered.CopyFrom(_ts(self.now()))
            log.info("node %s registered at %s", name, ip)
        moved = old is not None and old.underlay_ip != str(ip)
        node.name, node.underlay_ip, node.underlay_mtu = name, str(ip), mtu
        node.boot_id, node.applied_revision = req.boot_id, req.applied_revision
        node.agent_version, node.agent_address = req.agent_version, req.agent_address
        node.state = pb.NODE_STATE_READY
        txn = Txn()
        if not node.mac_prefix:
            index = self.c.counters.get("node_index", 0) + 1
            node.mac_prefix = ipam.node_mac_prefix(index)
            txn.put("counter", "node_index", {"value": index})
        self.last_seen[name] = time.monotonic()
        self.applied[name] = req.applied_revision
        if mtu < max((g.mtu for g in self.c.groups.values()), default=0) + self.cfg.overhead:
            log.warning("node %s has underlay MTU %d: groups with a larger MTU than %d will lose large frames",
                        name, mtu, mtu - self.cfg.overhead)
        if old != node:
            txn.put("node", name, to_record(node))
            # A node that moved changes its peers' endpoints; a new node needs a view.
            peers = {n for g in self.c.groups_of_node(name) for n in self.c.nodes_of_group(g)}
            self._commit(txn, touched_nodes={name} | (peers if moved else set()))
        return self.node_out(self.c.nodes[name]), self.hub.revs.get(name, self.c.revision)

    def _known_node(self, name: str, boot_id: str) -> pb.Node:
        validate.node_name(name)
        node = self.c.nodes.get(name)
        if node is None:
            raise NotFound(f"node {name} is not registered: the agent registers itself when it starts")
        if boot_id and node.boot_id != boot_id:
            raise FailedPrecondition(f"node {name} has registered again since (boot id {node.boot_id[:8]}, "
                                     f"not {boot_id[:8]}): register again")
        return node

    def heartbeat(self, req: pb.HeartbeatRequest) -> int:
        node = self._known_node(req.name, req.boot_id)
        self.last_seen[node.name] = time.monotonic()
        self.applied[node.name] = req.applied_revision
        if node.state != pb.NODE_STATE_READY:
            self._set_node_state(node, pb.NODE_STATE_READY)
            log.info("node %s is back", node.name)
        return self.hub.revs.get(node.name, self.c.revision)

    def _set_node_state(self, node: pb.Node, state: int) -> None:
        n2 = pb.Node()
        n2.CopyFrom(node)
        n2.state = state  # type: ignore[assignment]
        txn = Txn()
        txn.put("node", n2.name, to_record(n2))
        self._commit(txn)

    def purge_finished(self, limit: int = 1000) -> int:
        """Forget finished jobs older than the retention (at most `limit` per call, one transaction), and
        expired quarantine entries. Their network totals stay in the accounting store."""
        if not self.cfg.job_retention_s:
            return 0
        now = self.now()
        cutoff = now - self.cfg.job_retention_s
        txn = Txn()
        old = [j.id for j in self.c.jobs.values()
               if not is_live(j) and j.finished.seconds and j.finished.seconds < cutoff][:limit]
        for job_id in old:
            txn.delete("job", job_id)
        for ip, until in list(self.c.quarantine.items())[:limit]:
            if until <= now:
                txn.delete("quarantine", ip)
        if not txn:
            return 0
        self._commit(txn)
        if old:
            log.info("forgot %d finished job(s) older than %.0f h", len(old), self.cfg.job_retention_s / 3600)
        return len(old)

    def check_lost(self) -> list[str]:
        """Mark nodes without a heartbeat within the timeout LOST. Their jobs stay as they are: a lost
        node may come back (its agent then reconciles); `jobnet job stop` records them as lost."""
        now = time.monotonic()
        lost = []
        for name, node in list(self.c.nodes.items()):
            if node.state == pb.NODE_STATE_READY and now - self.last_seen.get(name, now) > self.cfg.node_timeout_s:
                self._set_node_state(node, pb.NODE_STATE_LOST)
                log.warning("node %s is lost: no heartbeat for %.0f s", name, now - self.last_seen[name])
                lost.append(name)
        return lost

    def list_nodes(self) -> list[pb.Node]:
        return [self.node_out(n) for _, n in sorted(self.c.nodes.items())]

    # ---------------------------------------------------------------- jobs

    def create_job(self, req: pb.CreateJobRequest) -> pb.Job:
        gname = validate.group_name(req.group)
        nname = validate.node_name(req.node)
        command = validate.command(list(req.command))
        name = validate.job_name(req.name)
        user = validate.user_name(req.user)
        validate.isolation(req.isolation)
        group = self.get_group(gname)
        node = self.c.nodes.get(nname)
        if node is None:
            raise NotFound(f"no node named {nname} is registered: `jobnet node list` shows the nodes")
        if node.state != pb.NODE_STATE_READY:
            raise FailedPrecondition(f"node {nname} is lost (no heartbeat): choose another node, or wait until "
                                     "its agent is back")
        live = self.c.live_jobs(group=gname)
        if name and any(j.name == name for j in live):
            raise AlreadyExists(f"group {gname} already has a live job named {name}")
        net = ipaddress.IPv4Network(group.subnet)
        ip = ipam.allocate_ip(net, {ipaddress.IPv4Address(j.ip) for j in live},
                              self.c.quarantined(self.now()), gname)
        mac = ipam.random_mac({j.mac for j in self.c.live_jobs(node=nname)} | {j.mac for j in live}, node.mac_prefix)
        job_id = secrets.token_hex(5)
        while job_id in self.c.jobs:
            job_id = secrets.token_hex(5)
        job = pb.Job(id=job_id, name=name, group=gname, node=nname, command=command, ip=str(ip), mac=mac,
                     state=pb.JOB_STATE_PENDING, created=_ts(self.now()), desired_running=True,
                     isolation=req.isolation, user=user)
        txn = Txn()
        txn.put("job", job_id, to_record(job))
        self._commit(txn, touched_groups=[gname], touched_nodes=[nname])
        log.info("job %s created in group %s on node %s for %s: %s %s", job_id, gname, nname, user, ip, mac)
        return self.c.jobs[job_id]

    def get_job(self, job_id: str) -> pb.Job:
        validate.job_id(job_id)
        j = self.c.jobs.get(job_id)
        if j is None:
            raise NotFound(f"no job {job_id}: `jobnet job list --all` shows jobs, finished ones included")
        return j

    def list_jobs(self, req: pb.ListJobsRequest) -> list[pb.Job]:
        if req.group:
            validate.group_name(req.group)
        if req.node:
            validate.node_name(req.node)
        jobs = self.c.jobs.values() if req.include_finished else self.c.live_jobs()
        out = [j for j in jobs if (not req.group or j.group == req.group) and (not req.node or j.node == req.node)]
        return sorted(out, key=lambda j: (j.created.seconds, j.created.nanos, j.id))

    def stop_job(self, job_id: str) -> pb.Job:
        j = self.get_job(job_id)
        if not is_live(j) or (j.state == pb.JOB_STATE_STOPPING and self._node_ready(j.node)):
            return j
        j2 = pb.Job()
        j2.CopyFrom(j)
        txn = Txn()
        if not self._node_ready(j.node):
            # Nobody can confirm the stop: record the job as lost; if the node comes back, the job is no
            # longer in its desired state and its agent kills it.
            self._finish(j2, pb.END_REASON_LOST, f"stopped while node {j.node} was lost", txn)
        else:
            j2.state, j2.desired_running = pb.JOB_STATE_STOPPING, False
            txn.put("job", j.id, to_record(j2))
        self._commit(txn, touched_groups=[j.group], touched_nodes=[j.node])
        return self.c.jobs[job_id]

    def _node_ready(self, name: str) -> bool:
        n = self.c.nodes.get(name)
        return n is not None and n.state == pb.NODE_STATE_READY

    def _finish(self, j: pb.Job, reason: int, message: str, txn: Txn) -> None:
        now = self.now()
        j.state, j.end_reason, j.desired_running = pb.JOB_STATE_FINISHED, reason, False  # type: ignore[assignment]
        j.message = message
        j.pid = 0
        j.finished.CopyFrom(_ts(now))
        txn.put("job", j.id, to_record(j))
        txn.put("quarantine", j.ip, {"until": now + self.cfg.quarantine_s})
        # Expired quarantine entries are dropped on the way.
        for ip, until in self.c.quarantine.items():
            if until <= now:
                txn.delete("quarantine", ip)

    def report_job_status(self, req: pb.ReportJobStatusRequest) -> None:
        self._known_node(req.node, req.boot_id)
        j = self.get_job(req.job_id)
        if j.node != req.node:
            raise InvalidArgument(f"job {j.id} runs on node {j.node}, not {req.node}")
        j2 = pb.Job()
        j2.CopyFrom(j)
        txn = Txn()
        if req.state == pb.JOB_STATE_RUNNING:
            if not is_live(j) or (j.pid == req.pid and j.state != pb.JOB_STATE_PENDING):
                return
            if j.state == pb.JOB_STATE_PENDING:
                j2.state = pb.JOB_STATE_RUNNING
            j2.pid = req.pid
            j2.started.CopyFrom(_ts(self.now()))
            txn.put("job", j.id, to_record(j2))
            self._commit(txn)  # not part of any node's desired state: nothing to publish
            return
        if req.state != pb.JOB_STATE_FINISHED:
            raise InvalidArgument(f"a job status report must say RUNNING or FINISHED, not "
                                  f"{pb.JobState.Name(req.state)}")
        if not is_live(j):
            # Already finished (a duplicate report, or the group was deleted): keep the first end, but
            # take the usage and exit status the node measured if we had none.
            if not j.HasField("usage") and req.HasField("usage"):
                j2.usage.CopyFrom(req.usage)
                j2.exit_code, j2.signal = req.exit_code, req.signal
                txn.put("job", j.id, to_record(j2))
                self._commit(txn)
            return
        j2.exit_code, j2.signal = req.exit_code, req.signal
        if req.HasField("usage"):
            j2.usage.CopyFrom(req.usage)
        reason = req.end_reason or pb.END_REASON_EXITED
        self._finish(j2, reason, req.message, txn)
        self._commit(txn, touched_groups=[j.group], touched_nodes=[j.node])
        log.info("job %s finished on %s: %s %s", j.id, j.node, pb.EndReason.Name(reason), req.message)

    def record_final_net(self, finals: Iterable[tuple[str, pb.NetUsage]]) -> int:
        """Write a finished job's network totals (its final accounting report) into its record, once: like its
        CPU/memory/IO usage, they then travel with the job record. Jobs whose record has them already are
        skipped. Returns how many records were written."""
        txn = Txn()
        for job_id, net in finals:
            j = self.c.jobs.get(job_id)
            if j is None or j.HasField("net"):
                continue
            j2 = pb.Job()
            j2.CopyFrom(j)
            j2.net.CopyFrom(net)
            txn.put("job", job_id, to_record(j2))
        if txn:
            self._commit(txn)  # not part of any node's desired state: nothing to publish
        return len(txn.puts)

    def job_agent_address(self, job_id: str) -> tuple[pb.Job, str]:
        j = self.get_job(job_id)
        node = self.c.nodes.get(j.node)
        if node is None or not node.agent_address:
            raise FailedPrecondition(f"node {j.node} has not told the controller where its agent listens")
        return j, node.agent_address
