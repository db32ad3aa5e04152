"""Agent-SIGKILL scenario, run as its own process (`python -m tests.isolation.crash_harness ...`) so that the
test process is never the parent of anything it kills.

    harness (child subreaper: orphaned zygotes/inits are reparented to it and reaped)
      └── agent (JobRuntime + N threads calling start() concurrently)   <- SIGKILLed mid-launch
    then, in the harness: a new JobRuntime.recover(), stop + cleanup of every job, and a report (JSON on stdout)
    of everything left: state/scratch dirs, cgroups, processes, mounts, and namespaces: the mount and PID
    namespaces of every job init alive at the kill (and of their processes) must be referenced by no process
    and no nsfs mount any more, and no process may be left in the jobs' network namespace.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from nodeagent.isolation import JobRuntime, LaunchRequest, SetupFailed

from .conftest import cgroup_procs_of, make_cgroups, make_settings, remove_parent

PR_SET_CHILD_SUBREAPER = 36


def agent(workdir: Path, parent: str, netns: Path, n: int, marker: str) -> None:
    rt = JobRuntime(make_settings(workdir, parent), cgroups=make_cgroups(parent))

    def one(i: int) -> None:
        try:
            rt.start(LaunchRequest(f"c{i:03d}", ("sleep", marker), netns))
            print(f"started c{i:03d}", flush=True)
        except SetupFailed as e:
            print(f"failed c{i:03d} {e}", flush=True)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(60)


def leftovers(workdir: Path, parent: str, marker: str) -> dict[str, list[str]]:
    st, sc = workdir / "state", workdir / "scratch"
    procs = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker in (p / "cmdline").read_bytes().decode(errors="replace"):
                    procs.append(p.name)
            except OSError:
                pass
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(workdir) in line]
    cgroups = [str(h / parent) for h in Path("/sys/fs/cgroup").iterdir() if (h / parent).is_dir()]
    return {
        "state": sorted(os.listdir(st)) if st.exists() else [],
        "scratch": sorted(os.listdir(sc)) if sc.exists() else [],
        "cgroups": cgroups,
        "cgroup_procs": cgroup_procs_of(parent, warm=True),
        "procs": procs,
        "mounts": mounts,
    }


def _ns(pid: str, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def _descendants(root: int) -> list[str]:
    children: dict[int, list[str]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            children.setdefault(_ppid(p), []).append(p.name)
    out: list[str] = []
    todo = [str(root)]
    while todo:
        for c in children.get(int(todo.pop()), []):
            out.append(c)
            todo.append(c)
    return out


def job_namespaces(harness_pid: int) -> set[str]:
    """mnt:[...] and pid:[...] of every process below the harness that is not in the host's namespaces."""
    host = {_ns("self", "mnt"), _ns("self", "pid")}
    found = {_ns(p, k) for p in _descendants(harness_pid) for k in ("mnt", "pid")}
    return {n for n in found if n is not None and n not in host}


def namespaces_in_use(netns: Path) -> tuple[set[str], list[str]]:
    """Every namespace any process refers to or an nsfs mount holds; the processes in the network namespace."""
    used: set[str] = set()
    net = f"net:[{os.stat(netns).st_ino}]"
    in_net: list[str] = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        for k in ("mnt", "pid", "pid_for_children"):
            if (n := _ns(p.name, k)) is not None:
                used.add(n)
        if _ns(p.name, "net") == net:
            in_net.append(p.name)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if " - nsfs " in line:
            used.add(line.split()[3])
    return used, in_net


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def harness(workdir: Path, parent: str, netns: Path, n: int, kill_after: int) -> dict[str, object]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    marker = f"6000.{os.getpid()}"
    child = subprocess.Popen([sys.executable, "-m", "tests.isolation.crash_harness", "agent", str(workdir), parent,
                              str(netns), str(n), marker], stdout=subprocess.PIPE, text=True,
                             cwd=str(Path(__file__).resolve().parents[2]))
    assert child.stdout is not None
    started = 0
    t0 = time.monotonic()
    while started < kill_after and time.monotonic() - t0 < 60:
        line = child.stdout.readline()
        if not line:
            break
        started += line.startswith("started")
    child.send_signal(signal.SIGKILL)
    child.wait()
    time.sleep(0.05)  # the zygote and the job inits are reparented to us
    before = leftovers(workdir, parent, marker)
    job_ns = job_namespaces(os.getpid())

    mgr = make_cgroups(parent)
    rt = JobRuntime(make_settings(workdir, parent), cgroups=mgr)
    dead = rt.recover()
    adopted = sorted(rt.running())
    for job_id in adopted:
        rt.stop(job_id, grace_s=0.5)
    ends = {e.job_id: e.end_reason for e in dead}
    deadline = time.monotonic() + 20
    while rt.running() and time.monotonic() < deadline:
        ends.update({e.job_id: e.end_reason for e in rt.poll()})
        time.sleep(0.02)
    for job_id in list(ends):
        rt.cleanup(job_id)
    rt.close()
    mgr.close()
    remove_parent(parent)
    end = time.monotonic() + 5
    while time.monotonic() < end:  # the old zygote leaves once its inits are gone
        reap()
        if not leftovers(workdir, parent, marker)["procs"]:
            break
        time.sleep(0.05)
    reap()
    after = leftovers(workdir, parent, marker)
    used, in_net = namespaces_in_use(netns)
    after["namespaces"] = sorted(job_ns & used)
    after["netns_procs"] = in_net
    return {"started_before_kill": started, "jobs_on_disk_before": len(before["state"]),
            "job_namespaces_at_kill": len(job_ns),
            "running_before": len(before["procs"]), "adopted": adopted, "ends": ends, "left": after,
            "children": [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == os.getpid()]}


def _ppid(p: Path) -> int:
    try:
        return int(p.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


if __name__ == "__main__":
    if sys.argv[1] == "agent":
        agent(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        print(json.dumps(harness(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), int(sys.argv[5]),
                                 int(sys.argv[6]))))
