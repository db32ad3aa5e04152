"""A multi-node jobnet lab on one machine.

    python -m deploy.lab up [--nodes 3]     controller + N nodes, each a real jobnet-agent process
    python -m deploy.lab demo [--keep]      up, two groups, jobs spread over the nodes, connectivity matrix
    python -m deploy.lab status             what runs
    python -m deploy.lab down               stop everything and remove every object the lab made

Layout (nothing is added to the host's own network namespace):

    netns <lab>-ul : bridge jnlab-br  (the "underlay switch", 198.18.0.0/24)
        |-- veth jnl-ctl  <->  jnul0 198.18.0.1   in netns <lab>-ctl : jobnet-controller :7400
        |-- veth jnl-n1   <->  jnul0 198.18.0.11  in netns <lab>-n1  : jobnet-agent --name n1
        |-- veth jnl-n2   <->  jnul0 198.18.0.12  in netns <lab>-n2  : jobnet-agent --name n2
        ...
The controller also listens on a unix socket (<dir>/controller.sock) for the `jobnet` CLI on the host.
198.18.0.0/15 is reserved for network benchmarks (RFC 2544) and exists only inside the lab's namespaces.

The same `Lab` class is the multi-node test harness (tests/e2e).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

UNDERLAY_PREFIX = "198.18.0"
CONTROLLER_PORT = 7400
CLONE_NEWNET = 0x40000000
NETNS_RUN = Path("/run/netns")


def _ipr(netns: str | None = None) -> Any:
    from pyroute2 import IPRoute

    return IPRoute(netns=netns) if netns else IPRoute()


@dataclass
class Lab:
    name: str = "jnlab"
    nodes: int = 3
    dir: Path = Path("/run/jobnet/lab")
    python: str = sys.executable
    agent_args: tuple[str, ...] = ()
    controller_args: tuple[str, ...] = ()
    procs: dict[str, int] = field(default_factory=dict)  # member -> pid

    # ---------------------------------------------------------------- names

    @property
    def members(self) -> list[str]:
        return ["ctl"] + [f"n{i}" for i in range(1, self.nodes + 1)]

    def ns(self, member: str) -> str:
        return f"{self.name}-{member}"

    def underlay_ip(self, member: str) -> str:
        return f"{UNDERLAY_PREFIX}.1" if member == "ctl" else f"{UNDERLAY_PREFIX}.{10 + int(member[1:])}"

    @property
    def controller_socket(self) -> Path:
        return self.dir / "controller.sock"

    @property
    def controller_address(self) -> str:
        return f"unix:{self.controller_socket}"

    def node_dir(self, node: str) -> Path:
        return self.dir / node

    def job_netns(self, node: str, job_id: str) -> Path:
        return self.node_dir(node) / "netns" / f"jnj-{job_id}"

    def cgroup_parent(self, node: str) -> str:
        """The cgroup parent of the node's agent. An agent names it jn-<node>: unique on a real machine, but
        labs on one machine share its cgroup tree and all have an n1, so an agent's start-up recover() and a
        lab's down() would remove the jobs of every other lab. Each lab's agents get jn-<lab>-<node>."""
        return f"jn-{self.name}-{node}"

    # ---------------------------------------------------------------- registry

    @property
    def _registry(self) -> Path:
        return self.dir / "lab.json"

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._registry.write_text(json.dumps({"name": self.name, "nodes": self.nodes, "procs": self.procs}))

    @classmethod
    def load(cls, dir: Path) -> Lab:
        d = json.loads((dir / "lab.json").read_text())
        return cls(name=d["name"], nodes=d["nodes"], dir=dir, procs={k: int(v) for k, v in d["procs"].items()})

    # ---------------------------------------------------------------- up

    def up(self) -> None:
        if self._registry.exists():
            raise SystemExit(f"a lab is already registered in {self.dir}; run `python -m deploy.lab down` first")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._save()
        try:
            self._network_up()
            self.start_controller()
            for i in range(1, self.nodes + 1):
                self.start_agent(f"n{i}")
            self.wait_nodes_ready()
        except BaseException:
            self.down()
            raise

    def network_up(self) -> None:
        """Only the namespaces and the underlay (no controller, no agents): for benches that build their own
        data path between the nodes. `down()` removes it."""
        self._network_up()

    def _network_up(self) -> None:
        from pyroute2 import netns

        for m in ["ul", *self.members]:
            netns.create(self.ns(m))
        with _ipr(self.ns("ul")) as ul:
            ul.link("add", ifname="jnlab-br", kind="bridge", br_stp_state=0, br_forward_delay=0)
            br = ul.link_lookup(ifname="jnlab-br")[0]
            ul.link("set", index=br, state="up")
            for m in self.members:
                ul.link("add", ifname=f"jnl-{m}", kind="veth",
                        peer={"ifname": "jnul0", "net_ns_fd": self.ns(m)})
                idx = ul.link_lookup(ifname=f"jnl-{m}")[0]
                ul.link("set", index=idx, master=br, state="up")
        for m in self.members:
            with _ipr(self.ns(m)) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                idx = ipr.link_lookup(ifname="jnul0")[0]
                ipr.addr("add", index=idx, address=self.underlay_ip(m), prefixlen=24)
                ipr.link("set", index=idx, state="up")

    def _spawn(self, member: str, argv: list[str], log: Path) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 start_new_session=True, cwd=str(Path(__file__).resolve().parent.parent))
        self.procs[member] = p.pid
        self._save()
        return p.pid

    def start_controller(self) -> None:
        argv = [self.python, "-m", "deploy.lab", "_nsexec", str(NETNS_RUN / self.ns("ctl")), "--",
                self.python, "-m", "controller.main",
                "--listen", f"{self.underlay_ip('ctl')}:{CONTROLLER_PORT}",
                "--listen", self.controller_address,
                "--db", str(self.dir / "controller.db"),
                "--underlay", f"{UNDERLAY_PREFIX}.0/24",
                *self.controller_args]
        with contextlib.suppress(FileNotFoundError):
            self.controller_socket.unlink()
        self._spawn("ctl", argv, self.dir / "controller.log")
        self.wait_controller()

    def start_agent(self, node: str) -> None:
        d = self.node_dir(node)
        argv = [self.python, "-m", "nodeagent.main", "--name", node, "--cgroup-parent", self.cgroup_parent(node),
                "--netns", str(NETNS_RUN / self.ns(node)),
                "--controller", f"{self.underlay_ip('ctl')}:{CONTROLLER_PORT}",
                "--underlay-ifname", "jnul0", "--underlay-ip", self.underlay_ip(node),
                "--state-dir", str(d / "state"), "--netns-dir", str(d / "netns"),
                "--scratch-root", str(d / "scratch"), "--stop-jobs-on-exit",
                *self.agent_args]
        self._spawn(node, argv, d / "agent.log")

    def wait_controller(self, timeout: float = 20) -> None:
        import grpc

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.controller_socket.exists():
                ch = grpc.insecure_channel(self.controller_address)
                try:
                    grpc.channel_ready_future(ch).result(timeout=1)
                    return
                except grpc.FutureTimeoutError:
                    pass
                finally:
                    ch.close()
            if not _alive(self.procs.get("ctl", 0)):
                raise RuntimeError(f"jobnet-controller exited; see {self.dir / 'controller.log'}:\n"
                                   + _tail(self.dir / "controller.log"))
            time.sleep(0.1)
        raise TimeoutError(f"controller not ready after {timeout} s; see {self.dir / 'controller.log'}")

    def wait_nodes_ready(self, timeout: float = 30) -> None:
        from protos.jobnet.v1 import jobnet_pb2 as pb

        deadline = time.monotonic() + timeout
        want = {f"n{i}" for i in range(1, self.nodes + 1)}
        while time.monotonic() < deadline:
            nodes = self.stub().ListNodes(pb.ListNodesRequest(), timeout=5).nodes
            if want <= {n.name for n in nodes if n.state == pb.NODE_STATE_READY}:
                return
            for n in want:
                if not _alive(self.procs.get(n, 0)):
                    log = self.node_dir(n) / "agent.log"
                    raise RuntimeError(f"agent {n} exited; see {log}:\n" + _tail(log))
            time.sleep(0.2)
        raise TimeoutError(f"nodes {sorted(want)} not all ready after {timeout} s")

    def stub(self) -> Any:
        import grpc

        from protos.jobnet.v1 import jobnet_pb2_grpc as pbg

        if not hasattr(self, "_stub"):
            self._channel = grpc.insecure_channel(self.controller_address)
            self._stub = pbg.ControllerStub(self._channel)
        return self._stub

    # ---------------------------------------------------------------- operations used by tests

    def kill(self, member: str, sig: int = signal.SIGKILL, wait: float = 10) -> None:
        pid = self.procs.get(member)
        if pid and _alive(pid):
            os.kill(pid, sig)
            _wait_dead(pid, wait)

    def restart_agent(self, node: str, sig: int = signal.SIGKILL) -> None:
        self.kill(node, sig)
        self.start_agent(node)

    def restart_controller(self, sig: int = signal.SIGKILL) -> None:
        self.kill("ctl", sig)
        self.start_controller()

    def in_job(self, node: str, job_id: str, argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
        """Run a probe inside a job's network namespace (the test's oracle, not the product)."""
        return subprocess.run(["nsenter", f"--net={self.job_netns(node, job_id)}", *argv],
                              capture_output=True, text=True, timeout=timeout)

    def in_node(self, node: str, argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", f"--net={NETNS_RUN / self.ns(node)}", *argv],
                              capture_output=True, text=True, timeout=timeout)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([self.python, "-m", "jobnet_cli.main", "--controller", self.controller_address, *args],
                           capture_output=True, text=True, timeout=60,
                           cwd=str(Path(__file__).resolve().parent.parent))
        if check and p.returncode != 0:
            raise RuntimeError(f"jobnet {' '.join(args)} failed ({p.returncode}): {p.stderr}")
        return p

    # ---------------------------------------------------------------- down

    def down(self) -> None:
        """Stop agents (they drain their jobs), the controller, then remove the namespaces. Idempotent."""
        for m in reversed(self.members):
            pid = self.procs.get(m)
            if pid and _alive(pid):
                os.kill(pid, signal.SIGTERM)
        for m in reversed(self.members):
            pid = self.procs.get(m)
            if pid and not _wait_dead(pid, 15):
                os.kill(pid, signal.SIGKILL)
                _wait_dead(pid, 5)
        if hasattr(self, "_channel"):
            self._channel.close()
            del self._stub
        self._reap_leftovers()
        from pyroute2 import netns

        for m in [*self.members, "ul"]:
            with contextlib.suppress(OSError, FileNotFoundError):
                netns.remove(self.ns(m))
        self.procs.clear()
        with contextlib.suppress(FileNotFoundError):
            self._registry.unlink()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _reap_leftovers(self) -> None:
        """What a killed agent could not clean: job netns mounts and the nodes' cgroups."""
        for i in range(1, self.nodes + 1):
            nsdir = self.node_dir(f"n{i}") / "netns"
            if nsdir.is_dir():
                for f in nsdir.iterdir():
                    _umount(f)
        # Mounts under the lab dir (scratch binds of jobs).
        with open("/proc/self/mountinfo") as mi:
            mounts = [line.split()[4] for line in mi]
        for mp in sorted((m for m in mounts if m.startswith(str(self.dir) + "/")), key=len, reverse=True):
            _umount(Path(mp))
        for i in range(1, self.nodes + 1):
            _remove_cgroups(self.cgroup_parent(f"n{i}"), self)


