"""Minimal raw rtnetlink for the two per-job hot paths: the setup batch and the observation of a job's
namespace. Everything else goes through netlink.py (pyroute2).

FDB and neighbour entries go the same way, many per datagram (a snapshot with thousands of remote jobs),
and so do a job port's attachment to its bridge (master, up, learning off) and its static bridge FDB entry.

Setting up a job's namespace from inside it takes five requests (veth create, lo up, eth0 up, address,
default route). Sent as ONE batch on a raw socket from the worker thread that made the namespace, they
cost one system call and no pyroute2 socket (whose construction alone costs ~0.4 ms). Only the few fixed
message shapes needed here are encoded. Each reply is an ack (NLMSG_ERROR); the first failure is raised
as a typed error naming its request. Observing a job namespace (three small dumps) the same way costs a
fraction of what pyroute2's socket setup and message parsing cost, which matters for a full reconcile of
hundreds of jobs.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from nodeagent.kernel.errors import DumpInterrupted, KernelError, from_errno

NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_GETLINK, RTM_GETADDR, RTM_GETROUTE, RTM_GETNEIGH = 18, 22, 26, 30
NLM_F_DUMP, NLM_F_DUMP_INTR = 0x300, 0x10
DUMP_RETRIES = 5
RECV_SIZE = 1 << 16
RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_NEWROUTE, RTM_NEWNEIGH, RTM_DELNEIGH = 16, 17, 20, 24, 28, 29
NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE, NLM_F_APPEND = 0x1, 0x4, 0x100, 0x200, 0x400, 0x800
NLM_F_ACK_TLVS = 0x200  # in an ack: extended ack attributes follow
NLMSGERR_ATTR_MSG = 1
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_EXT_ACK = 270, 10, 11
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER, IFLA_LINKINFO, IFLA_NET_NS_FD = 1, 3, 4, 10, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_KIND, IFLA_INFO_SLAVE_DATA, VETH_INFO_PEER = 1, 2, 4, 5, 1
IFLA_BRPORT_LEARNING = 8
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
IFF_UP = 0x1
NDA_DST, NDA_LLADDR = 1, 2
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80
NTF_SELF, NTF_MASTER, NTF_STICKY = 0x02, 0x04, 0x40
NDA_VLAN = 5
AF_BRIDGE = 7
RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 4, 0, 1


@dataclass(frozen=True)
class Request:
    op: str  # for errors: "create veth", "set link up", ...
    obj: str
    type: int
    flags: int
    body: bytes


def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _str(s: str) -> bytes:
    return s.encode() + b"\0"


def _mac(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, change)


def veth_here(ifname: str, index: int, mac: str, mtu: int, peer_ifname: str, peer_netns_fd: int) -> Request:
    """A veth `ifname` (with ifindex `index`, `mac`, `mtu`) in the socket's namespace, its peer created in
    the namespace `peer_netns_fd` refers to."""
    peer = _ifinfo() + _attr(IFLA_IFNAME, _str(peer_ifname)) + _attr(IFLA_MTU, struct.pack("=I", mtu)) + _attr(
        IFLA_NET_NS_FD, struct.pack("=I", peer_netns_fd))
    info = _attr(IFLA_INFO_KIND, b"veth") + _attr(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer))
    body = (_ifinfo(index) + _attr(IFLA_IFNAME, _str(ifname)) + _attr(IFLA_ADDRESS, _mac(mac))
            + _attr(IFLA_MTU, struct.pack("=I", mtu)) + _attr(IFLA_LINKINFO, info))
    return Request("create veth", f"{ifname} (peer {peer_ifname})", RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)


def link_up(ifname: str, index: int) -> Request:
    return Request("set link up", ifname, RTM_NEWLINK, 0, _ifinfo(index, IFF_UP, IFF_UP))


def link_delete(ifname: str, index: int) -> Request:
    return Request("delete link", ifname, RTM_DELLINK, 0, _ifinfo(index))


def link_rename(ifname: str, index: int, new_name: str) -> Request:
    """Rename link `index` (it must be down)."""
    return Request("rename link", f"{ifname} to {new_name}", RTM_NEWLINK, 0,
                   _ifinfo(index) + _attr(IFLA_IFNAME, _str(new_name)))


def link_set_up(ifname: str, index: int, mac: str, mtu: int) -> Request:
    """Set link `index`'s MAC and MTU and bring it up (one request)."""
    return Request("set link address, mtu, up", f"{ifname} address {mac} mtu {mtu}", RTM_NEWLINK, 0,
                   _ifinfo(index, IFF_UP, IFF_UP) + _attr(IFLA_ADDRESS, _mac(mac)) + _attr(IFLA_MTU,
                                                                                          struct.pack("=I", mtu)))


