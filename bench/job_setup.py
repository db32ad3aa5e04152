"""Per-job network setup and teardown latency: jobnet's reconciler vs the CNI reference plugins
(`bridge` + `host-local`, Debian's containernetworking-plugins) doing the same work in the same run.

    python -m bench.job_setup [--jobs 500] [--rounds 3] [--groups 1] [--deal fill|round-robin]

Throwaway "node" network namespaces, `jnbs<pid>-j` (jobnet) and `jnbs<pid>-c` (CNI), so each side sees
only its own links and the host is untouched. The bench process lives in the jobnet node namespace; a
worker thread entered the CNI one and execs the plugins from there (a child inherits its thread's netns).

  jobnet  one job is added to the desired state and `NetworkReconciler.reconcile(full=False)` runs, the way
          the agent does when a job arrives: network namespace + veth (peer made in the job namespace) +
          bridge port + address, MAC, MTU, default route via the gateway, lo up, IPv6 off, its static
          bridge FDB entry, and a permanent neighbour entry for every peer of its group in its namespace
          (all jobs here are of ONE group: the 500th job gets 499). The same reconcile then spreads the new
          job's own entry into the namespaces of the jobs already there (`last_fan_out_s`: one request
          per namespace, O(group size) by nature). That fan-out is the group's convergence on the node, as
          the remote nodes' entries are (bench/convergence.py), not the work CNI does for a container:
          "setup" below is the job's own network (the reconcile minus the fan-out), and the fan-out and
          the sum are printed next to it. The agent waits for both before it starts the job (a peer
          answering the job never has to ARP for it).
  CNI     the `bridge` plugin (which execs `host-local`) with CNI_COMMAND=ADD for a namespace made
          beforehand: veth + bridge port + IPAM + address, MTU, default route via the gateway. Creating the
          namespace (`ip netns add`) is NOT counted for CNI: conservative for jobnet.
  teardown jobnet: the job removed from the desired state + reconcile (the namespace file unmounted; the
          kernel destroys the namespace and its veth asynchronously). CNI: DEL + unmount/unlink of the netns
          file (in-process, no `ip` exec). After each round the bench waits until every job veth is gone on
          both sides (verifies teardown, and keeps the next round off the kernel's cleanup backlog).

Every round has two ramps, each from an empty bridge, jobs added one at a time:
  A  jobnet alone, 1 -> --jobs live jobs: the node as it would be (only jobnet's jobs, namespaces, veths).
     Setup percentiles and flatness (p50 of the last 50 jobs / the first 50) are taken here.
  B  jobnet and CNI alternating (job i on jobnet, then job i on CNI), so the live jobs on each side grow
     together and noise from other work on the machine hits both alike: the jobnet/CNI ratio is taken here.
Verdicts use the median over rounds of each round's figure.

Groups (`--groups G`, `--deal`): with `fill` (the default) the jobs fill the groups one after the other, so
every window of ~500/G jobs sees its group grow from 1 to full, and the first and the last 50 jobs differ in
the node's live jobs only: what the flatness target is about. With `round-robin` the last 50 jobs join groups
that are nearly full (45-49 peers against 0-4 for the first 50), so the flatness also grows with the group
size: a job's own neighbour entries and the planning of them are O(group) by design (issue 4's permanent
entries for every peer), which `--groups 1` measures on its own.

Drift control: a third node namespace (`jnbs<pid>-k`, its own reconciler and bridge) gets one job added
(timed) and removed at every step of both ramps, so it always has 1 live job. On a machine shared with other
work the load drifts during a ramp; the control sees that drift but not the ramp's bridge ports or its
reconciler's model. "jobnet last/first ÷ control last/first" is therefore a lower bound of what the live
jobs cost (it also divides out their kernel-wide costs, which a real node pays), the plain ratio an upper
bound (it includes the drift). The verdict uses the plain ratio, as the target is stated.

The CNI `bridge` plugin names its host-side veth `veth<random>`; the bench renames it `jncv<i>` right after
ADD (untimed, inside the CNI node namespace) so that every object it leaves in the kernel is `jn`-named.

Targets (issue 2): setup p50 <= 5 ms and <= 0.4 x CNI's; flat: p50 of the last 50 jobs within 20 % of the
first 50 while live jobs grow from 1 to --jobs (500).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

CNI_BIN = Path("/usr/lib/cni")
CLONE_NEWNET = 0x40000000
MNT_DETACH = 2
UNDERLAY_IP = "198.18.0.11"
GATEWAY_C, SUBNET_C = "10.201.0.1", "10.201.0.0/22"
MTU = 1450
MAC_PREFIX = "02:00:00"  # the bench node's MAC prefix (the controller gives each node its own)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def fmt(name: str, xs: list[float]) -> str:
    return (f"  {name:34} p50 {pct(xs, 50):6.2f}  p90 {pct(xs, 90):6.2f}  p99 {pct(xs, 99):6.2f}"
            f"  max {max(xs):6.2f} ms  (n={len(xs)})")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# -- the two sides ---------------------------------------------------------------------------------------


class Jobnet:
    """jobnet's reconciler on one node (the calling thread's network namespace)."""

    def __init__(self, netns_dir: Path, groups: int = 1, spares: int = 2, per_group: int = 0,
                 accounting: str = "off") -> None:
        """`per_group` > 0: jobs fill the groups one after the other, that many each; 0: dealt round robin.
        `accounting` "tcx"/"tc": each job's counting programs as the agent does (NetAccounting.ensure after the
        reconcile, timed apart; spares refilled with the programs installed ahead, untimed)."""
        from nodeagent.desired import DesiredState, GroupSpec
        from nodeagent.kernel.namespaces import tmpfs_for_netns_dir
        from nodeagent.kernel.reconciler import NetSettings, NetworkReconciler

        netns_dir.mkdir(parents=True, exist_ok=True)
        tmpfs_for_netns_dir(netns_dir)  # as jobnet-agent does (--no-netns-tmpfs aside)
        self.rec = NetworkReconciler(NetSettings(netns_dir=netns_dir, underlay_ifname="jnsul",
                                                 underlay_ip=UNDERLAY_IP, spare_namespaces=spares,
                                                 paced_release=accounting == "tcx"))  # as jobnet-agent
        self.refills: list[float] = []
        self.acct: Any = None
        self.acct_ms: list[float] = []
        if accounting != "off":
            from nodeagent.accounting import NetAccounting

            self.acct = NetAccounting(hook=accounting)  # built in the node namespace, as the agent's is
        # Group g: 10.200.<4g>.0/22 on its own bridge.
        self.groups = {f"bench{g}": GroupSpec(f"bench{g}", 4100 + g, f"10.200.{4 * g}.0/22", f"10.200.{4 * g}.1", MTU)
                       for g in range(groups)}
        self.jobs: dict[str, Any] = {}
        self.per_group = per_group
        self.state = DesiredState(1, dict(self.groups), {}, {})
        self.rec.reconcile(self.state, full=True)

    def _publish(self, job_id: str) -> tuple[float, float]:
        """(the job's own network, the group's fan-out) in ms: one reconcile, split by what it did. The state
        names the job it changes, as a delta from the controller does (DesiredState.changes)."""
        from nodeagent.desired import Changes, DesiredState

        state = DesiredState(self.state.revision + 1, dict(self.groups), dict(self.jobs), {},
                             Changes(self.state.revision, frozenset({job_id}), frozenset()))
        t0 = time.perf_counter()
        self.rec.reconcile(state, full=False)
        dt = (time.perf_counter() - t0) * 1000
        self.state = state
        fan = self.rec.last_fan_out_s * 1000
        job = self.jobs.get(job_id)
        if self.acct is not None and job is not None:  # the agent's step before it starts the job
            t1 = time.perf_counter()
            self.acct.ensure(job_id, self.rec.job_netns_path(job_id), job.mac)
            self.acct_ms.append((time.perf_counter() - t1) * 1000)
        prepare = (lambda: self.acct.prepare_here(MAC_PREFIX)) if self.acct is not None else None
        t1 = time.perf_counter()
        if self.rec.refill_spares(prepare=prepare):  # as the agent does after a pass (not counted: off the path)
            self.refills.append((time.perf_counter() - t1) * 1000)
        return dt - fan, fan

    def add(self, r: int, i: int) -> tuple[float, float]:
        """Add job i; returns the reconcile's ms (building the desired state is not counted): the job's own
        network, and the fan-out of its entry into the other jobs of its group."""
        from nodeagent.desired import LocalJob

        jid = f"{r:02x}{i:08x}"
        if self.per_group:  # the groups filled one after the other
            g = min(i // self.per_group, len(self.groups) - 1)
            j = i - g * self.per_group
        else:  # dealt round robin
            g, j = i % len(self.groups), i // len(self.groups)
        ip = f"10.200.{4 * g + (j + 2) // 256}.{(j + 2) % 256}"
        self.jobs[jid] = LocalJob(jid, f"bench{g}", ip, f"{MAC_PREFIX}:{r:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}",
                                  ("true",))
        return self._publish(jid)

    def remove(self) -> tuple[float, float]:
        jid = next(iter(self.jobs))
        del self.jobs[jid]
        if self.acct is not None:
            self.acct.release(jid)
        return self._publish(jid)

    def close(self) -> None:
        from nodeagent.desired import DesiredState

        self.rec.reconcile(DesiredState(self.state.revision + 1), full=True)  # group devices too
        self.rec.close()
        if self.acct is not None:
            self.acct.close()


class Cni:
    """The CNI bridge + host-local plugins, exec'd from a thread that sits in the CNI node namespace."""

    def __init__(self, work: Path, tag: str, node_ns: str) -> None:
        self.tag, self.work = tag, work
        self.conf = json.dumps({
            "cniVersion": "1.0.0", "name": "jnbench", "type": "bridge", "bridge": "jncbr0",
            "isGateway": False, "ipMasq": False, "mtu": MTU,
            "ipam": {"type": "host-local", "subnet": SUBNET_C, "gateway": GATEWAY_C,
                     "routes": [{"dst": "0.0.0.0/0", "gw": GATEWAY_C}], "dataDir": str(work / "cni-ipam")},
        })
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.ex = ThreadPoolExecutor(max_workers=1, initializer=_enter_netns, initargs=(node_ns,))
        self.ex.submit(self._open).result()
        self.live: list[tuple[int, str]] = []

    def _open(self) -> None:
        from pyroute2 import IPRoute

        self.ipr = IPRoute()  # opened in the worker thread: bound to the CNI node namespace

    def _plugin(self, cmd: str, name: str) -> subprocess.CompletedProcess[str]:
        env = {"CNI_COMMAND": cmd, "CNI_CONTAINERID": name, "CNI_NETNS": f"/run/netns/{name}",
               "CNI_IFNAME": "eth0", "CNI_PATH": str(CNI_BIN), "PATH": os.environ["PATH"]}
        r = subprocess.run([str(CNI_BIN / "bridge")], input=self.conf, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"CNI {cmd} {name} failed: {r.stdout} {r.stderr}")
        return r

    def _add(self, i: int) -> float:
        name = f"{self.tag}c{i}"
        subprocess.run(["ip", "netns", "add", name], check=True)  # untimed
        self.live.append((i, name))
        t0 = time.perf_counter()
        r = self._plugin("ADD", name)
        dt = (time.perf_counter() - t0) * 1000
        res = json.loads(r.stdout)
        host = next(x["name"] for x in res["interfaces"] if "sandbox" not in x and x["name"] != "jncbr0")
        idx = self.ipr.link_lookup(ifname=host)[0]  # untimed: give the host veth a jn name
        self.ipr.link("set", index=idx, state="down")
        self.ipr.link("set", index=idx, ifname=f"jncv{i}")
        self.ipr.link("set", index=idx, state="up")
        return dt

    def _remove(self) -> tuple[float, float]:
        _, name = self.live.pop(0)
        t0 = time.perf_counter()
        self._plugin("DEL", name)
        t1 = time.perf_counter()
        path = f"/run/netns/{name}".encode()
        if self.libc.umount2(path, MNT_DETACH) != 0:
            raise OSError(ctypes.get_errno(), f"umount {path!r}")
        os.unlink(path)
        t2 = time.perf_counter()
        return (t1 - t0) * 1000, (t2 - t0) * 1000

    def _veths(self) -> int:
        return sum(1 for link in self.ipr.get_links() if link.get_attr("IFLA_IFNAME").startswith("jncv"))

    def add(self, i: int) -> float:
        return self.ex.submit(self._add, i).result()

    def remove(self) -> tuple[float, float]:
        return self.ex.submit(self._remove).result()

    def veths(self) -> int:
        return self.ex.submit(self._veths).result()

    def close(self) -> None:
        def done() -> None:
            with contextlib.suppress(Exception):
                self.ipr.link("del", ifname="jncbr0")
            self.ipr.close()

        self.ex.submit(done).result()
        self.ex.shutdown()


