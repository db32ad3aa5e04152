"""The controller's state store: an interface, so that SQLite today and etcd tomorrow are interchangeable.

The model is deliberately the one etcd offers: typed records (`kind`, `key`) -> JSON-able dict, written in
atomic transactions, plus one cluster-wide revision that every transaction that changes desired state
bumps. The controller keeps the whole state in memory (it is small: a record per group, node and job) and
writes through the store before anything is published, so what an agent has seen is always durable.

Kinds in use: "group" (key: name), "node" (name), "job" (id), "quarantine" (IP address), "noderev" (node
name: the revision and digest of the node's last published desired state).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

Record = dict[str, Any]


@dataclass
class Txn:
    """What one transaction writes. `revision` None leaves the cluster revision unchanged."""

    puts: list[tuple[str, str, Record]] = field(default_factory=list)
    deletes: list[tuple[str, str]] = field(default_factory=list)
    revision: int | None = None

    def put(self, kind: str, key: str, value: Record) -> None:
        self.puts.append((kind, key, value))

    def delete(self, kind: str, key: str) -> None:
        self.deletes.append((kind, key))

    def __bool__(self) -> bool:
        return bool(self.puts or self.deletes or self.revision is not None)


@dataclass
class Contents:
    revision: int
    records: dict[str, dict[str, Record]]  # kind -> key -> value

    def kind(self, kind: str) -> dict[str, Record]:
        return self.records.get(kind, {})


class Store(Protocol):
    """A transactional record store. Implementations must make `commit` atomic and durable when it
    returns, and must raise (never half-apply) when it cannot."""

    def load(self) -> Contents: ...

    def commit(self, txn: Txn) -> None: ...

    def close(self) -> None: ...


class MemoryStore:
    """A store that forgets everything on exit: for unit tests and throwaway controllers."""

    def __init__(self) -> None:
        self.revision = 0
        self.records: dict[str, dict[str, Record]] = {}
        self.commits = 0

    def load(self) -> Contents:
        return Contents(self.revision, {k: dict(v) for k, v in self.records.items()})

    def commit(self, txn: Txn) -> None:
        for kind, key, value in txn.puts:
            self.records.setdefault(kind, {})[key] = value
        for kind, key in txn.deletes:
            self.records.get(kind, {}).pop(key, None)
        if txn.revision is not None:
            self.revision = txn.revision
        self.commits += 1

    def close(self) -> None:
        pass


def keys(records: Iterable[tuple[str, str, Record]]) -> list[tuple[str, str]]:
    return [(k, key) for k, key, _ in records]
