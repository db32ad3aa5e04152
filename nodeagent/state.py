"""What the agent keeps on disk in its state dir, written atomically (write, fsync, rename).

- desired.json: the last desired state received from the controller, with its revision, so that a
  restarted agent reconciles at once (even with the controller down) and asks only for the delta.
- finished.json: jobs that ended on this node, so that a restarted agent never starts them again while
  the controller has not yet taken their end into account.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from pathlib import Path

from nodeagent.desired import DesiredState


def write_atomic(path: Path, text: str) -> None:
    """Write, fsync, rename. The temporary file is unique, so concurrent writers never trip on each other
    (the last rename wins, and every rename installs a complete file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class AgentState:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self._desired_path = state_dir / "desired.json"
        self._finished_path = state_dir / "finished.json"
        self._lock = threading.Lock()  # the loop thread and the kernel thread both save

    def load_desired(self) -> DesiredState:
        try:
            return DesiredState.from_json(self._desired_path.read_text())
        except FileNotFoundError:
            return DesiredState()
        except (ValueError, KeyError, TypeError):
            # Unreadable: start from nothing; the controller sends a full snapshot.
            return DesiredState()

    def save_desired(self, desired: DesiredState) -> None:
        with self._lock:
            write_atomic(self._desired_path, desired.to_json())

    def load_finished(self) -> set[str]:
        try:
            return set(json.loads(self._finished_path.read_text()))
        except (FileNotFoundError, ValueError):
            return set()

    def save_finished(self, finished: set[str]) -> None:
        with self._lock:
            write_atomic(self._finished_path, json.dumps(sorted(finished)))
