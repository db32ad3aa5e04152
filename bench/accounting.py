"""Network accounting costs (issue 4): setting a job's counters up (both hooks), reading N jobs' counters, final
reads, the spool's durable append, and the packet path with and without the counters.

    python -m bench.accounting [--jobs 200] [--rounds 5] [--pairs 10] [--seconds 3] [--no-overlay]
                               [--variants on[,tcx,nft,...]|all] [--profile [--profile-runs N]] [--no-offload]
                               [--concurrent PAIRS [--concurrent-ab on,off/off,off]]

Packet path: iperf3 (`-J`, one TCP stream) from one job's namespace to another's, with the accounting
counters (`on`: both jobs' BPF programs and maps exactly as the agent installs them) and without (`off`), in
the same run: `--pairs` A/B pairs of `--seconds` each, the order alternating (off,on / on,off / ...: ABBA, so
drift from other work on a shared machine cancels), the ratio on/off of each pair, their median and spread.
Two paths:
  local    two jobs on the bench's bridge (veth, bridge, veth)
  overlay  two jobs on two "nodes" joined by VXLAN: the lab's underlay (deploy.lab, namespaces and veths
           only: no controller, no agent) and the data path of bench.overlay_throughput built by hand
           (bridge, VXLAN nolearning with static FDB/neighbour entries, MTU 1450), one node prefix per node
`--variants` adds peers, each A/B against `off` in the same rounds: `tcx` / `tc` (the same programs on that
hook; `on` is the product's default, tcx where the kernel has it), `nft` (the nftables
table jobnet counted with until 2026-12-02, bench/nft_accounting.py) and rule-set
variants of it (VARIANTS below). `--profile` adds `--profile-runs` runs per variant (and `off`) under
`perf record -a` and prints the share of iperf3's CPU samples spent under a frame hook (HOOK_SYMBOLS): a cost
measure that, unlike the throughput ratio, does not swing with other work on the machine. `--concurrent`
runs two streams at once (see throughput_concurrent), with an A/A control taking turns. `--no-offload` turns
TSO/GSO/GRO off on both jobs' eth0, so that every wire frame is a packet for the hooks (an amplifier of
per-packet costs, not the issue's figure).

Throwaway namespaces jnab<pid>-sw (a bridge) and jnab<pid>-<i> (a job: veth eth0 on the bridge), the overlay's
lab jnab<pid>o-{ul,ctl,n1,n2,h1,h2}, all removed at the end, also after a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.nft import Nft, NftError
from bench.nft_accounting import CHAINS, FAMILY, PACKET_OTHERHOST, TABLE, create_commands
from bench.overlay_throughput import (
    HAND_NET,
    hand_mac,
    hand_vxlan,
    iperf,
    iperf_many,
    loadavg,
    remove_hand_vxlan,
    wait_reachable,
)
from deploy.lab import Lab
from nodeagent.accounting import JobNet, NetAccounting, NetTotals, UsageSpool
from nodeagent.accounting.hooks import KINDS, Hooks, tcx_supported
from nodeagent.accounting.rules import DEVICE, KEYS, mac_prefix
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
    """The nftables peer's transaction minus the other chain (same counters, same rules)."""
    def build(prefix: int) -> str:
        other = next(c for c in CHAINS if c != chain)
        lines = [ln for ln in create_commands(prefix).splitlines()
                 if not ln.startswith((f"add chain {T} {other} ", f"add rule {T} {other} "))]
        return "\n".join(lines) + "\n"
    return build


def _same_rule(rule: Callable[[str], str]) -> Callable[[int], str]:
    """Both chains, each with one rule `rule(direction)` (and the nftables peer's counter objects)."""
    def build(_prefix: int) -> str:
        cmds = [f"create table {T}", *(f"add counter {T} {d}_external" for d in CHAINS)]
        for d in CHAINS:
            cmds.append(_chain(d))
            if r := rule(d):
                cmds.append(f"add rule {T} {d} {r}")
        return "\n".join(cmds) + "\n"
    return build


