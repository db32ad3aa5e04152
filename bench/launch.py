"""Job launch latency to the job's first instruction inside full isolation, throughput with many live jobs,
and teardown, for jobnet and, in the same run, the peers doing the same work (CNI `bridge` + `host-local`
ADD, then `crun run` of an OCI bundle with the same rootfs).

    python -m bench.launch [--jobs 200] [--live 500] [--gap-ms 10] [--skip-peers]

Isolation of every job, both sides: its own network namespace with a veth on a bridge (address, MAC, MTU,
route), mount namespace, PID namespace, a cgroup, pivot_root into a minimal read-only busybox rootfs with
/proc, /dev, /dev/shm, /sys, /tmp, /var/tmp and /scratch mounted in it, uid/gid 65534, every capability set
empty, no_new_privs.

How "first instruction" is measured. The job command is a 165-byte (174 with pause) static x86-64 ELF this
bench writes into the rootfs (hand-assembled: no libc, no dynamic loader). Its very first instruction is the
clock_gettime(CLOCK_MONOTONIC) system call; it writes the 16-byte timespec to its stdout (a file in the job's
scratch dir for jobnet, a file given to `crun run -d` for crun) and then exits, or waits in pause() for the live-jobs
phase. The bench takes t0 = time.monotonic() (the same clock: neither side uses a time namespace) just
before the request and reads the stamp whenever it likes afterwards, so the figure does not depend on how
or when the bench observes it (no polling, inotify or python start-up inside the measured interval).

What is timed:
  jobnet  request = adding the job to the desired state and `NetworkReconciler.reconcile(full=False)`
          (namespace, veth, bridge port, address, route) then `JobRuntime.start()` (mount/PID ns, cgroup,
          pivot_root, barrier, privilege drop, exec); latency = stamp - t0. Also printed: the network step,
          start() alone, and which launches went through a warm slot (pre-forked init in a pre-made cgroup)
          or a spare network namespace (refilled between launches one at a time, as the agent does after
          every pass; not between launches back to back).
  peers   CNI ADD of the `bridge` plugin (which execs `host-local`) for a namespace made beforehand, then
          `crun run -d` of a bundle whose config joins that namespace; latency = stamp - t0 (end to end)
          and the CNI ADD and crun parts separately. NOT counted for the peers (conservative for jobnet):
          creating the network namespace (`ip netns add`), writing config.json, making the scratch dirs.
          crun runs in one long-lived private mount namespace with /sys/fs/cgroup/unified unmounted (Debian's
          crun 1.8.1 refuses a hybrid cgroup layout otherwise): set up once, not per job.
  teardown jobnet: `JobRuntime.stop(job, 0)` + `cleanup(job)` (returns once the init is dead and the
          cgroup removed), then the job's removal from the desired state + reconcile (netns unmounted).
          peers: `crun delete -f` + CNI DEL + unmount and unlink of the netns file.
          Then the kernel objects are polled until gone (max 1 s): the job's processes (pid + start time),
          its mount, PID and network namespaces (no process refers to their inodes any more), its cgroup
          directories in every hierarchy, the netns bind mount, the host-side veth (it disappears only when
          the kernel has destroyed the network namespace), and the job's scratch/state dirs.
  live    --live jobs launched back to back and left running (pause): jobs/s over the whole ramp and over
          its last fifth, latency percentiles under that load, then all torn down and verified gone.

Everything runs in a throwaway node network namespace (jnlt-node, a veth jnlt-ul as the underlay); cgroups under
jn-bench-<pid> and jn-bench-crun-<pid>; files under /var/lib/jn-bench-launch and /run/jn-bench-launch; all
removed at the end, also after a failure. Targets (issue 3): jobnet p50 <= 8 ms and <= 0.45 x (CNI ADD p50 +
crun run p50); teardown <= 2 ms with the objects verified gone within 1 s.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import platform
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NODE_NS = "jnlt-node"
WORK = Path("/var/lib/jn-bench-launch")  # rootfs, bundles, state, scratch (not under /tmp: jobs get their own)
RUN = Path("/run/jn-bench-launch")  # network namespace files, crun state
CNI_BIN = Path("/usr/lib/cni")
UNIFIED = Path("/sys/fs/cgroup/unified")
PROBE = "/bin/jnprobe"  # stamp, exit
PROBE_PAUSE = "/bin/jnprobe-pause"  # stamp, pause() forever
APPLETS = ("sh", "cat", "ls", "echo", "sleep", "id")
MNT_DETACH = 2
PR_SET_CHILD_SUBREAPER = 36
GONE_TIMEOUT_S = 1.0


# -- the probe -------------------------------------------------------------------------------------------


def probe_elf(pause: bool) -> bytes:
    """A static x86-64 ELF: clock_gettime(CLOCK_MONOTONIC, sp) first, write(1, sp, 16), then exit_group(0)
    or pause() in a loop."""
    code = bytes.fromhex(
        "b8e4000000"  # mov eax, 228 (clock_gettime)
        "bf01000000"  # mov edi, 1 (CLOCK_MONOTONIC)
        "4883ec10"  # sub rsp, 16
        "4889e6"  # mov rsi, rsp
        "0f05"  # syscall
        "b801000000"  # mov eax, 1 (write)
        "bf01000000"  # mov edi, 1 (stdout)
        "ba10000000"  # mov edx, 16
        "0f05"  # syscall
    )
    if pause:
        code += bytes.fromhex("b822000000" "0f05" "ebf7")  # mov eax, 34 (pause); syscall; jmp back
    code += bytes.fromhex("b8e7000000" "31ff" "0f05")  # mov eax, 231 (exit_group); xor edi, edi; syscall
    base, off = 0x400000, 64 + 56
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, base + off, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, off + len(code), off + len(code), 0x1000)
    return ehdr + phdr + code


def make_rootfs(root: Path) -> None:
    """busybox-static with a few applets, the two probes, and the mount points both runtimes need."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/usr/bin/busybox", root / "bin" / "busybox")
    for a in APPLETS:
        (root / "bin" / a).symlink_to("busybox")
    for path, pause in ((PROBE, False), (PROBE_PAUSE, True)):
        p = root / path.lstrip("/")
        p.write_bytes(probe_elf(pause))
        p.chmod(0o755)
    for d in ("proc", "dev", "sys", "tmp", "var/tmp", "scratch", "etc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for p in (root, *root.parents):
        if p == Path("/"):
            break
        p.chmod(p.stat().st_mode | 0o755)


def read_stamp(path: Path, timeout: float = 5.0) -> float:
    """The probe's CLOCK_MONOTONIC stamp (seconds) from its stdout file."""
    end = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError):
            data = path.read_bytes()
            if len(data) >= 16:
                sec, nsec = struct.unpack("<qq", data[:16])
                return float(sec + nsec / 1e9)
        if time.monotonic() > end:
            raise TimeoutError(f"no stamp in {path} after {timeout}s")
        time.sleep(0.0002)


