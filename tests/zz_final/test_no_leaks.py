"""Runs last (directory order): after the whole suite, nothing the project or its tests created is left
on the machine: no network namespace, link, nft table or cgroup with the project's prefix `jn`, and no
accounting BPF program (they go with their job's eth0, when its namespace is destroyed: asynchronously, so
the check waits a little)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.root


def _ours(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith(("jn", "jobnet"))]


def test_no_namespaces_links_nft_tables_or_cgroups_left() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    netns = _ours([p.name for p in Path("/run/netns").iterdir()]) if Path("/run/netns").is_dir() else []
    links = _ours([link["ifname"] for link in json.loads(
        subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout)])
    nft = subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, text=True)
    tables = []
    if nft.returncode == 0:
        tables = _ours([t["table"]["name"] for t in json.loads(nft.stdout)["nftables"] if "table" in t])
    cgroups = []
    root = Path("/sys/fs/cgroup")
    for hier in [root, *[p for p in root.iterdir() if p.is_dir()]]:
        cgroups += [str(hier / n) for n in _ours([p.name for p in hier.iterdir() if p.is_dir()])]
    from nodeagent.accounting import bpf
    from nodeagent.accounting.rules import PROG_NAMES

    deadline = time.monotonic() + 10
    while (progs := bpf.loaded_programs(tuple(PROG_NAMES.values()))) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {"netns": netns, "links": links, "nft tables": tables, "cgroups": cgroups,
            "bpf programs": [f"{p.name} id {p.id}" for p in progs]}
    assert not any(left.values()), f"left behind after the suite: {left}"
