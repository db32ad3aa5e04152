"""Per-job network accounting in real namespaces with real traffic: the product's counters (read through
NetAccounting) are frame bytes exactly (UDP/IPv4: P + 8 + 34 n for P payload bytes in n frames), in the
right class (destination MAC on send, source MAC on receive: same node prefix -> local, another 02 prefix
-> overlay, anything else -> external), and agree with the device's own counters (IFLA_STATS64) and with a
packet capture on the device. Tests run in file order on one topology (conftest.py): idle first."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nodeagent.accounting import AccountingError, JobNet, NetAccounting, NetTotals, bpf
from nodeagent.accounting.hooks import KINDS, Hooks, tcx_supported
from nodeagent.accounting.rules import BASE, KEYS, PROG_NAMES
from nodeagent.kernel.namespaces import write_sysctl
from tests.accounting.conftest import IPV6_OFF, Topo, frag_count

pytestmark = pytest.mark.root

SIZES = (0, 1, 1472, 1473, 8000, 65507)


def snap(topo: Topo) -> tuple[dict[str, NetTotals], dict[str, dict[str, int]]]:
    return topo.counters(), {j: topo.device(j) for j in topo.jobs}


def deltas(topo: Topo, before: tuple[dict[str, NetTotals], dict[str, dict[str, int]]]) -> tuple[
        dict[str, NetTotals], dict[str, dict[str, int]]]:
    c, d = snap(topo)
    return ({j: c[j] - before[0][j] for j in c},
            {j: {k: d[j][k] - before[1][j][k] for k in d[j]} for j in d})


def only(**kv: tuple[int, int]) -> NetTotals:
    assert all(k in KEYS for k in kv)
    return NetTotals.of(kv)


def assert_device_agrees(dc: dict[str, NetTotals], dd: dict[str, dict[str, int]]) -> None:
    """Per job: the sum over classes of what we count == what eth0 itself counted."""
    for j, t in dc.items():
        tx = [t.get(f"tx_{c}") for c in ("local", "overlay", "external")]
        rx = [t.get(f"rx_{c}") for c in ("local", "overlay", "external")]
        assert (sum(b for b, _ in tx), sum(p for _, p in tx)) == (dd[j]["tx_bytes"], dd[j]["tx_packets"]), j
        assert (sum(b for b, _ in rx), sum(p for _, p in rx)) == (dd[j]["rx_bytes"], dd[j]["rx_packets"]), j


def test_idle_namespaces_count_nothing(topo: Topo) -> None:
    time.sleep(3)
    c, d = snap(topo)
    for j in topo.jobs:
        assert c[j] == NetTotals(), f"{j} counted traffic nobody sent: {c[j]}"
        assert d[j] == {"tx_bytes": 0, "tx_packets": 0, "rx_bytes": 0, "rx_packets": 0}, (j, d[j])


@pytest.mark.parametrize("dst,cls", [("b", "local"), ("c", "overlay")])
def test_udp_datagrams_to_the_byte(topo: Topo, dst: str, cls: str) -> None:
    rx = topo.udp_socket(dst, 9999)
    tx = topo.udp_socket("a")
    rx.settimeout(5)
    try:
        for size in SIZES:
            before = snap(topo)
            tx.sendto(b"x" * size, (topo.jobs[dst].ip, 9999))
            assert len(rx.recv(65536)) == size
            dc, dd = deltas(topo, before)
            n = frag_count(size, topo.mtu)
            want = (size + 8 + 34 * n, n)
            assert dc["a"] == only(**{f"tx_{cls}": want}), (size, dc["a"])
            assert dc[dst] == only(**{f"rx_{cls}": want}), (size, dc[dst])
            for other in set(topo.jobs) - {"a", dst}:
                assert dc[other] == NetTotals(), (size, other)
            assert_device_agrees(dc, dd)
    finally:
        rx.close()
        tx.close()


def test_broadcast_is_external_on_send_and_by_source_on_receive(topo: Topo) -> None:
    """a's broadcast: tx external at a; received as local (b, d: a's node prefix) or overlay (c). The copy
    the kernel loops back to a's own socket passes a's ingress hook without crossing eth0: not counted."""
    socks = {j: topo.udp_socket(j, 9999) for j in topo.jobs}
    for s in socks.values():
        s.settimeout(5)
    try:
        for size in SIZES:
            before = snap(topo)
            socks["a"].sendto(b"y" * size, ("10.250.0.255", 9999))
            for j in topo.jobs:
                assert len(socks[j].recv(65536)) == size, j  # a too: its own looped-back copy
            dc, dd = deltas(topo, before)
            n = frag_count(size, topo.mtu)
            want = (size + 8 + 34 * n, n)
            assert dc["a"] == only(tx_external=want), (size, dc["a"])
            assert dc["b"] == only(rx_local=want) and dc["d"] == only(rx_local=want), size
            assert dc["c"] == only(rx_overlay=want), size
            assert_device_agrees(dc, dd)
    finally:
        for s in socks.values():
            s.close()


@pytest.mark.parametrize("dst,cls,size", [("b", "local", 3_000_000), ("c", "overlay", 1_000_003)])
def test_tcp_transfer_matches_device_and_capture(topo: Topo, dst: str, cls: str, size: int) -> None:
    """TCP: each frame the kernel hands eth0 is counted with its headers (with segmentation offload a frame
    can carry up to 64 KiB: it is counted once, as the device and a packet capture see it). Counted bytes
    == payload + Ethernet/IP/TCP headers of the frames that crossed, on both ends and both directions."""
    caps = {j: topo.capture(j) for j in ("a", dst)}
    srv = topo.tcp_socket(dst)
    srv.bind((topo.jobs[dst].ip, 7100))
    srv.listen(1)
    cli = topo.tcp_socket("a")
    got: list[int] = []

    def serve() -> None:
        c, _ = srv.accept()
        n = 0
        while d := c.recv(1 << 20):
            n += len(d)
        c.close()
        got.append(n)

    before = snap(topo)
    for c in caps.values():
        c.drain()
        c.frames.clear()
    t = threading.Thread(target=serve)
    t.start()
    cli.connect((topo.jobs[dst].ip, 7100))
    cli.sendall(os.urandom(size))
    cli.shutdown(socket.SHUT_WR)
    t.join(30)
    assert got == [size]
    cli.recv(1)  # the server's FIN
    cli.close()
    srv.close()
    time.sleep(0.3)  # the last ACK
    dc, dd = deltas(topo, before)
    assert_device_agrees(dc, dd)
    cap = {j: c.totals() for j, c in caps.items()}
    assert dc["a"].get(f"tx_{cls}") == cap["a"]["tx"] and dc["a"].get(f"rx_{cls}") == cap["a"]["rx"]
    assert dc[dst].get(f"rx_{cls}") == cap[dst]["rx"] and dc[dst].get(f"tx_{cls}") == cap[dst]["tx"]
    assert dc["a"].total_bytes == dc["a"].get(f"tx_{cls}")[0] + dc["a"].get(f"rx_{cls}")[0], "one class only"
    payload, headers = caps["a"].tcp_payload(outgoing=True)
    assert payload == size and dc["a"].get(f"tx_{cls}")[0] == payload + headers
    # one bridge between them: what a sent is exactly what the other end received, frame by frame
    assert dc["a"].get(f"tx_{cls}") == dc[dst].get(f"rx_{cls}")
    assert dc["a"].get(f"rx_{cls}") == dc[dst].get(f"tx_{cls}")
    for c in caps.values():
        c.close()


def test_orphan_tcp_data_is_in_the_final_reading(topo: Topo) -> None:
    """A process that exits with data still in its socket's send buffer: the kernel keeps sending it after
    the exit. A final reading (drain_s) waits until the namespace has no socket that can still send, so
    those bytes are in it."""
    assert topo.acct is not None
    cap = topo.capture("a")
    srv = topo.tcp_socket("b")
    srv.bind((topo.jobs["b"].ip, 7101))
    srv.listen(1)
    srv.settimeout(10)
    size = 4_000_000
    before = topo.counters("a")["a"]
    sender = subprocess.Popen(
        ["nsenter", f"--net={topo.netns('a')}", sys.executable, "-c",
         "import socket,sys; c=socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8<<20); "
         f"c.connect(('{topo.jobs['b'].ip}', 7101)); c.sendall(b'z'*{size}); c.close()"],
    )
    conn, _ = srv.accept()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    assert sender.wait(10) == 0  # exited; most of its data still queued in the orphan socket
    received = 0

    def slow_reader() -> None:  # ~2 s to take it all
        nonlocal received
        while d := conn.recv(65536):
            received += len(d)
            time.sleep(0.03)
        conn.close()

    t = threading.Thread(target=slow_reader)
    t.start()
    r = topo.acct.read({"a": JobNet(topo.netns("a"), None)}, drain_s=15)["a"]
    assert not isinstance(r, Exception)
    t.join(20)
    srv.close()
    assert received == size
    assert r.drained and r.waited_s > 0.2, f"the orphan socket was still sending ({r.waited_s:.2f} s)"
    sent = (r.totals - before).get("tx_local")[0]
    cap.drain()
    out = [(n, head) for o, n, head in cap.frames if o]
    # the frames a sent, in order: the final reading is the sum of a prefix of them, and every frame after
    # that prefix carries no data (the ACK of the receiver's FIN, sent from TIME_WAIT)
    k, acc = 0, 0
    while acc < sent:
        acc += out[k][0]
        k += 1
    assert acc == sent, "the final reading is whole frames"

    def data(head: bytes, n: int) -> int:
        ihl = (head[14] & 0x0F) * 4
        return n - 14 - ihl - (head[14 + ihl + 12] >> 4) * 4

    assert sum(data(h, n) for n, h in out[:k]) >= size, "all the data went out before the final reading"
    assert all(data(h, n) == 0 for n, h in out[k:]) and len(out) - k <= 2, out[k:]
    cap.close()


def test_job_cannot_touch_its_counters(topo: Topo) -> None:
    """An unprivileged process in the job's namespace (uid 65534, no capabilities) can neither see nor change
    the counting programs and their map: bpf() refuses it, and so does rtnetlink (tc)."""
    # plain ctypes and a raw netlink socket (the test's own oracle), run by the system python as nobody
    code = ("import ctypes, os, socket, struct\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "def bpf(cmd, attr):\n"
            "    buf = ctypes.create_string_buffer(attr, 128)\n"
            "    r = libc.syscall(321, cmd, buf, 128)\n"
            "    print('CHANGED' if r >= 0 else 'refused', cmd, os.strerror(ctypes.get_errno()))\n"
            "idx = socket.if_nametoindex('eth0')\n"
            "bpf(16, struct.pack('=II', idx, 47))\n"              # BPF_PROG_QUERY tcx egress
            "bpf(13, struct.pack('=I', 1))\n"                     # BPF_PROG_GET_FD_BY_ID
            "bpf(14, struct.pack('=I', 1))\n"                     # BPF_MAP_GET_FD_BY_ID
            "s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\n"
            "kind = b'clsact\\0\\0'\n"                            # RTM_DELQDISC clsact
            "body = struct.pack('=BxxxiIII', 0, idx, 0xFFFF0000, 0xFFFFFFF1, 0) + struct.pack('=HH', 11, 1) + kind\n"
            "s.send(struct.pack('=IHHII', 16 + len(body), 37, 5, 1, 0) + body)\n"
            "err = struct.unpack_from('=i', s.recv(4096), 16)[0]\n"
            "print('CHANGED' if err == 0 else 'refused', 'tc', os.strerror(-err))\n")
    p = subprocess.run(["nsenter", f"--net={topo.netns('a')}", "-S", "65534", "-G", "65534", "/usr/bin/python3", "-c",
                        code], capture_output=True, text=True, cwd="/", timeout=30)
    assert p.returncode == 0, p.stderr
    assert "CHANGED" not in p.stdout and p.stdout.count("refused") == 4, p.stdout
    assert "Operation not permitted" in p.stdout
    assert topo.acct is not None
    r = topo.acct.read({"a": JobNet(topo.netns("a"), topo.jobs["a"].mac)})["a"]
    assert not isinstance(r, Exception) and r.action == "ok"


def _programs(topo: Topo, job: str) -> dict[str, list[bpf.ProgInfo]]:
    """{direction: our programs on the job's eth0}, on either hook."""
    def work() -> dict[str, list[bpf.ProgInfo]]:
        idx = socket.if_nametoindex("eth0")
        out: dict[str, list[bpf.ProgInfo]] = {}
        with Hooks() as hooks:
            for d, name in PROG_NAMES.items():
                progs = [p for k in KINDS for p in hooks.programs(k, idx, d)]
                out[d] = [p.info for p in progs if p.info.name == name]
                for p in progs:
                    os.close(p.fd)
        return out
    return topo.run(job, work)


def test_repair_keeps_the_counts(topo: Topo) -> None:
    """A program detached by hand (root on the host) or replaced by another one under our name is put right
    by the next read: ours again, counting into the same map, whose values are kept."""
    assert topo.acct is not None
    acct = topo.acct
    before = topo.counters("b")["b"]
    assert before.total_bytes > 0
    progs = _programs(topo, "b")
    assert [len(progs["tx"]), len(progs["rx"])] == [1, 1]
    map_id = progs["rx"][0].map_ids[0]

    def tamper() -> None:
        idx = socket.if_nametoindex("eth0")
        with Hooks() as hooks:
            for d in ("rx", "tx"):
                for p in hooks.programs(topo.hook, idx, d):
                    hooks.detach(idx, p, d)
                    os.close(p.fd)
            # an impostor under our name: counts every frame it sees as another node's (wrong prefix)
            m = bpf.map_fd_by_id(map_id)
            fd = bpf.prog_load_sched_cls("jn_acct_tx", bpf.program(m, "tx", 0x02FFFF, BASE["tx"]))
            hooks.attach(topo.hook, idx, fd, "tx", "jn_acct_tx")
            os.close(fd)
            os.close(m)

    topo.run("b", tamper)
    r = acct.read({"b": JobNet(topo.netns("b"), topo.jobs["b"].mac)})["b"]
    assert not isinstance(r, Exception)
    assert r.action == "repaired", r
    assert any("rx: program jn_acct_rx was not on eth0" in p for p in r.problems), r.problems
    assert any("not the program we load" in p for p in r.problems), r.problems
    assert r.totals == before
    again = acct.read({"b": JobNet(topo.netns("b"), topo.jobs["b"].mac)})["b"]
    assert not isinstance(again, Exception) and again.action == "ok" and again.totals == before
    progs = _programs(topo, "b")
    assert [len(progs["tx"]), len(progs["rx"])] == [1, 1], "exactly one of ours per direction"
    assert all(p.map_ids == (map_id,) for ps in progs.values() for p in ps), "the same map: the counts are kept"
    # and it counts again, in the right class
    rx = topo.udp_socket("b", 9998)
    tx = topo.udp_socket("a")
    rx.settimeout(5)
    tx.sendto(b"q" * 100, (topo.jobs["b"].ip, 9998))
    rx.recv(1000)
    rx.close()
    tx.close()
    assert topo.counters("b")["b"] - before == only(rx_local=(142, 1))


def test_a_restarted_agent_finds_the_counters(topo: Topo) -> None:
    """A new NetAccounting (an agent after SIGKILL) finds each job's map through its programs: same totals,
    nothing created. And programs left on the other hook (the agent's --accounting-hook changed) are moved,
    the counts kept: never both (that would count twice)."""
    assert topo.acct is not None
    before = topo.counters("a")["a"]
    fresh = NetAccounting(topo.ns, hook=topo.hook)
    try:
        r = fresh.read({"a": JobNet(topo.netns("a"), topo.jobs["a"].mac)})["a"]
        assert not isinstance(r, Exception) and r.action == "ok" and r.totals == before
    finally:
        fresh.close()
    other = [k for k in KINDS if k != topo.hook]
    if other and (other[0] == "tc" or tcx_supported()):
        moved = NetAccounting(topo.ns, hook=other[0])
        try:
            r = moved.read({"a": JobNet(topo.netns("a"), topo.jobs["a"].mac)})["a"]
            assert not isinstance(r, Exception) and r.action == "repaired" and r.totals == before, r
            assert sum("on the other hook" in p for p in r.problems) == 2, r.problems
        finally:
            moved.close()
        back = topo.acct.read({"a": JobNet(topo.netns("a"), topo.jobs["a"].mac)})["a"]
        assert not isinstance(back, Exception) and back.action == "repaired" and back.totals == before
        progs = _programs(topo, "a")
        assert [len(progs["tx"]), len(progs["rx"])] == [1, 1]


def test_counts_survive_the_device_being_made_again(topo: Topo) -> None:
    """ensure() twice changes nothing. When eth0 is deleted and made again (as a network repair does), its
    programs go with it; the agent still holds the map, so the next ensure puts them back on the new eth0
    counting on from where they were."""
    from pyroute2 import IPRoute, netns

    assert topo.acct is not None
    name = f"{topo.prefix}-e"
    netns.create(name)
    path = Path("/run/netns") / name
    mac = "02:00:01:0e:00:0e"
    try:
        topo.ns.run_in(path, lambda: [write_sysctl(k, v, "test") for k, v in IPV6_OFF.items()])
        with pytest.raises(AccountingError, match="no eth0"):
            topo.acct.ensure("e", path, mac)

        def make_eth0() -> None:
            with IPRoute() as ipr:
                ipr.link("add", ifname="eth0", kind="veth", peer={"ifname": "jnae1"})
                e = ipr.link_lookup(ifname="eth0")[0]
                ipr.link("set", index=e, address=mac, state="up")
                ipr.link("set", index=ipr.link_lookup(ifname="jnae1")[0], state="up")
                ipr.addr("add", index=e, address="10.251.0.1", prefixlen=24)
                ipr.neigh("add", dst="10.251.0.2", lladdr="02:00:01:00:00:99", ifindex=e, state=0x80)

        def send() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"e" * 10, ("10.251.0.2", 9))

        def drop_eth0() -> None:
            with IPRoute() as ipr:
                ipr.link("del", index=ipr.link_lookup(ifname="eth0")[0])

        topo.ns.run_in(path, make_eth0)
        assert topo.acct.ensure("e", path, mac).action == "created"
        assert topo.acct.ensure("e", path, mac).action == "ok"
        topo.ns.run_in(path, send)
        topo.ns.run_in(path, drop_eth0)
        topo.ns.run_in(path, make_eth0)
        r = topo.acct.ensure("e", path, mac)
        assert r.action == "repaired" and r.totals == only(tx_local=(52, 1)), r
        topo.ns.run_in(path, send)
        r = topo.acct.read({"e": JobNet(path, mac)})["e"]
        assert not isinstance(r, Exception) and r.action == "ok"
        assert r.totals == only(tx_local=(2 * 52, 2))
    finally:
        topo.acct.release("e")
        with contextlib.suppress(OSError):
            netns.remove(name)


