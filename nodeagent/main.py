"""`jobnet-agent`: the node agent daemon.

Start-up order matters and is fixed here:
  1. parse the settings;
  2. enter the node's network namespace if --netns is given (whole process, before any thread exists);
  3. create the job runtime (it may fork a helper process: that must happen before any thread or gRPC
     channel exists, see nodeagent.isolation);
  4. open the netlink sockets, then the gRPC channel, then run.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ipaddress
import logging
import os
import re
import signal
import sys
from pathlib import Path

from nodeagent.config import AgentSettings

CLONE_NEWNET = 0x40000000

EPILOG = """\
examples:
  # a node whose underlay is eth1, controller on the management network
  jobnet-agent --name n1 --controller 10.0.0.5:7400 --underlay-ifname eth1 --underlay-ip 10.1.0.11

  # several agents on one machine (how the lab runs them): each in its own network namespace,
  # with its own state and namespace directories
  jobnet-agent --name n2 --netns /run/netns/jnlab-n2 --controller 198.18.0.1:7400 \\
      --underlay-ifname jnul0 --underlay-ip 198.18.0.12 \\
      --state-dir /run/jobnet/lab/n2/state --netns-dir /run/jobnet/lab/n2/netns

The agent keeps jobs running when it stops or crashes; a restarted agent adopts them and
reconciles the kernel with the controller's desired state (use --stop-jobs-on-exit to drain).
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="jobnet-agent",
        description="jobnet node agent: runs this node's jobs in isolated network namespaces joined "
        "by per-group bridges and VXLAN tunnels, as the controller's desired state says.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--name", required=True, help="node name as registered with the controller "
                   "(lowercase letters, digits, '-', at most 13 characters)")
    p.add_argument("--controller", default=os.environ.get("JOBNET_CONTROLLER", "127.0.0.1:7400"),
                   help="controller address, HOST:PORT or unix:/path (default: %(default)s; "
                   "env JOBNET_CONTROLLER)")
    p.add_argument("--underlay-ifname", required=True,
                   help="the interface VXLAN tunnels are sent from (e.g. eth1)")
    p.add_argument("--underlay-ip", required=True, help="this node's IPv4 address on the underlay")
    p.add_argument("--underlay-mtu", type=int, default=1500, help="underlay MTU (default: %(default)s)")
    p.add_argument("--netns", type=Path, help="run the agent inside this network namespace file "
                   "(e.g. /run/netns/jnlab-n1); default: the current one")
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/jobnet/agent"),
                   help="desired state, outbox and job records (default: %(default)s)")
    p.add_argument("--netns-dir", type=Path, default=Path("/run/jobnet/netns"),
                   help="where job network namespaces are bind-mounted (default: %(default)s)")
    p.add_argument("--no-netns-tmpfs", dest="netns_tmpfs", action="store_false",
                   help="do not mount a small tmpfs on --netns-dir when it is empty and not on a tmpfs already "
                   "(the agent does by default: every job creates and removes a file there, which slows down "
                   "with the live jobs on ext4; on a systemd host /run is a tmpfs anyway)")
    p.add_argument("--scratch-root", type=Path, default=Path("/var/lib/jobnet/scratch"),
                   help="per-job scratch directories (default: %(default)s)")
    p.add_argument("--resync-interval", type=float, default=15.0, metavar="SECONDS",
                   help="full reconcile (re-read the kernel) every SECONDS (default: %(default)s)")
    p.add_argument("--job-uid", type=int, default=65534, help="uid jobs run as (default: nobody)")
    p.add_argument("--job-gid", type=int, default=65534, help="gid jobs run as (default: nogroup)")
    p.add_argument("--agent-port", type=int, default=7401,
                   help="port on the underlay address where the agent serves job logs to the controller "
                   "(default: %(default)s)")
    p.add_argument("--usage-interval", type=float, default=10.0, metavar="SECONDS",
                   help="network accounting: read every job's traffic counters and queue a usage report for the "
                   "controller every SECONDS (default: %(default)s); a job's final totals are always read at its end")
    p.add_argument("--accounting-hook", choices=["auto", "tcx", "tc"], default="auto",
                   help="where each job's counting programs hang on its eth0: tcx (Linux 6.6+: ~0.7 %% of a TCP "
                   "stream's CPU, but every attach and every job namespace's teardown waits for RCU grace "
                   "periods with the RTNL held, ~20 ms per job each: spares get their programs ahead of time and "
                   "the networks of ended jobs are released one at a time in the background, ~50 ms each) or tc "
                   "(a clsact qdisc with cls_bpf filters: any kernel, ~2 %% of the stream's CPU, no such waits); "
                   "auto: tcx where the kernel has it (default: %(default)s). Counts move with the programs when "
                   "this changes")
    p.add_argument("--spare-netns", type=int, default=2, metavar="N",
                   help="job network namespaces to keep made ahead (unshared, veth created) for the next jobs, "
                   "refilled after each pass; 0: make each one when its job comes (default: %(default)s)")
    p.add_argument("--cgroup-parent", metavar="NAME", default="",
                   help="the cgroup (in every hierarchy) under which this agent's jobs get theirs; must start "
                   "with 'jn' (default: jn-<name>). Agents sharing one machine need distinct ones: an agent "
                   "removes the job cgroups under its parent that it does not know")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics, inside the agent's network "
                   "namespace (default: off)")
    p.add_argument("--usage-spool-max", type=int, default=100_000, metavar="N",
                   help="usage reports kept on disk while the controller does not acknowledge them; when full, "
                   "older samples of a job are merged into its newest (totals are never lost) and an alarm is "
                   "logged (default: %(default)s)")
    p.add_argument("--site-config", type=Path, help="TOML file with the site's isolation [defaults] and "
                   "[max] (see nodeagent/site.py); default: no limits beyond the job's own requests")
    p.add_argument("--allow-root-jobs", action="store_true", help="let jobs ask to run as root")
    p.add_argument("--stop-jobs-on-exit", action="store_true",
                   help="on SIGTERM, stop every job and remove the node's network objects")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = p.parse_args(argv)
    try:
        ipaddress.IPv4Address(args.underlay_ip)
    except ValueError:
        p.error(f"--underlay-ip {args.underlay_ip!r} is not an IPv4 address")
    if not 0 <= args.spare_netns <= 64:
        p.error(f"--spare-netns {args.spare_netns} is out of range 0..64")
    if not 0.1 <= args.usage_interval <= 3600:
        p.error(f"--usage-interval {args.usage_interval} is out of range 0.1..3600 seconds")
    if args.usage_spool_max < 100:
        p.error(f"--usage-spool-max {args.usage_spool_max} is too small (at least 100)")
    if args.cgroup_parent and not re.fullmatch(r"jn[A-Za-z0-9_.-]{0,61}", args.cgroup_parent):
        p.error(f"--cgroup-parent {args.cgroup_parent!r} must start with 'jn' and be a plain name (letters, digits, "
                "'-', '_', '.')")
    if not 1280 <= args.underlay_mtu <= 65535:
        p.error(f"--underlay-mtu {args.underlay_mtu} is out of range 1280..65535")
    return args


