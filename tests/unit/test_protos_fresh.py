"""The committed generated code matches the .proto files (regenerate: `python protos/generate.py`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh() -> None:
    r = subprocess.run([sys.executable, "protos/generate.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_stale_code_is_detected(tmp_path: Path) -> None:
    """The check can fail: a copy of the tree with a changed .proto is reported stale."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", copy / "protos")
    proto = copy / "protos" / "jobnet" / "v1" / "jobnet.proto"
    text = proto.read_text().replace("message ListNodesRequest {}", "message ListNodesRequest { string x = 1; }")
    proto.write_text(text)
    r = subprocess.run([sys.executable, "protos/generate.py", "--check"], cwd=copy, capture_output=True, text=True)
    assert r.returncode == 1 and "stale" in r.stdout
