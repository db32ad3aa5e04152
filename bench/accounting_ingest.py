"""Network accounting ingest: N simulated agents x M jobs reporting every I seconds over real gRPC to a real
controller process (issue 4).

    python -m bench.accounting_ingest [--agents 1000] [--jobs 100] [--interval 10] [--split 1] [--duration 60]
                                      [--warmup 15] [--procs 2] [--commit-ms 50] [--nested] [--baseline]
                                      [--state-cache DIR]

Set-up (not measured): the controller's state file is filled offline through the controller's own code
(`Controller.register_node` / `create_group` / `create_job` on a SqliteStore, fsync off while filling): one node
per agent, one group per node (so no node's desired state is large), M jobs per node. Then `jobnet-controller`
starts on a unix socket with that state (and --node-timeout-seconds large: no heartbeats are simulated, they are
not what is measured).

Load: `--procs` client processes share the agents; each agent sends one ReportUsage with its M jobs' cumulative
counters (all 12 growing, packed in JobUsageReport.counters as current agents send them; `--nested`: in `net`, as
agents before it did; per-job seq, sample time) every `--interval` seconds, agents evenly spread over the
interval, each waiting for its acknowledgement (which means durable: group commit). After `--warmup` seconds,
`--duration` seconds are measured: reports acknowledged per second, RPC latency, and the controller's CPU from
/proc/<pid>/stat (utime + stime over all its threads) against wall time. At the end the controller's total
(QueryUsage by all) is checked against the sum of what the agents sent, and the sizes of the accounting file
are printed. Needs no root.

`--baseline` first runs the same load against a stub grpc.aio server whose ReportUsage only answers (no
validation, no storage): the CPU that gRPC itself costs for these requests on this machine, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import multiprocessing as mp
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from controller.core import Config, Controller
from controller.store_sqlite import SqliteStore
from protos.jobnet.v1 import jobnet_pb2 as pb
from protos.jobnet.v1 import jobnet_pb2_grpc as pbg

ROOT = Path(__file__).resolve().parent.parent
POOL = "10.0.0.0/8"
UNDERLAY = ipaddress.IPv4Network("172.16.0.0/12")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def setup_state(db: Path, agents: int, jobs: int) -> dict[str, list[str]]:
    """Fill the state file through the controller's own code; returns node -> job ids."""
    store = SqliteStore(db)
    store.db.execute("PRAGMA synchronous=OFF")  # set-up only: the controller itself opens it with FULL
    core = Controller(store, Config(pool=ipaddress.IPv4Network(POOL), default_prefix=25,
                                    underlays=(UNDERLAY,), node_timeout_s=86400))
    out: dict[str, list[str]] = {}
    t0 = time.monotonic()
    for i in range(agents):
        node = f"node-{i:04d}"
        ip = UNDERLAY.network_address + 256 + i
        core.register_node(pb.RegisterNodeRequest(name=node, underlay_ip=str(ip), boot_id=f"boot-{i}"))
        group = f"g{i:04d}"
        core.create_group(pb.CreateGroupRequest(name=group))
        out[node] = [core.create_job(pb.CreateJobRequest(group=group, node=node, command=["sleep", "inf"],
                                                          user=f"user{i % 50}")).id for _ in range(jobs)]
        if (i + 1) % 100 == 0:
            print(f"  set-up: {i + 1}/{agents} nodes, {(i + 1) * jobs} jobs ({time.monotonic() - t0:.0f} s)",
                  flush=True)
    store.close()
    return out


def layout_of(db: Path) -> dict[str, list[str]]:
    """node -> job ids of a state file filled by setup_state()."""
    store = SqliteStore(db)
    try:
        out: dict[str, list[str]] = {}
        for key, rec in sorted(store.load().kind("job").items()):
            out.setdefault(rec["node"], []).append(key)
        return out
    finally:
        store.close()


class _Stub(pbg.ControllerServicer):
    async def ReportUsage(self, request: pb.ReportUsageRequest, context: Any) -> pb.ReportUsageResponse:
        return pb.ReportUsageResponse(accepted=len(request.reports))


async def _serve_stub(address: str) -> None:
    server = grpc.aio.server()
    pbg.add_ControllerServicer_to_server(_Stub(), server)
    server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


