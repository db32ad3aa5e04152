"""Network accounting costs (issue 4): setting a job's table up, reading N jobs' counters, final reads, the
spool's durable append, and the packet path with and without the table.

    python -m bench.accounting [--jobs 200] [--rounds 5] [--pairs 10] [--seconds 3] [--no-overlay]
                               [--variants on[,tx,rx,hooks,...]] [--no-offload]

Packet path: iperf3 (`-J`, one TCP stream) from one job's namespace to another's, with the accounting tables
(`on`: both jobs' tables exactly as the agent installs them) and without (`off`: no table), in the same run:
`--pairs` A/B pairs of `--seconds` each, the order alternating (off,on / on,off / ...: ABBA, so drift from
other work on a shared machine cancels), the ratio on/off of each pair, their median and spread. Two paths:
  local    two jobs on the bench's bridge (veth, bridge, veth)
  overlay  two jobs on two "nodes" joined by VXLAN: the lab's underlay (deploy.lab, namespaces and veths
           only: no controller, no agent) and the data path of bench.overlay_throughput built by hand
           (bridge, VXLAN nolearning with static FDB/neighbour entries, MTU 1450), one node prefix per node
`--variants` adds other rule sets, each A/B against `off` in the same rounds (VARIANTS below: to find where
the cost is); `--no-offload` turns TSO/GSO/GRO off on both jobs' eth0, so that every wire frame is a packet
for the hooks (an amplifier of per-packet costs, not the issue's figure).

Throwaway namespaces jnab<pid>-sw (a bridge) and jnab<pid>-<i> (a job: veth eth0 on the bridge), the overlay's
lab jnab<pid>o-{ul,ctl,n1,n2,h1,h2}, all removed at the end, also after a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.overlay_throughput import HAND_NET, hand_mac, hand_vxlan, iperf, loadavg, remove_hand_vxlan, wait_reachable
from deploy.lab import Lab
from nodeagent.accounting import JobNet, NetAccounting, NetTotals, UsageSpool
from nodeagent.accounting.nft import Nft, NftError
from nodeagent.accounting.rules import CHAINS, DEVICE, FAMILY, TABLE, create_commands, mac_prefix
from nodeagent.kernel.namespaces import Namespaces, write_sysctl

NETNS = Path("/run/netns")
T = f"{FAMILY} {TABLE}"
OVERLAY_MTU = 1450


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


# ---------------------------------------------------------------------------------------------- rule sets

def _chain(name: str, hooked: bool = True) -> str:
    if not hooked:
        return f"add chain {T} {name}"
    hook, prio = CHAINS[name]
    return f'add chain {T} {name} {{ type filter hook {hook} device "{DEVICE}" priority {prio}; policy accept; }}'


def _product_only(chain: str) -> Callable[[int], str]:
    """The product's transaction minus the other chain (same counters, same rules)."""
    def build(prefix: int) -> str:
        other = next(c for c in CHAINS if c != chain)
        lines = [ln for ln in create_commands(prefix).splitlines()
                 if not ln.startswith((f"add chain {T} {other} ", f"add rule {T} {other} "))]
        return "\n".join(lines) + "\n"
    return build


def _same_rule(rule: Callable[[str], str]) -> Callable[[int], str]:
    """Both chains, each with one rule `rule(direction)` (and the product's counter objects)."""
    def build(_prefix: int) -> str:
        cmds = [f"create table {T}", *(f"add counter {T} {d}_external" for d in CHAINS)]
        for d in CHAINS:
            cmds.append(_chain(d))
            if r := rule(d):
                cmds.append(f"add rule {T} {d} {r}")
        return "\n".join(cmds) + "\n"
    return build


VARIANTS: dict[str, Callable[[int], str]] = {
    "on": create_commands,                                                  # the product, as installed
    "tx": _product_only("tx"),                                               # its egress chain alone
    "rx": _product_only("rx"),                                               # its ingress chain alone
    "hooks": _same_rule(lambda d: ""),                                       # both chains, no rule
    "anon": _same_rule(lambda d: "counter"),                                 # one anonymous counter each
    "named": _same_rule(lambda d: f'counter name "{d}_external"'),           # one named counter each
    "match": _same_rule(lambda d: f"@ll,{0 if d == 'tx' else 48},8 0x02"),   # one payload match, no counter
}


def set_rules(acct: NetAccounting, netns: Path, commands: str | None) -> None:
    """Replace the job's accounting table by `commands` (None: no table)."""
    def work(nft: Nft) -> None:
        with contextlib.suppress(NftError):
            nft.run(f"delete table {T}")
        if commands:
            nft.run(commands)
    acct.run_in(netns, work)


def sh_in(netns: Path, *argv: str) -> None:
    subprocess.run(["nsenter", f"--net={netns}", *argv], check=True, capture_output=True)


def run_iperf(srv: Path, cli: Path, ip: str, seconds: float) -> dict[str, float]:
    try:
        return iperf(str(srv), str(cli), ip, seconds)
    except RuntimeError as e:  # one retry: a stuck run is printed, not silently dropped
        print(f"    iperf3 failed ({e}); once more")
        return iperf(str(srv), str(cli), ip, seconds)


def spread(xs: list[float]) -> str:
    return (f"median {statistics.median(xs):.3f}, IQR {pct(xs, 25):.3f}-{pct(xs, 75):.3f}, "
            f"range {min(xs):.3f}-{max(xs):.3f}, n={len(xs)}")


