"""Fan-out of desired state to the node agents' WatchNode streams.

For every registered node the hub keeps the last published view and its revision, plus a short history,
so that a reconnecting agent gets the delta since the revision it holds (or nothing, when it is current)
and only falls back to a full snapshot when its revision is unknown (e.g. after a controller restart
with a different state, or after more than HISTORY changes).

Deltas are chained: every update sent to a node has from_revision equal to the revision of the update
before it, so an agent that missed one detects it (StaleDelta) and asks for a snapshot.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from controller.cluster import Cluster
from controller.views import View, delta, node_view
from protos.jobnet.v1 import jobnet_pb2 as pb

log = logging.getLogger("jobnet.controller.watch")

HISTORY = 32
MAX_BACKLOG = 10_000  # updates queued for one slow stream before it is cut (the agent resyncs)


@dataclass(eq=False)
class Subscriber:
    node: str
    boot_id: str
    queue: asyncio.Queue[pb.NodeStateUpdate | None] = field(default_factory=asyncio.Queue)
    closed: bool = False

    def send(self, update: pb.NodeStateUpdate | None) -> None:
        if self.closed:
            return
        if update is not None and self.queue.qsize() >= MAX_BACKLOG:
            log.warning("watch stream of node %s is %d updates behind: closing it (the agent will resync)",
                        self.node, MAX_BACKLOG)
            update = None
        if update is None:
            self.closed = True
        self.queue.put_nowait(update)


class WatchHub:
    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self.views: dict[str, View] = {}
        self.revs: dict[str, int] = {}
        self.history: dict[str, deque[tuple[int, View]]] = {}
        self.subs: dict[str, list[Subscriber]] = {}
        self.published = 0

    def load(self) -> None:
        """At start-up: a node whose view equals the one last published (by digest) keeps its revision,
        so agents that are current need nothing; any other gets the current cluster revision."""
        for name in self.c.nodes:
            view = node_view(self.c, name)
            rec = self.c.noderev.get(name, {})
            rev = int(rec["revision"]) if rec.get("digest") == view.digest() else self.c.revision
            self._set(name, view, rev)

    def _set(self, node: str, view: View, rev: int) -> None:
        self.views[node] = view
        self.revs[node] = rev
        self.history.setdefault(node, deque(maxlen=HISTORY)).append((rev, view))

    def refresh(self, nodes: Iterable[str], revision: int) -> dict[str, View]:
        """Recompute the given nodes' views at `revision`; publish and return those that changed."""
        changed: dict[str, View] = {}
        for node in sorted(set(nodes)):
            if node not in self.c.nodes:
                continue
            new = node_view(self.c, node)
            old = self.views.get(node)
            if old is None:
                self._set(node, new, revision)
                changed[node] = new
                continue
            upd = delta(old, new, self.revs[node], revision)
            if upd is None:
                continue
            self._set(node, new, revision)
            changed[node] = new
            for sub in self.subs.get(node, []):
                sub.send(upd)
                self.published += 1
        return changed

    def subscribe(self, node: str, boot_id: str, since: int) -> Subscriber:
        """A new stream for `node`. Earlier streams of the node are closed: one agent per node."""
        for old in self.subs.pop(node, []):
            old.send(None)
        sub = Subscriber(node, boot_id)
        self.subs[node] = [sub]
        view, rev = self.views.get(node, View()), self.revs.get(node, self.c.revision)
        first: pb.NodeStateUpdate | None = None
        if since == rev:
            first = pb.NodeStateUpdate(revision=rev, from_revision=rev)
        elif since:
            past = next((v for r, v in self.history.get(node, ()) if r == since), None)
            if past is not None:
                first = delta(past, view, since, rev) or pb.NodeStateUpdate(revision=rev, from_revision=since)
        if first is None:
            first = view.snapshot(rev)
        log.info("node %s watches from revision %d: %s at revision %d", node, since,
                 "snapshot" if first.snapshot else "delta", rev)
        sub.send(first)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        subs = self.subs.get(sub.node, [])
        if sub in subs:
            subs.remove(sub)
        sub.closed = True

    def close_node(self, node: str) -> None:
        for sub in self.subs.pop(node, []):
            sub.send(None)

    def close_all(self) -> None:
        for node in list(self.subs):
            self.close_node(node)
