"""Prometheus metrics of the controller (`jobnet-controller --metrics-listen HOST:PORT`, path /metrics).

Values are computed at scrape time from the controller's own state, on its event loop (the HTTP server
runs on prometheus_client's thread; it asks the loop for a snapshot, so no state is read mid-change).

Label cardinality is bounded by design: labels are node names, group names, states, classes, RPC
methods and status codes — never job ids. Per-job figures are in the API (`jobnet usage`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.accounting import COUNTERS, Accounting, add_into
from controller.cluster import is_live
from controller.core import Controller
from protos.jobnet.v1 import jobnet_pb2 as pb

log = logging.getLogger("jobnet.controller.metrics")

RPCS: Counter[tuple[str, str]] = Counter()  # (method, status code) -> calls; updated by controller.service


def snapshot(core: Controller) -> list[Metric]:
    c = core.c
    out: list[Metric] = []
    g = GaugeMetricFamily("jobnet_groups", "Groups (private networks) that exist.")
    g.add_metric([], len(c.groups))
    out.append(g)
    nodes = GaugeMetricFamily("jobnet_nodes", "Registered nodes by state.", labels=["state"])
    by_state = Counter(pb.NodeState.Name(n.state).removeprefix("NODE_STATE_").lower() for n in c.nodes.values())
    for state in ("ready", "lost"):
        nodes.add_metric([state], by_state.get(state, 0))
    out.append(nodes)
    jobs = GaugeMetricFamily("jobnet_jobs", "Jobs by state (finished ones still on record included).",
                             labels=["state"])
    js = Counter(pb.JobState.Name(j.state).removeprefix("JOB_STATE_").lower() for j in c.jobs.values())
    for state in ("pending", "running", "stopping", "finished"):
        jobs.add_metric([state], js.get(state, 0))
    out.append(jobs)
    live = GaugeMetricFamily("jobnet_group_live_jobs", "Live jobs per group.", labels=["group"])
    for name in sorted(c.groups):
        live.add_metric([name], len(c.live_by_group.get(name, ())))
    out.append(live)
    ended = CounterMetricFamily("jobnet_jobs_ended", "Jobs on record that ended, by end reason.",
                                labels=["reason"])
    er = Counter(pb.EndReason.Name(j.end_reason).removeprefix("END_REASON_").lower()
                 for j in c.jobs.values() if not is_live(j))
    for reason, n in sorted(er.items()):
        ended.add_metric([reason], n)
    out.append(ended)
    rev = GaugeMetricFamily("jobnet_revision", "The cluster's desired-state revision.")
    rev.add_metric([], c.revision)
    out.append(rev)
    lag = GaugeMetricFamily("jobnet_node_revision_lag",
                            "Published revision of a node's desired state minus the revision its agent last "
                            "reported applied (0 = converged).", labels=["node"])
    for name in sorted(c.nodes):
        lag.add_metric([name], max(0, core.hub.revs.get(name, 0) - core.applied.get(name, 0)))
    out.append(lag)
    streams = GaugeMetricFamily("jobnet_watch_streams", "Open WatchNode streams.")
    streams.add_metric([], sum(len(s) for s in core.hub.subs.values()))
    out.append(streams)
    pub = CounterMetricFamily("jobnet_watch_updates", "Desired-state updates sent to agents.")
    pub.add_metric([], core.hub.published)
    out.append(pub)
    commits = CounterMetricFamily("jobnet_store_commits", "Transactions committed to the state store.")
    commits.add_metric([], core.commits)
    out.append(commits)
    rpcs = CounterMetricFamily("jobnet_rpcs", "RPCs served, by method and status code.", labels=["method", "code"])
    for (method, code), n in sorted(RPCS.items()):
        rpcs.add_metric([method, code], n)
    out.append(rpcs)
    for extra in EXTRA:
        out.extend(extra(core))
    return out


# Further metric sources (e.g. network accounting) register a function here.
EXTRA: list[Callable[[Controller], list[Metric]]] = []


class _LoopCollector(Collector):
    def __init__(self, core: Controller, loop: asyncio.AbstractEventLoop) -> None:
        self.core, self.loop = core, loop

    def collect(self) -> Iterator[Metric]:
        async def take() -> list[Metric]:
            return snapshot(self.core)

        try:
            metrics = asyncio.run_coroutine_threadsafe(take(), self.loop).result(timeout=5)
        except Exception:
            log.exception("metrics snapshot failed")
            return iter(())
        return iter(metrics)


def serve(core: Controller, address: str, loop: asyncio.AbstractEventLoop) -> Any:
    """Start the /metrics HTTP server on a background thread; returns (server, thread)."""
    host, _, port = address.rpartition(":")
    registry = CollectorRegistry()
    registry.register(_LoopCollector(core, loop))
    return start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)


def accounting_metrics(acct: Accounting) -> list[Metric]:
    """Network totals of every job on record, summed per group, direction and class (counters: a job's totals
    only grow; jobs purged from the state count on through the accounting's per-group sums of them), and the ingest
    counters."""
    by_group: dict[str, list[int]] = {g: list(c) for g, c in acct.gone_by_group.items()}
    for j in [*acct.jobs.values(), *acct.evicting()]:
        add_into(by_group.setdefault(j.group, [0] * len(COUNTERS)), j.counters)
    nbytes = CounterMetricFamily("jobnet_network_bytes", "Frame bytes of jobs by group, direction and class "
                                 "(as reported by the agents; Ethernet header included).",
                                 labels=["group", "direction", "class"])
    npkts = CounterMetricFamily("jobnet_network_packets", "Frames of jobs by group, direction and class.",
                                labels=["group", "direction", "class"])
    for group in sorted(by_group):
        acc = by_group[group]
        for i, name in enumerate(COUNTERS):
            direction, cls, kind = name.split("_")
            (nbytes if kind == "bytes" else npkts).add_metric([group, direction, cls], acc[i])
    st = acct.stats
    reports = CounterMetricFamily("jobnet_usage_reports", "Usage reports received, by outcome.", labels=["outcome"])
    for outcome, n in (("accepted", st.accepted), ("duplicate", st.duplicates), ("unknown_job", st.unknown)):
        reports.add_metric([outcome], n)
    flush = CounterMetricFamily("jobnet_usage_flush_seconds", "Time spent committing usage batches.")
    flush.add_metric([], st.flush_seconds)
    return [nbytes, npkts, reports, flush]