def _prefix_ranges(prefix: int, mine: str, other02: str, rest: str | None) -> str:
    """Map elements over 24-bit MAC prefixes: our node's prefix -> mine, other 02:xx:xx -> other02, all else
    -> rest (None: not in the map)."""
    parts = [(0x020000, prefix - 1, other02), (prefix, prefix, mine), (prefix + 1, 0x02FFFF, other02)]
    if rest is not None:
        parts = [(0, 0x01FFFF, rest), *parts, (0x030000, 0xFFFFFF, rest)]
    return ", ".join(f"0x{lo:06x}{'' if lo == hi else f'-0x{hi:06x}'} : {v}" for lo, hi, v in parts if lo <= hi)


def _objmap(prefix: int) -> str:
    """One lookup per frame: the counter's NAME is looked up by the 3-byte MAC prefix (the same classes)."""
    cmds = [f"create table {T}", *(f"add counter {T} {k}" for k in KEYS), _chain("tx"), _chain("rx")]
    tx = _prefix_ranges(prefix, '"tx_local"', '"tx_overlay"', '"tx_external"')
    rx = _prefix_ranges(prefix, '"rx_local"', '"rx_overlay"', '"rx_external"')
    cmds += [f"add rule {T} tx counter name @ll,0,24 map {{ {tx} }} accept",
             f'add rule {T} tx counter name "tx_external"',
             f"add rule {T} rx meta pkttype {PACKET_OTHERHOST} accept",
             f"add rule {T} rx counter name @ll,48,24 map {{ {rx} }}"]
    return "\n".join(cmds) + "\n"


def _vmap(prefix: int) -> str:
    """A verdict map on the MAC prefix, going to a chain per class that counts."""
    cmds = [f"create table {T}", *(f"add counter {T} {k}" for k in KEYS), _chain("tx"), _chain("rx")]
    for k in KEYS:
        cmds += [_chain(k, hooked=False), f'add rule {T} {k} counter name "{k}" accept']
    tx = _prefix_ranges(prefix, "goto tx_local", "goto tx_overlay", None)
    rx = _prefix_ranges(prefix, "goto rx_local", "goto rx_overlay", "goto rx_external")
    cmds += [f"add rule {T} tx @ll,0,24 vmap {{ {tx} }}", f'add rule {T} tx counter name "tx_external"',
             f"add rule {T} rx meta pkttype {PACKET_OTHERHOST} accept", f"add rule {T} rx @ll,48,24 vmap {{ {rx} }}"]
    return "\n".join(cmds) + "\n"


# nftables peers of the product ("on": the BPF programs). "nft" is the table jobnet used until 2026-12-02.
HOOK_VARIANTS = KINDS  # the product's programs on one hook: "tc" (its default, = "on") or "tcx"
VARIANTS: dict[str, Callable[[int], str]] = {
    "nft": create_commands,                                                  # the nftables peer, as it was
    "none": lambda _prefix: "",                                              # no table either: an A/A control
    "nft-tx": _product_only("tx"),                                           # its egress chain alone
    "nft-rx": _product_only("rx"),                                           # its ingress chain alone
    "hooks": _same_rule(lambda d: ""),                                       # both chains, no rule
    "anon": _same_rule(lambda d: "counter"),                                 # one anonymous counter each
    "named": _same_rule(lambda d: f'counter name "{d}_external"'),           # one named counter each
    "match": _same_rule(lambda d: f"@ll,{0 if d == 'tx' else 48},8 0x02"),   # one payload match, no counter
    "objmap": _objmap,                                                       # candidate: counter name by map
    "vmap": _vmap,                                                           # candidate: verdict map + chains
}


@dataclass(frozen=True)
class Counting:
    """The product's counters (acct: on its default hook, tcx where the kernel has it), the same programs on
    each hook the kernel has (by_hook: "tc", and "tcx" on Linux 6.6+), and a way into the bench's namespaces
    (ns) for the nftables peers."""

    acct: NetAccounting
    by_hook: dict[str, NetAccounting]
    ns: Namespaces


