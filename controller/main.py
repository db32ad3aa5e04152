"""`jobnet-controller`: the central gRPC controller."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import re
import signal
import sqlite3
import sys
from pathlib import Path

import grpc

from controller import accounting_sqlite, metrics
from controller.accounting import Accounting, Retention
from controller.core import Config, Controller
from controller.service import ControllerService
from controller.store_sqlite import SchemaError, SqliteStore
from protos.jobnet.v1 import jobnet_pb2_grpc as pbg

log = logging.getLogger("jobnet.controller")

EPILOG = """\
examples:
  # one controller for a cluster whose nodes talk VXLAN over 10.1.0.0/16, CLI on the local socket
  jobnet-controller --listen 10.0.0.5:7400 --listen unix:/run/jobnet/controller.sock \\
      --db /var/lib/jobnet/controller.db --underlay 10.1.0.0/16

  # group subnets from 172.30.0.0/16, /26 each unless a group asks otherwise; 9000-byte underlay
  jobnet-controller --pool 172.30.0.0/16 --default-prefix 26 --underlay-mtu 9000

  # network accounting: raw samples for 3 days, then one per 10 minutes; samples deleted after 90 days
  jobnet-controller --usage-raw-retention 3d --usage-downsample-step 10m --usage-retention 90d

State (groups, nodes, jobs, addresses) lives in the SQLite file given by --db and survives restarts;
agents reconnect by themselves and get the delta since the revision they hold. Network accounting (the agents'
per-job counters) lives in its own SQLite file, --accounting-db; per-job totals are kept forever, samples
(the time series) as the --usage-* options say. Durations: 90s, 10m, 24h, 30d, 1h30m or seconds.
"""

_DURATION = re.compile(r"(\d+)([smhd])")


def duration(text: str) -> float:
    """'24h' -> 86400.0; units s, m, h, d, combinable ('1h30m'); a plain number is seconds; 0 is allowed."""
    s = text.strip().lower()
    try:
        return float(s)
    except ValueError:
        pass
    parts = _DURATION.findall(s)
    if not parts or "".join(n + u for n, u in parts) != s:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use e.g. 90s, 10m, 24h, 30d, 1h30m or seconds")
    return float(sum(int(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[u] for n, u in parts))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="jobnet-controller",
        description="jobnet controller: assigns job groups to private subnets (IPAM, VXLAN VNIs), keeps the "
        "node registry and each node's desired state, and streams it to the node agents.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", action="append", default=[], metavar="ADDR",
                   help="HOST:PORT or unix:/path to serve on; repeatable "
                   "(default: 0.0.0.0:7400 and unix:/run/jobnet/controller.sock)")
    p.add_argument("--db", type=Path, default=Path("/var/lib/jobnet/controller.db"),
                   help="SQLite state file (default: %(default)s)")
    p.add_argument("--pool", default="10.200.0.0/16", help="where group subnets come from (default: %(default)s)")
    p.add_argument("--default-prefix", type=int, default=24,
                   help="prefix length of a group's subnet when it asks for none (default: %(default)s)")
    p.add_argument("--underlay", action="append", default=[], metavar="CIDR",
                   help="the nodes' underlay network; nodes must register from inside it and no group subnet "
                   "may overlap it (repeatable)")
    p.add_argument("--underlay-mtu", type=int, default=1500,
                   help="underlay MTU; a group's MTU is this minus 50 (VXLAN over IPv4) (default: %(default)s)")
    p.add_argument("--quarantine-seconds", type=float, default=600,
                   help="an address released by a finished job is not handed out again for this long "
                   "(default: %(default)s)")
    p.add_argument("--node-timeout-seconds", type=float, default=10,
                   help="a node without a heartbeat for this long is marked lost (default: %(default)s)")
    p.add_argument("--job-retention-days", type=float, default=7,
                   help="finished jobs stay on record (jobnet job list --all) this long; their network totals "
                   "stay in the accounting store (default: %(default)s; 0: forever)")
    p.add_argument("--heartbeat-interval-ms", type=int, default=2000,
                   help="how often agents send heartbeats (default: %(default)s)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)")
    acct = p.add_argument_group("network accounting")
    acct.add_argument("--accounting-db", type=Path, metavar="PATH",
                      help="SQLite file for per-job network totals and samples (default: accounting.db next to --db)")
    acct.add_argument("--usage-raw-retention", type=duration, default=24 * 3600.0, metavar="DURATION",
                      help="samples older than this are thinned to one per --usage-downsample-step; 0: never "
                      "(default: 24h)")
    acct.add_argument("--usage-downsample-step", type=duration, default=300.0, metavar="DURATION",
                      help="what old samples are thinned to: the last one of each step, so totals stay exact "
                      "(default: 5m)")
    acct.add_argument("--usage-retention", type=duration, default=30 * 86400.0, metavar="DURATION",
                      help="samples older than this are deleted (per-job totals are kept forever); 0: never "
                      "(default: 30d)")
    acct.add_argument("--usage-retention-interval", type=duration, default=300.0, metavar="DURATION",
                      help="how often thinning and deletion run (default: 5m)")
    acct.add_argument("--usage-commit-ms", type=float, default=50.0, metavar="MS",
                      help="group commit: reports are written together at most this often; an agent's report "
                      "is acknowledged once on disk (default: %(default)g; each commit is an fsync, so "
                      "a shorter interval costs more CPU at a high report rate: bench/README.md)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    a = p.parse_args(argv)
    try:
        a.pool_net = ipaddress.IPv4Network(a.pool)
        a.underlay_nets = tuple(ipaddress.IPv4Network(u) for u in a.underlay)
    except ValueError as e:
        p.error(f"{e} (give networks as CIDR with the host bits clear, e.g. 10.200.0.0/16)")
    if a.node_timeout_seconds * 1000 < 2 * a.heartbeat_interval_ms:
        p.error("--node-timeout-seconds must be at least two heartbeat intervals")
    if not 1280 <= a.underlay_mtu <= 65535:
        p.error("--underlay-mtu must be between 1280 and 65535")
    if a.usage_downsample_step < 1:
        p.error("--usage-downsample-step must be at least 1 s")
    if a.usage_raw_retention and a.usage_raw_retention < a.usage_downsample_step:
        p.error("--usage-raw-retention must be at least one --usage-downsample-step (or 0: never thin)")
    if a.usage_retention and a.usage_raw_retention and a.usage_retention < a.usage_raw_retention:
        p.error("--usage-retention must not be shorter than --usage-raw-retention")
    if a.usage_retention_interval < 0.1:
        p.error("--usage-retention-interval must be at least 0.1 s")
    if not 1 <= a.usage_commit_ms <= 1000:
        p.error("--usage-commit-ms must be between 1 and 1000")
    a.listen = a.listen or ["0.0.0.0:7400", "unix:/run/jobnet/controller.sock"]
    a.accounting_db = a.accounting_db or a.db.with_name("accounting.db")
    return a


async def serve(a: argparse.Namespace) -> int:
    try:
        store = SqliteStore(a.db)
    except (SchemaError, OSError) as e:
        log.error("cannot open the state file: %s", e)
        return 1
    cfg = Config(pool=a.pool_net, default_prefix=a.default_prefix, underlays=a.underlay_nets,
                 underlay_mtu=a.underlay_mtu, quarantine_s=a.quarantine_seconds,
                 node_timeout_s=a.node_timeout_seconds,
                 job_retention_s=a.job_retention_days * 86400, heartbeat_interval_ms=a.heartbeat_interval_ms)
    try:
        core = Controller(store, cfg)
    except ValueError as e:
        log.error("%s", e)
        return 2
    try:
        acct_store = accounting_sqlite.SqliteAccountingStore(a.accounting_db)
    except (accounting_sqlite.SchemaError, OSError, sqlite3.Error) as e:
        log.error("cannot open the accounting file %s: %s", a.accounting_db, e)
        return 1
    acct = Accounting(core, acct_store, Retention(raw_s=a.usage_raw_retention, step_s=a.usage_downsample_step,
                                                  keep_s=a.usage_retention, interval_s=a.usage_retention_interval),
                      commit_interval_s=a.usage_commit_ms / 1000)
    await acct.start()
    await acct.evict()  # jobs purged from the state before: their accounting totals stay in the store only
    # The loaded state (every job, its accounting totals) lives as long as the process: out of the garbage
    # collector's sight, so that collections triggered by ingest's short-lived objects do not scan it each time
    # (~2-3 us per usage report at 100,000 jobs otherwise).
    gc.collect()
    gc.freeze()
    metrics.EXTRA.append(lambda _core: metrics.accounting_metrics(acct))
    service = ControllerService(core, acct)
    server = grpc.aio.server(options=[("grpc.keepalive_permit_without_calls", 1),
                                      ("grpc.http2.min_ping_interval_without_data_ms", 5000)])
    pbg.add_ControllerServicer_to_server(service, server)
    for addr in a.listen:
        if addr.startswith("unix:"):
            path = Path(addr.removeprefix("unix:").removeprefix("//"))
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a stale socket of an earlier run
        try:
            server.add_insecure_port(addr)
        except RuntimeError as e:
            log.error("cannot listen on %s: %s", addr, e)
            return 1
    await server.start()
    if a.metrics_listen:
        try:
            metrics.serve(core, a.metrics_listen, asyncio.get_running_loop())
        except (OSError, ValueError) as e:
            log.error("cannot serve metrics on %s: %s", a.metrics_listen, e)
            return 1
    print(f"jobnet-controller listening on {', '.join(a.listen)} (state {a.db}, revision {core.c.revision}; "
          f"accounting {a.accounting_db})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def watchdog() -> None:
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            try:
                core.check_lost()
                if ticks % 60 == 0 and core.purge_finished():
                    await acct.evict()  # their accounting totals leave memory (they stay in the store)
            except Exception:
                log.exception("periodic check failed")

    task = asyncio.create_task(watchdog())
    await stop.wait()
    log.info("shutting down")
    task.cancel()
    await service.close()
    await server.stop(grace=2)
    await acct.close()  # after the server: reports still being answered get their flush
    store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=a.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.umask(0o077)
    return asyncio.run(serve(a))


if __name__ == "__main__":
    sys.exit(main())
