#!/usr/bin/env bash
# Install everything jobnet needs on a fresh Debian machine (run as root), into ./.venv.
#   bash deploy/setup.sh          system packages + Python packages (idempotent; fast when done already)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "deploy/setup.sh: run as root (it installs system packages and jobnet creates namespaces)" >&2
    exit 1
fi

# Kernel-side tools used by the lab, the tests (as an independent oracle) and the benchmarks.
# The product itself talks netlink (pyroute2) and never runs these.
PKGS=(iproute2 nftables iperf3 iputils-ping util-linux procps kmod busybox-static containernetworking-plugins crun)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    python3 -m venv .venv
fi
stamp=.venv/.jobnet-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "== installing jobnet and its Python dependencies into .venv"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch "$stamp"
fi
echo "== ready: $(.venv/bin/python --version), jobnet CLI at .venv/bin/jobnet"
