#!/usr/bin/env bash
# Set up everything MegaFlow needs on one Debian/Ubuntu machine (run as root). Safe to run again:
# installs only what is missing, starts only what is not running.
#   scripts/setup.sh            demo needs: apt packages, Redis on 127.0.0.1:6379, dockerd, venv, sandbox image
#   scripts/setup.sh --test     also the test extras (chromium for the Flower page test, dev requirements)
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=demo
[ "${1:-}" = "--test" ] && MODE=test
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "run as root (or install sudo)"; exit 1; }
  SUDO=sudo
fi

# --- apt packages ------------------------------------------------------------------------------
PKGS=(redis-server redis-tools docker.io mmdebstrap python3 python3-venv python3-pip git ca-certificates curl)
# chromium: the Flower page test; build-essential + cmake: llama-cpp-python's server builds from source (once; pip caches the wheel)
[ "$MODE" = test ] && PKGS+=(chromium build-essential cmake)
MISSING=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || MISSING+=("$p")
done
if [ ${#MISSING[@]} -gt 0 ]; then
  say "installing ${MISSING[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${MISSING[@]}" >/dev/null
fi

# --- Redis for the demo (tests start their own on free ports) ------------------------------------
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  say "starting redis-server on 127.0.0.1:6379"
  $SUDO mkdir -p /var/lib/redis /var/log/redis
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/megaflow.log
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

# --- Docker engine ----------------------------------------------------------------------------
if ! $SUDO docker info >/dev/null 2>&1; then
  if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    $SUDO rm -f /var/run/docker.pid
  fi
  if command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then
    say "starting docker (systemd)"
    $SUDO systemctl start docker || true
  fi
  if ! $SUDO docker info >/dev/null 2>&1; then
    # No systemd here: run dockerd directly. Containers need no network: no bridge, no iptables.
    say "starting dockerd (--bridge=none --iptables=false)"
    $SUDO sh -c 'nohup dockerd --bridge=none --iptables=false >/var/log/megaflow-dockerd.log 2>&1 &'
  fi
  for _ in $(seq 60); do $SUDO docker info >/dev/null 2>&1 && break; sleep 0.5; done
  $SUDO docker info >/dev/null 2>&1 || { echo "dockerd did not start; see /var/log/megaflow-dockerd.log"; exit 1; }
fi

# --- Python virtualenv ------------------------------------------------------------------------
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
  echo "MegaFlow needs Python 3.11+; set PYTHON=/path/to/python3.11"; exit 1; }
[ -x .venv/bin/python ] || { say "creating .venv"; "$PY" -m venv .venv; }
REQ=requirements.txt
[ "$MODE" = test ] && REQ=requirements-dev.txt
STAMP=".venv/.installed-$(cat requirements*.txt pyproject.toml | sha256sum | cut -c1-16)-$MODE"
if [ ! -f "$STAMP" ]; then
  say "installing Python requirements ($REQ)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  # llama-cpp-python (test extras) compiles llama.cpp: skip the multimodal part, use both cores
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    .venv/bin/python -m pip install -q -r "$REQ"
  .venv/bin/python -m pip install -q --no-deps -e .
  rm -f .venv/.installed-*
  touch "$STAMP"
fi

# --- the sandbox image (built locally with mmdebstrap; cached) ------------------------------------
.venv/bin/megaflow images build
say "ready"
