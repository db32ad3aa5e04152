"""One test per isolation property, each probed from inside the job (real kernel, real namespaces)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from nodeagent.isolation import IsolationSpec, JobRuntime, LaunchRequest

from .conftest import PROBE_SOURCE, PYTHON, cgroup_procs_of, rand, run, wait_exit

pytestmark = pytest.mark.root


def test_exit_code_and_logs(runtime: JobRuntime, netns: Path) -> None:
    ex, out, err = run(runtime, netns, ("sh", "-c", "echo to-out; echo to-err >&2; exit 7"))
    assert (ex.end_reason, ex.exit_code, ex.signal) == ("exited", 7, None)
    assert (out, err) == ("to-out\n", "to-err\n")
    assert ex.usage["cpu_seconds"] > 0


def test_signalled(runtime: JobRuntime, netns: Path) -> None:
    ex, _, _ = run(runtime, netns, ("sh", "-c", "kill -USR1 $$; sleep 5"))
    assert (ex.end_reason, ex.signal) == ("signalled", signal.SIGUSR1)


def test_private_tmp_backed_by_scratch_and_gone_after_cleanup(runtime: JobRuntime, netns: Path) -> None:
    name = f"jn-iso-marker-{rand()}"
    ex, _, err = run(runtime, netns, ("sh", "-c", f"echo inside > /tmp/{name} && echo v > /var/tmp/{name}"))
    assert ex.end_reason == "exited" and ex.exit_code == 0, err
    assert not Path("/tmp", name).exists() and not Path("/var/tmp", name).exists()
    job_id = ex.job_id
    scratch = runtime.settings.scratch_root / job_id
    assert (scratch / "tmp" / name).read_text() == "inside\n"
    assert (scratch / "var_tmp" / name).read_text() == "v\n"
    runtime.cleanup(job_id)
    assert not scratch.exists()
    assert not (runtime.settings.state_dir / job_id).exists()


def test_pid_namespace_init_is_pid1_and_only_own_processes_visible(runtime: JobRuntime, netns: Path) -> None:
    ex, out, err = run(runtime, netns, ("sh", "-c", "echo $$; cat /proc/1/comm; ls /proc"))
    assert ex.exit_code == 0, err
    lines = out.split("\n")
    pids = sorted(int(x) for x in lines[2:] if x.isdigit())
    assert int(lines[0]) == 2  # the job is the first child of its init
    assert lines[1].startswith("python")  # PID 1 is the job's init
    assert pids[0] == 1 and len(pids) <= 4 and max(pids) < 10  # init, sh, ls: nothing of the host


def test_init_reaps_orphaned_zombies(runtime: JobRuntime, netns: Path) -> None:
    # orphans of the job are reparented to its init, which must reap them (no zombie accumulates)
    ex, out, err = run(runtime, netns, (
        "sh", "-c", "for i in 1 2 3 4 5; do (sh -c 'exit 0' &); done; sleep 0.5; cat /proc/[0-9]*/stat"))
    assert ex.exit_code == 0, err
    states = [line.rsplit(")", 1)[1].split()[0] for line in out.splitlines() if ")" in line]
    assert states and "Z" not in states, out


def test_barrier_cgroup_and_netns_in_place_at_first_instruction(
        runtime: JobRuntime, netns: Path, parent: str) -> None:
    # `cat` is the job's first external instruction: what it sees was in place before the job ran at all
    ex, out, err = run(runtime, netns, (
        "sh", "-c", "readlink /proc/self/ns/net; cat /proc/self/cgroup; ls /sys/class/net"))
    assert ex.exit_code == 0, err
    lines = out.split("\n")
    assert lines[0] == f"net:[{os.stat(netns).st_ino}]"
    assert lines[-2:] == ["lo", ""]  # sysfs of the job's netns: only its own links
    job_paths = [line.split(":", 2)[2] for line in lines[1:-2] if line]
    plan = json.loads((runtime.settings.state_dir / ex.job_id / "plan.json").read_text())
    if plan.get("warm_slot") and not getattr(runtime._cg, "can_rename", False):  # v2: the slot keeps its name
        name = f"jn-{plan['cgroup']}"
    else:  # cold launch, or a warm slot's cgroup renamed to the job's (v1)
        name = f"jn-{ex.job_id}"
        assert plan["cgroup"] == ex.job_id
    ours = [p for p in job_paths if p.endswith(f"/{parent}/{name}")]
    assert ours, f"job not in its cgroup {name} at its first instruction: {job_paths}"
    assert all(p in ("/", f"/{parent}/{name}") for p in job_paths), job_paths
    assert bool(plan.get("warm_slot")) == (runtime.settings.warm_slots > 0)  # the warm fixture launched warm


def test_unprivileged_no_caps_no_new_privs_and_forbidden_operations(
        runtime: JobRuntime, netns: Path, workdir: Path) -> None:
    host = subprocess.Popen(["sleep", "30"])
    try:
        targets = ["/etc/jn-iso-probe", str(workdir / "jn-iso-probe"), "/run/lock/jn-iso-probe",
                   "/dev/shm/jn-iso-private", str(runtime.settings.state_dir / "jn-iso-probe"), "/tmp/jn-iso-ok"]
        ex, out, err = run(runtime, netns, (PYTHON, "-S", "-c", PROBE_SOURCE, str(host.pid), *targets), timeout=20)
        assert ex.exit_code == 0, err
        res = json.loads(out)
        st = res["status"]
        assert st["Uid"].split() == ["65534"] * 4 and st["Gid"].split() == ["65534"] * 4
        assert st["Groups"] == ""
        assert st["NoNewPrivs"] == "1"
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(st[cap], 16) == 0, (cap, st[cap])
        for op in ("remount_rw", "mount_tmpfs", "set_ip", "set_mac", "set_down", "add_route", "setuid0"):
            assert res[op] == 1, f"{op}: errno {res[op]} (expected EPERM)"
        assert res["kill_host"] == 3  # ESRCH: host processes do not exist for the job
        assert host.poll() is None
        writes = res["write"]
        assert writes.pop("/tmp/jn-iso-ok") == 0
        assert writes.pop("/dev/shm/jn-iso-private") == 0 and not Path("/dev/shm/jn-iso-private").exists()
        assert all(e in (13, 30) for e in writes.values()), writes  # EACCES or EROFS everywhere else
        assert not Path("/etc/jn-iso-probe").exists()
    finally:
        host.kill()
        host.wait()


def test_other_jobs_scratch_and_agent_state_hidden(runtime: JobRuntime, netns: Path) -> None:
    other = f"o{rand(8)}"
    runtime.start(LaunchRequest(other, ("sleep", "30"), netns))
    s = runtime.settings
    ex, out, err = run(runtime, netns, ("sh", "-c", f"ls -A {s.scratch_root}; echo --; ls -A {s.state_dir}; echo --; "
                                        "echo shm > /dev/shm/x && cat /dev/shm/x"))
    assert ex.exit_code == 0, err
    scratch_ls, state_ls, shm = out.split("--\n")
    assert scratch_ls.split() == [ex.job_id]  # not the other job's scratch dir
    assert state_ls.split() == []
    assert shm == "shm\n" and not Path("/dev/shm/x").exists()
    runtime.stop(other, grace_s=0)


def test_pivot_root_busybox_userland_old_root_unreachable(
        runtime: JobRuntime, netns: Path, rootfs: Path) -> None:
    ex, out, err = run(runtime, netns, (
        "sh", "-c",
        "ls /bin | head -3; test -e /usr/bin/python3 && echo HOST-VISIBLE; cd /..; ls /; "
        "echo in > /tmp/f; echo s > $JOBNET_SCRATCH/g; touch /bin/x 2>/dev/null && echo ROOTFS-WRITABLE; "
        "cat /proc/self/mountinfo"), rootfs=rootfs)
    assert ex.exit_code == 0, err
    assert "busybox" in out
    assert "HOST-VISIBLE" not in out and "ROOTFS-WRITABLE" not in out
    top = set(out.split("\n")[3:10])
    assert "work" not in top and "usr" not in top
    mounts = {line.split()[4]: line.split()[3] for line in out.splitlines() if len(line.split()) > 9
              and line.split()[0].isdigit()}
    assert mounts["/"] == str(rootfs)  # the rootfs is the job's root mount ...
    allowed = {"/", "/scratch", "/tmp", "/var/tmp", "/dev", "/dev/shm", "/proc", "/sys", *(f"/dev/{n}" for n in
                                                                         ("null", "zero", "full", "random",
                                                                          "urandom", "tty"))}
    assert set(mounts) <= allowed, set(mounts) - allowed  # ... and no mount of the old root is left
    scratch = runtime.settings.scratch_root / ex.job_id
    assert (scratch / "tmp" / "f").read_text() == "in\n" and (scratch / "g").read_text() == "s\n"
    assert not (rootfs / "tmp" / "f").exists()


def test_wall_time_limit_timeout(runtime: JobRuntime, netns: Path) -> None:
    t0 = time.monotonic()
    ex, _, _ = run(runtime, netns, ("sleep", "30"), wall_time_s=0.5)
    assert ex.end_reason == "timeout"
    assert time.monotonic() - t0 < 5


def test_job_cannot_forge_its_timeout_or_kill_its_init(runtime: JobRuntime, netns: Path) -> None:
    ex, out, _ = run(runtime, netns, ("sh", "-c", "kill -ALRM 1; kill -KILL 1; sleep 0.3; echo alive"),
                     wall_time_s=30)
    assert (ex.end_reason, ex.exit_code, out) == ("exited", 0, "alive\n")


def test_stop_kills_double_forked_children(runtime: JobRuntime, netns: Path, parent: str) -> None:
    job_id = f"s{rand(8)}"
    runtime.start(LaunchRequest(job_id, (
        "sh", "-c", "trap '' TERM; (setsid sh -c 'trap \"\" TERM; sleep 1000' &); sleep 1000"), netns))
    deadline = time.monotonic() + 5
    while len(cgroup_procs_of(parent)) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    procs = cgroup_procs_of(parent)
    assert len(procs) >= 4, procs  # init, sh, the escaped sh and its sleep, sleep
    runtime.stop(job_id, grace_s=0.3)
    ex = wait_exit(runtime, job_id, timeout=10)
    assert ex.end_reason == "stopped"
    end = time.monotonic() + 3
    while cgroup_procs_of(parent) and time.monotonic() < end:
        time.sleep(0.02)
    assert cgroup_procs_of(parent) == []
    assert all(not Path(f"/proc/{p}").exists() or _zombie(p) for p in procs)


def test_cleanup_returns_at_once_and_the_reaper_leaves_nothing(
        runtime: JobRuntime, netns: Path, parent: str) -> None:
    from nodeagent.isolation.state import STOP_XATTR, list_job_ids

    job_id = f"r{rand(8)}"
    runtime.start(LaunchRequest(job_id, ("sh", "-c", "sleep 1000 & sleep 1000"), netns))
    deadline = time.monotonic() + 5
    while len(cgroup_procs_of(parent)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    procs = cgroup_procs_of(parent)
    assert len(procs) >= 3, procs  # init, sh, two sleeps
    state = runtime.settings.state_dir / job_id
    runtime.stop(job_id, grace_s=30)
    first = float(os.getxattr(state, STOP_XATTR))
    runtime.stop(job_id, grace_s=0)  # the earlier deadline wins
    assert float(os.getxattr(state, STOP_XATTR)) < first
    runtime.cleanup(job_id)
    # at once: the job is no longer known, its dirs no longer exist under their names
    assert job_id not in runtime.running() and job_id not in list_job_ids(runtime.settings.state_dir)
    assert not state.exists() and not (runtime.settings.scratch_root / job_id).exists()
    runtime.cleanup(job_id)  # idempotent while the reaper works
    # the same id again right away: the launch waits for the old cgroup to be gone
    runtime.start(LaunchRequest(job_id, ("sleep", "1000"), netns))
    runtime.stop(job_id, grace_s=0)
    runtime.cleanup(job_id)
    assert runtime.wait_reaped(5.0) and runtime.reap_errors() == []
    assert cgroup_procs_of(parent) == []
    assert all(not Path(f"/proc/{p}").exists() or _zombie(p) for p in procs)
    for hier in Path("/sys/fs/cgroup").iterdir():
        assert not (hier / parent / f"jn-{job_id}").exists(), f"cgroup left in {hier}"
    for root in (runtime.settings.state_dir, runtime.settings.scratch_root):
        assert [d for d in os.listdir(root) if not d.startswith(".w")] == [], os.listdir(root)


def _zombie(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_stop_sigterm_honoured_within_grace(runtime: JobRuntime, netns: Path) -> None:
    job_id = f"s{rand(8)}"
    runtime.start(LaunchRequest(job_id, ("sleep", "1000"), netns))
    runtime.stop(job_id, grace_s=10)
    ex = wait_exit(runtime, job_id, timeout=5)  # SIGTERM alone ends it, long before the grace
    assert (ex.end_reason, ex.signal) == ("stopped", signal.SIGTERM)


def test_memory_hog_is_oom(runtime: JobRuntime, netns: Path) -> None:
    from .conftest import limits

    hog = "a = []\nwhile True: a.append(b'x' * (1 << 20))"
    ex, _, _ = run(runtime, netns, (PYTHON, "-S", "-c", hog), timeout=30,
                   limits=limits(memory_max=64 << 20))
    assert ex.end_reason == "oom", ex
    assert ex.usage.get("oom_kills", 1) >= 1


def test_fork_bomb_stops_at_pids_limit(runtime: JobRuntime, netns: Path, parent: str) -> None:
    from .conftest import limits

    bomb = ("import os, time\nok = fail = 0\nfor _ in range(200):\n    try:\n        if os.fork() == 0:\n"
            "            time.sleep(2); os._exit(0)\n        ok += 1\n    except BlockingIOError:\n        fail += 1\n"
            "print(ok, fail)")
    ex, out, err = run(runtime, netns, (PYTHON, "-S", "-c", bomb), timeout=30, limits=limits(pids_max=20))
    assert ex.exit_code == 0, err
    ok, fail = map(int, out.split())
    assert ok < 20 and fail == 200 - ok  # init + the job + its children stay within 20
    end = time.monotonic() + 3
    while cgroup_procs_of(parent) and time.monotonic() < end:
        time.sleep(0.02)
    assert cgroup_procs_of(parent) == []  # the job's end took its children with it


def test_cpu_weight_shares_a_contended_cpu_1_to_2(runtime: JobRuntime, netns: Path) -> None:
    from .conftest import limits

    # both jobs pin themselves to one CPU and spin in the same window (CLOCK_MONOTONIC: the host's clock, the
    # jobs have no time namespace), then print the CPU time they got in it
    cpu = sorted(os.sched_getaffinity(0))[0]
    start = time.monotonic() + 1.0
    spin = (f"import os, time\nos.sched_setaffinity(0, {{{cpu}}})\nstart, end = {start!r}, {start + 3.0!r}\n"
            "while time.monotonic() < start: time.sleep(0.001)\nt0 = time.process_time()\n"
            "while time.monotonic() < end: pass\nprint(time.process_time() - t0)")
    ids = {100: f"w{rand(8)}", 200: f"w{rand(8)}"}
    for weight, job_id in ids.items():
        runtime.start(LaunchRequest(job_id, (PYTHON, "-S", "-c", spin), netns,
                                    IsolationSpec(limits=limits(cpu_weight=weight))))
    assert time.monotonic() < start, "the launches took longer than the head start"
    used = {}
    for weight, job_id in ids.items():
        ex = wait_exit(runtime, job_id, timeout=15)
        assert ex.exit_code == 0, ex
        used[weight] = float((runtime.settings.scratch_root / job_id / "stdout").read_text())
    ratio = used[200] / max(used[100], 1e-6)
    print(f"cpu seconds weight 100: {used[100]:.3f} weight 200: {used[200]:.3f} ratio {ratio:.2f}")
    assert used[100] + used[200] > 1.0, used  # they did run (one CPU for 3 s, shared with the rest of the machine)
    assert 1.5 <= ratio <= 2.6, used


def _assert_nothing_left(rt: JobRuntime, job_id: str, parent: str) -> None:
    assert not (rt.settings.state_dir / job_id).exists()
    assert not (rt.settings.scratch_root / job_id).exists()
    assert cgroup_procs_of(parent) == []
    for hier in Path("/sys/fs/cgroup").iterdir():
        assert not (hier / parent / f"jn-{job_id}").exists(), f"cgroup left in {hier}"
    assert rt.running() == {}


def test_setup_failure_bad_netns_rolls_back(runtime: JobRuntime, workdir: Path, parent: str) -> None:
    from nodeagent.isolation import SetupFailed

    with pytest.raises(SetupFailed) as ei:
        runtime.start(LaunchRequest("badns", ("true",), Path("/run/netns/jn-iso-does-not-exist")))
    assert ei.value.step == "netns" and str(ei.value).startswith("setup-failed: netns: ")
    _assert_nothing_left(runtime, "badns", parent)
    notns = workdir / "plainfile"
    notns.write_text("")
    with pytest.raises(SetupFailed, match="setup-failed: netns: not a namespace"):
        runtime.start(LaunchRequest("badns2", ("true",), notns))
    _assert_nothing_left(runtime, "badns2", parent)


def test_setup_failure_bad_rootfs_rolls_back(runtime: JobRuntime, netns: Path, parent: str) -> None:
    from nodeagent.isolation import SetupFailed

    with pytest.raises(SetupFailed) as ei:
        runtime.start(LaunchRequest("badroot", ("true",), netns, IsolationSpec(rootfs=Path("/nonexistent/jn"))))
    assert ei.value.step == "rootfs"
    _assert_nothing_left(runtime, "badroot", parent)


def test_setup_failure_inside_the_job_rolls_back(
        runtime: JobRuntime, netns: Path, rootfs: Path, parent: str) -> None:
    """Failures after the init exists (in its namespaces, after the cgroup attach) also roll back fully."""
    from nodeagent.isolation import SetupFailed

    with pytest.raises(SetupFailed) as ei:  # the rootfs has no python: exec fails in the namespace
        runtime.start(LaunchRequest("badexec", (PYTHON,), netns, IsolationSpec(rootfs=rootfs)))
    assert ei.value.step == "exec" and "No such file" in ei.value.cause
    _assert_nothing_left(runtime, "badexec", parent)
    with pytest.raises(SetupFailed) as ei:  # a MOUNT_UNDER_SCRATCH target missing on the host: mount step
        runtime.start(LaunchRequest("badmnt", ("true",), netns,
                                    IsolationSpec(mount_under_scratch=("/tmp", "/jn-iso-nonexistent"))))
    assert ei.value.step == "mount-scratch"
    _assert_nothing_left(runtime, "badmnt", parent)
    with pytest.raises(SetupFailed) as ei:
        runtime.start(LaunchRequest("badcwd", ("true",), netns, IsolationSpec(cwd="/root")))
    assert ei.value.step == "chdir"
    _assert_nothing_left(runtime, "badcwd", parent)


def test_site_maximum_and_root_are_enforced(runtime: JobRuntime, netns: Path) -> None:
    from nodeagent.isolation import SpecError

    with pytest.raises(SpecError, match="root"):
        runtime.start(LaunchRequest("rootjob", ("true",), netns, IsolationSpec(uid=0)))
    assert runtime.running() == {}


def test_zygote_death_is_survived(runtime: JobRuntime, netns: Path) -> None:
    old = runtime.zygote_pid
    os.kill(old, signal.SIGKILL)
    time.sleep(0.1)
    for _ in range(3):  # the first may use a warm slot made before; the others need a (new) zygote
        ex, out, _ = run(runtime, netns, ("echo", "after"))
        assert (ex.end_reason, out) == ("exited", "after\n")
    assert runtime.zygote_pid != old
