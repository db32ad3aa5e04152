"""Runs INSIDE a job (as the job's uid, with /usr/bin/python3 -S) and prints what the job can and cannot do,
as JSON: its /proc/self/status credentials and the errno of each forbidden operation (0 = it succeeded)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import socket
import struct
import sys

libc = ctypes.CDLL(None, use_errno=True)


def err_of(fn) -> int:  # type: ignore[no-untyped-def]
    try:
        rc = fn()
    except OSError as e:
        return e.errno or -1
    if isinstance(rc, int) and rc < 0:
        return ctypes.get_errno()
    return 0


def status() -> dict[str, str]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Uid", "Gid", "Groups", "NoNewPrivs", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "Pid"):
                out[k] = v.strip()
    return out


def ifreq_ioctl(req: int, payload: bytes) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        fcntl.ioctl(s.fileno(), req, struct.pack("16s", b"lo") + payload.ljust(24, b"\0"))
    finally:
        s.close()


def write_file(path: str) -> None:
    with open(path, "w") as f:
        f.write("x")


def main() -> None:
    host_pid = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    sin = struct.pack("HH4s8x", socket.AF_INET, 0, socket.inet_aton("10.77.0.9"))
    res = {
        "status": status(),
        "remount_rw": err_of(lambda: libc.mount(None, b"/", None, ctypes.c_ulong(0x20), None)),
        "mount_tmpfs": err_of(lambda: libc.mount(b"tmpfs", b"/mnt", b"tmpfs", ctypes.c_ulong(0), None)),
        "set_ip": err_of(lambda: ifreq_ioctl(0x8916, sin)),  # SIOCSIFADDR
        "set_mac": err_of(lambda: ifreq_ioctl(0x8924, struct.pack("H6s", 1, b"\x02\0\0\0\0\x09"))),  # SIOCSIFHWADDR
        "set_down": err_of(lambda: ifreq_ioctl(0x8914, struct.pack("H", 0))),  # SIOCSIFFLAGS
        "add_route": err_of(lambda: _add_route()),
        "setuid0": err_of(lambda: os.setuid(0)),
        "kill_host": err_of(lambda: os.kill(host_pid, 0)) if host_pid else None,
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "write": {p: err_of(lambda p=p: write_file(p)) for p in sys.argv[2:]},
    }
    print(json.dumps(res))


def _add_route() -> None:
    # struct rtentry: pad, rt_dst, rt_gateway, rt_genmask, flags, ... (x86_64 layout, 120 bytes)
    dst = struct.pack("HH4s8x", socket.AF_INET, 0, socket.inet_aton("10.78.0.0"))
    gw = struct.pack("HH4s8x", socket.AF_INET, 0, socket.inet_aton("0.0.0.0"))
    mask = struct.pack("HH4s8x", socket.AF_INET, 0, socket.inet_aton("255.255.0.0"))
    rt = struct.pack("L", 0) + dst + gw + mask + struct.pack("H", 0x1)  # RTF_UP
    rt = rt.ljust(120, b"\0")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        fcntl.ioctl(s.fileno(), 0x890B, rt)  # SIOCADDRT
    finally:
        s.close()


if __name__ == "__main__":
    assert errno.EPERM == 1
    main()