# -- statistics and output -------------------------------------------------------------------------------


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def fmt(name: str, xs: list[float]) -> str:
    if not xs:
        return f"  {name:40} (no samples)"
    return (f"  {name:40} p50 {pct(xs, 50):7.2f}  p90 {pct(xs, 90):7.2f}  p99 {pct(xs, 99):7.2f}"
            f"  max {max(xs):7.2f} ms  (n={len(xs)})")


def conditions() -> str:
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return f"loadavg {load}"


# -- kernel objects of a job, and the check that they are gone -------------------------------------------


def starttime(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if rest[0] in ("Z", "X") else int(rest[19])


def cgroup_dirs(pid: int, parent: str) -> list[Path]:
    """The job's cgroup directory in every hierarchy (from /proc/<pid>/cgroup), restricted to `parent`."""
    out = []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, ctrl, path = line.rstrip("\n").split(":", 2)
            if f"/{parent}/" not in path + "/":
                continue
            hier = "unified" if ctrl == "" else ctrl.removeprefix("name=")
            out.append(Path("/sys/fs/cgroup") / hier / path.lstrip("/"))
    return out


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


NS_GET_ID = 0x8008B70D  # _IOR(0xb7, 0xd, u64): a namespace's 64-bit id, never reused (inodes are)
NS_KINDS = ("mnt", "pid", "net")


def ns_id(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return int(struct.unpack("Q", fcntl.ioctl(fd, NS_GET_ID, bytes(8)))[0])
    finally:
        os.close(fd)


def ns_in_use(wanted: dict[int, tuple[str, int]]) -> set[tuple[str, int]]:
    """Which of the namespaces `wanted` (inode -> (kind, id)) some process is still in. The inode number only
    preselects (the kernel reuses it at once for a new namespace); the id decides."""
    found = set()
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        for kind in NS_KINDS:
            path = f"/proc/{p}/ns/{kind}"
            with contextlib.suppress(OSError):
                want = wanted.get(os.stat(path).st_ino)
                if want is not None and want[0] == kind and ns_id(path) == want[1]:
                    found.add(want)
    return found


def mounted(path: Path) -> bool:
    needle = f" {path} "
    with open("/proc/self/mountinfo") as f:
        return any(needle in line for line in f)


@dataclass
class Objects:
    """What a job left in the kernel while it ran, recorded at launch."""

    procs: list[tuple[int, int]] = field(default_factory=list)  # (pid, start time)
    ns: dict[int, tuple[str, int]] = field(default_factory=dict)  # inode -> (kind, id)
    cgroups: list[Path] = field(default_factory=list)
    netns_file: Path | None = None
    veth: str = ""
    paths: list[Path] = field(default_factory=list)

    @classmethod
    def of(cls, init_pid: int, parent: str, netns_file: Path, veth: str, paths: list[Path]) -> Objects:
        pids = [init_pid, *children(init_pid)]
        o = cls(netns_file=netns_file, veth=veth, paths=paths)
        o.procs = [(p, st) for p in pids if (st := starttime(p)) is not None]
        for kind in NS_KINDS:
            path = f"/proc/{init_pid}/ns/{kind}"
            o.ns[os.stat(path).st_ino] = (kind, ns_id(path))
        o.cgroups = cgroup_dirs(init_pid, parent)
        return o

    def left(self, in_use: set[tuple[str, int]]) -> list[str]:
        out = [f"process {p}" for p, st in self.procs if starttime(p) == st]
        out += [f"{kind} namespace id {i}" for kind, i in set(self.ns.values()) & in_use]
        out += [f"cgroup {d}" for d in self.cgroups if d.exists()]
        if self.netns_file is not None and (self.netns_file.exists() or mounted(self.netns_file)):
            out.append(f"netns {self.netns_file}")
        if self.veth:
            with contextlib.suppress(OSError):
                socket.if_nametoindex(self.veth)
                out.append(f"veth {self.veth}")
        out += [f"path {p}" for p in self.paths if p.exists()]
        return out


def wait_gone(objs: list[Objects], t0: float, timeout: float = GONE_TIMEOUT_S,
              tick: Callable[[], None] | None = None) -> tuple[float, list[str]]:
    """Poll until nothing of `objs` is left; returns (ms since t0 when verified, what was left at timeout).
    `tick` runs before every check (the peers' driver reaps its zombies there, as a container shim does)."""
    wanted = {ino: ki for o in objs for ino, ki in o.ns.items()}
    while True:
        if tick is not None:
            tick()
        in_use = ns_in_use(wanted)
        left = [x for o in objs for x in o.left(in_use)]
        now = time.monotonic()
        if not left:
            return (now - t0) * 1000, []
        if now - t0 > timeout:
            return (now - t0) * 1000, left
        time.sleep(0.001)


# -- jobnet ----------------------------------------------------------------------------------------------


class Jobnet:
    """The agent's two components for one node: the network reconciler and the job runtime."""

    def __init__(self, rootfs: Path, parent: str) -> None:
        from nodeagent.desired import DesiredState, GroupSpec
        from nodeagent.isolation import JobRuntime, RuntimeSettings
        from nodeagent.kernel.reconciler import NetSettings, NetworkReconciler

        self.rootfs, self.parent = rootfs, parent
        self.rec = NetworkReconciler(NetSettings(netns_dir=RUN / "netns", underlay_ifname="jnlt-ul",
                                                 underlay_ip="198.18.0.21"))
        self.group = GroupSpec("bench", 4210, "10.210.0.0/20", "10.210.0.1", 1450)
        self.jobs: dict[str, Any] = {}
        self.state = DesiredState(1, {"bench": self.group}, {}, {})
        self.rec.reconcile(self.state, full=True)
        self.rt = JobRuntime(RuntimeSettings(state_dir=WORK / "state", scratch_root=WORK / "scratch",
                                             cgroup_parent=parent))
        self.n = 0

    def _publish(self) -> None:
        from nodeagent.desired import DesiredState

        self.state = DesiredState(self.state.revision + 1, {"bench": self.group}, dict(self.jobs), {})
        self.rec.reconcile(self.state, full=False)

    def launch(self, jid: str, command: str) -> dict[str, float]:
        from nodeagent.desired import LocalJob
        from nodeagent.isolation import IsolationSpec, LaunchRequest

        i = self.n = self.n + 1
        job = LocalJob(jid, "bench", f"10.210.{(i + 1) // 256}.{(i + 1) % 256}",
                       f"02:00:00:aa:{(i >> 8) & 255:02x}:{i & 255:02x}", (command,))
        t0 = time.monotonic()
        self.jobs[jid] = job
        self._publish()
        t1 = time.monotonic()
        self.rt.start(LaunchRequest(jid, (command,), self.rec.job_netns_path(jid), IsolationSpec(rootfs=self.rootfs)))
        t2 = time.monotonic()
        return {"t0": t0, "net": (t1 - t0) * 1000, "start": (t2 - t1) * 1000, "returned": (t2 - t0) * 1000}

    def stamp(self, jid: str) -> float:
        return read_stamp(WORK / "scratch" / jid / "stdout")

    def warm(self, jid: str) -> bool:
        plan = json.loads((WORK / "state" / jid / "plan.json").read_text())
        return bool(plan.get("warm_slot"))  # the runtime records the slot it launched through

    def objects(self, jid: str) -> Objects:
        from nodeagent import names

        pid = self.rt.running()[jid]
        return Objects.of(pid, self.parent, self.rec.job_netns_path(jid), names.host_veth(jid),
                          [WORK / "scratch" / jid, WORK / "state" / jid])

    def teardown(self, jid: str) -> tuple[float, float, float, float]:
        """(t0, ms for stop(job, 0), ms for cleanup(job), ms for the network teardown)"""
        t0 = time.monotonic()
        self.rt.stop(jid, 0.0)
        ts = time.monotonic()
        self.rt.cleanup(jid)
        t1 = time.monotonic()
        del self.jobs[jid]
        self._publish()
        t2 = time.monotonic()
        return t0, (ts - t0) * 1000, (t1 - ts) * 1000, (t2 - t1) * 1000

    def close(self) -> None:
        from nodeagent.desired import DesiredState

        for jid in list(self.rt.running()):
            with contextlib.suppress(Exception):
                self.rt.stop(jid, 0.0)
                self.rt.cleanup(jid)
        self.rt.close()
        self.rec.reconcile(DesiredState(self.state.revision + 1), full=True)
        self.rec.close()


def jid_of(phase: int, i: int) -> str:
    return f"{phase:x}{i:09x}"


def bench_jobnet_latency(jn: Jobnet, n: int, gap_s: float) -> dict[str, list[float]]:
    r: dict[str, list[float]] = {k: [] for k in ("first", "net", "start", "returned", "warm", "stop", "cleanup",
                                                 "stop_cleanup", "net_down", "teardown", "gone")}
    failures: list[str] = []
    for i in range(-5, n):  # 5 warm-up launches
        jid = jid_of(0xA, i + 5)
        t = jn.launch(jid, PROBE_PAUSE)
        stamp = jn.stamp(jid)
        warm = jn.warm(jid)
        objs = jn.objects(jid)
        t0, stop_ms, clean_ms, net_ms = jn.teardown(jid)
        gone_ms, left = wait_gone([objs], t0)
        jn.rec.refill_spares()  # as the agent does after every pass (between launches here; not timed)
        if i >= 0:
            r["first"].append((stamp - t["t0"]) * 1000)
            for k in ("net", "start", "returned"):
                r[k].append(t[k])
            r["warm"].append(float(warm))
            r["stop"].append(stop_ms)
            r["cleanup"].append(clean_ms)
            r["stop_cleanup"].append(stop_ms + clean_ms)
            r["net_down"].append(net_ms)
            r["teardown"].append(stop_ms + clean_ms + net_ms)
            r["gone"].append(gone_ms)
            if left:
                failures.append(f"{jid}: {', '.join(left)}")
        time.sleep(gap_s)
    if failures:
        print(f"  !! {len(failures)} job(s) not gone within {GONE_TIMEOUT_S}s: {failures[:3]}")
    return r


def bench_jobnet_live(jn: Jobnet, n: int) -> dict[str, Any]:
    ts: list[tuple[str, float]] = []
    marks: list[float] = []
    net: list[float] = []
    start: list[float] = []
    t_begin = time.monotonic()
    for i in range(n):
        jid = jid_of(0xB, i)
        t = jn.launch(jid, PROBE_PAUSE)
        ts.append((jid, t["t0"]))
        net.append(t["net"])
        start.append(t["start"])
        marks.append(time.monotonic())
    t_end = time.monotonic()
    first = [(jn.stamp(jid) - t0) * 1000 for jid, t0 in ts]
    live = len(jn.rt.running())
    warm = sum(jn.warm(jid) for jid, _ in ts)
    objs = [jn.objects(jid) for jid, _ in ts]
    tail = max(1, n // 5)
    down: list[float] = []
    t_down0 = time.monotonic()
    for jid, _ in ts:
        _, stop_ms, clean_ms, net_ms = jn.teardown(jid)
        down.append(stop_ms + clean_ms + net_ms)
    t_down1 = time.monotonic()
    gone_ms, left = wait_gone(objs, t_down1)
    return {"first": first, "net": net, "start": start, "rate": n / (t_end - t_begin), "live": live, "warm": warm,
            "rate_tail": tail / (marks[-1] - marks[-tail - 1]) if n > tail else 0.0,
            "teardown": down, "down_rate": n / (t_down1 - t_down0), "gone_ms": gone_ms, "left": left}


# -- peers: CNI bridge + host-local, then crun run (runs in its own process, see peer_main) --------------


def crun_config(rootfs: Path, scratch: Path, netns: Path, cgroup: str, command: str) -> dict[str, Any]:
    binds = [("/tmp", scratch / "tmp"), ("/var/tmp", scratch / "var_tmp"), ("/scratch", scratch)]
    return {
        "ociVersion": "1.0.0",
        "process": {"terminal": False, "user": {"uid": 65534, "gid": 65534}, "args": [command],
                    "env": ["PATH=/bin", "HOME=/scratch"], "cwd": "/scratch", "noNewPrivileges": True,
                    "capabilities": {k: [] for k in ("bounding", "effective", "inheritable", "permitted",
                                                     "ambient")}},
        "root": {"path": str(rootfs), "readonly": True},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "noexec", "mode=755", "size=64k"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "nodev", "mode=1777", "size=64m"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            *({"destination": d, "type": "bind", "source": str(s), "options": ["rbind", "rw"]} for d, s in binds),
        ],
        "linux": {
            "cgroupsPath": cgroup,
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "network", "path": str(netns)}],
            "maskedPaths": [], "readonlyPaths": [],
        },
    }


