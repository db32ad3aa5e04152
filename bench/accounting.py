"""Network accounting costs (issue 4): setting a job's table up, reading N jobs' counters, final reads, the
spool's durable append, and the packet path with and without the table.

    python -m bench.accounting [--jobs 200] [--rounds 5] [--tcp-seconds 2]

Throwaway namespaces jnab<pid>-sw (a bridge) and jnab<pid>-<i> (a job: veth eth0 on the bridge), all removed
at the end, also after a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from nodeagent.accounting import JobNet, NetAccounting, NetTotals, UsageSpool
from nodeagent.kernel.namespaces import Namespaces, write_sysctl

NETNS = Path("/run/netns")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tcp-seconds", type=float, default=2.0)
    a = ap.parse_args()
    from pyroute2 import IPRoute, netns

    prefix = f"jnab{os.getpid() % 100000}"
    names = [f"{prefix}-{i}" for i in range(a.jobs)]
    ns = Namespaces("bench")
    made: list[str] = []
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; {a.jobs} job namespaces")
    try:
        for n in [f"{prefix}-sw", *names]:
            netns.create(n)
            made.append(n)
            ns.run_in(NETNS / n, lambda: [write_sysctl(k, "1", "bench") for k in (
                "ipv6/conf/all/disable_ipv6", "ipv6/conf/default/disable_ipv6")])
        with IPRoute(netns=f"{prefix}-sw") as sw:
            sw.link("add", ifname="jnabbr", kind="bridge", br_stp_state=0, br_forward_delay=0, br_mcast_snooping=0)
            br = sw.link_lookup(ifname="jnabbr")[0]
            sw.link("set", index=br, state="up")
            for i, n in enumerate(names):
                sw.link("add", ifname=f"jnab{i}", kind="veth", peer={"ifname": "eth0", "net_ns_fd": n})
                idx = sw.link_lookup(ifname=f"jnab{i}")[0]
                sw.link("set", index=idx, master=br, state="up")
        macs = {n: f"02:00:01:00:{i >> 8:02x}:{i & 0xFF:02x}" for i, n in enumerate(names)}
        for i, n in enumerate(names):
            def up(i: int = i, n: str = n) -> None:
                with IPRoute() as ipr:
                    e = ipr.link_lookup(ifname="eth0")[0]
                    ipr.link("set", index=e, address=macs[n], state="up")
                    ipr.addr("add", index=e, address=f"10.252.{i >> 8}.{(i & 0xFF) + 1}", prefixlen=16)
                    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ns.run_in(NETNS / n, up)
        acct = NetAccounting(ns)

        # 1. set-up (create) and an idempotent ensure (verify) per job
        create, verify = [], []
        for n in names:
            t0 = time.perf_counter()
            r = acct.ensure(n, NETNS / n, macs[n])
            create.append((time.perf_counter() - t0) * 1000)
            assert r.action == "created"
        for n in names:
            t0 = time.perf_counter()
            acct.ensure(n, NETNS / n, macs[n])
            verify.append((time.perf_counter() - t0) * 1000)
        print(f"set-up per job (enter netns, create table in one transaction, back): p50 {pct(create, 50):.2f} ms, "
              f"p99 {pct(create, 99):.2f} ms")
        print(f"ensure on an existing table (list + verify): p50 {pct(verify, 50):.2f} ms")

        # 2. a sampling pass: every job's counters, one worker thread for all
        jobs = {n: JobNet(NETNS / n, macs[n]) for n in names}
        passes = []
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            out = acct.read(jobs)
            passes.append((time.perf_counter() - t0) * 1000)
            assert all(not isinstance(r, Exception) for r in out.values())
        med = statistics.median(passes)
        print(f"sampling pass over {a.jobs} jobs (read + verify each table): median {med:.1f} ms "
              f"({med / a.jobs * 1000:.0f} us per job), min {min(passes):.1f} ms")

        # 3. final reads (one job at a time, as at each job's end; no TCP socket left: no wait)
        finals = []
        for n in names[:50]:
            t0 = time.perf_counter()
            acct.read({n: JobNet(NETNS / n, None)}, drain_s=2.0)
            finals.append((time.perf_counter() - t0) * 1000)
        print(f"final read of one job (thread, setns, sockstat, counters): p50 {pct(finals, 50):.2f} ms")

        # 4. the spool: one durable append for a whole pass, an ack
        with tempfile.TemporaryDirectory(prefix="jnab-spool") as d:
            spool = UsageSpool(Path(d), max_entries=100_000)
            adds, acks = [], []
            for _ in range(a.rounds):
                items = [(n, time.time_ns(), False, NetTotals((1 << 40,) * 6, (1 << 30,) * 6)) for n in names]
                t0 = time.perf_counter()
                recs = spool.add(items)
                adds.append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                spool.ack([r.seq for r in recs])
                acks.append((time.perf_counter() - t0) * 1000)
            one = []
            for _ in range(20):
                t0 = time.perf_counter()
                spool.add([(names[0], time.time_ns(), True, NetTotals())])
                one.append((time.perf_counter() - t0) * 1000)
            spool.close()
        print(f"spool: append {a.jobs} records + fdatasync median {statistics.median(adds):.1f} ms; one final record "
              f"median {statistics.median(one):.2f} ms; ack of a pass (segment deleted, marks written) median "
              f"{statistics.median(acks):.2f} ms")

        # 5. the packet path: TCP bulk between two jobs, with the tables and without
        def bulk() -> float:
            srv = ns.run_in(NETNS / names[1], lambda: socket.socket())
            srv.bind(("10.252.0.2", 7300))
            srv.listen(1)
            cli = ns.run_in(NETNS / names[0], lambda: socket.socket())
            got = [0]

            def sink() -> None:
                c, _ = srv.accept()
                while d := c.recv(1 << 20):
                    got[0] += len(d)
                c.close()

            t = threading.Thread(target=sink)
            t.start()
            cli.connect(("10.252.0.2", 7300))
            buf = b"\0" * (1 << 18)
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < a.tcp_seconds:
                cli.sendall(buf)
            cli.close()
            t.join()
            srv.close()
            return got[0] * 8 / (time.perf_counter() - t0) / 1e9

        with_tables = [bulk() for _ in range(3)]
        for n in names[:2]:
            acct.run_in(NETNS / n, lambda nft: nft.run("delete table netdev jn_acct"))
        without = [bulk() for _ in range(3)]
        print(f"TCP bulk between two jobs (python sender, GSO): {statistics.median(with_tables):.1f} Gbit/s with the "
              f"tables, {statistics.median(without):.1f} Gbit/s without (ratio "
              f"{statistics.median(with_tables) / statistics.median(without):.2f})")
    finally:
        for n in reversed(made):
            with contextlib.suppress(OSError):
                netns.remove(n)
        ns.close()


if __name__ == "__main__":
    main()