def _remove_cgroups(parent: str, lab: Lab) -> None:
    """Kill what is left in the agent's cgroups (only ours, by name) and remove them."""
    root = Path("/sys/fs/cgroup")
    for hier in [root, *[p for p in root.iterdir() if p.is_dir()]]:
        top = hier / parent
        if not top.is_dir():
            continue
        for d in [*sorted(top.rglob("*"), key=lambda p: len(str(p)), reverse=True), top]:
            if not d.is_dir():
                continue
            with contextlib.suppress(OSError):
                for pid in (d / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def _umount(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2(str(path).encode(), 2)  # MNT_DETACH
    if path.is_file():
        with contextlib.suppress(OSError):
            path.unlink()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
            return False
    return True


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


def _nsexec(path: str, argv: list[str]) -> None:
    """Enter a network namespace and exec a program (what `ip netns exec` does, minus /sys)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise SystemExit(f"setns {path}: {os.strerror(ctypes.get_errno())}")
    os.close(fd)
    os.execvp(argv[0], argv)


# -------------------------------------------------------------------- demo

def demo(lab: Lab, keep: bool) -> int:
    from protos.jobnet.v1 import jobnet_pb2 as pb

    print(f"== bringing up a {lab.nodes}-node lab (controller + {lab.nodes} agents in network namespaces)")
    t0 = time.monotonic()
    lab.up()
    print(f"   ready in {time.monotonic() - t0:.1f} s; logs in {lab.dir}")
    ok = True
    try:
        print("\n== jobnet group create blue / red")
        print(lab.cli("group", "create", "blue").stdout, end="")
        print(lab.cli("group", "create", "red").stdout, end="")
        layout = [("blue", "n1"), ("blue", "n2"), ("blue", "n3"), ("red", "n1"), ("red", "n2"), ("red", "n3")]
        layout = [(g, n) for g, n in layout if int(n[1:]) <= lab.nodes]
        jobs = []
        print("\n== jobnet job run (one long-running job per group per node)")
        for g, n in layout:
            out = lab.cli("-o", "json", "job", "run", "--group", g, "--node", n, "--", "sleep", "3600").stdout
            j = json.loads(out)
            jobs.append(j)
        wait_running(lab, [j["id"] for j in jobs])
        print(lab.cli("job", "list").stdout)
        print("== connectivity matrix (ping from row job to column job; expected: same group only)")
        names = [f"{j['group']}@{j['node']}" for j in jobs]
        w = max(len(n) for n in names) + 1
        print(" " * w + " ".join(f"{n:>{w}}" for n in names))
        for src in jobs:
            cells = []
            for dst in jobs:
                if src is dst:
                    cells.append(f"{'-':>{w}}")
                    continue
                r = lab.in_job(src["node"], src["id"], ["ping", "-c1", "-W1", "-q", dst["ip"]])
                reach = r.returncode == 0
                expect = src["group"] == dst["group"]
                ok &= reach == expect
                mark = ("ok" if reach else "--") + ("" if reach == expect else "!!")
                cells.append(f"{mark:>{w}}")
            print(f"{src['group'] + '@' + src['node']:<{w}}" + " ".join(cells))
        print("   ok = reachable, -- = isolated, !! = not what the group layout says")
        print("\n== jobnet topology")
        print(lab.cli("topology").stdout)
        verdict = "isolation and reachability as expected" if ok else "UNEXPECTED connectivity (see !!)"
        print("RESULT:", verdict)
    finally:
        if keep:
            print(f"\nlab left running: export JOBNET_CONTROLLER={lab.controller_address}; "
                  "jobnet group list; ...; python -m deploy.lab down")
        else:
            print("\n== tearing the lab down")
            lab.down()
            print("   done: no namespace, link or cgroup of the lab is left")
    _ = pb
    return 0 if ok else 1


def wait_running(lab: Lab, job_ids: list[str], timeout: float = 30) -> None:
    from protos.jobnet.v1 import jobnet_pb2 as pb

    deadline = time.monotonic() + timeout
    pending = set(job_ids)
    while pending and time.monotonic() < deadline:
        for jid in list(pending):
            j = lab.stub().GetJob(pb.GetJobRequest(id=jid), timeout=5)
            if j.state == pb.JOB_STATE_RUNNING:
                pending.discard(jid)
            elif j.state == pb.JOB_STATE_FINISHED:
                raise RuntimeError(f"job {jid} finished early: {j.message}")
        time.sleep(0.1)
    if pending:
        raise TimeoutError(f"jobs not running after {timeout} s: {sorted(pending)}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_nsexec":
        sep = argv.index("--")
        _nsexec(argv[1], argv[sep + 1:])
    p = argparse.ArgumentParser(prog="python -m deploy.lab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["up", "down", "demo", "status"])
    p.add_argument("--nodes", type=int, default=3, help="number of nodes (default: %(default)s)")
    p.add_argument("--dir", type=Path, default=Path("/run/jobnet/lab"), help="lab state, sockets and logs")
    p.add_argument("--name", default="jnlab", help="prefix of the lab's namespaces (must start with jn)")
    p.add_argument("--keep", action="store_true", help="demo: leave the lab running afterwards")
    a = p.parse_args(argv)
    if not a.name.startswith("jn"):
        p.error("--name must start with 'jn' (every object jobnet creates carries that prefix)")
    if os.geteuid() != 0:
        p.error("the lab creates network namespaces: run it as root")
    if a.command == "up":
        lab = Lab(name=a.name, nodes=a.nodes, dir=a.dir)
        lab.up()
        print(f"lab up: {a.nodes} nodes. Try:\n  export JOBNET_CONTROLLER={lab.controller_address}\n"
              "  jobnet node list\n  jobnet group create blue\n"
              "  jobnet job run --group blue --node n1 -- sleep 600\n  python -m deploy.lab down")
        return 0
    if a.command == "demo":
        return demo(Lab(name=a.name, nodes=a.nodes, dir=a.dir), a.keep)
    if not (a.dir / "lab.json").exists():
        print(f"no lab registered in {a.dir}")
        return 0
    lab = Lab.load(a.dir)
    if a.command == "down":
        lab.down()
        print("lab down")
    else:
        for m, pid in lab.procs.items():
            print(f"{m:5} pid {pid:7} {'running' if _alive(pid) else 'DEAD'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
