"""The nftables rule set jobnet counted with until 2026-12-02 (netdev egress/ingress chains on the job's eth0,
six named counters), kept as the peer that bench.accounting measures the BPF counters against in the same run.

    table netdev jn_acct
      counters  tx_local tx_overlay tx_external rx_local rx_overlay rx_external
      chain tx  hook egress  device eth0 priority 500
        @ll,0,24  == <node prefix>  counter tx_local    accept     destination MAC 02:NN:NN: same node
        @ll,0,8   == 0x02           counter tx_overlay  accept     another node's job
                                    counter tx_external            broadcast, multicast, anything else
      chain rx  hook ingress device eth0 priority -500
        meta pkttype 3 (PACKET_OTHERHOST)               accept     unicast for another MAC (bridge flooding)
        @ll,48,24 == <node prefix>  counter rx_local    accept     source MAC
        @ll,48,8  == 0x02           counter rx_overlay  accept
        @ll,48,8  != 0x02           counter rx_external            (needs a MAC header)

It counts the same frames into the same classes as the BPF programs (at the ingress hook nftables sees the
frame without its 14-byte header: add 14 per received packet). Its per-packet cost was 2.2-4 % of a TCP
stream's CPU on kernel 6.18 (bench/README.md): the reason it was replaced.
"""

from __future__ import annotations

from nodeagent.accounting.rules import DEVICE, KEYS

TABLE = "jn_acct"
FAMILY = "netdev"
VERSION = 1
PACKET_OTHERHOST = 3
TX_PRIORITY = 500
RX_PRIORITY = -500


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