def port_attach(ifname: str, index: int, master: str, master_index: int, mtu: int = 0) -> Request:
    """Link `index` onto bridge `master_index` (a no-op if it is there already) and up; also its MTU if given."""
    body = _ifinfo(index, IFF_UP, IFF_UP) + _attr(IFLA_MASTER, struct.pack("=I", master_index))
    if mtu:
        body += _attr(IFLA_MTU, struct.pack("=I", mtu))
    return Request("attach to bridge", f"{ifname} master {master}", RTM_NEWLINK, 0, body)


def port_learning(ifname: str, index: int, learning: bool) -> Request:
    """The bridge port flag `learning` of link `index` (a port of a bridge already: the flag belongs to the
    port, so this cannot go in the request that makes it one)."""
    data = _attr(IFLA_BRPORT_LEARNING, struct.pack("=B", learning))
    info = _attr(IFLA_INFO_SLAVE_KIND, _str("bridge")) + _attr(IFLA_INFO_SLAVE_DATA, data)
    return Request("set bridge port learning " + ("on" if learning else "off"), ifname, RTM_NEWLINK, 0,
                   _ifinfo(index) + _attr(IFLA_LINKINFO, info))


def addr_replace(ifname: str, index: int, ip: str, prefixlen: int) -> Request:
    packed = ipaddress.IPv4Address(ip).packed
    body = struct.pack("=BBBBi", socket.AF_INET, prefixlen, 0, 0, index) + _attr(IFA_LOCAL, packed) + _attr(
        IFA_ADDRESS, packed)
    return Request("replace address", f"{ip}/{prefixlen} dev {ifname}", RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE,
                   body)


def default_route_replace(ifname: str, index: int, gateway: str) -> Request:
    body = struct.pack("=BBBBBBBBI", socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE,
                       RTN_UNICAST, 0) + _attr(RTA_GATEWAY, ipaddress.IPv4Address(gateway).packed) + _attr(
        RTA_OIF, struct.pack("=I", index))
    return Request("replace default route", f"via {gateway} dev {ifname}", RTM_NEWROUTE,
                   NLM_F_CREATE | NLM_F_REPLACE, body)


_NDMSG = struct.Struct("=BxxxiHBB")


def _ndmsg(family: int, ifindex: int, state: int, flags: int) -> bytes:
    return struct.pack("=BxxxiHBB", family, ifindex, state, flags, 0)


def fdb(op: str, dev: str, ifindex: int, mac: str, dst: str) -> Request:
    """A VXLAN FDB entry `mac -> dst` on `dev` (NTF_SELF, permanent); op: replace, append or delete."""
    body = _ndmsg(AF_BRIDGE, ifindex, NUD_PERMANENT | NUD_NOARP, NTF_SELF) + _attr(NDA_LLADDR, _mac(mac)) + _attr(
        NDA_DST, ipaddress.IPv4Address(dst).packed)
    kind, flags = {"replace": (RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE),
                   "append": (RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_APPEND),
                   "delete": (RTM_DELNEIGH, 0)}[op]
    return Request(f"{op} fdb", f"{mac} dst {dst} dev {dev}", kind, flags, body)


BRIDGE_FDB_STATIC = NUD_NOARP  # "static" (NUD_PERMANENT would be "local": frames to it go to the host)


def bridge_fdb(op: str, bridge: str, port: str, ifindex: int, mac: str) -> Request:
    """A static, sticky entry `mac -> port` in the FDB of the bridge `port` (ifindex) is a port of: NTF_MASTER,
    NUD_NOARP (never ages), NTF_STICKY (learning on another port never moves it); op: replace (also moves
    the entry from another port and makes a dynamic one static) or delete (ENOENT unless it is on `port`)."""
    flags = NTF_MASTER | (NTF_STICKY if op == "replace" else 0)
    body = _ndmsg(AF_BRIDGE, ifindex, BRIDGE_FDB_STATIC, flags) + _attr(NDA_LLADDR, _mac(mac))
    kind, nl_flags = {"replace": (RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE), "delete": (RTM_DELNEIGH, 0)}[op]
    return Request(f"{op} bridge fdb", f"{mac} dev {port} master {bridge}", kind, nl_flags, body)


