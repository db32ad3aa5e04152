"""Spool records -> jobnet.v1.JobUsageReport."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from nodeagent.accounting.rules import CLASSES, DIRECTIONS
from nodeagent.accounting.spool import UsageRecord
from protos.jobnet.v1 import jobnet_pb2 as pb


def to_report(rec: UsageRecord) -> pb.JobUsageReport:
    net = pb.NetUsage()
    for d in DIRECTIONS:
        side = getattr(net, d)
        for c in CLASSES:
            b, p = rec.totals.get(f"{d}_{c}")
            counters = getattr(side, c)
            counters.bytes = b
            counters.packets = p
    sampled = Timestamp()
    sampled.FromNanoseconds(rec.sampled_ns)
    return pb.JobUsageReport(job_id=rec.job_id, seq=rec.seq, sampled=sampled, net=net, final=rec.final)
