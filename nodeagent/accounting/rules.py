"""The accounting table of a job's network namespace, as data (pure: no kernel, no I/O).

    table netdev jn_acct
      counters  tx_local tx_overlay tx_external rx_local rx_overlay rx_external
      chain tx  hook egress  device eth0 priority 500   (after anything that could still drop the frame)
        @ll,0,24  == <node prefix>  counter tx_local    accept     destination MAC 02:NN:NN: same node
        @ll,0,8   == 0x02           counter tx_overlay  accept     another node's job
                                    counter tx_external            broadcast, multicast, anything else
      chain rx  hook ingress device eth0 priority -500  (before anything else sees the frame)
        meta pkttype 3 (PACKET_OTHERHOST)               accept     unicast for another MAC (bridge flooding)
        @ll,48,24 == <node prefix>  counter rx_local    accept     source MAC
        @ll,48,8  == 0x02           counter rx_overlay  accept
        @ll,48,8  != 0x02           counter rx_external            (needs a MAC header, see below)

What the kernel counts (skb->len, measured on kernel 6.18, tests/accounting): at the egress hook the frame
with its 14-byte Ethernet header; at the ingress hook the frame WITHOUT it (the header is pulled before
the hook). `frame_totals` adds 14 bytes per received packet, so both directions are frame bytes (what
IFLA_STATS64 of eth0 counts). The looped-back copy of a broadcast/multicast the job sends itself
(dev_loopback_xmit) passes the ingress hook of eth0 without crossing the device; it has no MAC header
(mac_len 0), so every @ll match on it fails and no rx rule counts it (`meta pkttype` cannot tell it: nft
reports such a copy's pkttype from its destination address, not as PACKET_LOOPBACK). So the receive side
matches the device's own counters. Unicast frames for another
MAC (PACKET_OTHERHOST: a bridge floods a frame whose destination it has not learned, e.g. to a job that
has not sent anything for 5 minutes) do cross eth0 and are counted by the device, but the job's kernel
drops them unread: they are noise, not the job's traffic, and are not charged to it.

Every rule carries a comment that states its whole meaning (`jn-acct/<version> ...`, with the prefix):
`problems` compares them, the hooks and priorities and the counters with what we want; a mismatch is
repaired in ONE transaction that replaces the chains and keeps the counter objects (their values).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

TABLE = "jn_acct"
FAMILY = "netdev"
DEVICE = "eth0"
VERSION = 1
ETH_HLEN = 14
PACKET_OTHERHOST = 3
TX_PRIORITY = 500
RX_PRIORITY = -500

DIRECTIONS = ("tx", "rx")
CLASSES = ("local", "overlay", "external")
KEYS = tuple(f"{d}_{c}" for d in DIRECTIONS for c in CLASSES)  # counter names, the order of every tuple here


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


def _prefix_text(prefix: int) -> str:
    return ":".join(f"{(prefix >> s) & 0xFF:02x}" for s in (16, 8, 0))


def _rules(prefix: int) -> dict[str, list[tuple[str, str]]]:
    """chain -> [(rule body, comment)], in order."""
    p = _prefix_text(prefix)
    tag = f"jn-acct/{VERSION}"
    return {
        "tx": [
            (f'@ll,0,24 0x{prefix:06x} counter name "tx_local" accept', f"{tag} tx local dst {p}"),
            ('@ll,0,8 0x02 counter name "tx_overlay" accept', f"{tag} tx overlay dst 02 not {p}"),
            ('counter name "tx_external"', f"{tag} tx external"),
        ],
        "rx": [
            (f"meta pkttype {PACKET_OTHERHOST} accept", f"{tag} rx skip unicast for another host"),
            (f'@ll,48,24 0x{prefix:06x} counter name "rx_local" accept', f"{tag} rx local src {p}"),
            ('@ll,48,8 0x02 counter name "rx_overlay" accept', f"{tag} rx overlay src 02 not {p}"),
            ('@ll,48,8 != 0x02 counter name "rx_external"', f"{tag} rx external src not 02, has a MAC header"),
        ],
    }


CHAINS = {"tx": ("egress", TX_PRIORITY), "rx": ("ingress", RX_PRIORITY)}


def _body(prefix: int) -> list[str]:
    t = f"{FAMILY} {TABLE}"
    cmds = [f"add counter {t} {k}" for k in KEYS]  # an existing counter is kept as it is (values too)
    for chain, rules in _rules(prefix).items():
        hook, prio = CHAINS[chain]
        cmds.append(f'add chain {t} {chain} {{ type filter hook {hook} device "{DEVICE}" priority {prio}; '
                    "policy accept; }")
        cmds += [f'add rule {t} {chain} {body} comment "{comment}"' for body, comment in rules]
    return cmds


def create_commands(prefix: int) -> str:
    """One transaction that creates the whole table; fails with EEXIST (changing nothing) if it exists."""
    return "\n".join([f"create table {FAMILY} {TABLE}", *_body(prefix)]) + "\n"


def repair_commands(listing: Sequence[dict[str, Any]], prefix: int) -> str:
    """One transaction that replaces every chain of the existing table by ours and keeps the counters."""
    t = f"{FAMILY} {TABLE}"
    cmds = [f"add table {t}"]
    for chain in sorted(_chains(listing)):
        cmds += [f"flush chain {t} {chain}", f"delete chain {t} {chain}"]
    return "\n".join(cmds + _body(prefix)) + "\n"


def _chains(listing: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["chain"]["name"]: o["chain"] for o in listing if "chain" in o and o["chain"].get("table") == TABLE}


def problems(listing: Sequence[dict[str, Any]], prefix: int) -> list[str]:
    """What differs between the table in `listing` (JSON of `list table netdev jn_acct`) and ours."""
    out: list[str] = []
    have = {o["counter"]["name"] for o in listing if "counter" in o}
    out += [f"counter {k} missing" for k in KEYS if k not in have]
    chains = _chains(listing)
    for name in sorted(set(chains) - set(CHAINS)):
        out.append(f"unexpected chain {name}")
    rules: dict[str, list[str]] = {name: [] for name in chains}
    for o in listing:
        if "rule" in o and o["rule"].get("chain") in rules:
            rules[o["rule"]["chain"]].append(str(o["rule"].get("comment", "")))
    for name, (hook, prio) in CHAINS.items():
        c = chains.get(name)
        if c is None:
            out.append(f"chain {name} missing")
            continue
        if (c.get("type"), c.get("hook"), c.get("prio"), c.get("policy")) != ("filter", hook, prio, "accept"):
            out.append(f"chain {name} is {c.get('type')} hook {c.get('hook')} priority {c.get('prio')} "
                       f"policy {c.get('policy')}, not filter hook {hook} priority {prio} policy accept")
        want = [comment for _, comment in _rules(prefix)[name]]
        if rules[name] != want:
            out.append(f"chain {name} rules {rules[name]} != {want}")
    return out


def raw_counters(listing: Iterable[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """{counter name: (bytes, packets)} as the kernel holds them."""
    out: dict[str, tuple[int, int]] = {}
    for o in listing:
        c = o.get("counter")
        if c is not None and c.get("table") == TABLE and c.get("name") in KEYS:
            out[c["name"]] = (int(c.get("bytes", 0)), int(c.get("packets", 0)))
    return out


def frame_totals(raw: dict[str, tuple[int, int]]) -> NetTotals:
    """Kernel counters -> frame bytes: received packets were counted without their 14-byte header."""
    fixed = {k: ((b + ETH_HLEN * p) if k.startswith("rx_") else b, p) for k, (b, p) in raw.items()}
    return NetTotals.of(fixed)