def neigh(op: str, dev: str, ifindex: int, ip: str, mac: str) -> Request:
    """A permanent IPv4 neighbour entry `ip -> mac` on `dev`; op: replace or delete."""
    body = _ndmsg(socket.AF_INET, ifindex, NUD_PERMANENT, 0) + _attr(NDA_DST, ipaddress.IPv4Address(ip).packed)
    if op == "replace":
        return Request("replace neigh", f"{ip} lladdr {mac} dev {dev}", RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE,
                       body + _attr(NDA_LLADDR, _mac(mac)))
    return Request("delete neigh", f"{ip} dev {dev}", RTM_DELNEIGH, 0, body)


# The port id of the agent's netlink socket in every job namespace (port ids are per namespace): the
# neighbour watch drops the notifications of our own changes by it (neighwatch.py), so writing a group's
# N-1 entries into a new job costs no Python per notification.
JOB_PORTID = 0x6A6E0001
_NEIGH_NEW = struct.Struct("=IHHIIBxxxiHBBHH4sHH6sxx")  # nlmsghdr ndmsg NDA_DST(4) NDA_LLADDR(6)+pad: 48 bytes
_NEIGH_DEL = struct.Struct("=IHHIIBxxxiHBBHH4s")  # 36 bytes
_seq = itertools.count()


def _seq_base() -> int:
    """A fresh block of 65536 sequence numbers (u32 wraps after 65535 blocks: long enough to be unique)."""
    return (next(_seq) % 0xFFFF + 1) << 16


JOB_SOCKET_TIMEOUT_S = 5  # a reply that never comes (its ack dropped) fails the step instead of hanging


def job_socket() -> socket.socket:
    """A route socket in the calling thread's namespace (a job's), bound to JOB_PORTID; should something
    else hold that port there, to any (the watch then sees our own notifications: slower, still right).
    Receiving times out after JOB_SOCKET_TIMEOUT_S (SO_RCVTIMEO: no extra system call per receive)."""
    s = route_socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("=qq", JOB_SOCKET_TIMEOUT_S, 0))
        try:
            s.bind((JOB_PORTID, 0))
        except OSError:
            s.bind((0, 0))
    except BaseException:
        s.close()
        raise
    return s


def _neigh_msg(seq: int, ifindex: int, ip: bytes, mac: bytes | None, ack: bool) -> bytes:
    """A permanent IPv4 neighbour replace (`mac`) or delete (None), ready to send."""
    flag = NLM_F_ACK if ack else 0
    if mac is not None:
        return _NEIGH_NEW.pack(48, RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE | flag, seq, 0,
                               socket.AF_INET, ifindex, NUD_PERMANENT, 0, 0, 8, NDA_DST, ip, 10, NDA_LLADDR, mac)
    return _NEIGH_DEL.pack(36, RTM_DELNEIGH, NLM_F_REQUEST | flag, seq, 0, socket.AF_INET, ifindex, 0, 0, 0, 8,
                           NDA_DST, ip)


def _replies(sock: socket.socket, netns: str) -> Iterator[tuple[int, int, int, bytes]]:
    """The messages the kernel sends on `sock`, as they come: (type, flags, seq, the message). Never ends by
    itself: the caller stops when it has its answer (a receive timeout or error raises OSError)."""
    while True:
        data = _recv(sock, netns)
        off = 0
        while off + 16 <= len(data):
            length, kind, flags, seq = struct.unpack_from("=IHHI", data, off)
            if length < 16:
                break
            yield kind, flags, seq, data[off:off + length]
            off += (length + 3) & ~3


def _error(msg: bytes, flags: int) -> tuple[int, str] | None:
    """An NLMSG_ERROR message's outcome: None (an ack) or (errno, extended ack message)."""
    (err,) = struct.unpack_from("=i", msg, 16)
    return (-err, _ext_ack_msg(msg, flags)) if err else None


