"""Overlay throughput: jobnet's job-to-job path across two lab nodes, beside the same path built by hand
with `ip` (same kernel, same topology) and the plain underlay veth, all in one run.

    python -m bench.overlay_throughput [--seconds 5] [--repeat 7] [--pairs 7]

Paths measured (iperf3, one TCP stream, offloads left as the kernel made them, median of --repeat runs):
  underlay   node n1 -> node n2: their underlay veths and the lab's underlay bridge (no encapsulation)
  hand-vxlan netns -> veth -> bridge -> vxlan (VNI 4242, port 4789, nolearning, proxy, static FDB and
             neighbour entries, group MTU) -> underlay -> ... -> netns, built by hand with `ip`/`bridge` in
             the same two node namespaces, next to jobnet's devices; its job namespaces get jobnet's
             accounting table as a job does (--no-hand-accounting: none), so the ratio compares networks
  jobnet     a jobnet job on n1 -> a jobnet job on n2 (same group), made through the controller
The three paths are measured in turn within every repeat (the order rotates), so drift from other work on
a shared machine hits every path alike. Then --pairs runs of jobnet and hand-vxlan at the SAME time (two
streams sharing the CPUs): their ratio cancels the load from other work, which makes the sequential ratio
swing by tens of percent on a shared 2-core machine. Also printed: the device configuration of both paths
compared (`ip -d link`, names, indexes, MACs, VNI and timers aside), MTUs and a DF ping at full MTU.
Target: jobnet >= 0.97 x hand-vxlan (jobnet adds nothing to the data path). The lab (`jnbo<pid>`) and
everything built by hand are removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from deploy.lab import Lab, wait_running
from protos.jobnet.v1 import jobnet_pb2 as pb

HAND_VNI = 4242
HAND_NET = "10.254.0"
PORT = 5301


def sh(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r.stdout


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def iperf(server_ns: str, client_ns: str, ip: str, seconds: float) -> dict[str, float]:
    """One TCP stream from client_ns to an iperf3 server in server_ns (netns file paths)."""
    return iperf_many([(server_ns, client_ns, ip)], seconds)[0]


def iperf_many(runs: list[tuple[str, str, str]], seconds: float) -> list[dict[str, float]]:
    """One TCP stream per (server_ns, client_ns, ip), all at the same time (each on its own port)."""
    servers: list[subprocess.Popen[str]] = []
    clients: list[tuple[str, subprocess.Popen[str]]] = []
    try:
        for i, (server_ns, _, ip) in enumerate(runs):
            srv = subprocess.Popen(["nsenter", f"--net={server_ns}", "iperf3", "-s", "-1", "-B", ip, "-p",
                                    str(PORT + i), "--forceflush"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
            servers.append(srv)
            assert srv.stdout is not None
            seen: list[str] = []
            while not seen or "listening" not in seen[-1]:  # "Server listening on 5301" once bound
                line = srv.stdout.readline()
                if not line:
                    raise RuntimeError(f"iperf3 server in {server_ns}: {' '.join(seen)}")
                seen.append(line.strip())
        for i, (_, client_ns, ip) in enumerate(runs):
            clients.append((client_ns, subprocess.Popen(
                ["nsenter", f"--net={client_ns}", "iperf3", "-c", ip, "-p", str(PORT + i), "-t", str(seconds), "-J",
                 "--connect-timeout", "3000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        out = []
        deadline = time.monotonic() + seconds + 20
        for client_ns, c in clients:
            try:
                stdout, _ = c.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as e:
                raise RuntimeError(f"iperf3 client in {client_ns} did not finish within {seconds + 20:g} s") from e
            data = json.loads(stdout)
            if "error" in data:
                raise RuntimeError(f"iperf3 client in {client_ns}: {data['error']}")
            end = data["end"]
            out.append({"gbps": float(end["sum_received"]["bits_per_second"]) / 1e9,
                        "retr": float(end["sum_sent"].get("retransmits", 0)),
                        "cpu_snd": float(end["cpu_utilization_percent"]["host_total"]),
                        "cpu_rcv": float(end["cpu_utilization_percent"]["remote_total"])})
        return out
    finally:
        for p in [c for _, c in clients] + servers:
            if p.poll() is None:
                p.kill()
            p.wait()


def hand_mac(i: int) -> str:
    """Node i's job: 02:42:<i> is the node's prefix, as jobnet's MACs are (bench.accounting classes by it)."""
    return f"02:42:{i:02x}:00:00:{i:02x}"


