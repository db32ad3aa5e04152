"""The job runtime's durable state, one directory per job: state_dir/<job_id>/

    plan.json   written before the first kernel step (what the launch was)
    pid.json    {pid, starttime} of the job's init, written as soon as it exists (identifies it across pid reuse)
    status      written by the job's init when the job ends (end reason, exit code or signal)
    stop.json   {deadline}: a stop was requested; SIGKILL of the cgroup after the deadline (epoch seconds)

This is what lets a restarted agent adopt running jobs and report the end of jobs that died meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class InitIdentity:
    pid: int
    starttime: int


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


class JobState:
    def __init__(self, state_root: Path, job_id: str) -> None:
        self.job_id = job_id
        self.dir = state_root / job_id

    def create(self, plan: dict[str, Any]) -> None:
        self.dir.mkdir(mode=0o700, parents=False, exist_ok=False)
        _write_json(self.dir / "plan.json", plan)

    def plan(self) -> dict[str, Any] | None:
        return _read_json(self.dir / "plan.json")

    @property
    def status_path(self) -> Path:
        return self.dir / "status"

    def write_init(self, ident: InitIdentity) -> None:
        _write_json(self.dir / "pid.json", {"pid": ident.pid, "starttime": ident.starttime})

    def init(self) -> InitIdentity | None:
        d = _read_json(self.dir / "pid.json")
        return InitIdentity(int(d["pid"]), int(d["starttime"])) if d else None

    def status(self) -> dict[str, Any] | None:
        return _read_json(self.status_path)

    def request_stop(self, deadline: float) -> None:
        if not (self.dir / "stop.json").exists():
            _write_json(self.dir / "stop.json", {"deadline": deadline})

    def stop_deadline(self) -> float | None:
        d = _read_json(self.dir / "stop.json")
        return float(d["deadline"]) if d else None

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.dir)


def list_job_ids(state_root: Path) -> list[str]:
    try:
        return sorted(p.name for p in state_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []
