"""Per-job network accounting (issue 4, agent side): kernel counters (a BPF map, counted by two programs on
the job's eth0) in each job's network namespace, sampled into a durable spool and reported to the controller
(ReportUsage). See README "Network accounting".

    acct = NetAccounting()                                   # in the agent's network namespace
    acct.ensure(job_id, netns_path, job_mac)                 # before the job's first process (idempotent)
    acct.read({job_id: JobNet(netns_path, mac)})             # -> {job_id: Reading | AccountingError}
    acct.release(job_id)                                     # after its final reading
    spool = UsageSpool(state_dir / "usage", max_entries=100_000)
"""

from nodeagent.accounting.counters import AccountingError, JobNet, NetAccounting, Reading
from nodeagent.accounting.meter import UsageMeter
from nodeagent.accounting.rules import CLASSES, DIRECTIONS, KEYS, NetTotals
from nodeagent.accounting.spool import UsageRecord, UsageSpool

__all__ = [
    "CLASSES",
    "DIRECTIONS",
    "KEYS",
    "AccountingError",
    "JobNet",
    "NetAccounting",
    "NetTotals",
    "Reading",
    "UsageMeter",
    "UsageRecord",
    "UsageSpool",
]
