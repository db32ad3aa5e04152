"""SQLite implementation of the store: one file, WAL journal, every commit durable (synchronous=FULL).

Schema (version 1):
    objects(kind TEXT, key TEXT, value TEXT JSON, PRIMARY KEY (kind, key)) WITHOUT ROWID
    meta(key TEXT PRIMARY KEY, value TEXT)      -- "revision"
A newer schema than this code knows is refused at start-up rather than misread.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from controller.store import Contents, Record, Txn

SCHEMA_VERSION = 1


class SchemaError(Exception):
    pass


class SqliteStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=5000")
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SchemaError(f"{path} has schema version {version}, newer than this controller's "
                              f"{SCHEMA_VERSION}: run a newer jobnet-controller or restore a backup")
        if version == 0:
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute("CREATE TABLE IF NOT EXISTS objects (kind TEXT NOT NULL, key TEXT NOT NULL, "
                                "value TEXT NOT NULL, PRIMARY KEY (kind, key)) WITHOUT ROWID")
                self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def load(self) -> Contents:
        records: dict[str, dict[str, Record]] = {}
        for kind, key, value in self.db.execute("SELECT kind, key, value FROM objects"):
            records.setdefault(kind, {})[key] = json.loads(value)
        row = self.db.execute("SELECT value FROM meta WHERE key='revision'").fetchone()
        return Contents(int(row[0]) if row else 0, records)

    def commit(self, txn: Txn) -> None:
        if not txn:
            return
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            if txn.puts:
                cur.executemany(
                    "INSERT INTO objects(kind, key, value) VALUES (?, ?, ?) "
                    "ON CONFLICT(kind, key) DO UPDATE SET value=excluded.value",
                    [(k, key, json.dumps(v, sort_keys=True, separators=(",", ":"))) for k, key, v in txn.puts],
                )
            if txn.deletes:
                cur.executemany("DELETE FROM objects WHERE kind=? AND key=?", txn.deletes)
            if txn.revision is not None:
                cur.execute("INSERT INTO meta(key, value) VALUES ('revision', ?) "
                            "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (str(txn.revision),))
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()