def set_rules(c: Counting, netns: Path, commands: str | None) -> None:
    """Replace the job's nftables accounting table by `commands` (None: no table)."""
    def work() -> None:
        with Nft() as nft:
            with contextlib.suppress(NftError):
                nft.run(f"delete table {T}")
            if commands:
                nft.run(commands)
    c.ns.run_in(netns, work)


def detach_programs(c: Counting, netns: Path, job: str | None = None) -> None:
    """Every BPF program off the job's eth0, on both hooks (the product's counters; the bench's namespaces have
    no other), and the product's hold on its map (`job`: the id it was ensured under; default str(netns))."""
    def work() -> None:
        idx = socket.if_nametoindex(DEVICE)
        with Hooks() as hooks:
            for kind in KINDS:
                for d in ("tx", "rx"):
                    for p in hooks.programs(kind, idx, d):
                        try:
                            hooks.detach(idx, p, d)
                        finally:
                            os.close(p.fd)
    c.ns.run_in(netns, work)
    for acct in (c.acct, *c.by_hook.values()):
        acct.release(job if job is not None else str(netns))


def set_variant(c: Counting, netns: Path, mac: str, k: str | None) -> None:
    """The job's counting as variant `k`: "on" (the product: BPF programs and map, as the agent installs them
    by default), "tc" / "tcx" (the same on that hook), an nftables rule set of VARIANTS, or nothing (None,
    "off")."""
    detach_programs(c, netns)
    set_rules(c, netns, VARIANTS[k](mac_prefix(mac)) if k in VARIANTS else None)
    if k == "on" or k in HOOK_VARIANTS:
        (c.acct if k == "on" else c.by_hook[k]).ensure(str(netns), netns, mac)


def ipv6_off() -> None:
    for k in ("ipv6/conf/all/disable_ipv6", "ipv6/conf/default/disable_ipv6"):
        write_sysctl(k, "1", "bench")


def sh_in(netns: Path, *argv: str) -> None:
    subprocess.run(["nsenter", f"--net={netns}", *argv], check=True, capture_output=True)


def run_iperf(srv: Path, cli: Path, ip: str, seconds: float) -> dict[str, float]:
    try:
        return iperf(str(srv), str(cli), ip, seconds)
    except RuntimeError as e:  # one retry: a stuck run is printed, not silently dropped
        print(f"    iperf3 failed ({e}); once more")
        return iperf(str(srv), str(cli), ip, seconds)


# Functions under which a frame's classifier work runs, whichever kind: netfilter's hook entry and the netdev
# chains, tc's entry (clsact, tcx) and classifiers (the BPF programs show as bpf_prog_<tag>_<name>). Not
# nf_hook_slow: br_netfilter's bridge hooks run it with or without accounting (and the netdev hooks run under
# nf_ingress / nf_hook_egress anyway). The bench also subtracts the share measured with nothing installed ("off").
HOOK_SYMBOLS = ("nft_do_chain_netdev", "nf_hook_egress", "nf_ingress", "sch_handle_egress",
                "sch_handle_ingress", "tcf_classify", "tc_run", "tcx_run", "cls_bpf_classify", "bpf_prog_")


def nft_share(data: Path) -> tuple[float, int]:
    """From a `perf record -a -g` file: the share of the iperf3 processes' samples spent under a frame hook
    (HOOK_SYMBOLS on the stack: hook entry, rules or programs, counters), and their sample count."""
    out = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,ip,sym"], capture_output=True, text=True,
                         check=True).stdout
    iperf_samples = inside = 0
    for sample in out.split("\n\n"):
        lines = sample.strip().splitlines()
        if not lines or lines[0].split()[0] != "iperf3":
            continue
        iperf_samples += 1
        inside += any(ln.split()[-1].startswith(HOOK_SYMBOLS) for ln in lines[1:] if ln.split())
    return (inside / iperf_samples if iperf_samples else float("nan")), iperf_samples