class Peers:
    def __init__(self, rootfs: Path, parent: str) -> None:
        self.rootfs, self.parent = rootfs, parent
        self.root = RUN / "crun"
        self.conf = json.dumps({
            "cniVersion": "1.0.0", "name": "jnlt", "type": "bridge", "bridge": "jnlt-cni0",
            "isGateway": False, "ipMasq": False, "mtu": 1450,
            "ipam": {"type": "host-local", "subnet": "10.211.0.0/20", "dataDir": str(RUN / "cni-ipam")},
        })
        self.libc = ctypes.CDLL(None, use_errno=True)

    def _cni(self, cmd: str, name: str) -> dict[str, Any]:
        env = {"CNI_COMMAND": cmd, "CNI_CONTAINERID": name, "CNI_NETNS": f"/run/netns/{name}",
               "CNI_IFNAME": "eth0", "CNI_PATH": str(CNI_BIN), "PATH": os.environ["PATH"]}
        r = subprocess.run([str(CNI_BIN / "bridge")], input=self.conf, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"CNI {cmd} {name} failed: {r.stdout} {r.stderr}")
        return json.loads(r.stdout) if r.stdout.strip() else {}

    def prepare(self, name: str, command: str) -> Path:
        """Untimed: the network namespace, the scratch dirs and the bundle's config.json."""
        subprocess.run(["ip", "netns", "add", name], check=True)
        scratch = WORK / "peer-scratch" / name
        for d in (scratch / "tmp", scratch / "var_tmp"):
            d.mkdir(parents=True)
            d.chmod(0o1777)
        os.chown(scratch, 65534, 65534)
        bundle = WORK / "bundles" / name
        bundle.mkdir(parents=True)
        cfg = crun_config(self.rootfs, scratch, Path("/run/netns") / name, f"/{self.parent}/{name}", command)
        (bundle / "config.json").write_text(json.dumps(cfg))
        return bundle

    def launch(self, name: str, bundle: Path) -> dict[str, Any]:
        out = bundle / "stdout"
        with open(out, "wb") as f:
            t0 = time.monotonic()
            res = self._cni("ADD", name)
            t1 = time.monotonic()
            subprocess.run(["crun", "--root", str(self.root), "run", "-d", "--bundle", str(bundle), name],
                           stdout=f, stdin=subprocess.DEVNULL, check=True)
            t2 = time.monotonic()
        veth = next((i["name"] for i in res.get("interfaces", []) if "sandbox" not in i and i["name"] != "jnlt-cni0"),
                    "")
        return {"t0": t0, "t1": t1, "cni": (t1 - t0) * 1000, "crun_returned": (t2 - t1) * 1000, "veth": veth}

    def pid(self, name: str) -> int:
        r = subprocess.run(["crun", "--root", str(self.root), "state", name], capture_output=True, text=True,
                           check=True)
        return int(json.loads(r.stdout)["pid"])

    def teardown(self, name: str) -> tuple[float, float]:
        t0 = time.monotonic()
        subprocess.run(["crun", "--root", str(self.root), "delete", "-f", name], check=True)
        self._cni("DEL", name)
        path = f"/run/netns/{name}".encode()
        if self.libc.umount2(path, MNT_DETACH) != 0:
            raise OSError(ctypes.get_errno(), f"umount {path!r}")
        os.unlink(path)
        return t0, (time.monotonic() - t0) * 1000


def reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] != 0:
            pass


def peer_main(n: int, gap_s: float, rootfs: Path, parent: str) -> int:
    """Runs in a private mount namespace with /sys/fs/cgroup/unified unmounted; prints one JSON object.

    The driver is a child subreaper, as conmon or a containerd shim is: `crun run -d` leaves the container
    process to the nearest subreaper, which must reap it after `crun delete` (this VM's PID 1 does not reap
    promptly, and a zombie keeps its PID namespace alive)."""
    if UNIFIED.exists() and mounted(UNIFIED):
        raise SystemExit(f"{UNIFIED} is still mounted: crun 1.8.1 would refuse the hybrid cgroup layout")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    p = Peers(rootfs, parent)
    r: dict[str, list[float]] = {k: [] for k in ("first", "cni", "crun", "crun_returned", "teardown", "gone")}
    failures: list[str] = []
    for i in range(-5, n):
        name = f"jnlt-c{i + 5}"
        bundle = p.prepare(name, PROBE_PAUSE)
        t = p.launch(name, bundle)
        stamp = read_stamp(bundle / "stdout")
        pid = p.pid(name)
        objs = Objects.of(pid, parent, Path("/run/netns") / name, t["veth"], [])
        t0, down_ms = p.teardown(name)
        gone_ms, left = wait_gone([objs], t0, tick=reap)
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.rmtree(WORK / "peer-scratch" / name, ignore_errors=True)
        if i >= 0:
            r["first"].append((stamp - t["t0"]) * 1000)
            r["cni"].append(t["cni"])
            r["crun"].append((stamp - t["t1"]) * 1000)
            r["crun_returned"].append(t["crun_returned"])
            r["teardown"].append(down_ms)
            r["gone"].append(gone_ms)
            if left:
                failures.append(f"{name}: {', '.join(left)}")
        time.sleep(gap_s)
    print(json.dumps({"results": r, "failures": failures}))
    return 0


