"""Spool records -> jobnet.v1.JobUsageReport."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from nodeagent.accounting.rules import CLASSES, DIRECTIONS
from nodeagent.accounting.spool import UsageRecord
from protos.jobnet.v1 import jobnet_pb2 as pb


def to_report(rec: UsageRecord, packed: bool = True) -> pb.JobUsageReport:
    """`packed`: the counters in `counters` (for a controller that reads them), else in `net`."""
    sampled = Timestamp()
    sampled.FromNanoseconds(rec.sampled_ns)
    if packed:
        # tx local bytes, tx local packets, tx overlay bytes, ..., rx external packets (rules.KEYS' order)
        t = rec.totals
        counters = [v for pair in zip(t.bytes, t.packets, strict=True) for v in pair]
        return pb.JobUsageReport(job_id=rec.job_id, seq=rec.seq, sampled=sampled, counters=counters,
                                 final=rec.final)
    net = pb.NetUsage()
    for d in DIRECTIONS:
        side = getattr(net, d)
        for c in CLASSES:
            b, p = rec.totals.get(f"{d}_{c}")
            cnt = getattr(side, c)
            cnt.bytes = b
            cnt.packets = p
    return pb.JobUsageReport(job_id=rec.job_id, seq=rec.seq, sampled=sampled, net=net, final=rec.final)
