"""Jobs' network namespaces on a bridge, made by the test (every name starts with jn), for the accounting
tests: a "switch" namespace <p>-sw with bridge jnabr, and per job a namespace <p>-<job> whose eth0 is one
end of a veth (the other end, jnav<i>, is a bridge port). IPv6 is off everywhere before any link exists
and every job has permanent neighbour entries for the others (no ARP) and a static FDB entry on its bridge
port (no unknown-unicast flooding; test_flooding removes one): traffic is only what a test sends.
Torn down even on failure (deleting the namespaces removes every link in them, and with it the counting
programs; the maps go with the last program and the last fd the test's NetAccounting held).

Sockets are made by `Topo.run(job, fn)`: fn runs on a worker thread inside the job's namespace (a socket
belongs to the namespace it was created in), the test process itself never changes namespace.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from nodeagent.accounting import JobNet, NetAccounting, NetTotals
from nodeagent.kernel.namespaces import Namespaces, write_sysctl

T = TypeVar("T")
NETNS_RUN = Path("/run/netns")
IPV6_OFF = {"ipv6/conf/all/disable_ipv6": "1", "ipv6/conf/default/disable_ipv6": "1"}


@dataclass(frozen=True)
class Job:
    name: str
    mac: str
    ip: str


@dataclass
class Topo:
    prefix: str
    jobs: dict[str, Job]
    mtu: int = 1500
    ns: Namespaces = field(default_factory=lambda: Namespaces("test"))
    acct: NetAccounting | None = None
    hook: str = "tcx"

    def netns(self, job: str) -> Path:
        return NETNS_RUN / f"{self.prefix}-{job}"

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def run(self, job: str, fn: Callable[[], T]) -> T:
        return self.ns.run_in(self.netns(job), fn)

    def up(self) -> None:
        from pyroute2 import IPRoute, netns

        for name in [self.switch, *(f"{self.prefix}-{j}" for j in self.jobs)]:
            netns.create(name)
            self.ns.run_in(NETNS_RUN / name, lambda: [write_sysctl(k, v, "test") for k, v in IPV6_OFF.items()])
        with IPRoute(netns=self.switch) as sw:
            sw.link("add", ifname="jnabr", kind="bridge", br_stp_state=0, br_forward_delay=0,
                    br_mcast_snooping=0)  # as the product's bridges: no IGMP of its own
            br = sw.link_lookup(ifname="jnabr")[0]
            sw.link("set", index=br, state="up", mtu=self.mtu)
            for i, j in enumerate(self.jobs.values()):
                sw.link("add", ifname=f"jnav{i}", kind="veth",
                        peer={"ifname": "eth0", "net_ns_fd": f"{self.prefix}-{j.name}"})
                idx = sw.link_lookup(ifname=f"jnav{i}")[0]
                sw.link("set", index=idx, master=br, mtu=self.mtu, state="up")
                # static FDB entry (NTF_MASTER, NUD_NOARP): the bridge never floods a frame for a job
                sw.fdb("add", ifindex=idx, lladdr=j.mac, flags=4, state=0x40)
        for j in self.jobs.values():
            def configure(j: Job = j) -> None:
                with IPRoute() as ipr:
                    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                    e = ipr.link_lookup(ifname="eth0")[0]
                    ipr.link("set", index=e, address=j.mac, mtu=self.mtu)
                    ipr.addr("add", index=e, address=j.ip, prefixlen=24)
                    ipr.link("set", index=e, state="up")
                    for peer in self.jobs.values():
                        if peer is not j:
                            ipr.neigh("add", dst=peer.ip, lladdr=peer.mac, ifindex=e, state=0x80)  # permanent
            self.run(j.name, configure)
        self.acct = NetAccounting(self.ns, hook=self.hook)

    def down(self) -> None:
        from pyroute2 import netns

        for name in [*(f"{self.prefix}-{j}" for j in self.jobs), self.switch]:
            with contextlib.suppress(OSError):
                netns.remove(name)

    # ------------------------------------------------------------------ oracles

    def install(self, *jobs: str) -> None:
        assert self.acct is not None
        for j in jobs or tuple(self.jobs):
            self.acct.ensure(j, self.netns(j), self.jobs[j].mac)

    def counters(self, *jobs: str) -> dict[str, NetTotals]:
        """What the product reports (frame bytes), read through the product's own reader."""
        assert self.acct is not None
        names = jobs or tuple(self.jobs)
        out = self.acct.read({j: JobNet(self.netns(j), self.jobs[j].mac) for j in names})
        res: dict[str, NetTotals] = {}
        for j, r in out.items():
            assert not isinstance(r, Exception), r
            res[j] = r.totals
        return res

    def device(self, job: str) -> dict[str, int]:
        """IFLA_STATS64 of the job's eth0: the device's own count (the independent oracle)."""
        def work() -> dict[str, int]:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                s = ipr.get_links(ifname="eth0")[0].get_attr("IFLA_STATS64")
                return {k: int(s[k]) for k in ("tx_bytes", "tx_packets", "rx_bytes", "rx_packets")}
        return self.run(job, work)

    def udp_socket(self, job: str, port: int = 0) -> socket.socket:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.bind(("0.0.0.0", port))
            return s
        return self.run(job, make)

    def tcp_socket(self, job: str) -> socket.socket:
        return self.run(job, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))

    def capture(self, job: str) -> Capture:
        return self.run(job, lambda: Capture())