def compact(adb: Path) -> None:
    """Retention's cost: thin every raw sample of the run through the store (a cut after the current hour: every
    hourly table), a chunk per call, each table dropped after its last chunk."""
    from controller.accounting_sqlite import SqliteAccountingStore

    store = SqliteAccountingStore(adb)
    try:
        raw0, _ = store.sample_count()
        t0, c0 = time.monotonic(), time.process_time()
        calls = 0
        while store.compact(int(time.time() * 1000) + 2 * 3_600_000, 300_000):
            calls += 1
        dt, dc = time.monotonic() - t0, time.process_time() - c0
        raw1, thinned = store.sample_count()
        print(f"retention: thinning {raw0 - raw1:,} raw samples to {thinned:,} (one per job per 5 min) took "
              f"{dc:.1f} s CPU ({dc / max(raw0 - raw1, 1) * 1e6:.1f} us per sample), {calls} transactions, "
              f"{dt / max(calls, 1) * 1000:.0f} ms each on average (wall)")
    finally:
        store.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15 of stat)


# ---------------------------------------------------------------- the simulated agents (client processes)


def client(address: str, agents: list[tuple[int, str, list[str]]], interval: float, split: int, t_begin: float,
           t_measure: float, t_end: float, packed: bool, out: Any) -> None:
    out.put(asyncio.run(_client(address, agents, interval, split, t_begin, t_measure, t_end, packed)))


async def _client(address: str, agents: list[tuple[int, str, list[str]]], interval: float, split: int,
                  t_begin: float, t_measure: float, t_end: float, packed: bool) -> dict[str, Any]:
    channel = grpc.aio.insecure_channel(address)
    stub = pbg.ControllerStub(channel)
    lat: list[float] = []
    acked = errors = rpcs = 0
    acked_bytes: dict[str, int] = {}  # node -> its jobs' total bytes at the last acknowledged report
    n_agents_total = max(a[0] for a in agents) + 1 if agents else 1

    async def agent(index: int, node: str, job_ids: list[str]) -> None:
        nonlocal acked, errors, rpcs
        # `split` requests, each with its share of the jobs, sent interval/split apart
        reqs = [pb.ReportUsageRequest(node=node, boot_id=f"boot-{int(node.split('-')[1])}") for _ in range(split)]
        reps = [[reqs[s].reports.add(job_id=j) for j in job_ids[s::split]] for s in range(split)]
        cum = [[[0] * 12 for _ in part] for part in reps]
        seqs = [0] * split
        # evenly spread over the interval (the agents of all processes interleave by their global index)
        t_next = t_begin + interval / split * index / n_agents_total
        part = 0
        while True:
            delay = t_next - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if t_next >= t_end:
                return
            req = reqs[part]
            seqs[part] += 1
            seq = seqs[part]
            now_ms = int(time.time() * 1000)
            for k, r in enumerate(reps[part]):
                c = cum[part][k]
                inc = 1000 + 37 * k + seq
                for i in range(0, 12, 2):
                    c[i] += inc * (i + 1)      # bytes
                    c[i + 1] += i + 1          # packets
                r.seq = seq
                r.sampled.FromMilliseconds(now_ms)
                if packed:  # the form an agent sends once the controller reads it
                    r.counters[:] = c
                else:
                    n = r.net
                    n.tx.local.bytes, n.tx.local.packets = c[0], c[1]
                    n.tx.overlay.bytes, n.tx.overlay.packets = c[2], c[3]
                    n.tx.external.bytes, n.tx.external.packets = c[4], c[5]
                    n.rx.local.bytes, n.rx.local.packets = c[6], c[7]
                    n.rx.overlay.bytes, n.rx.overlay.packets = c[8], c[9]
                    n.rx.external.bytes, n.rx.external.packets = c[10], c[11]
            t0 = time.time()
            try:
                resp = await stub.ReportUsage(req, timeout=30)
            except grpc.aio.AioRpcError as e:
                errors += 1
                if errors <= 3:
                    print(f"  {node}: {e.code().name}: {e.details()}", file=sys.stderr, flush=True)
                # Lost: the next report (higher seq, higher counters) covers it, as a real agent's would.
            else:
                t1 = time.time()
                acked_bytes[node] = sum(sum(c[0:12:2]) for share in cum for c in share)
                if t_measure <= t1 <= t_end:
                    lat.append(t1 - t0)
                    acked += resp.accepted
                    rpcs += 1
                if resp.accepted != len(req.reports):
                    errors += 1
            part = (part + 1) % split
            t_next += interval / split

    await asyncio.gather(*(agent(i, n, js) for i, n, js in agents))
    await channel.close()
    return {"lat": lat, "acked": acked, "errors": errors, "rpcs": rpcs, "bytes": sum(acked_bytes.values())}