def job_neigh(sock: socket.socket, ifindex: int, replace: Sequence[tuple[bytes, bytes]], delete: Sequence[bytes],
              netns: str, chunk: int = 256) -> list[tuple[int, str] | None]:
    """Permanent IPv4 neighbour entries on `ifindex` through `sock` (in the job's namespace): `replace`
    (packed ip, packed mac) then `delete` (packed ip), in datagrams of `chunk` messages where only the last
    asks for an ack (the kernel answers every failed message anyway, and processes a datagram's messages
    in order, to the end). Each one's outcome in that order: None or (errno, extended ack message)."""
    items: list[tuple[bytes, bytes | None]] = [*replace, *((ip, None) for ip in delete)]
    out: list[tuple[int, str] | None] = [None] * len(items)
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        base = _seq_base()  # seqs unique across calls: a stale answer is never taken for this one's
        last = base + len(part) - 1
        sock.send(b"".join(_neigh_msg(seq, ifindex, ip, mac, seq == last)
                           for seq, (ip, mac) in enumerate(part, base)))
        for kind, flags, seq, msg in _replies(sock, netns):
            if kind == NLMSG_ERROR and base <= seq <= last:
                out[start + seq - base] = _error(msg, flags)
                if seq == last:
                    break
    return out


def neigh_one(sock: socket.socket, ifindex: int, ip: bytes, mac: bytes | None) -> int:
    """Send ONE permanent neighbour replace (`mac`) or delete (None) with an ack asked; return its seq for
    `ack_of` (a fan-out sends to every job namespace first, then reads the answers)."""
    seq = _seq_base()
    sock.send(_neigh_msg(seq, ifindex, ip, mac, True))
    return seq


def ack_of(sock: socket.socket, seq: int, netns: str) -> tuple[int, str] | None:
    """The answer to the request `seq` on `sock`: None (done) or (errno, extended ack message)."""
    for kind, flags, got, msg in _replies(sock, netns):
        if kind == NLMSG_ERROR and got == seq:
            return _error(msg, flags)
    raise AssertionError("unreachable")  # (_replies never ends)


def link_index(sock: socket.socket, ifname: str, netns: str) -> int:
    """The ifindex of `ifname` in the namespace of `sock` (RTM_GETLINK by name); 0 when there is none."""
    seq = _seq_base()
    body = _ifinfo() + _attr(IFLA_IFNAME, _str(ifname))
    sock.send(struct.pack("=IHHII", 16 + len(body), RTM_GETLINK, NLM_F_REQUEST, seq, 0) + body)
    for kind, flags, got, msg in _replies(sock, netns):
        if got != seq:
            continue
        if kind == RTM_NEWLINK:
            return int(struct.unpack_from("=i", msg, 20)[0])
        if kind == NLMSG_ERROR:
            err = _error(msg, flags)
            if err is None or err[0] in (errno.ENODEV, errno.ENOENT):
                return 0
            raise from_errno("look up link", ifname, netns, *err)
    raise AssertionError("unreachable")  # (_replies never ends)


def route_socket() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    s.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
    s.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
    return s


def send(sock: socket.socket, requests: list[Request], netns: str) -> None:
    """Send all requests in one datagram; wait for every ack; raise the first failure (typed)."""
    for err in send_all(sock, requests, netns):
        if err is not None:
            raise err


def send_all(sock: socket.socket, requests: list[Request], netns: str, chunk: int = 256) -> list[KernelError | None]:
    """Send requests in batches of `chunk` (one datagram each); return each one's outcome, in order."""
    out: list[KernelError | None] = []
    for start in range(0, len(requests), chunk):
        part = requests[start:start + chunk]
        buf = bytearray()
        for seq, r in enumerate(part, start=1):
            buf += struct.pack("=IHHII", 16 + len(r.body), r.type, NLM_F_REQUEST | NLM_F_ACK | r.flags, seq, 0)
            buf += r.body
        sock.send(bytes(buf))
        errors: dict[int, tuple[int, str]] = {}
        pending = set(range(1, len(part) + 1))
        for kind, flags, seq, msg in _replies(sock, netns):
            if kind == NLMSG_ERROR and seq in pending:
                pending.discard(seq)
                if (err := _error(msg, flags)) is not None:
                    errors[seq] = err
                if not pending:
                    break
        for seq, r in enumerate(part, start=1):
            e = errors.get(seq)
            out.append(None if e is None else from_errno(r.op, r.obj, netns, *e))
    return out


def _recv(sock: socket.socket, netns: str) -> bytes:
    data, _, flags, _ = sock.recvmsg(RECV_SIZE)
    if flags & socket.MSG_TRUNC:  # never for rtnetlink (datagrams are at most 32 KiB), but never silently
        raise KernelError("receive", "rtnetlink reply", netns, 90, f"reply longer than {RECV_SIZE} bytes")
    return data