def profiled_iperf(srv: Path, cli: Path, ip: str, seconds: float) -> tuple[dict[str, float], float, int]:
    """One run with `perf record -a` (cpu-clock, call graphs) over its middle; + nft_share of it."""
    with tempfile.TemporaryDirectory(prefix="jnab-perf") as d:
        data = Path(d) / "perf.data"
        perf = subprocess.Popen(["perf", "record", "-q", "-a", "-g", "-e", "cpu-clock", "-F", "2000", "-o", str(data),
                                 "--", "sleep", str(max(1.0, seconds - 1.5))], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            res = run_iperf(srv, cli, ip, seconds)
        finally:
            perf.wait()
        share, n = nft_share(data)
    return res, share, n


def spread(xs: list[float]) -> str:
    return (f"median {statistics.median(xs):.3f}, IQR {pct(xs, 25):.3f}-{pct(xs, 75):.3f}, "
            f"range {min(xs):.3f}-{max(xs):.3f}, n={len(xs)}")


def throughput(acct: Counting, label: str, jobs: dict[str, tuple[Path, str]], ip: str,
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
                    set_variant(acct, netns, mac, k)
                got[k] = run_iperf(srv, cli, ip, a.seconds)
                runs[k].append(got[k])
                if r == 0 and k == "on":  # the product's table counted the stream, in the right class
                    cnt = acct.acct.read({str(cli): JobNet(cli, jobs["cli"][1])})[str(cli)]
                    assert not isinstance(cnt, Exception), cnt
                    print("    client's counters after its 'on' run (frame bytes/packets): " + ", ".join(
                        f"{d}_{c} {b}/{p}" for d in ("tx", "rx") for c, (b, p) in cnt.totals.direction(d).items() if b))
            ratios[v].append(got[v]["gbps"] / got["off"]["gbps"])
            print(f"  pair {r + 1:2}/{a.pairs} {v:>6}: off {got['off']['gbps']:6.2f}, {v} {got[v]['gbps']:6.2f} "
                  f"Gbit/s ({order[0]} first), ratio {ratios[v][-1]:.3f}; retransmits {got['off']['retr']:.0f}/"
                  f"{got[v]['retr']:.0f}; loadavg {loadavg()}")
    if a.profile:
        print(f"  CPU profile (perf record -a, cpu-clock 2 kHz, {a.profile_runs} run(s) per variant, interleaved): "
              "share of the iperf3 processes' samples under a frame hook (HOOK_SYMBOLS), minus the same share with "
              "nothing installed (off)")
        shares: dict[str, list[float]] = {k: [] for k in ["off", *a.variants]}
        for _ in range(a.profile_runs):
            for k in shares:
                for netns, mac in jobs.values():
                    set_variant(acct, netns, mac, k)
                res, share, n = profiled_iperf(srv, cli, ip, a.seconds)
                shares[k].append(share)
                print(f"    {k:8} {100 * share:5.2f} % of {n} samples ({res['gbps']:.2f} Gbit/s; loadavg {loadavg()})")
        base = statistics.median(shares["off"])
        for k in a.variants:
            m = statistics.median(shares[k])
            print(f"    {k:8} median {100 * m:5.2f} %, minus off {100 * (m - base):5.2f} points "
                  f"(runs {', '.join(f'{100 * x:.2f}' for x in shares[k])})")
    for netns, mac in jobs.values():
        set_variant(acct, netns, mac, None)
    print(f"  {label}, loadavg at the end {loadavg()}:")
    print(f"  {'variant':8} {'Gbit/s median':>13}  {'snd/rcv cpu%':>12}  ratio to off per pair")
    for k, xs in runs.items():
        if not xs:
            continue
        cpu = f"{statistics.median(x['cpu_snd'] for x in xs):.0f}/{statistics.median(x['cpu_rcv'] for x in xs):.0f}"
        line = f"  {k:8} {statistics.median(x['gbps'] for x in xs):13.2f}  {cpu:>12}  "
        if k != "off":
            line += spread(ratios[k])
        print(line)
    if ratios.get("on"):
        m = statistics.median(ratios["on"])
        print(f"  accounting on / off, median of {len(ratios['on'])} pairs = {m:.3f}   target >= 0.98   "
              f"{'PASS' if m >= 0.98 else 'MISS'}")
    return ratios


def throughput_concurrent(acct: Counting, pairs: list[dict[str, tuple[Path, str]]], ips: list[str],
                          a: argparse.Namespace) -> dict[str, list[float]]:
    """Two streams at the SAME time on two pairs of jobs on one bridge, one pair counted as A and one as B,
    the roles swapped every round. On 2 vCPUs the two streams compete for the same CPUs, so their
    throughput ratio is the inverse of their CPU cost per byte, and load from other work hits both alike.
    Two consecutive rounds (roles swapped) give one ratio, their geometric mean, which also cancels any
    difference between the two pairs. Several A,B comparisons (--concurrent-ab on,off/off,off) take turns
    block by block, so an A/A control measures the method's own error in the same minutes."""
    for pair, ip in zip(pairs, ips, strict=True):
        wait_reachable(str(pair["cli"][0]), ip)
    specs = a.concurrent_ab
    print(f"\nconcurrent A/B, local: two job pairs on one bridge, one stream each at the same time, {a.seconds:g} s, "
          f"{a.concurrent} swapped pairs of rounds per comparison ({', '.join(f'{x}/{y}' for x, y in specs)}, "
          f"taking turns); loadavg {loadavg()}")
    ratios: dict[str, list[float]] = {f"{x}/{y}": [] for x, y in specs}
    for block in range(a.concurrent * len(specs)):
        x, y = specs[block % len(specs)]
        per_round = []
        for on in (0, 1):
            for i, pair in enumerate(pairs):
                for netns, mac in pair.values():
                    set_variant(acct, netns, mac, x if i == on else y)
            res = iperf_many([(str(p["srv"][0]), str(p["cli"][0]), ip) for p, ip in zip(pairs, ips, strict=True)],
                             a.seconds)
            per_round.append(res[on]["gbps"] / res[1 - on]["gbps"])
            print(f"  block {block + 1:2}: pair {on + 1} {x} {res[on]['gbps']:6.2f}, pair {2 - on} {y} "
                  f"{res[1 - on]['gbps']:6.2f} Gbit/s, {x}/{y} {per_round[-1]:.3f}; loadavg {loadavg()}")
        ratios[f"{x}/{y}"].append((per_round[0] * per_round[1]) ** 0.5)
    for pair in pairs:
        for netns, mac in pair.values():
            set_variant(acct, netns, mac, None)
    for k, xs in ratios.items():
        print(f"  concurrent {k} (geometric mean of each swapped pair of rounds): {spread(xs)}")
    if ratios.get("on/off"):
        m = statistics.median(ratios["on/off"])
        line = f"  accounting on / off, concurrent, median of {len(ratios['on/off'])} = {m:.3f}"
        if ratios.get("off/off"):
            aa = statistics.median(ratios["off/off"])
            line += f"; A/A control off/off {aa:.3f}; on/off divided by the control {m / aa:.3f}"
        print(f"{line}   target >= 0.98   {'PASS' if m >= 0.98 else 'MISS'} (as measured)")
    return ratios


def throughput_overlay(acct: Counting, prefix: str, a: argparse.Namespace) -> dict[str, list[float]]:
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
    ap.add_argument("--pairs", type=int, default=10, help="A/B pairs per variant and path (0: none)")
    ap.add_argument("--seconds", type=float, default=3.0, help="iperf3 -t of every run")
    ap.add_argument("--variants", default="on", help=f"comma-separated, of {', '.join(VARIANTS)}, or all")
    ap.add_argument("--no-overlay", dest="overlay", action="store_false", help="the local path only")
    ap.add_argument("--concurrent", type=int, default=0, metavar="PAIRS",
                    help="also the concurrent A/B on the local path: PAIRS swapped pairs of rounds per "
                    "comparison (0: none)")
    ap.add_argument("--concurrent-ab", default="on,off/off,off", metavar="A,B[/C,D]",
                    help="the comparisons of --concurrent, taking turns (variants or off), each the ratio A/B; "
                    "default on,off/off,off (the product against nothing, and the A/A control)")
    ap.add_argument("--local", dest="local", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--no-offload", action="store_true", help="TSO/GSO/GRO off on both jobs' eth0")
    ap.add_argument("--profile-runs", type=int, default=1, help="profiled runs per variant (the median is printed)")
    ap.add_argument("--profile", action="store_true",
                    help="also one perf-profiled run per variant: CPU share of the accounting chains")
    a = ap.parse_args()
    a.variants = ["on", *HOOK_VARIANTS, *VARIANTS] if a.variants == "all" else a.variants.split(",")
    a.concurrent_ab = [tuple(x.split(",")) for x in a.concurrent_ab.split("/")]
    if any(len(x) != 2 for x in a.concurrent_ab):
        ap.error("--concurrent-ab: A,B[/C,D...]")
    if unknown := set(a.variants) - set(VARIANTS) - {"on", *HOOK_VARIANTS}:
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
            ns.run_in(NETNS / n, ipv6_off)
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

        # 1. set-up (create) and an idempotent ensure (verify) per job; the set-up on the other hook too
        c = Counting(acct, {h: NetAccounting(ns, hook=h) for h in KINDS if h == "tc" or tcx_supported()}, ns)
        if missing := {v for v in a.variants if v in HOOK_VARIANTS} - set(c.by_hook):
            ap.error(f"this kernel has no {', '.join(sorted(missing))} hooks")
        setup: dict[str, list[float]] = {acct.hook: []}
        verify = []
        for hook, other in c.by_hook.items():
            if hook == acct.hook:
                continue
            setup[hook] = []
            for n in names[:50]:
                t0 = time.perf_counter()
                assert other.ensure(n, NETNS / n, macs[n]).action == "created"
                setup[hook].append((time.perf_counter() - t0) * 1000)
                detach_programs(c, NETNS / n, n)
        for n in names:
            t0 = time.perf_counter()
            r = acct.ensure(n, NETNS / n, macs[n])
            setup[acct.hook].append((time.perf_counter() - t0) * 1000)
            assert r.action == "created"
        for n in names:
            t0 = time.perf_counter()
            acct.ensure(n, NETNS / n, macs[n])
            verify.append((time.perf_counter() - t0) * 1000)
        for hook, xs in setup.items():
            print(f"set-up per job, hook {hook} (enter netns, map + 2 programs loaded and attached, back), "
                  f"{len(xs)} jobs: p50 {pct(xs, 50):.2f} ms, p99 {pct(xs, 99):.2f} ms")
        print(f"ensure on existing counters (find the programs, verify, read; both hooks looked at): "
              f"p50 {pct(verify, 50):.2f} ms")

        # 2. a sampling pass: every job's counters, one worker thread for all
        jobs = {n: JobNet(NETNS / n, macs[n]) for n in names}
        passes = []
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            out = acct.read(jobs)
            passes.append((time.perf_counter() - t0) * 1000)
            assert all(not isinstance(r, Exception) for r in out.values())
        med = statistics.median(passes)
        print(f"sampling pass over {a.jobs} jobs (read + verify each job's counters): median {med:.1f} ms "
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
        if a.pairs or a.profile:  # (sequential A/B)
            jobs_local = {"srv": (NETNS / names[1], macs[names[1]]), "cli": (NETNS / names[0], macs[names[0]])}
            if a.local and a.pairs:
                throughput(c, "local (two jobs on one bridge)", jobs_local, "10.252.0.2", a)
            if a.overlay and a.pairs:
                throughput_overlay(c, prefix, a)
        if a.concurrent:
            if a.jobs < 4:
                ap.error("--concurrent needs --jobs >= 4")
            pairs = [{"srv": (NETNS / names[2 * k + 1], macs[names[2 * k + 1]]),
                      "cli": (NETNS / names[2 * k], macs[names[2 * k]])} for k in (0, 1)]
            throughput_concurrent(c, pairs, ["10.252.0.2", "10.252.0.4"], a)
    finally:
        for n in reversed(made):
            with contextlib.suppress(OSError):
                netns.remove(n)
        ns.close()


if __name__ == "__main__":
    main()
