"""Validation of every input at the edge: names, addresses, CIDRs, commands and isolation requests.

Each function returns the normalised value or raises `InvalidArgument` with a message that says what
would be accepted.
"""

from __future__ import annotations

import ipaddress
import re

from controller.errors import InvalidArgument
from protos.jobnet.v1 import jobnet_pb2 as pb

# Group names appear in kernel-facing places (logs, labels) and must fit an interface name (IFNAMSIZ).
GROUP_NAME = re.compile(r"^[a-z][a-z0-9-]{0,14}$")
# Node names are host names: letters, digits, '-' and '.', at most 63 characters.
NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
JOB_ID = re.compile(r"^[0-9a-f]{10}$")
# A login name as useradd accepts it (the portable set plus upper case; a trailing '$' for machine accounts),
# at most 32 characters (utmp's limit).
USER_NAME = re.compile(r"^[A-Za-z_](?:[A-Za-z0-9_.-]{0,30}[A-Za-z0-9_.$-])?$")
UNKNOWN_USER = "unknown"
DEVICE = re.compile(r"^\d+:\d+$")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

MAX_VNI = 2**24 - 1
MIN_MTU = 576
MAX_COMMAND_BYTES = 128 * 1024
LINK_LOCAL = ipaddress.ip_network("169.254.0.0/16")


def group_name(name: str) -> str:
    if not GROUP_NAME.match(name):
        raise InvalidArgument(
            f"group name {name!r} is invalid: use 1-15 characters from a-z, 0-9 and '-', starting with a "
            "letter (a group name must fit a kernel interface name)"
        )
    return name


def node_name(name: str) -> str:
    if not NODE_NAME.match(name):
        raise InvalidArgument(
            f"node name {name!r} is invalid: use a host name of 1-63 characters from a-z, 0-9, '-' and '.'"
        )
    return name


def job_id(job: str) -> str:
    if not JOB_ID.match(job):
        raise InvalidArgument(f"job id {job!r} is invalid: a job id is 10 hexadecimal characters, "
                              "as `jobnet job list` prints it")
    return job


def user_name(name: str, empty: str = UNKNOWN_USER) -> str:
    """A login name; empty gives `empty` (jobs created without a user are accounted to "unknown")."""
    if not name:
        return empty
    if not USER_NAME.match(name):
        raise InvalidArgument(f"user name {name!r} is invalid: use a login name of 1-32 characters from A-Z, a-z, "
                              "0-9, '_', '.' and '-', starting with a letter or '_' (as `id -un` prints it)")
    return name


def job_name(name: str) -> str:
    if name and not JOB_NAME.match(name):
        raise InvalidArgument(f"job name {name!r} is invalid: use 1-63 characters from A-Z, a-z, 0-9, "
                              "'_', '.' and '-', starting with a letter or digit")
    return name


def ipv4(address: str, what: str) -> ipaddress.IPv4Address:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise InvalidArgument(f"{what} {address!r} is not an IP address (expected e.g. 10.1.0.11)") from None
    if not isinstance(ip, ipaddress.IPv4Address):
        raise InvalidArgument(f"{what} {address} is IPv6: only IPv4 underlays are supported for now")
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
        raise InvalidArgument(f"{what} {address} cannot carry VXLAN traffic between nodes: "
                              "give the node's own unicast address on the underlay network")
    return ip


def cidr(text: str) -> ipaddress.IPv4Network:
    text = text.strip()
    try:
        if "/" not in text:
            raise ValueError
        net = ipaddress.ip_network(text, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False) if "/" in text else None
        except ValueError:
            loose = None
        if loose is None:
            raise InvalidArgument(f"{text!r} is not a CIDR (expected e.g. 10.200.3.0/24)") from None
        raise InvalidArgument(f"{text} has host bits set: did you mean {loose}?") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise InvalidArgument(f"{text} is IPv6: group subnets are IPv4 for now")
    return net


def vni(value: int) -> int:
    if not 1 <= value <= MAX_VNI:
        raise InvalidArgument(f"VNI {value} is out of range: a VXLAN network identifier is 1..{MAX_VNI} "
                              "(leave it unset to have one allocated)")
    return value


def mtu(value: int, underlay_mtu: int, overhead: int) -> int:
    top = underlay_mtu - overhead
    if not MIN_MTU <= value <= top:
        raise InvalidArgument(
            f"MTU {value} is out of range: between {MIN_MTU} and {top} on a {underlay_mtu}-byte underlay "
            f"(VXLAN takes {overhead} bytes); leave it unset to get {top}"
        )
    return value


def command(argv: list[str]) -> list[str]:
    if not argv:
        raise InvalidArgument("the job has no command: give one after `--`, e.g. `jobnet job run ... -- sleep 60`")
    if any("\0" in a for a in argv):
        raise InvalidArgument("the job's command contains a NUL byte, which no program can receive")
    if sum(len(a.encode()) + 1 for a in argv) > MAX_COMMAND_BYTES:
        raise InvalidArgument(f"the job's command is longer than {MAX_COMMAND_BYTES // 1024} KiB: "
                              "put long input in a file the job reads")
    return argv


def isolation(iso: pb.Isolation) -> None:
    """Shape checks only; site defaults and maximums are the node agent's (it knows its site config)."""
    r = iso.resources
    if r.memory_high_bytes and r.memory_max_bytes and r.memory_high_bytes > r.memory_max_bytes:
        raise InvalidArgument(f"memory high ({r.memory_high_bytes} bytes) is above memory max "
                              f"({r.memory_max_bytes} bytes): the soft limit must not exceed the hard one")
    if r.memory_max_bytes and r.memory_max_bytes < 1 << 20:
        raise InvalidArgument(f"memory max of {r.memory_max_bytes} bytes is too small to start a process: "
                              "give at least 1M (sizes are in bytes; the CLI accepts 512M, 2G)")
    for what, v in (("cpu weight", r.cpu_weight), ("io weight", r.io_weight)):
        if v and not 1 <= v <= 10000:
            raise InvalidArgument(f"{what} {v} is out of range 1..10000 (100 is the default share)")
    if r.cpu_quota_millicores and r.cpu_quota_millicores < 10:
        raise InvalidArgument(f"cpu quota of {r.cpu_quota_millicores} millicores is below the minimum of 10 "
                              "(0.01 CPU)")
    for lim in r.io_limits:
        if not DEVICE.match(lim.device):
            raise InvalidArgument(f"io limit device {lim.device!r} is invalid: use MAJOR:MINOR, e.g. 8:0 "
                                  "(see `lsblk -o NAME,MAJ:MIN`)")
    if iso.rootfs and not iso.rootfs.startswith("/"):
        raise InvalidArgument(f"rootfs {iso.rootfs!r} must be an absolute path on the node")
    if iso.cwd and not iso.cwd.startswith("/"):
        raise InvalidArgument(f"cwd {iso.cwd!r} must be an absolute path inside the job")
    for e in iso.env:
        key, eq, _ = e.partition("=")
        if not eq or not ENV_KEY.match(key):
            raise InvalidArgument(f"environment entry {e!r} is invalid: use KEY=VALUE with KEY made of "
                                  "letters, digits and '_'")
    if iso.HasField("uid") and iso.uid > 2**31 - 2:
        raise InvalidArgument(f"uid {iso.uid} is out of range")
    if iso.HasField("gid") and iso.gid > 2**31 - 2:
        raise InvalidArgument(f"gid {iso.gid} is out of range")
