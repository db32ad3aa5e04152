"""Prometheus metrics of a node agent (`jobnet-agent --metrics-listen HOST:PORT`, path /metrics).

Everything is read at scrape time from the agent's own state (thread-safe reads: the meter and the spool
lock internally; the agent's counters are plain integers), except the launch latency histogram, which the
agent observes on every launch.

Label cardinality is bounded and documented: `group` (groups with jobs on this node), `direction`
(tx, rx), `class` (local, overlay, external), `reason`, `state` — never job ids. Per-job traffic is in the
controller's API (`jobnet usage --job ID`).

Metrics:
  jobnet_agent_network_bytes_total{group,direction,class}    frame bytes of this node's jobs (see README)
  jobnet_agent_network_packets_total{group,direction,class}  frames
  jobnet_agent_launch_seconds (histogram)                    request to running job, per launch
  jobnet_agent_jobs{state}                                   running / ended-not-yet-acknowledged
  jobnet_agent_usage_spool_records, ..._alarm                durable usage reports not yet acknowledged
  jobnet_agent_outbox_records                                job status reports not yet acknowledged
  jobnet_agent_reconciles_total{kind}, jobnet_agent_reconcile_steps_total, jobnet_agent_errors_total
  jobnet_agent_job_networks_total{how}                       made from a spare namespace / anew (none ready)
  jobnet_agent_spare_netns_ready                             spare job namespaces ready (--spare-netns)
  jobnet_agent_desired_revision, jobnet_agent_applied_revision
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nodeagent.accounting.rules import KEYS, NetTotals

if TYPE_CHECKING:
    from nodeagent.agent import Agent

LAUNCH_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class AgentMetrics:
    """What the agent records as it goes; the rest is read from the agent at scrape time."""

    def __init__(self) -> None:
        self.launch_seconds = Histogram("jobnet_agent_launch_seconds",
                                        "Time from the start of a launch to the job running (seconds).",
                                        buckets=LAUNCH_BUCKETS, registry=None)
        self._lock = threading.Lock()
        self._ended: dict[str, list[int]] = defaultdict(lambda: [0] * (2 * len(KEYS)))

    def job_traffic_ended(self, group: str, final: NetTotals) -> None:
        """A job's final totals move from the live sum to the ended sum (the counters stay monotonic)."""
        with self._lock:
            acc = self._ended[group]
            for i, v in enumerate(final.bytes + final.packets):
                acc[i] += v

    def ended(self) -> dict[str, list[int]]:
        with self._lock:
            return {g: list(v) for g, v in self._ended.items()}


class AgentCollector(Collector):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        traffic = a.metrics.ended()
        for job_id, job in list(a.desired.jobs.items()):
            last = a.meter.last(job_id)
            if last is None:
                continue
            acc = traffic.setdefault(job.group, [0] * (2 * len(KEYS)))
            for i, v in enumerate(last.bytes + last.packets):
                acc[i] += v
        nbytes = CounterMetricFamily("jobnet_agent_network_bytes", "Frame bytes of this node's jobs by group, "
                                     "direction and class (Ethernet header included).",
                                     labels=["group", "direction", "class"])
        npkts = CounterMetricFamily("jobnet_agent_network_packets", "Frames of this node's jobs by group, "
                                    "direction and class.", labels=["group", "direction", "class"])
        for group in sorted(traffic):
            for i, key in enumerate(KEYS):
                direction, cls = key.split("_", 1)
                nbytes.add_metric([group, direction, cls], traffic[group][i])
                npkts.add_metric([group, direction, cls], traffic[group][len(KEYS) + i])
        yield nbytes
        yield npkts
        yield from a.metrics.launch_seconds.collect()
        jobs = GaugeMetricFamily("jobnet_agent_jobs", "Jobs on this node by state.", labels=["state"])
        try:  # the runtime is only ever called from the agent's kernel thread
            running = len(a._kernel.submit(a.runtime.running).result(timeout=2))
        except Exception:
            running = -1
        jobs.add_metric(["running"], running)
        jobs.add_metric(["ended_unacknowledged"], len(a.finished))
        yield jobs
        spool = GaugeMetricFamily("jobnet_agent_usage_spool_records",
                                  "Usage reports in the durable spool, not yet acknowledged by the controller.")
        spool.add_metric([], len(a.usage))
        yield spool
        alarm = GaugeMetricFamily("jobnet_agent_usage_spool_alarm",
                                  "1 while the usage spool is over its bound (samples coalesced, totals kept).")
        alarm.add_metric([], a.usage.stats.get("alarm", 0))
        yield alarm
        outbox = GaugeMetricFamily("jobnet_agent_outbox_records",
                                   "Job status reports not yet acknowledged by the controller.")
        outbox.add_metric([], len(a.outbox))
        yield outbox
        st: dict[str, Any] = dict(a.stats)
        rec = CounterMetricFamily("jobnet_agent_reconciles", "Reconcile passes.", labels=["kind"])
        rec.add_metric(["full"], st.get("full_reconciles", 0))
        rec.add_metric(["incremental"], st.get("reconciles", 0) - st.get("full_reconciles", 0))
        yield rec
        steps = CounterMetricFamily("jobnet_agent_reconcile_steps", "Kernel changes made by reconcile passes.")
        steps.add_metric([], st.get("steps", 0))
        yield steps
        errs = CounterMetricFamily("jobnet_agent_errors", "Unexpected errors in the agent's loops.")
        errs.add_metric([], st.get("errors", 0))
        yield errs
        spares = getattr(a.network, "spares", None)  # (the kernel layer's SparePool; absent in test doubles)
        if spares is not None:
            how = CounterMetricFamily("jobnet_agent_job_networks", "Job networks made, by how: from a spare "
                                      "namespace made ahead (--spare-netns) or anew because none was ready.",
                                      labels=["how"])
            how.add_metric(["spare"], spares.taken)
            how.add_metric(["anew"], spares.missed)
            yield how
            ready = GaugeMetricFamily("jobnet_agent_spare_netns_ready", "Spare job network namespaces ready.")
            ready.add_metric([], len(spares))
            yield ready
        for name, value in (("desired", a.desired.revision), ("applied", a.applied_revision)):
            g = GaugeMetricFamily(f"jobnet_agent_{name}_revision", f"The {name} desired-state revision.")
            g.add_metric([], value)
            yield g


def serve(agent: Agent, address: str) -> Any:
    host, _, port = address.rpartition(":")
    registry = CollectorRegistry()
    registry.register(AgentCollector(agent))
    return start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)
