"""Regenerate the Python code for the jobnet protos: `python protos/generate.py`.

Writes, next to each .proto under protos/jobnet/, the message module (`*_pb2.py`), its type stub
(`*_pb2.pyi`), the gRPC module (`*_pb2_grpc.py`) and its stub (`*_pb2_grpc.pyi`). The generated files
are committed; tests/unit/test_protos_fresh.py fails when they are stale.

`--check` regenerates into a temporary directory and exits 1 if anything differs.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted((ROOT / "protos" / "jobnet").rglob("*.proto"))
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out: Path) -> None:
    from grpc_tools import protoc  # imported late: only this tool needs grpcio-tools

    include = str(Path(protoc.__file__).parent / "_proto")
    # protoc finds its mypy plugins on PATH: look next to this interpreter first (a venv's bin/),
    # so `.venv/bin/python protos/generate.py` works without activating the venv.
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *[str(p.relative_to(ROOT)) for p in PROTOS],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")


def generated_files(base: Path) -> list[Path]:
    files = []
    for proto in PROTOS:
        stem = proto.relative_to(ROOT).with_suffix("")
        for suffix in SUFFIXES:
            files.append(base / f"{stem}{suffix}")
    return files


def main(argv: list[str]) -> int:
    check = "--check" in argv
    with tempfile.TemporaryDirectory(prefix="jnproto") as tmp:
        generate(Path(tmp))
        stale = []
        for new, cur in zip(generated_files(Path(tmp)), generated_files(ROOT), strict=True):
            if not cur.exists() or not filecmp.cmp(new, cur, shallow=False):
                stale.append(cur.relative_to(ROOT))
                if not check:
                    shutil.copyfile(new, cur)
    if check and stale:
        print("stale generated files (run `python protos/generate.py`):", *stale, sep="\n  ")
        return 1
    print("up to date" if not stale else f"regenerated {len(stale)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