def enter_netns(path: Path) -> None:
    """setns(2) the whole (still single-threaded) process into the network namespace at `path`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _raise_fd_limit() -> None:
    """The agent keeps a netlink socket open in every job's network namespace (and a few files per job): raise
    its soft limit on open files to the hard one (systemd's default soft limit is 1,024)."""
    import resource

    log = logging.getLogger("jobnet.agent")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            log.info("open files limit raised from %d to %d", soft, want)
        except (ValueError, OSError) as e:
            log.warning("could not raise the open files limit from %d (%s): at most ~%d jobs on this node",
                        soft, e, max(0, soft - 100))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s {args.name} %(levelname)s %(name)s: %(message)s")
    # pyroute2 logs every netlink message at DEBUG: far too much even when debugging jobnet.
    logging.getLogger("pyroute2").setLevel(max(logging.INFO, logging.getLogger().level))
    log = logging.getLogger("jobnet.agent")
    if args.netns:
        try:
            enter_netns(args.netns)
        except OSError as e:
            log.error("cannot enter network namespace %s: %s", args.netns, e.strerror or e)
            return 1
    settings = AgentSettings(
        name=args.name,
        controller=args.controller,
        underlay_ip=args.underlay_ip,
        underlay_ifname=args.underlay_ifname,
        underlay_mtu=args.underlay_mtu,
        state_dir=args.state_dir,
        netns_dir=args.netns_dir,
        scratch_root=args.scratch_root,
        resync_interval_s=args.resync_interval,
        job_uid=args.job_uid,
        job_gid=args.job_gid,
        allow_root_jobs=args.allow_root_jobs,
        agent_port=args.agent_port,
        usage_interval_s=args.usage_interval,
        usage_spool_max=args.usage_spool_max,
        cgroup_parent_name=args.cgroup_parent,
    )
    for d in (settings.state_dir, settings.netns_dir, settings.scratch_root):
        d.mkdir(parents=True, exist_ok=True)
    if args.netns_tmpfs:
        from nodeagent.kernel.namespaces import tmpfs_for_netns_dir

        try:
            log.info("namespace files in %s: %s", settings.netns_dir, tmpfs_for_netns_dir(settings.netns_dir))
        except OSError as e:
            log.warning("namespace files in %s stay on its filesystem: %s", settings.netns_dir, e)

    # Imported here, after setns: nothing below may have started a thread before this point.
    from nodeagent.agent import Agent
    from nodeagent.kernel.reconciler import NetSettings, NetworkReconciler
    from nodeagent.runtime import SetupFailed, make_runtime
    from nodeagent.site import SiteConfigError

    try:
        runtime = make_runtime(settings, args.site_config)  # starts its helper: before threads and channels
    except SiteConfigError as e:
        log.error("%s", e)
        return 2
    _raise_fd_limit()  # (after the runtime's helper started: jobs keep the limit the agent was given)
    from nodeagent.accounting import NetAccounting

    try:
        accounting = NetAccounting(hook=args.accounting_hook)
    except (ValueError, OSError) as e:
        log.error("network accounting: %s", e)
        runtime.close()
        return 2
    network = NetworkReconciler(NetSettings(
        netns_dir=settings.netns_dir,
        underlay_ifname=settings.underlay_ifname,
        underlay_ip=settings.underlay_ip,
        spare_namespaces=args.spare_netns,
        # tcx programs make a namespace's destruction hold the RTNL: release gone jobs' networks one at a time
        paced_release=accounting.hook == "tcx",
    ))
    log.info("network accounting: BPF programs on each job's eth0, hook %s", accounting.hook)
    agent = Agent(settings, runtime, network, accounting=accounting, setup_failed=(SetupFailed,))
    if args.metrics_listen:
        from nodeagent import metrics

        try:
            metrics.serve(agent, args.metrics_listen)
        except (OSError, ValueError) as e:
            log.error("cannot serve metrics on %s: %s", args.metrics_listen, e)
            network.close()
            runtime.close()
            return 1

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.request_stop)
        await agent.run(stop_jobs_on_exit=args.stop_jobs_on_exit)

    log.info("jobnet-agent %s starting: node %s, underlay %s on %s, controller %s",
             "0.1.0", settings.name, settings.underlay_ip, settings.underlay_ifname, settings.controller)
    asyncio.run(run())
    log.info("jobnet-agent stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

