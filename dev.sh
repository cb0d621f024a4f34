#!/usr/bin/env bash
# The README's quick start.  On a fresh Debian/Ubuntu machine, as root (or with sudo):
#   bash dev.sh demo    two pods talking mTLS through the sidecars (network namespaces)
#   bash dev.sh test    lint, types, unit tests, the fuzz campaign and the netns suite
#                       (under CI=true also the fresh-machine check of the quick start)
#   bash dev.sh image   build the Dockerfile with podman and run the demo through the image
#   bash dev.sh fresh   the quick start in a brand-new Debian root filesystem
#   bash dev.sh bench   the benchmarks (plaintext vs trio-tproxy vs stunnel vs haproxy)
# Each installs what it needs first: system packages with apt-get, Python ones in
# .venv.  Every step is idempotent and an interrupted run heals on the next one.
set -euo pipefail
cd "$(dirname "$0")"

need_root() {
  [[ $(id -u) -eq 0 ]] && return 0
  if command -v sudo >/dev/null 2>&1; then
    exec sudo --preserve-env=CI bash "$0" "$@"
  fi
  echo "dev.sh $1: needs root (network namespaces, nftables); run it as root" >&2
  exit 2
}

system_packages() {
  local want=(nftables iproute2 curl openssl tcpdump procps ca-certificates "$@") missing=()
  for pkg in "${want[@]}"; do
    # "install ok installed" only: an interrupted dpkg leaves half-configured ones
    [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) == "install ok installed" ]] ||
      missing+=("$pkg")
  done
  # The venv module ships with python3 itself; ensurepip (needed to create a
  # venv with pip in it) comes only with python3-venv.
  python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
  if ((${#missing[@]})); then
    echo "==> apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    dpkg --configure -a >/dev/null 2>&1 || true # finish what an interrupted run left
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# .venv with the package and the extras a command needs.  A venv without a
# working pip (an interrupted or failed creation) is made again; pip runs only
# when pyproject.toml or the extras changed since the last successful install.
python_env() {
  local extras=$1 stamp
  if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    echo "==> creating .venv"
    rm -rf .venv
    python3 -m venv .venv
  fi
  # A C compiler that appeared since (dev.sh test installs one) builds the
  # compiled data path: install again then.
  stamp="$(cat pyproject.toml setup.py | sha256sum | cut -d' ' -f1) ${extras} cc=$(command -v cc || true)"
  if [[ $(cat .venv/.installed 2>/dev/null) != "$stamp" ]]; then
    echo "==> installing trio-tproxy${extras:+[$extras]} into .venv"
    rm -f .venv/.installed
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
    echo "$stamp" >.venv/.installed
  fi
}

case "${1:-}" in
  demo)
    need_root "$@"; system_packages
    # what the tests install is a superset: keep it rather than reinstalling less
    if [[ $(cut -d' ' -f2 .venv/.installed 2>/dev/null) == test,dev ]]; then
      python_env test,dev
    else
      python_env lab
    fi
    exec .venv/bin/trio-tproxy demo
    ;;
  test)
    # dnsutils: dig, for the UDP-over-DTLS tests; gcc: the compiled data path,
    # which the tests run beside the pure-Python one
    need_root "$@"; system_packages dnsutils gcc libc6-dev
    python_env test,dev
    .venv/bin/tox run -e lint,types,unit,fuzz,netns
    if [[ ${CI:-} == true ]]; then
      system_packages podman runc mmdebstrap
      .venv/bin/tox run -e image
      exec bash .ci/fresh-machine
    fi
    ;;
  image)
    need_root "$@"; system_packages podman runc mmdebstrap
    python_env test,dev
    shift; exec .venv/bin/tox run -e image -- "$@"
    ;;
  fresh)
    need_root "$@"
    exec bash .ci/fresh-machine
    ;;
  bench)
    need_root "$@"
    # the proxies compared, the real applications of the app scenarios
    # (benchmarks/apps.py), and gcc for the compiled data path
    system_packages stunnel4 haproxy nginx-light wrk redis-server redis-tools postgresql \
      gcc libc6-dev
    python_env test,dev,bench
    shift; exec .venv/bin/python -m benchmarks "$@"
    ;;
  *)
    echo "usage: bash dev.sh demo|test|image|fresh|bench" >&2
    exit 2
    ;;
esac
