"""Typed facade over pyroute2's IPRoute: the only module of the kernel layer that imports pyroute2.

Each method is one netlink request (or one dump, retried on NLM_F_DUMP_INTR up to a bound). Failures are
translated once, in `_call`, into `errors.KernelError` subclasses naming the operation, the object and
the namespace; the kernel's ext_ack text (sockets are opened with ext_ack) becomes the detail. Deletes
tolerate exactly the "already gone" errnos. (The hot paths - FDB and neighbour entries, the job setup
batch, the observation of job namespaces - use the minimal raw rtnetlink of rawnl.py instead.)
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

from nodeagent.kernel.errors import GONE_ERRNOS, DumpInterrupted, KernelError, from_errno, from_oserror

T = TypeVar("T")

IFF_UP = 0x1
DUMP_RETRIES = 5


@dataclass(frozen=True)
class LinkRec:
    index: int
    ifname: str
    kind: str  # "" for links without IFLA_INFO_KIND
    mtu: int
    up: bool
    master: int  # 0 when none
    address: str
    data: dict[str, Any]  # IFLA_INFO_DATA attributes by their full name (IFLA_VXLAN_ID, IFLA_BR_STP_STATE, ...)


@dataclass(frozen=True)
class AddrRec:
    ifindex: int
    address: str
    prefixlen: int


@dataclass(frozen=True)
class RouteRec:
    dst: str  # "" for the default route
    dst_len: int
    gateway: str
    oif: int


class Netlink:
    """One rtnetlink socket in one network namespace. `netns` labels errors. `fileno`: an AF_NETLINK route
    socket already bound to the namespace (see `namespaces.Namespaces`); None opens one in the calling
    thread's namespace."""

    def __init__(self, netns: str, fileno: int | None = None) -> None:
        self.netns = netns
        try:
            self._ipr: Any = IPRoute(fileno=fileno, ext_ack=True) if fileno is not None else IPRoute(ext_ack=True)
        except OSError as e:
            if fileno is not None:
                socket.socket(fileno=fileno).close()
            raise from_oserror("open netlink socket", "rtnl", netns, e) from e

    def close(self) -> None:
        self._ipr.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------------

    def _call(self, op: str, obj: str, fn: Callable[[], T], *, gone_ok: bool = False) -> T | None:
        try:
            return fn()
        except NetlinkError as e:
            if gone_ok and e.code in GONE_ERRNOS:
                return None
            detail = e.args[1] if len(e.args) > 1 and e.args[1] else ""
            raise from_errno(op, obj, self.netns, e.code, str(detail)) from e
        except OSError as e:
            if gone_ok and e.errno in GONE_ERRNOS:
                return None
            raise from_oserror(op, obj, self.netns, e) from e

    def _req(self, op: str, obj: str, fn: Callable[[], T]) -> T:
        out = self._call(op, obj, fn)
        assert out is not None
        return out

    def _dump(self, what: str, fn: Callable[[], Any]) -> list[Any]:
        for _ in range(DUMP_RETRIES):
            try:
                return list(self._req("dump", what, fn))
            except KernelError as e:
                if not isinstance(e.__cause__, NetlinkDumpInterrupted):
                    raise
        raise DumpInterrupted("dump", what, self.netns, 0, f"interrupted {DUMP_RETRIES} times")

    # -- links ------------------------------------------------------------------------------------

    @staticmethod
    def _link_rec(m: Any) -> LinkRec:
        info = m.get("IFLA_LINKINFO")
        kind = ""
        data: dict[str, Any] = {}
        if info is not None:
            kind = info.get("IFLA_INFO_KIND") or ""
            d = info.get("IFLA_INFO_DATA")
            if d is not None and "attrs" in d:
                data = {a[0]: a[1] for a in d["attrs"]}
        return LinkRec(index=int(m["index"]), ifname=str(m.get("IFLA_IFNAME")), kind=str(kind),
                       mtu=int(m.get("IFLA_MTU") or 0), up=bool(m["flags"] & IFF_UP),
                       master=int(m.get("IFLA_MASTER") or 0), address=str(m.get("IFLA_ADDRESS") or ""),
                       data=data)

    def link(self, ifname: str) -> LinkRec | None:
        """One link by name (a targeted RTM_GETLINK, not a dump); None when it does not exist."""
        out = self._call("get link", ifname, lambda: self._ipr.link("get", ifname=ifname), gone_ok=True)
        return self._link_rec(out[0]) if out else None

    def create_bridge(self, ifname: str, mtu: int) -> None:
        """Created down: set it up once IPv6 is off on it (and likewise the other creates)."""
        self._req("create bridge", ifname, lambda: self._ipr.link(
            "add", ifname=ifname, kind="bridge", mtu=mtu, br_stp_state=0, br_forward_delay=0,
            br_mcast_snooping=0, br_mcast_querier=0))

    def create_vxlan(self, ifname: str, *, vni: int, mtu: int, local: str, link: int, port: int,
                     master: int) -> None:
        self._req("create vxlan", ifname, lambda: self._ipr.link(
            "add", ifname=ifname, kind="vxlan", vxlan_id=vni, vxlan_local=local, vxlan_link=link,
            vxlan_port=port, vxlan_learning=0, vxlan_proxy=1, mtu=mtu, master=master))

    def create_veth(self, ifname: str, *, mtu: int, peer_ifname: str, peer_netns_fd: int, peer_mac: str,
                    peer_netns: str) -> None:
        """A veth whose peer is created directly in another namespace (no move afterwards)."""
        peer = {"ifname": peer_ifname, "net_ns_fd": peer_netns_fd, "address": peer_mac, "mtu": mtu}
        self._req("create veth", f"{ifname} (peer {peer_ifname} in {peer_netns})", lambda: self._ipr.link(
            "add", ifname=ifname, kind="veth", mtu=mtu, peer=peer))

    def set_link_by_name(self, ifname: str, **attrs: Any) -> None:
        self._req("set link", f"{ifname} {attrs}", lambda: self._ipr.link("set", ifname=ifname, **attrs))

    def set_link(self, ifname: str, index: int, **attrs: Any) -> None:
        """`attrs`: mtu, master (index, 0 = none), address, state ("up"/"down")."""
        self._req("set link", f"{ifname} {attrs}", lambda: self._ipr.link("set", index=index, **attrs))

    def delete_link(self, ifname: str) -> None:
        self._call("delete link", ifname, lambda: self._ipr.link("del", ifname=ifname), gone_ok=True)

    # -- addresses / routes -----------------------------------------------------------------------

    def addrs(self) -> list[AddrRec]:
        return [AddrRec(int(m["index"]), str(m.get("IFA_ADDRESS")), int(m["prefixlen"]))
                for m in self._dump("addresses", lambda: self._ipr.addr("dump", family=socket.AF_INET))]

    def addr_replace(self, ifname: str, ifindex: int, address: str, prefixlen: int) -> None:
        self._req("replace address", f"{address}/{prefixlen} dev {ifname}", lambda: self._ipr.addr(
            "replace", index=ifindex, address=address, prefixlen=prefixlen))

    def addr_delete(self, ifname: str, ifindex: int, address: str, prefixlen: int) -> None:
        self._call("delete address", f"{address}/{prefixlen} dev {ifname}", lambda: self._ipr.addr(
            "del", index=ifindex, address=address, prefixlen=prefixlen), gone_ok=True)

    def routes(self) -> list[RouteRec]:
        return [RouteRec(str(m.get("RTA_DST") or ""), int(m["dst_len"]), str(m.get("RTA_GATEWAY") or ""),
                         int(m.get("RTA_OIF") or 0))
                for m in self._dump("routes", lambda: self._ipr.route("dump", family=socket.AF_INET,
                                                                      table=254))]

    def default_route_replace(self, ifname: str, ifindex: int, gateway: str) -> None:
        self._req("replace default route", f"via {gateway} dev {ifname}", lambda: self._ipr.route(
            "replace", dst="0.0.0.0/0", gateway=gateway, oif=ifindex))