# ---------------------------------------------------------------- main


def run_load(a: argparse.Namespace, address: str, pid: int, layout: dict[str, list[str]], label: str
             ) -> tuple[list[dict[str, Any]], float]:
    """Drive the agents against `address`; print and return the figures (and the CPU share of `pid`)."""
    agents = [(i, node, jobs) for i, (node, jobs) in enumerate(sorted(layout.items()))]
    shares = [agents[k::a.procs] for k in range(a.procs)]
    t_begin = time.time() + 2.0
    t_measure = t_begin + a.warmup
    t_end = t_measure + a.duration
    ctx = mp.get_context("fork")
    q: Any = ctx.Queue()
    workers = [ctx.Process(target=client, args=(address, share, a.interval, a.split, t_begin, t_measure, t_end,
                                                 not a.nested, q))
               for share in shares]
    for w in workers:
        w.start()
    time.sleep(max(0.0, t_measure - time.time()))
    cpu0, wall0 = cpu_seconds(pid), time.time()
    clients0 = sum(cpu_seconds(w.pid) for w in workers if w.pid)
    time.sleep(max(0.0, t_end - time.time()))
    cpu1, wall1 = cpu_seconds(pid), time.time()
    clients1 = sum(cpu_seconds(w.pid) for w in workers if w.pid)
    load = os.getloadavg()
    results = [q.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(30)
    lat = sorted(x for r in results for x in r["lat"])
    acked = sum(r["acked"] for r in results)
    rpcs = sum(r["rpcs"] for r in results)
    errors = sum(r["errors"] for r in results)
    span = wall1 - wall0
    cpu = (cpu1 - cpu0) / span
    print()
    print(f"{label}: sustained over {span:.0f} s: {acked / a.duration:,.0f} reports/s acknowledged "
          f"({rpcs / a.duration:,.0f} RPCs/s), errors {errors}")
    if lat:
        print(f"  RPC latency (ack = durable): p50 {statistics.median(lat) * 1000:.1f} ms, "
              f"p90 {lat[int(len(lat) * 0.9)] * 1000:.1f} ms, p99 {lat[int(len(lat) * 0.99)] * 1000:.1f} ms, "
              f"max {lat[-1] * 1000:.1f} ms")
    used = cpu1 - cpu0
    print(f"  server CPU: {cpu * 100:.1f} % of one core ({used / max(acked, 1) * 1e6:.1f} us per report, "
          f"{used / max(rpcs, 1) * 1e6:.0f} us per RPC); clients {((clients1 - clients0) / span) * 100:.0f} %; "
          f"loadavg {load[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    return results, cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=100, help="jobs per agent")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between an agent's reports")
    p.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=15.0)
    p.add_argument("--split", type=int, default=1, help="an agent sends its jobs in this many requests per "
                   "interval, spread over it (10: 1000 agents x 100 jobs = 1,000 RPCs/s of 10 reports)")
    p.add_argument("--procs", type=int, default=2, help="client processes")
    p.add_argument("--nested", action="store_true", help="send the counters in JobUsageReport.net (agents before "
                   "the packed JobUsageReport.counters) instead of the packed form")
    p.add_argument("--commit-ms", type=float, default=50.0, help="the controller's --usage-commit-ms (its default)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--state-cache", type=Path, metavar="DIR",
                   help="keep the filled state file here and reuse it when agents and jobs match (the set-up of "
                   "100,000 jobs takes minutes); the accounting file is always new")
    p.add_argument("--baseline", action="store_true",
                   help="first the same load against a stub gRPC server that only answers (gRPC's own cost)")
    p.add_argument("--serve-stub", metavar="ADDRESS", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve_stub:
        asyncio.run(_serve_stub(a.serve_stub))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="jn-acct-bench-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        t0 = time.monotonic()
        cached = a.state_cache / f"state-{a.agents}x{a.jobs}.db" if a.state_cache else None
        if cached is not None and cached.exists():
            shutil.copyfile(cached, tmp / "c.db")
            layout = layout_of(tmp / "c.db")
            print(f"set-up: {a.agents} nodes x {a.jobs} jobs from {cached}", flush=True)
        else:
            print(f"set-up: {a.agents} nodes x {a.jobs} jobs in {tmp}", flush=True)
            layout = setup_state(tmp / "c.db", a.agents, a.jobs)
            print(f"set-up done in {time.monotonic() - t0:.0f} s", flush=True)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(tmp / "c.db", cached)
        if a.baseline:
            stub_addr = f"unix:{tmp / 'stub.sock'}"
            stub = subprocess.Popen([sys.executable, "-m", "bench.accounting_ingest", "--serve-stub", stub_addr],
                                    cwd=ROOT)
            try:
                with grpc.insecure_channel(stub_addr) as ch:
                    grpc.channel_ready_future(ch).result(timeout=60)
                run_load(a, stub_addr, stub.pid, layout, "baseline (stub gRPC server, answers only)")
            finally:
                stub.kill()
                stub.wait()
        # The controller runs this tree's code (cwd and PYTHONPATH as here): say which.
        where = subprocess.run([sys.executable, "-c", "import controller; print(controller.__file__)"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        print(f"controller code: {Path(where).parent}", flush=True)
        sock = tmp / "c.sock"
        with open(tmp / "controller.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "controller.main", "--listen", f"unix:{sock}", "--db", str(tmp / "c.db"),
                 "--pool", POOL, "--default-prefix", "25", "--underlay", str(UNDERLAY),
                 "--node-timeout-seconds", "86400", "--usage-commit-ms", str(a.commit_ms)],
                cwd=ROOT, stdout=log, stderr=log)
        address = f"unix:{sock}"
        with grpc.insecure_channel(address) as ch:
            grpc.channel_ready_future(ch).result(timeout=600)
        print(f"controller up (pid {proc.pid}) after {time.monotonic() - t0:.0f} s", flush=True)

        offered = a.agents * a.jobs / a.interval
        print(f"offered: {a.agents} agents x {a.jobs} jobs every {a.interval:g} s = {offered:,.0f} reports/s in "
              f"{a.agents * a.split / a.interval:,.0f} RPCs/s of {a.jobs / a.split:g} reports", flush=True)
        results, _ = run_load(a, address, proc.pid, layout, "jobnet-controller")

        with grpc.insecure_channel(address) as ch:
            total = pbg.ControllerStub(ch).QueryUsage(pb.QueryUsageRequest(by="all"), timeout=120)
        got = total.rows[0].total_bytes if total.rows else 0
        sent = sum(r["bytes"] for r in results)
        adb = tmp / "accounting.db"
        con = sqlite3.connect(adb)
        samples = con.execute("SELECT count(*) FROM samples").fetchone()[0]
        con.close()
        size = sum(f.stat().st_size for f in tmp.glob("accounting.db*"))
        print(f"stored: {samples:,} samples, accounting files {size / 1e6:.0f} MB ({size / max(samples, 1):.0f} B "
              f"per sample)")
        print(f"check: controller total {got:,} bytes, agents' acknowledged total {sent:,} bytes: "
              f"{'equal' if got == sent else 'DIFFERENT'}")
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        line = next((x for x in (tmp / "controller.log").read_text().splitlines() if "CPU: ingest" in x), "")
        m = re.search(r"(\d+) report\(s\) accepted.*CPU: ingest ([\d.]+) s, writes ([\d.]+) s", line)
        if m:
            n, ingest, writes = int(m.group(1)), float(m.group(2)), float(m.group(3))
            print(f"controller's own accounting of its whole run ({n:,} reports): ingest {ingest / n * 1e6:.1f} us "
                  f"per report (event loop), store writes {writes / n * 1e6:.1f} us per report (writer thread); "
                  "the rest is gRPC, asyncio and the acknowledgements")
        compact(adb)
        return 0 if got == sent else 1
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            if proc.poll() is None:
                proc.kill()
        if a.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