class Capture:
    """AF_PACKET on eth0 of the calling thread's namespace: every frame that crosses the device (as the
    kernel hands it to packet taps: one entry per skb, GSO super-frames whole), with its header bytes."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 256 << 20)  # SO_RCVBUFFORCE: never drop a frame
        self.sock.bind(("eth0", 0))
        self.sock.setblocking(False)
        self.frames: list[tuple[bool, int, bytes]] = []  # (outgoing, length, first 128 bytes)

    def drain(self) -> None:
        buf = bytearray(128)
        while True:
            try:
                n, addr = self.sock.recvfrom_into(buf, 128, socket.MSG_TRUNC)
            except BlockingIOError:
                return
            self.frames.append((addr[2] == socket.PACKET_OUTGOING, n, bytes(buf[:min(n, 128)])))

    def totals(self) -> dict[str, tuple[int, int]]:
        """{"tx": (bytes, frames), "rx": (bytes, frames)}."""
        self.drain()
        out = {"tx": (0, 0), "rx": (0, 0)}
        for outgoing, n, _ in self.frames:
            k = "tx" if outgoing else "rx"
            out[k] = (out[k][0] + n, out[k][1] + 1)
        return out

    def tcp_payload(self, outgoing: bool) -> tuple[int, int]:
        """(sum of TCP payload bytes, sum of Ethernet + IP + TCP header bytes) over IPv4/TCP frames."""
        payload = headers = 0
        for out, n, head in self.frames:
            if out != outgoing or struct.unpack_from("!H", head, 12)[0] != 0x0800 or head[23] != socket.IPPROTO_TCP:
                continue
            ihl = (head[14] & 0x0F) * 4
            total_len = struct.unpack_from("!H", head, 16)[0]
            doff = (head[14 + ihl + 12] >> 4) * 4
            assert n == 14 + total_len, "a frame is its IP packet plus the Ethernet header"
            h = 14 + ihl + doff
            headers += h
            payload += n - h
        return payload, headers

    def close(self) -> None:
        self.sock.close()


def _jobs() -> dict[str, Job]:
    # a, b: same node (02:00:01); c: another node's job (02:00:02); d: idle
    return {
        "a": Job("a", "02:00:01:0a:00:0a", "10.250.0.10"),
        "b": Job("b", "02:00:01:0b:00:0b", "10.250.0.11"),
        "c": Job("c", "02:00:02:0c:00:0c", "10.250.0.12"),
        "d": Job("d", "02:00:01:0d:00:0d", "10.250.0.13"),
    }


def hooks_here() -> list[str]:
    """Both places the counting programs can hang where the kernel has tcx (6.6+), else classic tc only."""
    from nodeagent.accounting.hooks import tcx_supported

    return ["tcx", "tc"] if os.geteuid() == 0 and tcx_supported() else ["tc"]


@pytest.fixture(scope="module", params=hooks_here())
def topo(request: pytest.FixtureRequest) -> Iterator[Topo]:
    """The whole module runs once per hook (tcx and classic tc): the same bytes either way."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    t = Topo(f"jna{request.param}{os.getpid() % 10000}", _jobs(), hook=request.param)
    try:
        t.up()
        t.install()
        yield t
    finally:
        t.down()
        if t.acct is not None:
            t.acct.close()
        t.ns.close()


def frag_count(payload: int, mtu: int) -> int:
    """Frames of one UDP/IPv4 datagram: 1 if it fits, else fragments of (mtu - 20) // 8 * 8 data bytes."""
    data = payload + 8
    if data + 20 <= mtu:
        return 1
    per = (mtu - 20) // 8 * 8
    return -(-data // per)


def any_of(d: dict[str, Any]) -> Any:
    return next(iter(d.values()))