def hand_vxlan(lab: Lab, mtu: int, made: list[str]) -> None:
    """Build, by hand, the data path jobnet builds: in each node netns a bridge + a VXLAN device (nolearning,
    proxy, head-end replication entry + static FDB and neighbour entries for the remote end), and a veth to
    a job-like netns (its port: learning off, the job's MAC static and sticky on it). Appends each namespace
    it creates to `made` (removed by the caller)."""
    for i, node in enumerate(("n1", "n2"), start=1):
        other = 2 if i == 1 else 1
        node_ns = lab.ns(node)
        job_ns = f"{lab.name}-h{i}"
        sh("ip", "netns", "add", job_ns)
        made.append(job_ns)
        peer = lab.underlay_ip(f"n{other}")
        run = ["ip", "-n", node_ns]
        sh(*run, "link", "add", "jnhbr", "mtu", str(mtu), "type", "bridge", "stp_state", "0", "forward_delay", "0",
           "mcast_snooping", "0")
        sh(*run, "link", "add", "jnhvx", "mtu", str(mtu), "type", "vxlan", "id", str(HAND_VNI), "dstport", "4789",
           "local", lab.underlay_ip(node), "dev", "jnul0", "nolearning", "proxy")
        sh(*run, "link", "set", "jnhvx", "master", "jnhbr", "up")
        sh(*run, "link", "set", "jnhbr", "up")
        sh("bridge", "-n", node_ns, "fdb", "append", "00:00:00:00:00:00", "dev", "jnhvx", "dst", peer)
        sh("bridge", "-n", node_ns, "fdb", "replace", hand_mac(other), "dev", "jnhvx", "dst", peer, "self",
           "permanent")
        sh(*run, "neigh", "replace", f"{HAND_NET}.{other}", "lladdr", hand_mac(other), "dev", "jnhvx", "nud",
           "permanent")
        sh(*run, "link", "add", "jnhv", "mtu", str(mtu), "type", "veth", "peer", "name", "eth0", "netns", job_ns)
        sh(*run, "link", "set", "jnhv", "master", "jnhbr", "up")
        # as jobnet's job ports: learning off, the job's MAC a static sticky entry on its port
        sh("bridge", "-n", node_ns, "link", "set", "dev", "jnhv", "learning", "off")
        sh("bridge", "-n", node_ns, "fdb", "replace", hand_mac(i), "dev", "jnhv", "master", "static", "sticky")
        sh("ip", "-n", job_ns, "link", "set", "lo", "up")
        sh("ip", "-n", job_ns, "link", "set", "eth0", "mtu", str(mtu), "address", hand_mac(i), "up")
        sh("ip", "-n", job_ns, "addr", "add", f"{HAND_NET}.{i}/24", "dev", "eth0")


def hand_accounting(made: list[str]) -> None:
    """jobnet's accounting table in the hand-built job namespaces (as the agent makes it for a job), so that
    both paths carry the same per-frame cost and the ratio compares the networks alone."""
    from nodeagent.accounting import NetAccounting

    acct = NetAccounting()
    try:
        for i, job_ns in enumerate(made, start=1):
            acct.ensure(f"hand{i}", Path(f"/run/netns/{job_ns}"), hand_mac(i))
    finally:
        acct.close()


def remove_hand_vxlan(lab: Lab, made: list[str]) -> None:
    for ns in made:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    for node in ("n1", "n2"):
        if (Path("/run/netns") / lab.ns(node)).exists():
            for dev in ("jnhv", "jnhvx", "jnhbr"):
                subprocess.run(["ip", "-n", lab.ns(node), "link", "del", dev], check=False, capture_output=True)