def run_peers(n: int, gap_s: float, rootfs: Path, parent: str) -> dict[str, Any]:
    """crun 1.8.1 needs the cgroup2 mount hidden: one private mount namespace (unshare -m) for the whole run,
    in which the unified mount is unmounted; the driver process runs there."""
    root = Path(__file__).resolve().parent.parent
    inner = " ".join([sys.executable, "-m", "bench.launch", "--peer-driver", "--jobs", str(n),
                      "--gap-ms", str(gap_s * 1000), "--rootfs", str(rootfs), "--cgroup-parent", parent])
    script = f"if mountpoint -q {UNIFIED}; then umount {UNIFIED}; fi; exec {inner}"
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd=root,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"peer driver failed ({r.returncode}): {r.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


# -- the run ---------------------------------------------------------------------------------------------


def inner(a: argparse.Namespace) -> int:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        ipr.link("add", ifname="jnlt-ul", kind="veth", peer="jnlt-ulp")  # this kernel has no dummy driver
        idx = ipr.link_lookup(ifname="jnlt-ul")[0]
        ipr.addr("add", index=idx, address="198.18.0.21", prefixlen=24)
        ipr.link("set", index=idx, state="up")
    rootfs = WORK / "rootfs"
    make_rootfs(rootfs)
    crun_v = subprocess.run(["crun", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    print(f"conditions: kernel {platform.release()}, {os.cpu_count()} cpus (shared with other work), "
          f"cgroup v1 hybrid={UNIFIED.is_dir()}, python {platform.python_version()}, {crun_v}, "
          f"{conditions()}")
    print(f"  probe: {len(probe_elf(False))}-byte static ELF, first instruction = clock_gettime(CLOCK_MONOTONIC)")
    gap = a.gap_ms / 1000
    jn = Jobnet(rootfs, a.cgroup_parent)
    try:
        print(f"\n[1] jobnet, {a.jobs} launches one at a time ({a.gap_ms:g} ms apart), each torn down; "
              f"{conditions()}")
        taken0, missed0 = jn.rec.spares.taken, jn.rec.spares.missed
        lat = bench_jobnet_latency(jn, a.jobs, gap)
        spare_line = (f"  job networks from a spare namespace (made ahead after each launch, as the agent does after "
                      f"each pass): {jn.rec.spares.taken - taken0}, made anew: {jn.rec.spares.missed - missed0}")
        print(fmt("request -> first instruction", lat["first"]))
        print(fmt("  network (reconcile, one job)", lat["net"]))
        print(fmt("  runtime.start() returned", lat["start"]))
        print(f"  launches through a warm slot: {sum(lat['warm']):.0f}/{len(lat['warm'])}")
        print(spare_line)
        print(fmt("teardown: stop(job, 0)", lat["stop"]))
        print(fmt("teardown: cleanup(job)", lat["cleanup"]))
        print(fmt("teardown: stop + cleanup", lat["stop_cleanup"]))
        print(fmt("teardown: network (reconcile)", lat["net_down"]))
        print(fmt("teardown: total", lat["teardown"]))
        print(fmt("objects verified gone (from teardown)", lat["gone"]))
        peers: dict[str, Any] | None = None
        if not a.skip_peers:
            print(f"\n[2] peers, {a.jobs} launches one at a time ({a.gap_ms:g} ms apart), each torn down; "
                  f"{conditions()}")
            peers = run_peers(a.jobs, gap, rootfs, a.cgroup_parent.replace("jn-bench-", "jn-bench-crun-"))
            pr = peers["results"]
            print(fmt("request -> first instruction (CNI+crun)", pr["first"]))
            print(fmt("  CNI bridge+host-local ADD", pr["cni"]))
            print(fmt("  crun run -d -> first instruction", pr["crun"]))
            print(fmt("  crun run -d returned", pr["crun_returned"]))
            print(fmt("teardown: crun delete -f + CNI DEL + netns", pr["teardown"]))
            print(fmt("objects verified gone (from teardown)", pr["gone"]))
            if peers["failures"]:
                print(f"  !! {len(peers['failures'])} peer job(s) not gone within 1 s: {peers['failures'][:3]}")
        print(f"\n[3] jobnet, {a.live} launches back to back, all left running; {conditions()}")
        taken0, missed0 = jn.rec.spares.taken, jn.rec.spares.missed
        live = bench_jobnet_live(jn, a.live)
        print(f"  (back to back, no pass in between to refill: job networks from a spare "
              f"{jn.rec.spares.taken - taken0}, made anew {jn.rec.spares.missed - missed0})")
        print(fmt("request -> first instruction", live["first"]))
        k = max(1, min(50, a.live // 4))
        print(fmt(f"  first {k} jobs", live["first"][:k]))
        print(fmt(f"  last {k} jobs", live["first"][-k:]))
        print(fmt("  network (reconcile, one job)", live["net"]))
        print(fmt("  runtime.start() returned", live["start"]))
        print(f"  sustained: {live['rate']:.0f} jobs/s over the ramp 0 -> {a.live}; "
              f"{live['rate_tail']:.0f} jobs/s over the last {max(1, a.live // 5)}; live jobs at the end: "
              f"{live['live']}; through a warm slot: {live['warm']}/{a.live}")
        print(fmt(f"teardown of {a.live} live (stop+cleanup+net)", live["teardown"]))
        print(f"  all {a.live} verified gone {live['gone_ms']:.0f} ms after the last teardown returned"
              + (f"; LEFT: {live['left'][:5]}" if live["left"] else ""))
        print(f"\nsummary; {conditions()}")
        j50 = pct(lat["first"], 50)
        print(f"  jobnet p50 request -> first instruction {j50:.2f} ms  (target <= 8 ms)")
        print(f"  jobnet teardown p50 {pct(lat['teardown'], 50):.2f} ms (stop+cleanup "
              f"{pct(lat['stop_cleanup'], 50):.2f} + network {pct(lat['net_down'], 50):.2f}; target <= 2 ms), "
              f"gone within 1 s: {sum(g <= 1000 for g in lat['gone'])}/{len(lat['gone'])}")
        if peers is not None:
            pr = peers["results"]
            peer_sum = pct(pr["cni"], 50) + pct(pr["crun"], 50)
            print(f"  peers: CNI ADD p50 {pct(pr['cni'], 50):.2f} + crun run p50 {pct(pr['crun'], 50):.2f} = "
                  f"{peer_sum:.2f} ms (end-to-end p50 {pct(pr['first'], 50):.2f} ms)")
            print(f"  ratio jobnet p50 / peers' sum = {j50 / peer_sum:.2f}  (target <= 0.45)")
            print(f"  teardown ratio jobnet / peers (p50) = "
                  f"{pct(lat['teardown'], 50) / pct(pr['teardown'], 50):.2f}")
    finally:
        jn.close()
    return 0


def cleanup(parents: list[str]) -> None:
    """Everything this bench may have left, by its own names: netns mounts and files, the node namespace,
    crun state, cgroup dirs under our parents (processes still in them are ours: killed), files."""
    for d in (RUN / "netns",):
        for f in d.glob("*") if d.is_dir() else []:
            subprocess.run(["umount", "-l", str(f)], check=False, capture_output=True)
    for f in Path("/run/netns").glob("jnlt-c*"):
        subprocess.run(["umount", "-l", str(f)], check=False, capture_output=True)
        with contextlib.suppress(OSError):
            f.unlink()
    subprocess.run(["ip", "netns", "del", NODE_NS], check=False, capture_output=True)
    for parent in parents:
        for hier in Path("/sys/fs/cgroup").iterdir():
            top = hier / parent
            if not top.is_dir():
                continue
            for d in [*sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)), top]:
                _rmdir_cgroup(d)
    shutil.rmtree(RUN, ignore_errors=True)
    shutil.rmtree(WORK, ignore_errors=True)


def _rmdir_cgroup(d: Path) -> None:
    end = time.monotonic() + 3
    while True:
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            with contextlib.suppress(OSError):
                for pid in (d / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), 9)
            if time.monotonic() > end:
                print(f"warning: cannot remove {d}", file=sys.stderr)
                return
            time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=200, help="launches measured one at a time, per system")
    ap.add_argument("--live", type=int, default=500, help="jobnet jobs launched back to back and kept running")
    ap.add_argument("--gap-ms", type=float, default=10.0, help="pause between one-at-a-time launches")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--peer-driver", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rootfs", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cgroup-parent", default=f"jn-bench-{os.getpid()}", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.peer_driver:
        return peer_main(a.jobs, a.gap_ms / 1000, a.rootfs, a.cgroup_parent)
    if a.inner:
        return inner(a)
    if os.geteuid() != 0:
        sys.exit("run as root")
    if platform.machine() != "x86_64":
        sys.exit("the probe is an x86-64 ELF")
    parents = [a.cgroup_parent, a.cgroup_parent.replace("jn-bench-", "jn-bench-crun-")]
    cleanup(parents)  # a previous run's leftovers (same fixed paths)
    WORK.mkdir(parents=True, mode=0o755)
    RUN.mkdir(parents=True)
    try:
        subprocess.run(["ip", "netns", "add", NODE_NS], check=True)
        root = Path(__file__).resolve().parent.parent
        argv = [sys.executable, "-m", "bench.launch", "--inner", "--cgroup-parent", a.cgroup_parent,
                "--jobs", str(a.jobs), "--live", str(a.live), "--gap-ms", str(a.gap_ms)]
        if a.skip_peers:
            argv.append("--skip-peers")
        return subprocess.run([sys.executable, "-m", "deploy.lab", "_nsexec", f"/run/netns/{NODE_NS}", "--",
                               *argv], cwd=root).returncode
    finally:
        cleanup(parents)


if __name__ == "__main__":
    sys.exit(main())