def _ext_ack_msg(msg: bytes, flags: int) -> str:
    if not flags & NLM_F_ACK_TLVS:
        return ""
    off = 16 + 4 + 16  # header, error, the (capped) original header
    while off + 4 <= len(msg):
        length, kind = struct.unpack_from("=HH", msg, off)
        if length < 4:
            break
        if kind & 0x3FFF == NLMSGERR_ATTR_MSG:
            return msg[off + 4:off + length].rstrip(b"\0").decode(errors="replace")
        off += (length + 3) & ~3
    return ""


# -- dumps -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkInfo:
    index: int
    ifname: str
    up: bool
    mtu: int
    mac: str
    master: int = 0
    kind: str = ""
    data: dict[int, bytes] | None = None  # IFLA_INFO_DATA attributes by type (IFLA_VXLAN_*, IFLA_BR_*)
    learning: bool | None = None  # the bridge port flag, when the link is a port of a bridge


@dataclass(frozen=True)
class AddrInfo:
    index: int
    address: str
    prefixlen: int


@dataclass(frozen=True)
class RouteInfo:
    table: int
    dst_len: int
    gateway: str
    oif: int


def _attrs(data: bytes, off: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while off + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, off)
        if length < 4:
            break
        out.setdefault(kind & 0x3FFF, data[off + 4:off + length])
        off += (length + 3) & ~3
    return out


def _dump(sock: socket.socket, kind: int, body: bytes, netns: str, what: str,
          keep: Callable[[bytes], bool] | None = None) -> list[tuple[bytes, dict[int, bytes]]]:
    """[(fixed header, attributes)] of every message of one dump (that `keep` keeps, judging by the fixed
    header alone: the others' attributes are not parsed); retried when interrupted."""
    hdr_len = len(body)
    for _ in range(DUMP_RETRIES):
        sock.send(struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
        out: list[tuple[bytes, dict[int, bytes]]] = []
        interrupted = done = False
        while not done:
            data = _recv(sock, netns)
            off = 0
            while off + 16 <= len(data):
                length, mtype, flags = struct.unpack_from("=IHH", data, off)
                if length < 16:
                    break
                interrupted |= bool(flags & NLM_F_DUMP_INTR)
                if mtype == NLMSG_DONE:
                    done = True
                elif mtype == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, off + 16)
                    raise from_errno("dump", what, netns, -err)
                else:
                    start = off + 16
                    hdr = data[start:start + hdr_len]
                    if keep is None or keep(hdr):
                        out.append((hdr, _attrs(data, start + hdr_len, off + length)))
                off += (length + 3) & ~3
        if not interrupted:
            return out
    raise DumpInterrupted("dump", what, netns, 0, f"interrupted {DUMP_RETRIES} times")


@dataclass(frozen=True)
class NeighInfo:
    ifindex: int
    state: int
    flags: int
    dst: str  # "" without NDA_DST (or not IPv4)
    mac: str
    vlan: int = 0  # NDA_VLAN of a bridge FDB entry (0: none)


def neighbours(sock: socket.socket, family: int, netns: str,
               keep: Callable[[int, int, int], bool] | None = None) -> list[NeighInfo]:
    """Neighbour (AF_INET) or FDB (AF_BRIDGE) entries; those `keep(ifindex, state, flags)` keeps (a node's
    FDB dump holds ~3 entries per bridge port that are the kernel's: only ours are worth parsing)."""
    out = []
    what = "fdb" if family == AF_BRIDGE else "neighbours"
    hdr_keep = None
    if keep is not None:
        def hdr_keep(hdr: bytes) -> bool:
            _, ifindex, state, flags, _ = _NDMSG.unpack(hdr)
            return keep(ifindex, state, flags)

    for hdr, a in _dump(sock, RTM_GETNEIGH, _ndmsg(family, 0, 0, 0), netns, what, hdr_keep):
        _, ifindex, state, flags, _ = _NDMSG.unpack(hdr)
        vlan = a.get(NDA_VLAN, b"")
        out.append(NeighInfo(ifindex, state, flags, _ip(a.get(NDA_DST, b"")),
                             ":".join(f"{b:02x}" for b in a.get(NDA_LLADDR, b"")),
                             struct.unpack("=H", vlan)[0] if len(vlan) == 2 else 0))
    return out


_NDA_DST_V4 = struct.pack("=HH", 8, NDA_DST)  # the attribute headers of an IPv4 entry as the kernel writes them
_NDA_LLADDR_ETH = struct.pack("=HH", 10, NDA_LLADDR)


