#!/usr/bin/env bash
# The README's quick start.  On a fresh Debian/Ubuntu machine, as root:
#   bash dev.sh demo    two pods talking mTLS through the sidecars (network namespaces)
#   bash dev.sh test    lint, types, unit tests, the netns suite and the fuzz campaign
#   bash dev.sh bench   the benchmarks (plaintext vs trio-tproxy vs stunnel vs haproxy)
# Each installs what it needs first: system packages with apt-get, Python ones in .venv.
set -euo pipefail
cd "$(dirname "$0")"

need_root() {
  if [[ $(id -u) -ne 0 ]]; then
    echo "dev.sh $1: needs root (network namespaces, nftables): run it with sudo" >&2
    exit 2
  fi
}

system_packages() {
  local want=(nftables iproute2 curl openssl tcpdump procps "$@") missing=()
  for pkg in "${want[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
  if ((${#missing[@]})); then
    echo "==> apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

python_env() {
  local extras=${1:-test,dev}
  if [[ ! -x .venv/bin/python ]]; then
    echo "==> creating .venv"
    python3 -m venv .venv
  fi
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
}

case "${1:-}" in
  demo)
    need_root demo; system_packages; python_env
    exec .venv/bin/trio-tproxy demo
    ;;
  test)
    need_root test; system_packages; python_env
    exec .venv/bin/tox run -e lint,types,unit,fuzz,netns
    ;;
  bench)
    need_root bench; system_packages stunnel4 haproxy; python_env test,dev,bench
    shift; exec .venv/bin/python -m benchmarks "$@"
    ;;
  *)
    echo "usage: bash dev.sh demo|test|bench" >&2
    exit 2
    ;;
esac
