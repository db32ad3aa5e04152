"""Who is calling: the identity attached to every RPC.

Today channels are insecure (a unix socket or a management network), so the identity is the transport
peer. When mTLS node identity arrives, `identify` reads the verified certificate from the auth context,
and the service checks that a node only speaks for itself (RegisterNode, Heartbeat, WatchNode,
ReportJobStatus) without changing any handler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Identity:
    kind: str  # "peer" today; "node" / "user" with mTLS
    name: str
    verified: bool = False

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" + ("" if self.verified else " (unverified)")


def identify(context: Any) -> Identity:
    auth = context.auth_context() or {}
    cn = auth.get("x509_common_name")
    if cn:
        return Identity("node", cn[0].decode(), verified=True)
    return Identity("peer", context.peer() or "unknown")