def throughput(acct: NetAccounting, label: str, jobs: dict[str, tuple[Path, str]], ip: str,
               a: argparse.Namespace) -> dict[str, list[float]]:
    """A/B pairs, `off` against each variant, alternating the order; prints every pair and the medians.
    `jobs`: {"srv": (netns, mac), "cli": (netns, mac)}. Returns {variant: [ratio of each pair]}."""
    srv, cli = jobs["srv"][0], jobs["cli"][0]
    if a.no_offload:
        for netns, _ in jobs.values():
            sh_in(netns, "ethtool", "-K", DEVICE, "tso", "off", "gso", "off", "gro", "off")
    wait_reachable(str(cli), ip)
    version = subprocess.run(["iperf3", "--version"], capture_output=True, text=True).stdout.split()[1]
    print(f"\npacket path, {label}: iperf3 {version} -J, 1 TCP stream, {a.seconds:g} s per run, {a.pairs} A/B pairs "
          f"per variant (order alternating); kernel {platform.release()}, {os.cpu_count()} cpus shared; "
          f"offloads {'OFF (per-packet amplifier)' if a.no_offload else 'as made'}; loadavg {loadavg()}")
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in ["off", *a.variants]}
    ratios: dict[str, list[float]] = {v: [] for v in a.variants}
    for r in range(a.pairs):
        for v in a.variants:
            order = ("off", v) if r % 2 == 0 else (v, "off")
            got: dict[str, dict[str, float]] = {}
            for k in order:
                for netns, mac in jobs.values():
                    set_rules(acct, netns, None if k == "off" else VARIANTS[k](mac_prefix(mac)))
                got[k] = run_iperf(srv, cli, ip, a.seconds)
                runs[k].append(got[k])
            ratios[v].append(got[v]["gbps"] / got["off"]["gbps"])
            print(f"  pair {r + 1:2}/{a.pairs} {v:>6}: off {got['off']['gbps']:6.2f}, {v} {got[v]['gbps']:6.2f} "
                  f"Gbit/s ({order[0]} first), ratio {ratios[v][-1]:.3f}; retransmits {got['off']['retr']:.0f}/"
                  f"{got[v]['retr']:.0f}; loadavg {loadavg()}")
        if r == 0 and "on" in a.variants:  # the product's table counted the stream, in the right class
            cnt = acct.read({"cli": JobNet(cli, jobs["cli"][1])})["cli"]
            assert not isinstance(cnt, Exception), cnt
            print("    client's counters after its 'on' run (frame bytes, packets): "
                  + ", ".join(f"{d}_{c} {b}/{p}" for d in ("tx", "rx") for c, (b, p) in cnt.totals.direction(d).items()
                              if b))
    for netns, _ in jobs.values():
        set_rules(acct, netns, None)
    print(f"  {label}, loadavg at the end {loadavg()}:")
    print(f"  {'variant':8} {'Gbit/s median':>13}  {'snd/rcv cpu%':>12}  ratio to off per pair")
    for k, xs in runs.items():
        cpu = f"{statistics.median(x['cpu_snd'] for x in xs):.0f}/{statistics.median(x['cpu_rcv'] for x in xs):.0f}"
        line = f"  {k:8} {statistics.median(x['gbps'] for x in xs):13.2f}  {cpu:>12}  "
        if k != "off":
            line += spread(ratios[k])
        print(line)
    if "on" in ratios:
        m = statistics.median(ratios["on"])
        print(f"  accounting on / off, median of {len(ratios['on'])} pairs = {m:.3f}   target >= 0.98   "
              f"{'PASS' if m >= 0.98 else 'MISS'}")
    return ratios


def throughput_overlay(acct: NetAccounting, prefix: str, a: argparse.Namespace) -> dict[str, list[float]]:
    """Two "nodes" (the lab's underlay, no controller or agents) and the hand-built VXLAN data path."""
    lab = Lab(name=f"{prefix}o", nodes=2, dir=Path(f"/run/jobnet/bench-{prefix}o"))
    made: list[str] = []
    try:
        lab.network_up()
        hand_vxlan(lab, OVERLAY_MTU, made)
        jobs = {"srv": (NETNS / made[1], hand_mac(2)), "cli": (NETNS / made[0], hand_mac(1))}
        return throughput(acct, f"overlay (VXLAN between two nodes, MTU {OVERLAY_MTU})", jobs, f"{HAND_NET}.2", a)
    finally:
        with contextlib.suppress(Exception):
            remove_hand_vxlan(lab, made)
        lab.down()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=10, help="A/B pairs per variant and path (0: no packet path)")
    ap.add_argument("--seconds", type=float, default=3.0, help="iperf3 -t of every run")
    ap.add_argument("--variants", default="on", help=f"comma-separated, of {', '.join(VARIANTS)}, or all")
    ap.add_argument("--no-overlay", dest="overlay", action="store_false", help="the local path only")
    ap.add_argument("--local", dest="local", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--no-offload", action="store_true", help="TSO/GSO/GRO off on both jobs' eth0")
    a = ap.parse_args()
    a.variants = list(VARIANTS) if a.variants == "all" else a.variants.split(",")
    if unknown := set(a.variants) - set(VARIANTS):
        ap.error(f"unknown variants {sorted(unknown)}")
    if a.jobs < 2:
        ap.error("--jobs must be at least 2")
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

        # 5. the packet path: iperf3 between two jobs with the tables and without, A/B in the same run
        if a.pairs:
            jobs_local = {"srv": (NETNS / names[1], macs[names[1]]), "cli": (NETNS / names[0], macs[names[0]])}
            if a.local:
                throughput(acct, "local (two jobs on one bridge)", jobs_local, "10.252.0.2", a)
            if a.overlay:
                throughput_overlay(acct, prefix, a)
    finally:
        for n in reversed(made):
            with contextlib.suppress(OSError):
                netns.remove(n)
        ns.close()


if __name__ == "__main__":
    main()
