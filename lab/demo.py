"""``trio-tproxy demo``: two pods talking mutual TLS through their sidecars.

Everything happens in network namespaces this command creates and removes
(the machine's own namespace is never touched): pods A and B on a bridge, a
throwaway CA with SPIFFE certificates for their service accounts, both
sidecars, an HTTP server and a half-close server in B.  A sends an HTTP
request (curl) and a half-closed raw TCP exchange to B over IPv4 and IPv6,
while tcpdump on the bridge proves the wire carried only TLS.

The demo is part of the test lab: ``trio-tproxy demo`` (trio_tproxy/cli.py)
registers the command and imports this module only when it runs, so the
sidecar never loads the lab and an install without the lab (the image) says
where the demo lives instead.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import sys
import time

from trio_tproxy.interception import CAP_NET_ADMIN, CAP_SYS_ADMIN, has_capability

from .pods import PodLab, spiffe_id, work_directory
from .topology import sigterm_unwinds

HTTP_PORT = 8080
RAW_PORT = 7000

_CONN_LINE = re.compile(
    r"(?P<dir>egress|ingress) (?P<src>\S+) -> (?P<dst>\S+) peer=(?P<peer>\S+) "
    r"(?P<version>\S+) (?P<cipher>\S+) sent=(?P<sent>\d+) received=(?P<received>\d+) "
    r"duration=(?P<duration>\S+) outcome=(?P<outcome>\S+)"
)


def missing_prerequisites() -> list[str]:
    problems = []
    if not (has_capability(CAP_SYS_ADMIN) and has_capability(CAP_NET_ADMIN)):
        problems.append(
            "the demo needs root: it creates network namespaces and nftables rules "
            "(run it with sudo)"
        )
    for tool, package in (
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("curl", "curl"),
        ("tcpdump", "tcpdump"),
        ("ss", "iproute2"),
    ):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is not installed (apt-get install {package})")
    return problems


def cmd_demo(args: argparse.Namespace) -> int:
    """``trio-tproxy demo [--keep]``; ``args.keep`` keeps the work directory."""
    problems = missing_prerequisites()
    if problems:
        print(f"trio-tproxy demo: {problems[0]}", file=sys.stderr)
        return 2
    with work_directory("trio-tproxy-demo-", keep=args.keep) as workdir:
        sigterm_unwinds()  # SIGTERM ends the demo like Ctrl-C: the teardown always runs
        started = time.monotonic()
        try:
            with PodLab(workdir) as lab:
                return _demo(lab, started)
        except KeyboardInterrupt:
            print("\ninterrupted: everything was torn down")
            return 130


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


def _demo(lab: PodLab, started: float) -> int:
    a, b, node = lab.host("a"), lab.host("b"), lab.topology.netns_of("node")
    _step(
        f"pods in network namespaces {a.netns} ({a.ip4}, {a.ip6}) and "
        f"{b.netns} ({b.ip4}, {b.ip6}), bridged in {node}"
    )
    _step(f"certificates: A is {spiffe_id('a')}, B is {spiffe_id('b')} (one throwaway CA)")
    capture = lab.workdir / "bridge.pcap"
    tcpdump = lab.topology.popen(
        "node",
        ["tcpdump", "--immediate-mode", "-i", "br0", "-U", "-s", "0", "-w", str(capture), "tcp"],
        stdout=open(os.devnull, "wb"),
        stderr=open(lab.workdir / "tcpdump.log", "wb"),
    )
    lab.start_sidecar("a")
    lab.start_sidecar("b")
    _step("sidecars ready in both pods (nftables TPROXY + policy routes installed)")
    lab.start_app(
        "b", sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", "::", port=HTTP_PORT
    )
    lab.start_app(
        "b",
        sys.executable,
        "-m",
        "lab.apps",
        "halfclose-server",
        str(RAW_PORT),
        "0.3",
        port=RAW_PORT,
    )
    _wait_capture_ready(lab)

    marker = f"plaintext-marker-{secrets.token_hex(8)}"
    ok = True
    for ip in (b.ip4, b.ip6):
        host = f"[{ip}]" if ":" in ip else ip
        http = lab.topology.run(
            "a",
            [
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                f"X-Marker: {marker}",
                f"http://{host}:{HTTP_PORT}/",
            ],
        )
        ok &= http.stdout.strip() == "200"
        _step(f"A: curl http://{host}:{HTTP_PORT}/ -> HTTP {http.stdout.strip() or http.stderr}")
        message = f"{marker} " * 1000
        raw = lab.topology.run(
            "a",
            [
                sys.executable,
                "-m",
                "lab.apps",
                "halfclose-client",
                ip,
                str(RAW_PORT),
                message,
            ],
        )
        ok &= raw.stdout.startswith(f"got {len(message)} bytes")
        _step(
            f"A: sent {len(message)} B to {host}:{RAW_PORT}, shut its write side, B answered "
            f"0.3 s "
            f"later: {raw.stdout.strip() or raw.stderr.strip()}"
        )

    time.sleep(0.3)
    lab.topology.stop(tcpdump, sig=signal.SIGINT)
    wire = capture.read_bytes() if capture.exists() else b""
    tls_records = len(re.findall(rb"\x17\x03\x03", wire))
    leaks = wire.count(marker.encode())

    print()
    print("What each sidecar saw (from their logs):")
    for pod in ("a", "b"):
        for m in _CONN_LINE.finditer(lab.sidecars[pod].log()):
            print(
                f"  {pod.upper()} {m['dir']:7} {m['src']:>26} -> {m['dst']:<24} "
                f"peer {m['peer']}  {m['version']} {m['cipher']}  "
                f"sent {m['sent']} B, received {m['received']} B, {m['outcome']}"
            )
    print()
    print(
        f"Wire: {len(wire)} bytes captured on the bridge, {tls_records} TLS application-data "
        f"records, plaintext marker found {leaks} times."
    )
    lines = {pod: len(_CONN_LINE.findall(lab.sidecars[pod].log())) for pod in ("a", "b")}
    codes = {pod: lab.stop_sidecar(pod) for pod in ("a", "b")}
    ok &= leaks == 0 and tls_records > 0 and lines["a"] >= 4 and lines["b"] >= 4
    ok &= codes == {"a": 0, "b": 0}
    print(
        f"Sidecars stopped with SIGTERM (exit codes {codes['a']}, {codes['b']}), "
        f"rules and routes removed; namespaces removed next."
    )
    print(f"{'OK' if ok else 'FAILED'}: demo took {time.monotonic() - started:.1f}s")
    return 0 if ok else 1


def _wait_capture_ready(lab: PodLab) -> None:
    log = lab.workdir / "tcpdump.log"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and b"listening on" not in log.read_bytes():
        time.sleep(0.05)
