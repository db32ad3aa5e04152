"""What a job's counters count, as data (pure: no kernel, no I/O).

Six counters per job, each (bytes, packets), in KEYS order: tx_local tx_overlay tx_external rx_local
rx_overlay rx_external. They are kept by the kernel in a per-CPU BPF array map, counted by two programs on
the job's `eth0` (nodeagent/accounting/bpf.py has the instructions, counters.py installs them):

    egress  (last on the hook: after anything that could still drop the frame)       "jn_acct_tx"
        destination MAC starts with the node prefix 02:NN:NN -> tx_local     (a job on the same node)
        destination MAC starts with 02                       -> tx_overlay   (another node's job)
        anything else (broadcast, multicast, the gateway)    -> tx_external
    ingress (first on the hook: before anything else sees the frame)                 "jn_acct_rx"
        PACKET_OTHERHOST (unicast for another MAC, a bridge's flooding) and PACKET_LOOPBACK (the looped-back
        copy of the job's own broadcast, which never crossed the device): not counted
        source MAC: the same three classes into rx_local, rx_overlay, rx_external

What a byte is: skb->len at the tc hooks, which is the whole Ethernet frame with its 14-byte header in both
directions (tc pushes the header back before an ingress program runs), the same bytes IFLA_STATS64 of eth0
counts (measured on kernel 6.18, tests/accounting). A frame without a whole Ethernet header in its linear
data is not counted (none of ours; a guard the verifier needs anyway).

The programs carry their node prefix as immediates, so the kernel's tag of a program (a hash of its
instructions, map references zeroed: SHA-1 before Linux 6.18, SHA-256 since) says whether it is exactly the
program we load for this job: `expected_tags`. counters.py detaches anything else that carries our names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from nodeagent.accounting.bpf import program

DEVICE = "eth0"
MAP_NAME = "jn_acct"
PROG_NAMES = {"tx": "jn_acct_tx", "rx": "jn_acct_rx"}

DIRECTIONS = ("tx", "rx")
CLASSES = ("local", "overlay", "external")
KEYS = tuple(f"{d}_{c}" for d in DIRECTIONS for c in CLASSES)  # counter names, the order of every tuple here
BASE = {"tx": 0, "rx": len(CLASSES)}  # map key of each direction's first class (the keys are KEYS' indexes)


@dataclass(frozen=True)
class NetTotals:
    """Cumulative frame bytes and packets per counter (KEYS order: tx_local .. rx_external)."""

    bytes: tuple[int, ...] = (0,) * len(KEYS)
    packets: tuple[int, ...] = (0,) * len(KEYS)

    def get(self, key: str) -> tuple[int, int]:
        i = KEYS.index(key)
        return self.bytes[i], self.packets[i]

    def __add__(self, other: NetTotals) -> NetTotals:
        return NetTotals(tuple(a + b for a, b in zip(self.bytes, other.bytes, strict=True)),
                         tuple(a + b for a, b in zip(self.packets, other.packets, strict=True)))

    def __sub__(self, other: NetTotals) -> NetTotals:
        return NetTotals(tuple(a - b for a, b in zip(self.bytes, other.bytes, strict=True)),
                         tuple(a - b for a, b in zip(self.packets, other.packets, strict=True)))

    def below(self, other: NetTotals) -> bool:
        """Some counter is lower than in `other` (the counters were reset or recreated)."""
        return any(a < b for a, b in zip(self.bytes + self.packets, other.bytes + other.packets, strict=True))

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes)

    def direction(self, d: str) -> dict[str, tuple[int, int]]:
        """{class: (bytes, packets)} of direction "tx" or "rx"."""
        return {c: self.get(f"{d}_{c}") for c in CLASSES}

    def to_lists(self) -> dict[str, list[int]]:
        """{"tx": [local bytes, local packets, overlay bytes, ...], "rx": [...]}: the spool's form."""
        out: dict[str, list[int]] = {}
        for d in DIRECTIONS:
            out[d] = [v for c in CLASSES for v in self.get(f"{d}_{c}")]
        return out

    @classmethod
    def from_lists(cls, d: dict[str, Sequence[int]]) -> NetTotals:
        b: list[int] = []
        p: list[int] = []
        for direction in DIRECTIONS:
            vals = [int(v) for v in d[direction]]
            if len(vals) != 2 * len(CLASSES) or any(v < 0 for v in vals):
                raise ValueError(f"bad {direction} counters: {vals}")
            b += vals[0::2]
            p += vals[1::2]
        return cls(tuple(b), tuple(p))

    @classmethod
    def of(cls, values: dict[str, tuple[int, int]]) -> NetTotals:
        """From {key: (bytes, packets)}; missing keys are 0."""
        return cls(tuple(values.get(k, (0, 0))[0] for k in KEYS), tuple(values.get(k, (0, 0))[1] for k in KEYS))


def mac_prefix(mac: str) -> int:
    """The first three octets of a MAC as a 24-bit number ("02:00:07:.." -> 0x020007)."""
    octets = mac.strip().lower().split(":")
    if len(octets) != 6 or not all(len(o) == 2 for o in octets):
        raise ValueError(f"not a MAC address: {mac!r}")
    value = int("".join(octets[:3]), 16)
    if value >> 16 != 0x02:
        raise ValueError(f"job MAC {mac} does not start with 02 (the controller's 02:NN:NN node prefix)")
    return value


def mac_prefix_of(node_prefix: str) -> int:
    """A node's "02:NN:NN" as a 24-bit number (ValueError unless it is one)."""
    return mac_prefix(f"{node_prefix}:00:00:00")


@cache
def expected_tags(direction: str, prefix: int) -> frozenset[bytes]:
    """The kernel tags our program for this direction and node prefix can have (kernel.tag is the first 8
    bytes of SHA-1 or, since 6.18, SHA-256 of the instructions with map references zeroed)."""
    insns = program(0, direction, prefix, BASE[direction])
    return frozenset({hashlib.sha1(insns).digest()[:8], hashlib.sha256(insns).digest()[:8]})