def test_final_read_never_creates_counters(topo: Topo) -> None:
    from pyroute2 import IPRoute, netns

    assert topo.acct is not None
    name = f"{topo.prefix}-f"
    netns.create(name)
    try:
        path = Path("/run/netns") / name

        def make_eth0() -> None:
            with IPRoute() as ipr:
                ipr.link("add", ifname="eth0", kind="veth", peer={"ifname": "jnaf1"})

        topo.ns.run_in(path, make_eth0)
        r = topo.acct.read({"f": JobNet(path, None)})["f"]
        assert isinstance(r, Exception) and "no accounting programs" in str(r)
        def ours() -> int:
            idx = socket.if_nametoindex("eth0")
            with Hooks() as hooks:
                progs = [p for k in KINDS for d in PROG_NAMES for p in hooks.programs(k, idx, d)]
                for p in progs:
                    os.close(p.fd)
            return len(progs)

        assert topo.ns.run_in(path, ours) == 0, "a final read attaches nothing"
        assert topo.acct.held == len(topo.jobs), "nothing held for it"
        gone = topo.acct.read({"g": JobNet(Path("/run/netns") / f"{topo.prefix}-nope", None)})["g"]
        assert isinstance(gone, Exception) and "cannot enter" in str(gone)
    finally:
        with contextlib.suppress(OSError):
            netns.remove(name)


