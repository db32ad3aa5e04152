"""Overlay throughput: jobnet's job-to-job path across two lab nodes, beside the same path built by hand
with `ip` (same kernel, same topology) and the plain underlay veth, all in one run.

    python -m bench.overlay_throughput [--seconds 5] [--repeat 3]

Paths measured (iperf3, one TCP stream, offloads left on, median of --repeat runs):
  underlay   node n1 -> node n2 over their underlay veths and the lab's underlay bridge
  hand-vxlan job-like netns -> veth -> bridge -> vxlan (VNI 4242, port 4789) -> underlay -> ... built by hand
  jobnet     a jobnet job on n1 -> a jobnet job on n2 (same group)
Target: jobnet >= 0.97 x hand-vxlan (jobnet adds nothing to the data path).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from deploy.lab import Lab, wait_running
from protos.jobnet.v1 import jobnet_pb2 as pb

HAND_VNI = 4242


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def iperf(server_ns: str, client_ns: str, ip: str, seconds: float) -> float:
    """Gbit/s of one TCP stream from client_ns to a server in server_ns (both netns file paths)."""
    srv = subprocess.Popen(["nsenter", f"--net={server_ns}", "iperf3", "-s", "-1", "-p", "5301"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        out = subprocess.run(["nsenter", f"--net={client_ns}", "iperf3", "-c", ip, "-p", "5301", "-t",
                              str(seconds), "-J"], capture_output=True, text=True, timeout=seconds + 30)
        data = json.loads(out.stdout)
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        srv.kill()
        srv.wait()


def hand_vxlan(lab: Lab, mtu: int) -> list[str]:
    """Build, by hand, the same data path jobnet builds: in each node netns a bridge + vxlan, and a veth
    to a job-like netns. Returns the netns names to delete afterwards."""
    made = []
    for i, node in enumerate(("n1", "n2"), start=1):
        node_ns = lab.ns(node)
        job_ns = f"{lab.name}-h{i}"
        sh("ip", "netns", "add", job_ns)
        made.append(job_ns)
        peer = lab.underlay_ip("n2" if node == "n1" else "n1")
        run = ["ip", "-n", node_ns]
        sh(*run, "link", "add", "jnhbr", "type", "bridge", "stp_state", "0", "forward_delay", "0",
           "mcast_snooping", "0")
        sh(*run, "link", "add", "jnhvx", "type", "vxlan", "id", str(HAND_VNI), "dstport", "4789", "local",
           lab.underlay_ip(node), "dev", "jnul0", "nolearning")
        sh(*run, "link", "set", "jnhvx", "mtu", str(mtu), "master", "jnhbr", "up")
        sh(*run, "link", "set", "jnhbr", "mtu", str(mtu), "up")
        sh("bridge", "-n", node_ns, "fdb", "append", "00:00:00:00:00:00", "dev", "jnhvx", "dst", peer)
        sh(*run, "link", "add", "jnhv", "mtu", str(mtu), "type", "veth", "peer", "name", "eth0", "netns", job_ns)
        sh(*run, "link", "set", "jnhv", "master", "jnhbr", "up")
        sh("ip", "-n", job_ns, "link", "set", "lo", "up")
        sh("ip", "-n", job_ns, "link", "set", "eth0", "mtu", str(mtu), "up")
        sh("ip", "-n", job_ns, "addr", "add", f"10.254.0.{i}/24", "dev", "eth0")
    return made


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    lab = Lab(name="jnbench", nodes=2, dir=Path("/run/jobnet/bench-overlay"))
    made: list[str] = []
    try:
        lab.up()
        stub = lab.stub()
        g = stub.CreateGroup(pb.CreateGroupRequest(name="bench"))
        j1 = stub.CreateJob(pb.CreateJobRequest(group="bench", node="n1", command=["sleep", "3600"]))
        j2 = stub.CreateJob(pb.CreateJobRequest(group="bench", node="n2", command=["sleep", "3600"]))
        wait_running(lab, [j1.id, j2.id])
        made = hand_vxlan(lab, g.mtu)
        paths = {
            "underlay": (f"/run/netns/{lab.ns('n2')}", f"/run/netns/{lab.ns('n1')}", lab.underlay_ip("n2")),
            "hand-vxlan": (f"/run/netns/{made[1]}", f"/run/netns/{made[0]}", "10.254.0.2"),
            "jobnet": (str(lab.job_netns("n2", j2.id)), str(lab.job_netns("n1", j1.id)), j2.ip),
        }
        results: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(a.repeat):  # interleaved, so drift on a shared machine hits every path alike
            for name, (srv, cli, ip) in paths.items():
                results[name].append(iperf(srv, cli, ip, a.seconds))
        med = {k: statistics.median(v) for k, v in results.items()}
        print(f"overlay throughput, iperf3 1 TCP stream, {a.seconds:.0f} s x {a.repeat} (median), MTU {g.mtu}")
        for k, v in results.items():
            print(f"  {k:10} {med[k]:7.2f} Gbit/s   runs: {', '.join(f'{x:.2f}' for x in v)}")
        print(f"  jobnet / hand-vxlan = {med['jobnet'] / med['hand-vxlan']:.3f}   (target >= 0.97)")
        print(f"  jobnet / underlay   = {med['jobnet'] / med['underlay']:.3f}")
        print(f"  hand-vxlan / underlay = {med['hand-vxlan'] / med['underlay']:.3f}")
        return 0
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        lab.down()


if __name__ == "__main__":
    sys.exit(main())
