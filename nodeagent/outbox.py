"""A durable queue of reports for the controller.

Job status changes must reach the controller even when it is unreachable or the agent is killed:
each report is appended (fsync'ed) to `outbox.jsonl` in the state dir before anything else happens, and
removed only after the controller acknowledged it. Reports are idempotent on the controller side, so
delivering one twice after a crash is harmless.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any


class Outbox:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._items: list[dict[str, Any]] = []
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    try:
                        self._items.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue  # a torn last line from a crash mid-write: the report is re-derived
        self._seq = max((int(i.get("seq", 0)) for i in self._items), default=0)

    def put(self, item: dict[str, Any]) -> None:
        with self._lock:
            self._seq += 1
            item = {**item, "seq": self._seq}
            self._items.append(item)
            with open(self._path, "a") as f:
                f.write(json.dumps(item, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def pending(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._items)

    def ack(self, seq: int) -> None:
        with self._lock:
            self._items = [i for i in self._items if i["seq"] != seq]
            tmp = self._path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                for i in self._items:
                    f.write(json.dumps(i, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
