"""Convergence: time from a job's registration (CreateJob returns) to its FDB and neighbour entries being
present on every peer node of its group, on a 3-node lab.

    python -m bench.convergence [--jobs 100]

Peers are watched through netlink from inside their node namespaces (polling the neighbour and FDB tables
of the group's VXLAN device every millisecond), so the figure includes the controller's fan-out, the
agents' watch streams and their netlink work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from deploy.lab import Lab, wait_running
from protos.jobnet.v1 import jobnet_pb2 as pb


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


class Watcher(threading.Thread):
    """Polls one node's neigh + fdb tables for the VXLAN device; records when each MAC appears in both."""

    def __init__(self, netns: str, ifname: str) -> None:
        super().__init__(daemon=True)
        self.netns, self.ifname = netns, ifname
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        from pyroute2 import IPRoute

        with IPRoute(netns=self.netns) as ipr:
            idx = None
            while not self.stop.is_set():
                if idx is None:
                    found = ipr.link_lookup(ifname=self.ifname)
                    idx = found[0] if found else None
                    if idx is None:
                        time.sleep(0.001)
                        continue
                now = time.monotonic()
                neigh = {n.get_attr("NDA_LLADDR") for n in ipr.get_neighbours(ifindex=idx, family=2)}
                fdb = {n.get_attr("NDA_LLADDR") for n in ipr.get_neighbours(ifindex=idx, family=7)}
                for mac in neigh & fdb:
                    self.seen.setdefault(mac, now)
                time.sleep(0.001)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    lab = Lab(name="jnconv", nodes=3, dir=Path("/run/jobnet/bench-conv"))
    try:
        lab.up()
        stub: Any = lab.stub()
        g = stub.CreateGroup(pb.CreateGroupRequest(name="conv", prefix_len=22))
        anchors = [stub.CreateJob(pb.CreateJobRequest(group="conv", node=n, command=["sleep", "3600"]))
                   for n in ("n2", "n3")]
        wait_running(lab, [j.id for j in anchors])
        watchers = [Watcher(lab.ns(n), f"jnx{g.vni}") for n in ("n2", "n3")]
        for w in watchers:
            w.start()
        lat: list[float] = []
        for _ in range(a.jobs):
            t0 = time.monotonic()
            j = stub.CreateJob(pb.CreateJobRequest(group="conv", node="n1", command=["sleep", "3600"]))
            deadline = t0 + 10
            while time.monotonic() < deadline and not all(j.mac in w.seen for w in watchers):
                time.sleep(0.0005)
            if not all(j.mac in w.seen for w in watchers):
                print(f"job {j.id}: not converged within 10 s")
                continue
            lat.append((max(w.seen[j.mac] for w in watchers) - t0) * 1000)
        for w in watchers:
            w.stop.set()
        print(f"convergence over {len(lat)} jobs (CreateJob -> FDB+neigh on both peer nodes), ms:")
        print(f"  p50 {pct(lat, 50):.1f}   p90 {pct(lat, 90):.1f}   p99 {pct(lat, 99):.1f}   "
              f"mean {statistics.mean(lat):.1f}   max {max(lat):.1f}")
        return 0
    finally:
        lab.down()


if __name__ == "__main__":
    sys.exit(main())