def wait_reachable(netns: str, ip: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(["nsenter", f"--net={netns}", "ping", "-c1", "-W1", "-q", ip],
                          capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{ip} not reachable from {netns} after {timeout} s")


OFFLOADS = {"tso": "tcp-segmentation-offload", "gso": "generic-segmentation-offload",
            "gro": "generic-receive-offload", "tx-csum": "tx-checksumming", "sg": "scatter-gather"}


def offloads(netns: str, dev: str) -> str:
    """Which of the usual offloads are on for a device (`ethtool -k`; "?" without ethtool)."""
    try:
        r = subprocess.run(["nsenter", f"--net={netns}", "ethtool", "-k", dev], capture_output=True, text=True)
    except FileNotFoundError:
        return "?"
    if r.returncode != 0:
        return "?"
    on = {ln.split(":")[0].strip() for ln in r.stdout.splitlines() if ": on" in ln}
    return " ".join(short for short, long in OFFLOADS.items() if long in on)


def save_logs(lab: Lab) -> None:
    """Keep the lab's logs (the lab dir is removed on down) for a failed run."""
    dest = Path(f"/tmp/{lab.name}-logs")
    dest.mkdir(parents=True, exist_ok=True)
    for log in lab.dir.rglob("*.log"):
        (dest / f"{log.parent.name}-{log.name}").write_bytes(log.read_bytes())
    print(f"  lab logs kept in {dest}")


def mtu_of(netns: str, dev: str) -> int:
    out = subprocess.run(["nsenter", f"--net={netns}", "ip", "-j", "link", "show", dev], capture_output=True,
                         text=True).stdout
    return int(json.loads(out)[0]["mtu"]) if out.strip() else 0


def df_ping(netns: str, ip: str, size: int) -> bool:
    """A ping of `size` payload bytes with DF set gets through (the path carries its full MTU)."""
    return subprocess.run(["nsenter", f"--net={netns}", "ping", "-c1", "-W1", "-q", "-M", "do", "-s", str(size), ip],
                          capture_output=True).returncode == 0


VOLATILE = {"ifindex", "ifname", "address", "broadcast", "link", "link_index", "link_netnsid", "master", "id",
            "operstate", "bridge_id", "root_id", "designated_root", "designated_bridge", "designated_port",
            "port_id", "port_no", "hello_timer", "tcn_timer", "topology_change_timer", "gc_timer", "hold_timer",
            "message_age_timer", "forward_delay_timer", "addr_info"}


def link_config(netns: str, dev: str) -> dict[str, Any]:
    """`ip -d -j link show` of a device minus what differs by nature (names, indexes, MACs, VNI, timers)."""
    out = subprocess.run(["nsenter", f"--net={netns}", "ip", "-d", "-j", "link", "show", "dev", dev],
                         capture_output=True, text=True).stdout

    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in VOLATILE}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    if not out.strip():
        raise RuntimeError(f"no device {dev} in {netns}")
    return dict(strip(json.loads(out)[0]))


def config_diff(a: dict[str, Any], b: dict[str, Any], where: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{where}{k}.")
        elif va != vb:
            out.append(f"{where}{k}: {va} vs {vb}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5, help="iperf3 -t of every run")
    ap.add_argument("--repeat", type=int, default=7, help="runs per path (median reported)")
    ap.add_argument("--pairs", type=int, default=7, help="concurrent jobnet + hand-vxlan runs (0: none)")
    ap.add_argument("--agent-arg", action="append", default=[], metavar="ARG",
                    help="passed to the lab's agents (repeatable), e.g. --agent-arg=--spare-netns --agent-arg=0")
    ap.add_argument("--no-hand-accounting", action="store_true",
                    help="leave the hand-built job namespaces without jobnet's accounting table (by default they get "
                         "the same one, so the ratio compares the networks; bench/accounting measures the table)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    name = f"jnbo{os.getpid()}"
    lab = Lab(name=name, nodes=2, dir=Path(f"/run/jobnet/bench-{name}"), agent_args=tuple(a.agent_arg))
    made: list[str] = []
    try:
        lab.up()
        stub: Any = lab.stub()
        g = stub.CreateGroup(pb.CreateGroupRequest(name="bench"))
        j1 = stub.CreateJob(pb.CreateJobRequest(group="bench", node="n1", command=["sleep", "3600"]))
        j2 = stub.CreateJob(pb.CreateJobRequest(group="bench", node="n2", command=["sleep", "3600"]))
        wait_running(lab, [j1.id, j2.id])
        hand_vxlan(lab, g.mtu, made)
        if not a.no_hand_accounting:
            hand_accounting(made)
        paths = {
            "underlay": (f"/run/netns/{lab.ns('n2')}", f"/run/netns/{lab.ns('n1')}", lab.underlay_ip("n2")),
            "hand-vxlan": (f"/run/netns/{made[1]}", f"/run/netns/{made[0]}", f"{HAND_NET}.2"),
            "jobnet": (str(lab.job_netns("n2", j2.id)), str(lab.job_netns("n1", j1.id)), j2.ip),
        }
        for _srv, cli, ip in paths.values():
            wait_reachable(cli, ip)
        checks = []
        for k in ("hand-vxlan", "jobnet"):
            srv, cli, ip = paths[k]
            m = (mtu_of(cli, "eth0"), mtu_of(srv, "eth0"))
            checks.append(f"{k} eth0 MTU {m[0]}/{m[1]}, DF ping of {g.mtu - 28} B "
                          f"{'ok' if df_ping(cli, ip, g.mtu - 28) else 'FAILED'}")
        print(f"overlay throughput: iperf3 {sh('iperf3', '--version').split()[1]}, 1 TCP stream, "
              f"{a.seconds:g} s x {a.repeat} per path (median); kernel {platform.release()}, {os.cpu_count()} cpus "
              f"shared with other work; group VNI {g.vni} MTU {g.mtu}, underlay MTU 1500; loadavg {loadavg()}")
        print("  jobnet's per-job accounting counters (BPF programs on eth0's tcx hooks) are on both job paths"
              if not a.no_hand_accounting else
              "  the hand-built job namespaces have NO accounting counters (jobnet's jobs do: their cost is in)")
        print(f"  offloads on (sender side): jobnet eth0 [{offloads(paths['jobnet'][1], 'eth0')}], "
              f"hand eth0 [{offloads(paths['hand-vxlan'][1], 'eth0')}], "
              f"vxlan jnx{g.vni} [{offloads('/run/netns/' + lab.ns('n1'), f'jnx{g.vni}')}], "
              f"jnhvx [{offloads('/run/netns/' + lab.ns('n1'), 'jnhvx')}]")
        print("  path check: " + "; ".join(checks))
        node1 = f"/run/netns/{lab.ns('n1')}"
        pairs = [(paths["jobnet"][1], "eth0", paths["hand-vxlan"][1], "eth0"),
                 (node1, f"jnv{j1.id}"[:15], node1, "jnhv"), (node1, f"jnb{g.vni}", node1, "jnhbr"),
                 (node1, f"jnx{g.vni}", node1, "jnhvx")]
        diffs = []
        for ns_a, dev_a, ns_b, dev_b in pairs:
            diffs += [f"{dev_a}/{dev_b} {d}" for d in config_diff(link_config(ns_a, dev_a), link_config(ns_b, dev_b))]
        print(f"  device config on n1, jobnet vs hand-built (job eth0, host veth, bridge, vxlan; names, indexes, "
              f"MACs, VNI, timers aside): {'; '.join(diffs) if diffs else 'identical'}")
        results: dict[str, list[dict[str, float]]] = {k: [] for k in paths}
        failures: list[str] = []
        per_repeat: list[float] = []  # jobnet / hand-vxlan of each repeat where both ran
        order = list(paths)
        for r in range(a.repeat):
            this: dict[str, float | None] = dict.fromkeys(paths)
            for k in order[r % 3:] + order[:r % 3]:
                srv, cli, ip = paths[k]
                for attempt in (1, 2):  # one retry: a stuck run is reported, not silently dropped
                    try:
                        results[k].append(iperf(srv, cli, ip, a.seconds))
                        this[k] = results[k][-1]["gbps"]
                        break
                    except RuntimeError as e:
                        ping = subprocess.run(["nsenter", f"--net={cli}", "ping", "-c3", "-i0.2", "-W1", "-q", ip],
                                              capture_output=True, text=True).stdout.strip().splitlines()
                        failures.append(f"repeat {r + 1} {k} attempt {attempt}: {e}; ping afterwards: "
                                        f"{ping[-2] if len(ping) >= 2 else '?'}")
                        print("  FAILED:", failures[-1])
                        save_logs(lab)
            jv, hv = this["jobnet"], this["hand-vxlan"]
            if jv is not None and hv is not None:
                per_repeat.append(jv / hv)
            print(f"  repeat {r + 1}/{a.repeat}: "
                  + ", ".join(f"{k} {'failed' if v is None else format(v, '.2f')}" for k, v in this.items())
                  + f" Gbit/s; loadavg {loadavg()}")
        if not all(results.values()):
            print("  no result for " + ", ".join(k for k, v in results.items() if not v) + ": no ratio")
            return 1
        med = {k: statistics.median(x["gbps"] for x in v) for k, v in results.items()}
        print(f"\n  {'path':10} {'median':>8}   runs (Gbit/s)                         retransmits   cpu% snd/rcv")
        for k, v in results.items():
            runs = ", ".join(f"{x['gbps']:.2f}" for x in v)
            retr = statistics.median(x["retr"] for x in v)
            cpu = (f"{statistics.median(x['cpu_snd'] for x in v):.0f}/"
                   f"{statistics.median(x['cpu_rcv'] for x in v):.0f}")
            print(f"  {k:10} {med[k]:8.2f}   {runs:38} {retr:8.0f}      {cpu}")
        ratio = med["jobnet"] / med["hand-vxlan"]
        print(f"\n  jobnet / hand-vxlan   = {ratio:.3f}   (per repeat: {', '.join(f'{x:.3f}' for x in per_repeat)};"
              f" median {statistics.median(per_repeat) if per_repeat else float('nan'):.3f})"
              f"   target >= 0.97   {'PASS' if ratio >= 0.97 else 'MISS'}")
        if a.pairs:
            print(f"\n  concurrent A/B: jobnet and hand-vxlan streams at the same time ({a.seconds:g} s, {a.pairs} x): "
                  "both see the same load from other work, so their ratio does not drift with it")
            pair_ratios = []
            for r in range(a.pairs):
                order_ab = ["jobnet", "hand-vxlan"] if r % 2 == 0 else ["hand-vxlan", "jobnet"]
                try:
                    res = dict(zip(order_ab, iperf_many([paths[k] for k in order_ab], a.seconds), strict=True))
                except RuntimeError as e:
                    failures.append(f"pair {r + 1}: {e}")
                    print("  FAILED:", failures[-1])
                    continue
                pair_ratios.append(res["jobnet"]["gbps"] / res["hand-vxlan"]["gbps"])
                print(f"  pair {r + 1}/{a.pairs}: jobnet {res['jobnet']['gbps']:.2f}, hand-vxlan "
                      f"{res['hand-vxlan']['gbps']:.2f} Gbit/s, ratio {pair_ratios[-1]:.3f}; loadavg {loadavg()}")
            if pair_ratios:
                pr = statistics.median(pair_ratios)
                print(f"  concurrent jobnet / hand-vxlan, median of {len(pair_ratios)} = {pr:.3f}   target >= 0.97   "
                      f"{'PASS' if pr >= 0.97 else 'MISS'}")
        print(f"\n  jobnet / underlay     = {med['jobnet'] / med['underlay']:.3f}")
        print(f"  hand-vxlan / underlay = {med['hand-vxlan'] / med['underlay']:.3f}")
        print(f"  failed runs (retried once): {len(failures)}")
        print(f"  loadavg at the end: {loadavg()}")
        return 0
    finally:
        with contextlib.suppress(Exception):
            remove_hand_vxlan(lab, made)
        lab.down()


if __name__ == "__main__":
    sys.exit(main())
