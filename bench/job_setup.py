"""Per-job network setup and teardown latency: jobnet's reconciler vs the CNI reference plugins
(`bridge` + `host-local`, Debian's containernetworking-plugins) doing the same work in the same run.

    python -m bench.job_setup [--jobs 500]

Everything runs inside a throwaway "node" network namespace (jnbs-node) with a dummy underlay device, so
the host is untouched. jobnet: one job is added to the desired state and `NetworkReconciler.reconcile`
runs (network namespace + veth with its peer created in the job namespace + bridge port + address, MAC,
MTU, default route, IPv6 off), the way the agent does it when a job arrives. CNI: the plugin binary is
exec'd with CNI_COMMAND=ADD for a namespace that already exists (its creation is NOT counted for CNI, so
the comparison is conservative for jobnet). Teardown: removing the job from the desired state vs CNI DEL
plus deleting the namespace.

Targets (issue 2): setup p50 <= 5 ms and <= 0.4 x CNI's; flat: p50 of the last 50 jobs within 20 % of
the first 50 while live jobs grow from 1 to --jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

NODE_NS = "jnbs-node"
WORK = Path("/run/jobnet/bench-setup")
CNI_BIN = Path("/usr/lib/cni")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def fmt(name: str, xs: list[float]) -> str:
    return (f"  {name:28} p50 {pct(xs, 50):6.2f}  p90 {pct(xs, 90):6.2f}  p99 {pct(xs, 99):6.2f} ms"
            f"  (n={len(xs)})")


def run_jobnet(n: int) -> tuple[list[float], list[float]]:
    from nodeagent.desired import DesiredState, GroupSpec, LocalJob
    from nodeagent.kernel.reconciler import NetSettings, NetworkReconciler

    rec = NetworkReconciler(NetSettings(netns_dir=WORK / "netns", underlay_ifname="jnbs-ul",
                                        underlay_ip="198.18.0.11"))
    group = GroupSpec("bench", 4100, "10.200.0.0/22", "10.200.0.1", 1450)
    jobs: dict[str, LocalJob] = {}
    state = DesiredState(1, {"bench": group}, {}, {})
    rec.reconcile(state, full=True)
    setup, teardown = [], []
    for i in range(n):
        jid = f"{i:010x}"
        ip = f"10.200.{(i + 2) // 256}.{(i + 2) % 256}"
        jobs[jid] = LocalJob(jid, "bench", ip, f"02:00:00:00:{(i >> 8) & 255:02x}:{i & 255:02x}", ("true",))
        state = DesiredState(state.revision + 1, {"bench": group}, dict(jobs), {})
        t0 = time.perf_counter()
        rec.reconcile(state, full=False)
        setup.append((time.perf_counter() - t0) * 1000)
    for jid in list(jobs):
        del jobs[jid]
        state = DesiredState(state.revision + 1, {"bench": group} if jobs else {}, dict(jobs), {})
        t0 = time.perf_counter()
        rec.reconcile(state, full=False)
        teardown.append((time.perf_counter() - t0) * 1000)
    rec.reconcile(DesiredState(state.revision + 1), full=True)
    rec.close()
    return setup, teardown


def run_cni(n: int) -> tuple[list[float], list[float]]:
    conf = json.dumps({
        "cniVersion": "1.0.0", "name": "jnbench", "type": "bridge", "bridge": "jnbscni0",
        "isGateway": False, "ipMasq": False, "mtu": 1450,
        "ipam": {"type": "host-local", "subnet": "10.201.0.0/22", "dataDir": str(WORK / "cni-ipam")},
    })
    nsdir = WORK / "cni-netns"
    nsdir.mkdir(parents=True, exist_ok=True)
    setup, teardown = [], []
    names = []
    for i in range(n):
        name = f"jnbs-c{i}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        names.append(name)
        env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": name, "CNI_NETNS": f"/run/netns/{name}",
               "CNI_IFNAME": "eth0", "CNI_PATH": str(CNI_BIN), "PATH": os.environ["PATH"]}
        t0 = time.perf_counter()
        r = subprocess.run([str(CNI_BIN / "bridge")], input=conf, env=env, capture_output=True, text=True)
        setup.append((time.perf_counter() - t0) * 1000)
        if r.returncode != 0:
            raise RuntimeError(f"CNI ADD failed: {r.stdout} {r.stderr}")
    for name in names:
        env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": name, "CNI_NETNS": f"/run/netns/{name}",
               "CNI_IFNAME": "eth0", "CNI_PATH": str(CNI_BIN), "PATH": os.environ["PATH"]}
        t0 = time.perf_counter()
        subprocess.run([str(CNI_BIN / "bridge")], input=conf, env=env, capture_output=True, check=True)
        subprocess.run(["ip", "netns", "del", name], check=True)
        teardown.append((time.perf_counter() - t0) * 1000)
    return setup, teardown


def inner(n: int) -> int:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        ipr.link("add", ifname="jnbs-ul", kind="dummy")
        idx = ipr.link_lookup(ifname="jnbs-ul")[0]
        ipr.addr("add", index=idx, address="198.18.0.11", prefixlen=24)
        ipr.link("set", index=idx, state="up")
    j_setup, j_down = run_jobnet(n)
    c_setup, c_down = run_cni(n)
    k = min(50, n // 4)
    print(f"per-job network setup/teardown, {n} jobs on one bridge, ms")
    print(fmt("jobnet setup", j_setup))
    print(fmt("jobnet setup, first jobs", j_setup[:k]))
    print(fmt("jobnet setup, last jobs", j_setup[-k:]))
    print(fmt("CNI bridge+host-local ADD", c_setup))
    print(fmt("jobnet teardown", j_down))
    print(fmt("CNI DEL + netns delete", c_down))
    print(f"  setup p50 ratio jobnet/CNI = {pct(j_setup, 50) / pct(c_setup, 50):.2f}   (target <= 0.40)")
    print(f"  flatness: p50 last {k} / first {k} = {pct(j_setup[-k:], 50) / pct(j_setup[:k], 50):.2f}"
          f"   (target within 1.20)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inner:
        return inner(a.jobs)
    if os.geteuid() != 0:
        sys.exit("run as root")
    WORK.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ip", "netns", "add", NODE_NS], check=True)
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run([sys.executable, "-m", "deploy.lab", "_nsexec", f"/run/netns/{NODE_NS}", "--",
                               sys.executable, "-m", "bench.job_setup", "--inner", "--jobs", str(a.jobs)],
                              cwd=root).returncode
    finally:
        for f in (WORK / "netns").glob("*") if (WORK / "netns").is_dir() else []:
            subprocess.run(["umount", "-l", str(f)], check=False, capture_output=True)
        for f in Path("/run/netns").glob("jnbs-c*"):
            subprocess.run(["ip", "netns", "del", f.name], check=False)
        subprocess.run(["ip", "netns", "del", NODE_NS], check=False)
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
