"""How long the node's netlink work stalls while job namespaces with accounting programs are destroyed.

    python -m bench.teardown_stall [--jobs 100] [--hooks tcx,tc,none]

A tcx attach, detach or uninstall waits for an RCU grace period with the RTNL held; a job namespace whose eth0
carries tcx programs therefore holds the RTNL for two more grace periods when the kernel destroys it, and the
kernel's namespace cleanup does that for every namespace of a batch in a row. Meanwhile every netlink change
on the node waits (a job's setup, the reconciler's fan-out).

Per hook, twice: --jobs job namespaces are made (a veth from a "node" namespace, eth0 up, the product's two
counting programs attached on that hook, as nodeagent.accounting installs them; `none`: no programs), then
released while a probe thread makes one netlink change every 5 ms in the node namespace (a permanent
neighbour entry on lo, replaced) and times each:
  all-at-once  every namespace file removed in a loop (what the agent does: the kernel's cleanup runs later,
               batched)
  paced        one at a time: the host-side veth deleted (synchronously, in this thread), then the namespace
               file removed (the mitigation a releaser thread in the agent could apply)
Printed: how long the release loop took, when the last veth was gone, and the probe's p50 / p99 / max.

Throwaway namespaces `jnts<pid>-node` and `jnts<pid>-j<i>`, removed at the end, also after a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import platform
import statistics
import sys
import threading
import time

CLONE_NEWNET = 0x40000000
NODE_PREFIX = "02:00:00"


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def _enter(name: str) -> None:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(fd)
    finally:
        os.close(fd)


def build(tag: str, n: int, hook: str, own: int) -> list[str]:
    from pyroute2 import IPRoute, netns

    from nodeagent.accounting import NetAccounting

    acct = NetAccounting(hook=hook) if hook != "none" else None
    names = []
    for i in range(n):
        j = f"{tag}-j{i}"
        netns.create(j)
        names.append(j)
        with IPRoute(netns=f"{tag}-node") as ipr:
            ipr.link("add", ifname=f"jntv{i}", kind="veth", peer={"ifname": "eth0", "net_ns_fd": j})
            ipr.link("set", index=ipr.link_lookup(ifname=f"jntv{i}")[0], state="up")
        _enter(j)
        try:
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname="eth0")[0]
                ipr.link("set", index=idx, state="up")
            if acct is not None:  # the product's programs on eth0, as the agent puts them into a spare
                acct.prepare_here(NODE_PREFIX)
        finally:
            _setns(own)
    if acct is not None:
        acct.close()
    return names


def probe(node: str, stop: threading.Event, lat: list[float]) -> None:
    from pyroute2 import IPRoute

    _enter(node)  # this thread only
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        k = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            ipr.neigh("replace", dst=f"10.9.{k % 200}.1", lladdr="02:00:00:00:00:01", ifindex=lo, state=0x80)
            lat.append((time.perf_counter() - t0) * 1000)
            k += 1
            time.sleep(0.005)


def one(tag: str, n: int, hook: str, mode: str, own: int) -> None:
    from pyroute2 import IPRoute, netns

    names = build(tag, n, hook, own)
    stop, lat = threading.Event(), list[float]()
    t = threading.Thread(target=probe, args=(f"{tag}-node", stop, lat))
    t.start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    if mode == "all-at-once":
        for j in names:
            netns.remove(j)
    else:
        with IPRoute(netns=f"{tag}-node") as ipr:
            for i, j in enumerate(names):
                ipr.link("del", index=ipr.link_lookup(ifname=f"jntv{i}")[0])
                netns.remove(j)
    t1 = time.perf_counter()
    with IPRoute(netns=f"{tag}-node") as ipr:
        while any(link.get_attr("IFLA_IFNAME").startswith("jntv") for link in ipr.get_links()):
            time.sleep(0.01)
    t2 = time.perf_counter()
    time.sleep(0.2)
    stop.set()
    t.join()
    lat.sort()
    print(f"  {hook:4} {mode:11}: release loop {1000 * (t1 - t0):6.0f} ms, last veth gone after "
          f"{1000 * (t2 - t0):6.0f} ms; probe netlink change p50 {statistics.median(lat):5.2f}  "
          f"p99 {lat[int(0.99 * (len(lat) - 1))]:7.1f}  max {lat[-1]:7.1f} ms  (n={len(lat)})", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100, help="job namespaces released per measurement")
    ap.add_argument("--hooks", default="tcx,tc,none", help="comma-separated, of tcx, tc, none")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    hooks = a.hooks.split(",")
    if bad := set(hooks) - {"tcx", "tc", "none"}:
        ap.error(f"unknown hooks {sorted(bad)}")
    if not 1 <= a.jobs <= 1000:
        ap.error("--jobs: 1 to 1000")
    from pyroute2 import netns

    from nodeagent.accounting.hooks import tcx_supported

    if "tcx" in hooks and not tcx_supported():
        sys.exit("this kernel has no tcx hooks (Linux 6.6+)")
    tag = f"jnts{os.getpid() % 100000}"
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    print(f"teardown stall: {a.jobs} job namespaces per measurement; kernel {platform.release()}, "
          f"{os.cpu_count()} cpus shared with other work; loadavg {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    try:
        netns.create(f"{tag}-node")
        for hook in hooks:
            for mode in ("all-at-once", "paced"):
                one(tag, a.jobs, hook, mode, own)
    finally:
        _setns(own)
        for name in netns.listnetns():
            if name.startswith(f"{tag}-"):
                with contextlib.suppress(OSError):
                    netns.remove(name)
    print(f"loadavg at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