def permanent_neighbours_v4(sock: socket.socket, ifindex: int, netns: str) -> dict[bytes, bytes]:
    """The PERMANENT IPv4 neighbour entries on link `ifindex`, packed: {ip (4 bytes): mac (6 bytes)}.
    Parsed in place, without an attribute dict per message: a full reconcile reads the table of
    every job namespace, a job in a group of N has N-1 entries, so this runs for hundreds of thousands of
    entries. The kernel writes NDA_DST, then NDA_LLADDR first; any other layout takes the general parser."""
    req = struct.pack("=IHHII", 28, RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + _ndmsg(socket.AF_INET, 0, 0, 0)
    unpack_hdr, unpack_nd = struct.Struct("=IHH").unpack_from, struct.Struct("=iH").unpack_from
    for _ in range(DUMP_RETRIES):
        sock.send(req)
        permanent: dict[bytes, bytes] = {}
        interrupted = done = False
        while not done:
            data = _recv(sock, netns)
            off, end = 0, len(data)
            while off + 16 <= end:
                length, mtype, flags = unpack_hdr(data, off)
                if length < 16:
                    break
                if flags & NLM_F_DUMP_INTR:
                    interrupted = True
                if mtype == RTM_NEWNEIGH:
                    ifi, state = unpack_nd(data, off + 20)
                    if ifi == ifindex and state & NUD_PERMANENT:
                        a = off + 28  # after nlmsghdr (16) and ndmsg (12)
                        if data[a:a + 4] == _NDA_DST_V4 and data[a + 8:a + 12] == _NDA_LLADDR_ETH:
                            ip, mac = data[a + 4:a + 8], data[a + 12:a + 18]
                        else:
                            attrs = _attrs(data, a, off + length)
                            ip, mac = attrs.get(NDA_DST, b""), attrs.get(NDA_LLADDR, b"")
                        if len(ip) == 4 and len(mac) == 6:
                            permanent[ip] = mac
                elif mtype == NLMSG_DONE:
                    done = True
                elif mtype == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, off + 16)
                    raise from_errno("dump", "neighbours", netns, -err)
                off += (length + 3) & ~3
        if not interrupted:
            return permanent
    raise DumpInterrupted("dump", "neighbours", netns, 0, f"interrupted {DUMP_RETRIES} times")


# -- network namespace ids -------------------------------------------------------------------------

RTM_NEWNSID, RTM_GETNSID = 88, 90
NETNSA_NSID, NETNSA_FD = 1, 3
NETNSA_NSID_NOT_ASSIGNED = -1


def nsid_of(sock: socket.socket, ns_fd: int, netns: str, what: str) -> int:
    """The id the socket's namespace has for the namespace `ns_fd` refers to, assigned first if it has
    none (ids are what a NETLINK_LISTEN_ALL_NSID socket tells notifications of other namespaces apart by).
    `what` names that namespace in errors."""
    rtgen = struct.pack("=Bxxx", socket.AF_UNSPEC)
    fd_attr = _attr(NETNSA_FD, struct.pack("=I", ns_fd))
    err = send_all(sock, [Request("assign nsid", what, RTM_NEWNSID, 0,
                                  rtgen + _attr(NETNSA_NSID, struct.pack("=i", NETNSA_NSID_NOT_ASSIGNED)) + fd_attr)],
                   netns)[0]
    if err is not None and err.errno != errno.EEXIST:  # EEXIST: it has one already
        raise err
    sock.send(struct.pack("=IHHII", 16 + len(rtgen) + len(fd_attr), RTM_GETNSID, NLM_F_REQUEST, 1, 0) + rtgen + fd_attr)
    while True:
        data = _recv(sock, netns)
        off = 0
        while off + 16 <= len(data):
            length, mtype, flags, seq = struct.unpack_from("=IHHI", data, off)
            if length < 16:
                break
            if seq == 1 and mtype == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, off + 16)
                raise from_errno("get nsid", what, netns, -code, _ext_ack_msg(data[off:off + length], flags))
            if seq == 1 and mtype == RTM_NEWNSID:
                nsid = _attrs(data, off + 16 + len(rtgen), off + length).get(NETNSA_NSID, b"")
                if len(nsid) != 4:
                    raise KernelError("get nsid", what, netns, errno.EPROTO, "reply without NETNSA_NSID")
                return int(struct.unpack("=i", nsid)[0])
            off += (length + 3) & ~3


