"""TCP sockets that may still put frames on the wire after the job's last process exited.

A process that exits with data in a TCP send buffer leaves an orphan socket that keeps sending (and
retransmitting, then sends its FIN) for a while. Those frames are the job's traffic: the final reading
waits (bounded) until no socket of the namespace is in a state that can still send data.

Cheap first: /proc/thread-self/net/sockstat ("TCP: inuse N", per namespace, ~50 us) is 0 for a namespace
without any hashed TCP socket (TIME_WAIT ones are not counted: they only acknowledge). Only when it is not,
a SOCK_DIAG_BY_FAMILY dump over raw netlink (NETLINK_SOCK_DIAG, ~2 ms: it walks the kernel's global TCP
hash) tells the states apart. Both look at the CALLING thread's namespace.
"""

from __future__ import annotations

import os
import socket
import struct
import time

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3

# TCP states that can still send data or a FIN (include/net/tcp_states.h). FIN_WAIT2 and TIME_WAIT only
# acknowledge; LISTEN and CLOSE send nothing.
TCP_ESTABLISHED, TCP_SYN_SENT, TCP_SYN_RECV, TCP_FIN_WAIT1 = 1, 2, 3, 4
TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING = 8, 9, 11
SENDING_STATES = (TCP_ESTABLISHED, TCP_SYN_SENT, TCP_SYN_RECV, TCP_FIN_WAIT1, TCP_CLOSE_WAIT, TCP_LAST_ACK,
                  TCP_CLOSING)


def sending_tcp_sockets() -> int:
    """How many TCP sockets (IPv4 and IPv6) of the calling thread's network namespace are in a state that
    can still send."""
    mask = sum(1 << s for s in SENDING_STATES)
    count = 0
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as s:
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            # inet_diag_req_v2: family, protocol, ext, pad, states, inet_diag_sockid (48 bytes of zeros)
            req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, mask) + bytes(48)
            s.send(struct.pack("=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
                   + req)
            count += _count_replies(s, seq)
    return count


def _count_replies(s: socket.socket, seq: int) -> int:
    n = 0
    while True:
        data = s.recv(65536)
        off = 0
        while off + 16 <= len(data):
            length, kind, _flags, mseq, _pid = struct.unpack_from("=IHHII", data, off)
            if length < 16:
                return n
            if mseq == seq:
                if kind == NLMSG_DONE:
                    return n
                if kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, off + 16)
                    if err == 0:
                        return n
                    raise OSError(-err, f"sock_diag dump: {os.strerror(-err)}")
                if kind == SOCK_DIAG_BY_FAMILY:
                    n += 1
            off += (length + 3) & ~3


def tcp_in_use() -> int:
    """Hashed TCP sockets of the calling thread's namespace (listening, connecting, connected, closing)."""
    with open("/proc/thread-self/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("inuse") + 1])
    return 0


def wait_tcp_drained(timeout_s: float, interval_s: float = 0.005) -> tuple[bool, float]:
    """Wait until no TCP socket of the calling thread's namespace can still send, at most `timeout_s`.
    Returns (drained, seconds waited)."""
    t0 = time.monotonic()
    while True:
        if tcp_in_use() == 0 or sending_tcp_sockets() == 0:
            return True, time.monotonic() - t0
        if time.monotonic() - t0 >= timeout_s:
            return False, time.monotonic() - t0
        time.sleep(interval_s)
