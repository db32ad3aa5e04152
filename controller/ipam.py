"""Address management: group subnets out of a pool, job addresses out of a group's subnet, MACs, VNIs.

Pure functions over plain sets; the caller (controller.core) owns the state and the quarantine of
released addresses.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Collection, Iterable

from controller.errors import AlreadyExists, InvalidArgument, ResourceExhausted
from controller.validate import LINK_LOCAL, MAX_VNI

Net = ipaddress.IPv4Network
Addr = ipaddress.IPv4Address
MAX_PREFIX = 29  # gateway + 5 jobs; smaller subnets are not useful for a group


class Pool:
    """The range group subnets come from, and what they must never overlap."""

    def __init__(self, pool: Net, default_prefix: int, underlays: Iterable[Net] = ()) -> None:
        if not pool.prefixlen <= default_prefix <= MAX_PREFIX:
            raise ValueError(f"default prefix length /{default_prefix} does not fit pool {pool} "
                             f"(must be between /{pool.prefixlen} and /{MAX_PREFIX})")
        self.pool = pool
        self.default_prefix = default_prefix
        self.underlays = list(underlays)
        for u in self.underlays:
            if pool.subnet_of(u):
                raise ValueError(f"pool {pool} lies inside the underlay {u}: jobs could not be told apart from "
                                 "nodes; choose another --pool")
            # a pool that merely overlaps an underlay is fine: allocation skips the underlay
        if pool.overlaps(LINK_LOCAL):
            raise ValueError(f"pool {pool} overlaps link-local {LINK_LOCAL}")

    def check(self, net: Net, used: dict[str, Net], node_ips: Collection[Addr] = ()) -> None:
        """An explicitly requested subnet: inside the pool, clear of groups, underlays and link-local."""
        if net.prefixlen > MAX_PREFIX:
            raise InvalidArgument(f"{net} is too small for a group: use at most /{MAX_PREFIX} "
                                  "(the gateway takes one address)")
        if net.overlaps(LINK_LOCAL):
            raise InvalidArgument(f"{net} overlaps link-local {LINK_LOCAL}, which the kernel uses for itself")
        for u in self.underlays:
            if net.overlaps(u):
                raise InvalidArgument(f"{net} overlaps the underlay network {u}: jobs would shadow the nodes' "
                                      "own addresses")
        for ip in node_ips:
            if ip in net:
                raise InvalidArgument(f"{net} contains node underlay address {ip}: choose another subnet")
        if not net.subnet_of(self.pool):
            raise InvalidArgument(f"{net} is outside the controller's pool {self.pool}: choose a subnet inside "
                                  "it, or start the controller with a --pool that covers it")
        for name, other in used.items():
            if net.overlaps(other):
                raise AlreadyExists(f"{net} overlaps group {name}'s subnet {other}: choose another or let the "
                                    "controller pick one (--prefix-len)")

    def allocate(self, used: dict[str, Net], prefix_len: int | None = None,
                 node_ips: Collection[Addr] = ()) -> Net:
        plen = prefix_len or self.default_prefix
        if not self.pool.prefixlen <= plen <= MAX_PREFIX:
            raise InvalidArgument(f"prefix length /{plen} is out of range: between /{self.pool.prefixlen} "
                                  f"(the pool {self.pool}) and /{MAX_PREFIX}")
        taken = sorted((int(n.network_address), int(n.broadcast_address)) for n in used.values())
        taken += [(int(u.network_address), int(u.broadcast_address)) for u in self.underlays]
        taken += [(int(LINK_LOCAL.network_address), int(LINK_LOCAL.broadcast_address))]
        taken += [(int(ip), int(ip)) for ip in node_ips]
        taken.sort()
        size = 1 << (32 - plen)
        start = int(self.pool.network_address)
        end = int(self.pool.broadcast_address)
        cand = start
        i = 0
        while cand + size - 1 <= end:
            while i < len(taken) and taken[i][1] < cand:
                i += 1
            clash = next((t for t in taken[i:] if t[0] <= cand + size - 1 and t[1] >= cand), None)
            if clash is None:
                return ipaddress.IPv4Network((cand, plen))
            # jump past the clash, aligned to the candidate size
            cand = ((clash[1] + 1 + size - 1) // size) * size
        raise ResourceExhausted(
            f"pool {self.pool} has no free /{plen} left ({len(used)} group(s) use it): delete unused groups, "
            f"ask for a smaller subnet (--prefix-len {min(plen + 1, MAX_PREFIX)}), or restart the controller "
            "with a larger --pool"
        )


def gateway(net: Net) -> Addr:
    return net.network_address + 1


def host_range(net: Net) -> range:
    """Job addresses: every host address but the gateway (network and broadcast excluded)."""
    return range(int(net.network_address) + 2, int(net.broadcast_address))


def allocate_ip(net: Net, in_use: Collection[Addr], quarantined: Collection[Addr], group: str) -> Addr:
    for n in host_range(net):
        ip = ipaddress.IPv4Address(n)
        if ip not in in_use and ip not in quarantined:
            return ip
    q = sum(1 for ip in quarantined if ip in net)
    raise ResourceExhausted(
        f"group {group}'s subnet {net} has no free address: {len(in_use)} in use by live jobs"
        + (f", {q} released recently and quarantined (they become free again after the quarantine period)"
           if q else "")
        + "; stop jobs or create a larger group"
    )


def free_count(net: Net, in_use: Collection[Addr], quarantined: Collection[Addr]) -> int:
    n = len(host_range(net))
    return n - sum(1 for ip in in_use if ip in net) - sum(1 for ip in quarantined if ip in net)


def node_mac_prefix(index: int) -> str:
    """The MAC prefix of node number `index` (1..65535): 02:NN:NN (locally administered, unicast)."""
    if not 1 <= index <= 0xFFFF:
        raise ResourceExhausted("more than 65535 nodes have registered: node numbers are exhausted")
    return f"02:{index >> 8:02x}:{index & 0xFF:02x}"


def random_mac(taken: Collection[str], prefix: str = "02") -> str:
    """A random MAC under `prefix` (default: any locally administered unicast MAC, first octet 02)."""
    n = 6 - len(prefix.split(":"))
    while True:
        mac = prefix + ":" + ":".join(f"{b:02x}" for b in secrets.token_bytes(n))
        if mac not in taken:
            return mac


def allocate_vni(used: Collection[int], after: int) -> int:
    """The next free VNI after the last one handed out (wrapping), so a deleted group's VNI is not
    reused at once while nodes may still be tearing its devices down."""
    if len(used) >= MAX_VNI:
        raise ResourceExhausted("every VNI is in use")
    v = after
    while True:
        v = v % MAX_VNI + 1
        if v not in used:
            return v