def neigh_event_v4(data: bytes, off: int, length: int) -> tuple[int, int, int, bytes, bytes] | None:
    """(message type, ifindex, state, packed ip, packed mac or b"") of an IPv4 neighbour notification
    (RTM_NEWNEIGH / RTM_DELNEIGH) at `off`; None for any other message."""
    mtype = struct.unpack_from("=H", data, off + 4)[0]
    if mtype not in (RTM_NEWNEIGH, RTM_DELNEIGH) or length < 28:
        return None
    family, ifindex, state = struct.unpack_from("=BxxxiH", data, off + 16)
    if family != socket.AF_INET:
        return None
    a = off + 28
    if data[a:a + 4] == _NDA_DST_V4 and data[a + 8:a + 12] == _NDA_LLADDR_ETH and length >= 46:
        return mtype, ifindex, state, data[a + 4:a + 8], data[a + 12:a + 18]
    attrs = _attrs(data, a, off + length)
    ip = attrs.get(NDA_DST, b"")
    return (mtype, ifindex, state, ip, attrs.get(NDA_LLADDR, b"")) if len(ip) == 4 else None


def u32(raw: bytes | None) -> int:
    return struct.unpack("=I", raw)[0] if raw and len(raw) == 4 else (raw[0] if raw and len(raw) == 1 else 0)


def be16(raw: bytes | None) -> int:
    return struct.unpack("!H", raw)[0] if raw and len(raw) == 2 else 0


def ip4(raw: bytes | None) -> str:
    return _ip(raw or b"")


def _ip(raw: bytes) -> str:
    return str(ipaddress.IPv4Address(raw)) if len(raw) == 4 else ""


def links(sock: socket.socket, netns: str) -> list[LinkInfo]:
    out = []
    for hdr, a in _dump(sock, RTM_GETLINK, _ifinfo(), netns, "links"):
        _, _, index, flags, _ = struct.unpack("=BxHiII", hdr)
        mtu = struct.unpack("=I", a[IFLA_MTU])[0] if IFLA_MTU in a else 0
        master = struct.unpack("=I", a[IFLA_MASTER])[0] if IFLA_MASTER in a else 0
        kind, data, learning = "", None, None
        if IFLA_LINKINFO in a:
            info = _attrs(a[IFLA_LINKINFO], 0, len(a[IFLA_LINKINFO]))
            kind = info.get(IFLA_INFO_KIND, b"").rstrip(b"\0").decode()
            if IFLA_INFO_DATA in info:
                data = _attrs(info[IFLA_INFO_DATA], 0, len(info[IFLA_INFO_DATA]))
            if info.get(IFLA_INFO_SLAVE_KIND) == b"bridge\0" and IFLA_INFO_SLAVE_DATA in info:
                flag = _find_attr(info[IFLA_INFO_SLAVE_DATA], IFLA_BRPORT_LEARNING)
                learning = None if flag is None else bool(flag[:1] != b"\0")
        out.append(LinkInfo(index, a.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(), bool(flags & IFF_UP), mtu,
                            ":".join(f"{b:02x}" for b in a.get(IFLA_ADDRESS, b"")), master, kind, data, learning))
    return out


def _find_attr(data: bytes, kind: int) -> bytes | None:
    """The payload of the first attribute of type `kind` in `data` (a bridge port's ~40 attributes: the
    flags come early, so this stops long before a full parse would)."""
    off = 0
    while off + 4 <= len(data):
        length, k = struct.unpack_from("=HH", data, off)
        if length < 4:
            break
        if k & 0x3FFF == kind:
            return data[off + 4:off + length]
        off += (length + 3) & ~3
    return None


def addrs(sock: socket.socket, netns: str) -> list[AddrInfo]:
    out = []
    for hdr, a in _dump(sock, RTM_GETADDR, struct.pack("=BBBBi", socket.AF_INET, 0, 0, 0, 0), netns, "addresses"):
        _, prefixlen, _, _, index = struct.unpack("=BBBBi", hdr)
        out.append(AddrInfo(index, _ip(a.get(IFA_LOCAL) or a.get(IFA_ADDRESS, b"")), prefixlen))
    return out


