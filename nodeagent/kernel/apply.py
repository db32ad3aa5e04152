"""Execute plan steps. Each step is idempotent: a create that meets EEXIST checks what is there and sets
what it can (or raises AlreadyExists when the object is not ours to fix); a delete tolerates exactly the
"already gone" errnos; FDB and neighbour writes are replace/append. A job network that fails half-way is
rolled back (its namespace file and veth removed), so the next attempt starts clean.

Job network setup, from a spare (spares.py; ~2 ms per job on a 2-vCPU VM at load ~1):
  1. here: the spare's veth peer jnw<n> renamed jnv<job>; its file jnp-<n> bind-mounted onto jnj-<job>.
  2. ONE rtnetlink batch through the spare's socket: eth0 (ifindex 2) gets the job's MAC and MTU and goes
     up; address; default route via the gateway.
  3. one raw batch here: onto the group bridge, up, MTU; bridge port learning off.
The cold path, when no spare is left (no helper processes, ~3.7 ms at load ~1):
  1. this thread (namespaces.Namespaces.create): unshare(CLONE_NEWNET); IPv6 off (all, default); bind
     mount onto <netns_dir>/jnj-<job>; then ONE rtnetlink batch (rawnl.py) from inside: eth0 with the
     job's MAC, the MTU and ifindex 2 (a new namespace has only lo), its peer jnv<job> created directly in
     our namespace (IFLA_NET_NS_FD); lo up; eth0 up; address; default route via the gateway; setns back.
  2. here: IPv6 off on jnv<job>, then one raw batch: onto the group bridge and up; bridge port learning off.
Either way its static bridge FDB entry (ReplaceBridgeFdb) follows in the entry batch after the pass's job
networks, and its neighbour entries (ReplaceJobNeigh) after that.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nodeagent import names
from nodeagent.kernel import rawnl
from nodeagent.kernel.errors import (
    GONE_ERRNOS,
    AlreadyExists,
    InvalidArgument,
    KernelError,
    NotFound,
    from_errno,
    from_oserror,
)
from nodeagent.kernel.model import ZERO_MAC, NetSettings
from nodeagent.kernel.namespaces import Namespaces, ipv6_off
from nodeagent.kernel.neighwatch import NeighWatch
from nodeagent.kernel.netlink import Netlink
from nodeagent.kernel.observe import LOOPBACK_IFINDEX
from nodeagent.kernel.releaser import Releaser
from nodeagent.kernel.spares import FRESH_NS_ETH0_INDEX, Spare, SparePool
from nodeagent.kernel.steps import (
    AddFloodEntry,
    ConfigureJob,
    CreateBridge,
    CreateJobNetwork,
    CreateVxlan,
    DeleteBridgeFdb,
    DeleteFdb,
    DeleteJobNeigh,
    DeleteJobNetwork,
    DeleteLink,
    DeleteNeigh,
    JobNetSpec,
    ReplaceBridgeFdb,
    ReplaceFdb,
    ReplaceJobNeigh,
    ReplaceNeigh,
    SetJobPort,
    SetLink,
    SpreadJobNeigh,
    Step,
    WithdrawJobNeigh,
)

log = logging.getLogger("jobnet.agent.kernel")

# batched: apply_entries
ENTRY_STEPS = (AddFloodEntry, ReplaceFdb, ReplaceNeigh, DeleteFdb, DeleteNeigh, ReplaceBridgeFdb, DeleteBridgeFdb)
DELETE_ENTRY_STEPS = (DeleteFdb, DeleteNeigh, DeleteBridgeFdb)
JOB_NEIGH_STEPS = (ReplaceJobNeigh, DeleteJobNeigh, SpreadJobNeigh, WithdrawJobNeigh)  # apply_job_neigh
# A job sends nothing on its own (every byte it sends is charged to it): no IPv6 (no link-local address,
# DAD, router solicitation or MLD); no gratuitous ARP when eth0 comes up or changes its MAC (arp_notify,
# inherited from the host's init namespace otherwise). Its peers' addresses are permanent neighbour entries
# (ReplaceJobNeigh): no ARP for them either. IGMP: the all-hosts group 224.0.0.1 is never reported.
JOB_SYSCTLS = {"ipv6/conf/all/disable_ipv6": "1", "ipv6/conf/default/disable_ipv6": "1",
               "ipv4/conf/all/arp_notify": "0", "ipv4/conf/default/arp_notify": "0"}


@dataclass
class _JobSock:
    sock: socket.socket
    eth0: int  # 0: look it up (through the socket) before the next use
    ino: int  # of the namespace it was opened in


def _gone(e: KernelError) -> bool:
    """The namespace, its eth0 or the entry is not there (which satisfies a delete)."""
    return e.errno in GONE_ERRNOS or (isinstance(e, InvalidArgument) and e.op in ("open netns", "setns"))


class Applier:
    """Applies steps in the agent's namespace (`nl`) and in job namespaces (`namespaces`). Keeps a cache
    of ifindex by name; `reset_index` replaces it after a full observation."""

    def __init__(self, settings: NetSettings, nl: Netlink, namespaces: Namespaces,
                 watch: NeighWatch | None = None, spares: SparePool | None = None,
                 releaser: Releaser | None = None) -> None:
        self.s = settings
        self.spares = spares  # taken first by CreateJobNetwork
        self.releaser = releaser  # releases the networks of jobs that are gone, one at a time (paced_release)
        self.nl = nl
        self.ns = namespaces
        self.watch = watch  # told about job namespaces made, remade and removed
        self._index: dict[str, int] = {}
        self._raw = rawnl.route_socket()  # in the calling thread's (= the agent's) namespace
        # A socket in each job namespace (opened when the namespace is made, or on first use), so writing
        # neighbour entries there needs no setns; and its eth0's ifindex.
        self._jobsocks: dict[str, _JobSock] = {}
        self._open_errors: dict[str, KernelError] = {}

    def close(self) -> None:
        self._raw.close()
        for job_id in list(self._jobsocks):
            self._close_job_sock(job_id)

    def reset_index(self, index: dict[str, int]) -> None:
        self._index = dict(index)

    def index(self, ifname: str) -> int:
        """ifindex of a link in the agent's namespace (= the calling thread's: an ioctl, not a netlink
        request); NotFound when it does not exist."""
        idx = self._index.get(ifname)
        if idx is None:
            try:
                idx = self._index[ifname] = socket.if_nametoindex(ifname)
            except OSError as e:
                raise NotFound("look up link", ifname, self.nl.netns, errno.ENODEV, "no such device") from e
        return idx

    def _forget(self, ifname: str) -> None:
        self._index.pop(ifname, None)

    def job_netns_path(self, netns: str) -> Path:
        return self.s.netns_dir / netns

    # -- dispatch ---------------------------------------------------------------------------------

    def apply(self, step: Step) -> None:
        match step:
            case DeleteJobNetwork():
                self._delete_job(step)
            case DeleteLink(ifname=ifname):
                self.nl.delete_link(ifname)
                self._forget(ifname)
            case (AddFloodEntry() | ReplaceFdb() | ReplaceNeigh() | DeleteFdb() | DeleteNeigh() | ReplaceBridgeFdb()
                  | DeleteBridgeFdb()):
                (err,) = self.apply_entries([step])
                if err is not None:
                    raise err
            case ReplaceJobNeigh() | DeleteJobNeigh() | SpreadJobNeigh() | WithdrawJobNeigh():
                self.apply_job_neigh(step)
            case CreateBridge():
                self._create_bridge(step)
            case CreateVxlan():
                self._create_vxlan(step)
            case SetLink(ifname=ifname, mtu=mtu, master=master, up=up):
                self.nl.set_link(ifname, self.index(ifname), mtu=mtu, master=self.index(master) if master else 0,
                                 state="up" if up else "down")
            case CreateJobNetwork(job=spec):
                self._create_job(spec)
            case ConfigureJob(job=spec, recreate_veth=recreate):
                self._configure_job(spec, recreate)
            case SetJobPort(job=spec):
                self._attach_port(spec, mtu=spec.mtu)

    def apply_entries(self, steps: list[Step]) -> list[Exception | None]:
        """Apply many FDB / neighbour steps (ENTRY_STEPS) in batches; each one's outcome, in order. Same
        semantics as `apply` one by one: deletes tolerate "already gone", a flood entry that is there is
        fine."""
        outcome: list[Exception | None] = [None] * len(steps)
        requests: list[rawnl.Request] = []
        sent: list[int] = []  # index into steps of each request
        for i, step in enumerate(steps):
            dev = step.port if isinstance(step, (ReplaceBridgeFdb, DeleteBridgeFdb)) else getattr(step, "dev", "")
            idx = self._index_or_none(dev)
            if idx is None:
                if not isinstance(step, DELETE_ENTRY_STEPS):  # deletes: gone with the device
                    outcome[i] = NotFound("look up link", dev, self.nl.netns, 19, "no such device")
                continue
            try:
                requests.append(self._entry_request(step, dev, idx))
            except ValueError as e:  # a malformed MAC or address fails its own step, not the batch
                outcome[i] = InvalidArgument("encode", str(step), self.nl.netns, 22, str(e))
                continue
            sent.append(i)
        for i, err in zip(sent, rawnl.send_all(self._raw, requests, self.nl.netns), strict=True):
            step = steps[i]
            if err is None or (isinstance(step, DELETE_ENTRY_STEPS) and err.errno in GONE_ERRNOS) or (
                    isinstance(step, AddFloodEntry) and isinstance(err, AlreadyExists)):
                continue
            outcome[i] = err
        return outcome

    @staticmethod
    def _entry_request(step: Step, dev: str, idx: int) -> rawnl.Request:
        match step:
            case AddFloodEntry(dst=dst):
                return rawnl.fdb("append", dev, idx, ZERO_MAC, dst)
            case ReplaceFdb(mac=mac, dst=dst):
                return rawnl.fdb("replace", dev, idx, mac, dst)
            case DeleteFdb(mac=mac, dst=dst):
                return rawnl.fdb("delete", dev, idx, mac, dst)
            case ReplaceNeigh(ip=ip, mac=mac):
                return rawnl.neigh("replace", dev, idx, ip, mac)
            case DeleteNeigh(ip=ip, mac=mac):
                return rawnl.neigh("delete", dev, idx, ip, mac)
            case ReplaceBridgeFdb(bridge=bridge, mac=mac):
                return rawnl.bridge_fdb("replace", bridge, dev, idx, mac)
            case DeleteBridgeFdb(bridge=bridge, mac=mac):
                return rawnl.bridge_fdb("delete", bridge, dev, idx, mac)
        raise TypeError(f"not an entry step: {step}")

    # -- neighbour entries in job namespaces ----------------------------------------------------------

    def apply_job_neigh(self, step: Step) -> None:
        """Apply a ReplaceJobNeigh / DeleteJobNeigh (many entries, one job: one datagram) or a
        SpreadJobNeigh / WithdrawJobNeigh (one entry, many jobs: one small request each, all sent before
        the answers are read) through the socket the agent keeps in each job namespace. A namespace or eth0
        that is not there fails a replace (NotFound) and satisfies a delete, as does an entry already gone.
        Raises the first failure (the others are logged); the entries that were written stay written (and
        are told to the neighbour watch)."""
        match step:
            case ReplaceJobNeigh(job_id=job_id, entries=entries):
                self._job_entries(job_id, entries, ())
            case DeleteJobNeigh(job_id=job_id, entries=entries):
                self._job_entries(job_id, (), [ip for ip, _ in entries])
            case SpreadJobNeigh(ip=ip, mac=mac, jobs=jobs):
                self._fan_out(ip, mac, jobs)
            case WithdrawJobNeigh(ip=ip, jobs=jobs):
                self._fan_out(ip, None, jobs)
            case _:
                raise TypeError(f"not a job neighbour step: {step}")

    def _job_entries(self, job_id: str, replace: Sequence[tuple[bytes, bytes]], delete: Sequence[bytes]) -> None:
        netns = names.job_netns(job_id)
        try:
            js = self._job_sock(job_id)
        except KernelError as e:
            if replace or not _gone(e):
                raise
            return  # deletes: gone with the namespace or its eth0
        try:
            results = rawnl.job_neigh(js.sock, js.eth0, replace, delete, netns)
        except OSError as e:
            self._close_job_sock(job_id)  # (a socket in an unknown state: opened anew next time)
            raise from_oserror("write neighbour entries", names.JOB_IFNAME, netns, e) from e
        first: KernelError | None = None
        failed = 0
        for i, res in enumerate(results):
            if res is None or (i >= len(replace) and res[0] in GONE_ERRNOS):
                continue
            failed += 1
            if first is None:
                what = (f"{socket.inet_ntoa(replace[i][0])} lladdr {replace[i][1].hex(':')}" if i < len(replace)
                        else socket.inet_ntoa(delete[i - len(replace)]))
                first = from_errno("replace neigh" if i < len(replace) else "delete neigh",
                                   f"{what} dev {names.JOB_IFNAME}", netns, *res)
        if self.watch is not None:
            if failed:
                self.watch.invalidate(job_id)  # some went, some did not: read it whole next time
            else:
                self.watch.applied(job_id, replace, delete)
        if first is not None:
            if failed > 1:
                log.warning("%d of %d neighbour entries in %s failed; the first: %s", failed, len(results), netns,
                            first)
            raise first

    def _fan_out(self, ip: bytes, mac: bytes | None, jobs: Sequence[str]) -> None:
        sent: list[tuple[str, _JobSock, int]] = []
        errors: list[tuple[str, KernelError]] = []
        self.open_job_sockets([j for j in jobs if j not in self._jobsocks])
        for job_id in jobs:
            try:
                js = self._job_sock(job_id)
                sent.append((job_id, js, rawnl.neigh_one(js.sock, js.eth0, ip, mac)))
            except KernelError as e:
                errors.append((job_id, e))
            except OSError as e:
                self._close_job_sock(job_id)
                errors.append((job_id, from_oserror("write neighbour entry", names.JOB_IFNAME,
                                                    names.job_netns(job_id), e)))
        done: list[str] = []
        for job_id, js, seq in sent:
            netns = names.job_netns(job_id)
            try:
                res = rawnl.ack_of(js.sock, seq, netns)
            except OSError as e:
                self._close_job_sock(job_id)
                errors.append((job_id, from_oserror("read neighbour ack", names.JOB_IFNAME, netns, e)))
                continue
            if res is None:
                done.append(job_id)
            else:
                what = f"{socket.inet_ntoa(ip)}" + (f" lladdr {mac.hex(':')}" if mac is not None else "")
                errors.append((job_id, from_errno("replace neigh" if mac is not None else "delete neigh",
                                                  f"{what} dev {names.JOB_IFNAME}", netns, *res)))
        if self.watch is not None:
            for job_id in done:
                self.watch.applied(job_id, [(ip, mac)] if mac is not None else (), () if mac is not None else (ip,))
        if mac is None:  # deletes: gone with the namespace, its eth0 or the entry itself is fine
            errors = [(j, e) for j, e in errors if not _gone(e)]
        if errors:
            if self.watch is not None:
                for job_id, _ in errors:
                    self.watch.invalidate(job_id)
            if len(errors) > 1:
                log.warning("neighbour entry %s failed in %d of %d job namespaces: %s", socket.inet_ntoa(ip),
                            len(errors), len(jobs), "; ".join(str(e) for _, e in errors[:5]))
            raise errors[0][1]

    # -- the agent's socket in each job namespace ----------------------------------------------------

    def _job_sock(self, job_id: str) -> _JobSock:
        """The job namespace's socket, opened (entering the namespace once) if there is none; NotFound when
        the namespace has no eth0."""
        js = self._jobsocks.get(job_id)
        if js is None:
            err = self._open_errors.pop(job_id, None)  # (a fan-out has just tried to open it: not twice)
            if err is None:
                self.open_job_sockets([job_id])
                js = self._jobsocks.get(job_id)
                err = self._open_errors.pop(job_id, None)
            if js is None:
                assert err is not None
                raise err
        netns = names.job_netns(job_id)
        if not js.eth0:
            js.eth0 = rawnl.link_index(js.sock, names.JOB_IFNAME, netns)
            if not js.eth0:
                raise NotFound("look up link", names.JOB_IFNAME, netns, errno.ENODEV, "no such device")
        return js

    def open_job_sockets(self, job_ids: Sequence[str]) -> None:
        """Open the sockets of these job namespaces (entering each once). A namespace that cannot be
        entered keeps its error for `_job_sock`."""
        if not job_ids:
            return

        def inside(job_id: str, path: Path) -> _JobSock:
            sock = rawnl.job_socket()
            try:
                ino = os.stat("/proc/thread-self/ns/net").st_ino
                try:
                    eth0 = socket.if_nametoindex(names.JOB_IFNAME)
                except OSError:
                    eth0 = 0
            except BaseException:
                sock.close()
                raise
            return _JobSock(sock, eth0, ino)

        paths = {job_id: self.job_netns_path(names.job_netns(job_id)) for job_id in job_ids}
        for job_id, res in self.ns.run_in_each(paths, inside).items():
            if isinstance(res, KernelError):
                self._open_errors[job_id] = res
            else:
                self._close_job_sock(job_id)
                self._jobsocks[job_id] = res

    def _close_job_sock(self, job_id: str) -> None:
        js = self._jobsocks.pop(job_id, None)
        if js is not None:
            js.sock.close()  # (it holds the namespace: closed before the namespace is to go)

    def retain_job_sockets(self, inos: dict[str, int]) -> None:
        """Keep the sockets of the job namespaces in `inos` (job id -> the inode its file has now): a
        namespace file that is gone, or that holds another namespace now, loses its socket."""
        for job_id, js in list(self._jobsocks.items()):
            if inos.get(job_id) != js.ino:
                self._close_job_sock(job_id)
        self._open_errors.clear()

    def _index_or_none(self, ifname: str) -> int | None:
        try:
            return self.index(ifname)
        except NotFound:
            return None

    # -- group devices ----------------------------------------------------------------------------

    def _create_bridge(self, step: CreateBridge) -> None:
        try:
            self.nl.create_bridge(step.ifname, step.mtu)
        except AlreadyExists:
            rec = self.nl.link(step.ifname)
            if rec is None or rec.kind != "bridge":
                raise
            self.nl.set_link(step.ifname, rec.index, mtu=step.mtu)
        self._forget(step.ifname)
        self._up_without_ipv6(step.ifname)

    def _create_vxlan(self, step: CreateVxlan) -> None:
        master = self.index(step.bridge)
        try:
            self.nl.create_vxlan(step.ifname, vni=step.vni, mtu=step.mtu, local=self.s.underlay_ip,
                                 link=self.index(self.s.underlay_ifname), port=self.s.vxlan_port, master=master)
        except AlreadyExists:
            rec = self.nl.link(step.ifname)
            if rec is None or rec.kind != "vxlan" or rec.data.get("IFLA_VXLAN_ID") != step.vni:
                raise
            self.nl.set_link(step.ifname, rec.index, mtu=step.mtu, master=master)
        self._forget(step.ifname)
        self._up_without_ipv6(step.ifname)

    def _up_without_ipv6(self, ifname: str) -> None:
        """The node takes no part in a group's L2: no link-local address, no DAD, RS or MLD into the
        overlay from the bridge, the vxlan device or a job's host end (`_attach_port`). Then up."""
        ipv6_off(ifname, self.nl.netns)
        self.nl.set_link_by_name(ifname, state="up")

    # -- job networks -----------------------------------------------------------------------------

    def _delete_job(self, step: DeleteJobNetwork) -> None:
        # Only the namespace file: the veth dies with the namespace, in the kernel's own (asynchronous,
        # batched) cleanup; deleting it here would wait for an RCU grace period per job. With a releaser (a
        # job that is gone, not a repair), the namespace is held open and handed to it with the veth: it deletes
        # them one at a time (releaser.py).
        held, ifindex = -1, 0
        if self.releaser is not None and step.gone:
            with contextlib.suppress(OSError, KernelError):
                ifindex = self.index(step.host_ifname)
                held = os.open(self.job_netns_path(step.netns), os.O_RDONLY | os.O_CLOEXEC)
        self._forget(step.host_ifname)
        self._close_job_sock(step.job_id)
        if self.watch is not None:
            self.watch.forget(step.job_id)
        try:
            self.ns.remove(self.job_netns_path(step.netns))
        except BaseException:
            if held >= 0:
                os.close(held)
            raise
        if held >= 0 and self.releaser is not None:
            self.releaser.release(step.host_ifname, ifindex, held)

    def _reclaim(self, host_ifname: str) -> None:
        """A job made again while its old network waits for the releaser: that one goes now (its name is
        needed), deleted by its own index."""
        got = self.releaser.take(host_ifname) if self.releaser is not None else None
        if got is None:
            return
        ifindex, fd = got
        try:
            rawnl.send(self._raw, [rawnl.link_delete(host_ifname, ifindex)], self.nl.netns)
        except KernelError as e:
            if e.errno not in GONE_ERRNOS:
                raise
        finally:
            os.close(fd)

    def _create_job(self, spec: JobNetSpec) -> None:
        self._reclaim(spec.host_ifname)
        spare = self.spares.take() if self.spares is not None else None
        if spare is not None and self._create_job_from(spare, spec):
            return
        path = self.job_netns_path(spec.netns)

        made: list[_JobSock] = []

        def inside(agent_netns_fd: int) -> None:
            # eth0 here with ifindex 2 (a new namespace has only lo, ifindex 1), its peer in our namespace.
            # The socket stays open: the job's neighbour entries go through it (apply_job_neigh).
            eth0 = FRESH_NS_ETH0_INDEX
            sock = rawnl.job_socket()
            try:
                rawnl.send(sock, [
                    rawnl.veth_here(names.JOB_IFNAME, eth0, spec.mac, spec.mtu, spec.host_ifname, agent_netns_fd),
                    rawnl.link_up("lo", LOOPBACK_IFINDEX),
                    rawnl.link_up(names.JOB_IFNAME, eth0),
                    rawnl.addr_replace(names.JOB_IFNAME, eth0, spec.ip, spec.prefixlen),
                    rawnl.default_route_replace(names.JOB_IFNAME, eth0, spec.gateway),
                ], spec.netns)
                made.append(_JobSock(sock, eth0, os.stat("/proc/thread-self/ns/net").st_ino))
            except BaseException:
                sock.close()
                raise

        self._close_job_sock(spec.job_id)  # (of a namespace that was there before: it holds it)

        for attempt in (1, 2):
            try:
                self.ns.create(path, JOB_SYSCTLS, inside)
                break
            except AlreadyExists as e:
                if e.op == "create netns file":
                    # A namespace file our model did not know of (e.g. after a failed step): fix it in place.
                    self._configure_job(spec, recreate_veth=True)
                    return
                if attempt == 2:
                    raise
                # A veth of that name outlived its namespace file (a process pinned the namespace, or the
                # kernel has not finished cleaning it up): it is ours and stale.
                self.nl.delete_link(spec.host_ifname)
        if made:
            self._jobsocks[spec.job_id] = made[0]
        self._finish_new_job(spec, path, lambda: self._attach_port(spec))

    def _finish_new_job(self, spec: JobNetSpec, path: Path, last: Callable[[], None]) -> None:
        """The end of a new job network, made anew or from a spare: `last` (what is left to do); should it
        fail, the job's veth and namespace go again (the original error is raised; a full reconcile cleans
        up the rest). Then the neighbour watch follows the namespace from an empty table."""
        self._forget(spec.host_ifname)
        try:
            last()
        except BaseException:
            with contextlib.suppress(KernelError):
                self.nl.delete_link(spec.host_ifname)
                self._delete_job(DeleteJobNetwork(spec.job_id, spec.netns, spec.host_ifname))
            raise
        if self.watch is not None:
            try:
                self.watch.fresh(spec.job_id, path, FRESH_NS_ETH0_INDEX)
            except KernelError as e:  # its table is read whole at the next full reconcile instead
                log.warning("not watching the neighbours of job %s: %s", spec.job_id, e)

    def _create_job_from(self, spare: Spare, spec: JobNetSpec) -> bool:
        """Make the job's network out of a spare namespace (spares.py); False (the spare discarded, nothing
        of the job made) when the spare cannot be taken: the caller makes one the cold way."""
        assert self.spares is not None
        path = self.job_netns_path(spec.netns)
        renamed = False
        try:
            index = socket.if_nametoindex(spare.ifname)
            rawnl.send(self._raw, [rawnl.link_rename(spare.ifname, index, spec.host_ifname)], self.nl.netns)
            renamed = True
            self.ns.move(spare.path, path)
        except (KernelError, OSError) as e:
            log.warning("spare namespace %s not usable for job %s (%s): making one", spare.path.name, spec.job_id, e)
            self.spares.discard(spare, [spec.host_ifname if renamed else spare.ifname])
            return False
        # The namespace and the veth are the job's now; the rest as for a new one (eth0 keeps ifindex 2).
        self._close_job_sock(spec.job_id)
        self._jobsocks[spec.job_id] = _JobSock(spare.sock, FRESH_NS_ETH0_INDEX, spare.ino)
        eth0 = FRESH_NS_ETH0_INDEX

        def last() -> None:
            rawnl.send(spare.sock, [
                rawnl.link_set_up(names.JOB_IFNAME, eth0, spec.mac, spec.mtu),
                rawnl.addr_replace(names.JOB_IFNAME, eth0, spec.ip, spec.prefixlen),
                rawnl.default_route_replace(names.JOB_IFNAME, eth0, spec.gateway),
            ], spec.netns)
            self._attach_port(spec, mtu=spec.mtu, disable_ipv6=False)  # (IPv6 went off when the spare was made)

        self._finish_new_job(spec, path, last)
        return True

    def _configure_job(self, spec: JobNetSpec, recreate_veth: bool) -> None:
        path = self.job_netns_path(spec.netns)
        if self.watch is not None:
            self.watch.invalidate(spec.job_id)  # eth0 (its ifindex) may be new: read its table whole again
        js = self._jobsocks.get(spec.job_id)
        if js is not None:
            js.eth0 = 0  # looked up again
        fd = self.ns.enter(path, JOB_SYSCTLS)
        with Netlink(spec.netns, fileno=fd) as job_nl:
            if recreate_veth:
                self.nl.delete_link(spec.host_ifname)
                self._forget(spec.host_ifname)
                job_nl.delete_link(names.JOB_IFNAME)
                self._make_veth(spec, path)
            else:
                self._attach_port(spec, mtu=spec.mtu)
            eth0 = job_nl.link(names.JOB_IFNAME)
            if eth0 is None:
                raise NotFound("look up link", names.JOB_IFNAME, spec.netns, 19, "no such device")
            job_nl.set_link(names.JOB_IFNAME, eth0.index, address=spec.mac, mtu=spec.mtu)
            want = (spec.ip, spec.prefixlen)
            for a in job_nl.addrs():
                if a.ifindex == eth0.index and (a.address, a.prefixlen) != want:
                    job_nl.addr_delete(names.JOB_IFNAME, eth0.index, a.address, a.prefixlen)
            self._configure_inside(job_nl, spec, eth0.index)

    def _make_veth(self, spec: JobNetSpec, path: Path) -> None:
        try:
            ns_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise from_oserror("open netns", str(path), self.nl.netns, e) from e
        try:
            for attempt in (1, 2):
                try:
                    self.nl.create_veth(spec.host_ifname, mtu=spec.mtu, peer_ifname=names.JOB_IFNAME,
                                        peer_netns_fd=ns_fd, peer_mac=spec.mac, peer_netns=spec.netns)
                    break
                except AlreadyExists:
                    if attempt == 2:
                        raise
                    self.nl.delete_link(spec.host_ifname)  # stale, as in _create_job
        finally:
            os.close(ns_fd)
        self._forget(spec.host_ifname)
        self._attach_port(spec)

    def _attach_port(self, spec: JobNetSpec, mtu: int = 0, disable_ipv6: bool = True) -> None:
        """A job's host end: IPv6 off (as `_up_without_ipv6`), then one batch: onto its bridge and up (and
        `mtu` if given), bridge port learning off. Its static FDB entry is a step of its own (ReplaceBridgeFdb)."""
        host = spec.host_ifname
        if disable_ipv6:
            ipv6_off(host, self.nl.netns)
        idx = self.index(host)
        rawnl.send(self._raw, [rawnl.port_attach(host, idx, spec.bridge, self.index(spec.bridge), mtu),
                               rawnl.port_learning(host, idx, False)], self.nl.netns)

    @staticmethod
    def _configure_inside(job_nl: Netlink, spec: JobNetSpec, eth0_index: int) -> None:
        job_nl.set_link("lo", LOOPBACK_IFINDEX, state="up")
        job_nl.set_link(names.JOB_IFNAME, eth0_index, state="up")
        job_nl.addr_replace(names.JOB_IFNAME, eth0_index, spec.ip, spec.prefixlen)
        job_nl.default_route_replace(names.JOB_IFNAME, eth0_index, spec.gateway)