def node_setup() -> None:
    """lo up and an underlay device (a veth: this kernel has no dummy driver) in the calling thread's netns."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        ipr.link("add", ifname="jnsul", kind="veth", peer="jnsulp")
        idx = ipr.link_lookup(ifname="jnsul")[0]
        ipr.addr("add", index=idx, address=UNDERLAY_IP, prefixlen=24)
        ipr.link("set", index=idx, state="up")


class Control:
    """The drift control: a second jobnet node (its own node namespace, reconciler and bridge) that gets one
    job added and removed at every step of the ramp, so it always has 1 live job. Machine-wide drift (other
    work, the kernel's global state) reaches it as it reaches the ramp; the ramp's own live jobs do not."""

    def __init__(self, netns_dir: Path, node_ns: str) -> None:
        self.ex = ThreadPoolExecutor(max_workers=1, initializer=_enter_netns, initargs=(node_ns,))
        self.ex.submit(self._open, netns_dir).result()

    def _open(self, netns_dir: Path) -> None:
        node_setup()
        self.jn = Jobnet(netns_dir)

    def _cycle(self, r: int, i: int) -> float:
        own, _ = self.jn.add(r, i)  # (1 live job: no peer, no fan-out)
        self.jn.remove()
        return own

    def cycle(self, r: int, i: int) -> float:
        """Add one job (timed, as the ramp's), then remove it."""
        return self.ex.submit(self._cycle, r, i).result()

    def close(self) -> None:
        self.ex.submit(self.jn.close).result()
        self.ex.shutdown()


def _enter_netns(node_ns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{node_ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {node_ns}")
    finally:
        os.close(fd)


def jobnet_veths() -> int:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return sum(1 for link in ipr.get_links() if link.get_attr("IFLA_IFNAME").startswith("jnv"))


def wait_gone(cni: Cni | None, timeout: float = 30.0) -> float:
    t0 = time.monotonic()
    while jobnet_veths() or (cni is not None and cni.veths()):
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"job veths left after {timeout} s: jobnet {jobnet_veths()}, "
                               f"CNI {cni.veths() if cni else 0}")
        time.sleep(0.01)
    return time.monotonic() - t0


# -- the run ---------------------------------------------------------------------------------------------


def one_round(r: int, n: int, work: Path, tag: str, ctl: Control, groups: int = 1,
              fill: bool = False, accounting: str = "off") -> dict[str, Any]:
    """Phase A: jobnet alone (the node has only jobnet's jobs), with the control. Phase B: jobnet and CNI
    alternating, with the control."""
    keys = ("a_setup", "a_fan", "a_ctl", "a_down", "a_dfan", "j_setup", "j_fan", "c_setup", "k_setup", "j_down",
            "c_del", "c_down")
    out: dict[str, Any] = {k: [] for k in keys}
    load0 = loadavg()
    jn = Jobnet(work / "netns", groups, per_group=-(-n // groups) if fill else 0, accounting=accounting)
    try:
        gc.collect()
        for i in range(n):
            own, fan = jn.add(r, i)
            out["a_setup"].append(own)
            out["a_fan"].append(fan)
            out["a_ctl"].append(ctl.cycle(r, i))
        for _ in range(n):
            own, fan = jn.remove()
            out["a_down"].append(own)
            out["a_dfan"].append(fan)
        jn.rec.wait_released(120)
        out["a_gone_s"] = wait_gone(None)
        out["a_acct"], out["a_refill"] = jn.acct_ms, jn.refills
    finally:
        jn.close()
    jn = Jobnet(work / "netns", groups, per_group=-(-n // groups) if fill else 0)
    cni = Cni(work, tag, f"{tag}-c")
    try:
        gc.collect()
        for i in range(n):
            own, fan = jn.add(r + 0x80, i)
            out["j_setup"].append(own)
            out["j_fan"].append(fan)
            out["c_setup"].append(cni.add(i))
            out["k_setup"].append(ctl.cycle(r + 0x80, i))
        for _ in range(n):
            out["j_down"].append(jn.remove()[0])
            d, t = cni.remove()
            out["c_del"].append(d)
            out["c_down"].append(t)
        out["gone_s"] = wait_gone(cni)
    finally:
        out["load"] = f"{load0} -> {loadavg()}"
        jn.close()
        cni.close()
    return out


def summary(o: dict[str, Any], k: int) -> dict[str, float]:
    def flat(xs: list[float]) -> float:
        return pct(xs[-k:], 50) / pct(xs[:k], 50)

    a, js, cs = o["a_setup"], o["j_setup"], o["c_setup"]
    tot = [x + y for x, y in zip(a, o["a_fan"], strict=True)]
    return {"a50": pct(a, 50), "a90": pct(a, 90), "a99": pct(a, 99), "aflat": flat(a), "akflat": flat(o["a_ctl"]),
            "fan_first": pct(o["a_fan"][:k], 50), "fan_last": pct(o["a_fan"][-k:], 50), "tot50": pct(tot, 50),
            "tot_first": pct(tot[:k], 50), "tot_last": pct(tot[-k:], 50),
            "aadj": flat(a) / flat(o["a_ctl"]), "ad50": pct(o["a_down"], 50),
            "j50": pct(js, 50), "c50": pct(cs, 50), "ratio": pct(js, 50) / pct(cs, 50), "flat": flat(js),
            "kflat": flat(o["k_setup"]), "cflat": flat(cs), "jd50": pct(o["j_down"], 50), "cd50": pct(o["c_down"], 50)}


def inner(n: int, rounds: int, work: Path, tag: str, groups: int = 1, fill: bool = False,
          accounting: str = "off") -> int:
    node_setup()
    ctl = Control(work / "netns-k", f"{tag}-k")
    try:
        return report(n, rounds, work, tag, ctl, groups, fill, accounting)
    finally:
        ctl.close()


def report(n: int, rounds: int, work: Path, tag: str, ctl: Control, groups: int = 1, fill: bool = False,
           accounting: str = "off") -> int:
    shape = "in ONE group (one bridge)" if groups == 1 else (
        f"in {groups} groups of ~{n // groups} (a bridge each), "
        + ("filled one group after the other" if fill else "dealt round robin"))
    print(f"per-job network setup/teardown: {n} jobnet jobs {shape}, {n} CNI containers on one bridge, "
          f"{rounds} round(s); kernel "
          f"{platform.release()}, {os.cpu_count()} cpus shared with other work, python "
          f"{platform.python_version()}, CNI plugins {cni_version()}; loadavg {loadavg()}")
    k = min(50, n // 4)
    allr: list[dict[str, Any]] = []
    sums: list[dict[str, float]] = []

    def ramp(o: dict[str, Any], key: str, label: str) -> None:
        print(fmt(label, o[key]))
        for lo in range(0, n, 100):
            print(fmt(f"  step {lo + 1}-{min(n, lo + 100)}", o[key][lo:lo + 100]))

    for r in range(rounds):
        o = one_round(r, n, work, tag, ctl, groups, fill, accounting)
        allr.append(o)
        s = summary(o, k)
        sums.append(s)
        print(f"\n round {r + 1}/{rounds} (loadavg {o['load']}), ms")
        print(" A: jobnet alone")
        ramp(o, "a_setup", "jobnet setup (the job's own network)")
        ramp(o, "a_fan", "+ fan-out into its group's jobs")
        ramp(o, "a_ctl", "control: jobnet setup, 1 live job")
        print(fmt("jobnet teardown", o["a_down"]))
        print(fmt("+ fan-out (its entry out of the others)", o["a_dfan"]))
        print(f"  all job veths gone {o['a_gone_s'] * 1000:.0f} ms after the last teardown returned")
        print(f"  p50 last {k} / first {k}: jobnet {s['aflat']:.3f}, control {s['akflat']:.3f}; "
              f"jobnet / control {s['aadj']:.3f}")
        print(f"  own network + fan-out, p50 first {k} / last {k}: {s['tot_first']:.2f} / {s['tot_last']:.2f} ms "
              f"(fan-out alone {s['fan_first']:.2f} / {s['fan_last']:.2f} ms)")
        if o["a_acct"]:
            with_acct = [x + y for x, y in zip(o["a_setup"], o["a_acct"], strict=True)]
            ramp(o, "a_acct", f"+ accounting ({accounting}), ensure")
            print(fmt("= setup with accounting", with_acct))
            print(fmt("spare refill with the programs", o["a_refill"]) + "  (after the pass, off the job's path)")
            wflat = pct(with_acct[-k:], 50) / pct(with_acct[:k], 50)
            print(f"  setup with accounting, p50 last {k} / first {k}: {wflat:.3f}")
        print(" B: jobnet and CNI alternating")
        ramp(o, "j_setup", "jobnet setup")
        ramp(o, "c_setup", "CNI bridge+host-local ADD")
        print(fmt("control: jobnet setup, 1 live job", o["k_setup"]))
        print(fmt("jobnet teardown", o["j_down"]))
        print(fmt("CNI DEL", o["c_del"]))
        print(fmt("CNI DEL + netns unmount/unlink", o["c_down"]))
        print(f"  all job veths gone {o['gone_s'] * 1000:.0f} ms after the last teardown returned")
        print(f"  setup p50 jobnet/CNI = {s['ratio']:.3f}; p50 last {k} / first {k}: jobnet {s['flat']:.3f}, "
              f"CNI {s['cflat']:.3f}, control {s['kflat']:.3f}")

    def pooled(key: str) -> list[float]:
        return [x for o in allr for x in o[key]]

    def med(key: str) -> float:
        return statistics.median(s[key] for s in sums)

    def each(key: str, f: str) -> str:
        return ", ".join(format(s[key], f) for s in sums)

    print(f"\nall rounds pooled ({rounds} x {n} jobs per side), ms")
    print(fmt("A jobnet setup", pooled("a_setup")))
    print(fmt("A control: jobnet setup, 1 live job", pooled("a_ctl")))
    print(fmt("A jobnet teardown", pooled("a_down")))
    print(fmt("B jobnet setup", pooled("j_setup")))
    print(fmt("B CNI bridge+host-local ADD", pooled("c_setup")))
    print(fmt("B jobnet teardown", pooled("j_down")))
    print(fmt("B CNI DEL + netns unmount/unlink", pooled("c_down")))
    print(f"\nper round: A jobnet p50 {each('a50', '.2f')}, flatness {each('aflat', '.3f')}, control "
          f"{each('akflat', '.3f')}; B jobnet p50 {each('j50', '.2f')}, CNI p50 {each('c50', '.2f')}, ratio "
          f"{each('ratio', '.3f')}, flatness jobnet {each('flat', '.3f')}, CNI {each('cflat', '.3f')}, control "
          f"{each('kflat', '.3f')}")
    a50, ratio, flat, adj = med("a50"), med("ratio"), med("aflat"), med("aadj")
    print(f"\nresults (median over {rounds} rounds of each round's figure):")
    print(f"  A setup p50 jobnet (p90 {med('a90'):.2f}, p99 {med('a99'):.2f})  {a50:6.2f} ms   target <= 5 ms"
          f"           {verdict(a50 <= 5)}")
    print(f"  A flat: p50 last/first {k}                {flat:6.3f}      target within 1 +- 0.20  "
          f"{verdict(abs(flat - 1) <= 0.20)}")
    print(f"  A same ÷ the control's {med('akflat'):.3f}             {adj:6.3f}      lower bound, not the verdict: "
          f"{'within' if abs(adj - 1) <= 0.20 else 'outside'} 1 +- 0.20")
    print(f"  A own network + fan-out p50 {med('tot50'):.2f} ms: first {k} {med('tot_first'):.2f}, last {k} "
          f"{med('tot_last'):.2f} (fan-out {med('fan_first'):.2f} -> {med('fan_last'):.2f} ms; not in the verdicts)")
    print(f"  B setup p50 jobnet {med('j50'):.2f} ms, CNI {med('c50'):.2f} ms, ratio {ratio:6.3f}   target <= 0.40"
          f"           {verdict(ratio <= 0.40)}")
    print(f"  teardown p50 jobnet {med('ad50'):.3f} ms (B: {med('jd50'):.3f}), CNI DEL + netns {med('cd50'):.2f} ms "
          f"(no target)")
    print(f"loadavg at the end: {loadavg()}")
    return 0


def cni_version() -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "containernetworking-plugins"], capture_output=True,
                       text=True)
    return r.stdout.strip() or "?"


def cleanup(tag: str, work: Path) -> None:
    """Everything this run may have left, by its own names."""
    for d in (work / "netns", work / "netns-k"):
        for f in d.glob("*") if d.is_dir() else []:
            subprocess.run(["umount", "-l", str(f)], check=False, capture_output=True)
        if d.is_dir():  # the tmpfs the bench put there, as the agent does
            subprocess.run(["umount", "-l", str(d)], check=False, capture_output=True)
    for f in Path("/run/netns").glob(f"{tag}c*"):
        subprocess.run(["umount", "-l", str(f)], check=False, capture_output=True)
        with contextlib.suppress(OSError):
            f.unlink()
    for ns in (f"{tag}-j", f"{tag}-c", f"{tag}-k"):
        if (Path("/run/netns") / ns).exists():
            subprocess.run(["ip", "netns", "del", ns], check=False)
    shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=500, help="live jobs per side at the top of the ramp")
    ap.add_argument("--rounds", type=int, default=3, help="ramps, each from an empty bridge")
    ap.add_argument("--groups", type=int, default=1,
                    help="jobnet's jobs go into this many groups (a bridge and a /22 each; see --deal); 1: all "
                         "jobs in ONE group, the worst case for the neighbour entries (the 500th job of a group "
                         "gets 499 and is written into 499 namespaces)")
    ap.add_argument("--deal", choices=["fill", "round-robin"], default="fill",
                    help="with --groups > 1: fill the groups one after the other (default: every window of jobs "
                         "sees groups growing from 1 to their size, so the first and the last 50 jobs differ only "
                         "in the node's live jobs), or deal the jobs round robin (the last jobs join groups that "
                         "are nearly full: the flatness then also measures the group's size, which the job's own "
                         "neighbour entries grow with)")
    ap.add_argument("--accounting", choices=["off", "tcx", "tc"], default="off",
                    help="ramp A only: also each job's accounting programs, as the agent installs them (in the "
                         "spare namespaces ahead of time, verified by NetAccounting.ensure before the job starts); "
                         "timed apart from the setup, whose targets stay the issue's like-for-like comparison")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tag", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inner:
        return inner(a.jobs, a.rounds, Path(f"/run/jobnet/bench-setup-{a.tag}"), a.tag, a.groups, a.deal == "fill",
                     a.accounting)
    if os.geteuid() != 0:
        sys.exit("run as root")
    if a.jobs > 1000 * a.groups:
        sys.exit("--jobs: at most 1000 per group (the /22 subnets)")
    if not 1 <= a.groups <= 63:
        sys.exit("--groups: 1 to 63")
    tag = f"jnbs{os.getpid()}"
    work = Path(f"/run/jobnet/bench-setup-{tag}")
    work.mkdir(parents=True)
    try:
        for ns in (f"{tag}-j", f"{tag}-c", f"{tag}-k"):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        root = Path(__file__).resolve().parent.parent
        return subprocess.run([sys.executable, "-m", "deploy.lab", "_nsexec", f"/run/netns/{tag}-j", "--",
                               sys.executable, "-m", "bench.job_setup", "--inner", "--tag", tag,
                               "--jobs", str(a.jobs), "--rounds", str(a.rounds), "--groups", str(a.groups),
                               "--deal", a.deal, "--accounting", a.accounting],
                              cwd=root).returncode
    finally:
        cleanup(tag, work)


if __name__ == "__main__":
    sys.exit(main())