def routes(sock: socket.socket, netns: str) -> list[RouteInfo]:
    out = []
    body = struct.pack("=BBBBBBBBI", socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
    for hdr, a in _dump(sock, RTM_GETROUTE, body, netns, "routes"):
        _, dst_len, _, _, table, _, _, _, _ = struct.unpack("=BBBBBBBBI", hdr)
        if RTA_TABLE in a:
            table = struct.unpack("=I", a[RTA_TABLE])[0]
        oif = struct.unpack("=I", a[RTA_OIF])[0] if RTA_OIF in a else 0
        out.append(RouteInfo(table, dst_len, _ip(a.get(RTA_GATEWAY, b"")), oif))
    return out


# ---------------------------------------------------------------------------------------------- tc (clsact, bpf)

RTM_NEWQDISC, RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER = 36, 44, 45, 46
TCA_KIND, TCA_OPTIONS = 1, 2
NLA_F_NESTED = 0x8000
TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS, TCA_BPF_ID = 6, 7, 8, 11
TCA_BPF_FLAG_ACT_DIRECT = 1
TC_H_CLSACT = 0xFFFFFFF1
TC_PARENT = {"rx": 0xFFFFFFF2, "tx": 0xFFFFFFF3}  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / _EGRESS)
ETH_P_ALL_BE = 0x0300  # htons(ETH_P_ALL)
_TCMSG = struct.Struct("=BxxxiIII")


def clsact_add(ifindex: int) -> Request:
    """The clsact qdisc (where classic tc filters hang at ingress and egress); EEXIST when it is there."""
    body = _TCMSG.pack(socket.AF_UNSPEC, ifindex, 0xFFFF0000, TC_H_CLSACT, 0) + _attr(TCA_KIND, _str("clsact"))
    return Request("add clsact qdisc", f"ifindex {ifindex}", RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, body)


def bpf_filter_add(ifindex: int, direction: str, prio: int, prog_fd: int, name: str) -> Request:
    """A cls_bpf direct-action filter running the program at the clsact hook of `direction`."""
    opts = (_attr(TCA_BPF_FD, struct.pack("=I", prog_fd)) + _attr(TCA_BPF_NAME, _str(name))
            + _attr(TCA_BPF_FLAGS, struct.pack("=I", TCA_BPF_FLAG_ACT_DIRECT)))
    body = (_TCMSG.pack(socket.AF_UNSPEC, ifindex, 1, TC_PARENT[direction], (prio << 16) | ETH_P_ALL_BE)
            + _attr(TCA_KIND, _str("bpf")) + _attr(TCA_OPTIONS | NLA_F_NESTED, opts))
    return Request(f"add tc bpf filter {name}", f"ifindex {ifindex}", RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_EXCL,
                   body)


def bpf_filter_del(ifindex: int, direction: str, handle: int, info: int) -> Request:
    body = (_TCMSG.pack(socket.AF_UNSPEC, ifindex, handle, TC_PARENT[direction], info)
            + _attr(TCA_KIND, _str("bpf")))
    return Request("delete tc bpf filter", f"ifindex {ifindex}", RTM_DELTFILTER, 0, body)


@dataclass(frozen=True)
class BpfFilter:
    handle: int
    info: int        # (prio << 16) | protocol: what deletes it
    prog_id: int
    name: str


def bpf_filters(sock: socket.socket, ifindex: int, direction: str, netns: str) -> list[BpfFilter]:
    """The cls_bpf filters at the clsact hook of `direction` ([] when there is no clsact qdisc)."""
    body = _TCMSG.pack(socket.AF_UNSPEC, ifindex, 0, TC_PARENT[direction], 0)
    try:
        msgs = _dump(sock, RTM_GETTFILTER, body, netns, f"tc filters of ifindex {ifindex}")
    except KernelError as e:
        if e.errno in (errno.EINVAL, errno.ENOENT, errno.EOPNOTSUPP):  # no clsact qdisc (no block to list)
            return []
        raise
    out = []
    for hdr, attrs in msgs:
        opts = attrs.get(TCA_OPTIONS)
        if attrs.get(TCA_KIND) != b"bpf\0" or opts is None:
            continue
        o = _attrs(opts, 0, len(opts))
        if TCA_BPF_ID not in o:
            continue  # the chain's own entry, not a filter
        _f, _i, handle, _parent, info = _TCMSG.unpack(hdr)
        name = o.get(TCA_BPF_NAME, b"").split(b"\0", 1)[0].decode(errors="replace")
        out.append(BpfFilter(handle, info, u32(o[TCA_BPF_ID]), name))
    return out