def test_flooded_unicast_is_not_charged_to_bystanders(topo: Topo) -> None:
    """A bridge floods a frame for a MAC it does not know to every port: the bystander's eth0 (and its
    device counter) sees it, its kernel drops it (PACKET_OTHERHOST); it is not charged to the bystander.
    The addressee is charged exactly."""
    from pyroute2 import IPRoute

    with IPRoute(netns=topo.switch) as sw:
        port = sw.link_lookup(ifname="jnav1")[0]  # b's
        sw.fdb("del", ifindex=port, lladdr=topo.jobs["b"].mac, flags=4, state=0x40)
        br = sw.link_lookup(ifname="jnabr")[0]
        sw.link("set", index=br, br_ageing_time=0)  # and forget what it learns at once
    try:
        rx = topo.udp_socket("b", 9997)
        tx = topo.udp_socket("a")
        rx.settimeout(5)
        before = snap(topo)
        tx.sendto(b"f" * 1000, (topo.jobs["b"].ip, 9997))
        assert len(rx.recv(2000)) == 1000
        rx.close()
        tx.close()
        dc, dd = deltas(topo, before)
        assert dc["a"] == only(tx_local=(1042, 1)) and dc["b"] == only(rx_local=(1042, 1))
        for bystander in ("c", "d"):
            assert dd[bystander]["rx_bytes"] == 1042, "flooded: the bystander's eth0 did see it"
            assert dc[bystander] == NetTotals(), f"{bystander} is not charged for another job's frame"
    finally:
        with IPRoute(netns=topo.switch) as sw:
            sw.link("set", index=sw.link_lookup(ifname="jnabr")[0], br_ageing_time=30000)
            sw.fdb("add", ifindex=sw.link_lookup(ifname="jnav1")[0], lladdr=topo.jobs["b"].mac, flags=4,
                   state=0x40)



def test_default_hook_is_tcx_where_the_kernel_has_it() -> None:
    """The agent's default: tcx where the kernel has it (the cheapest per frame), else classic tc."""
    from nodeagent.accounting.hooks import resolve, tcx_supported
    from nodeagent.main import parse_args

    args = parse_args(["--name", "n1", "--underlay-ifname", "jnul0", "--underlay-ip", "198.18.0.11"])
    assert args.accounting_hook == "auto"
    assert resolve("auto") == ("tcx" if tcx_supported() else "tc")
    assert resolve("tc") == "tc"
