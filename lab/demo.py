"""``trio-tproxy demo``: two pods talking mutual TLS through their sidecars.

Everything happens in network namespaces this command creates and removes
(the machine's own namespace is never touched): pods A and B on a bridge, a
throwaway CA with SPIFFE certificates for their service accounts, both
sidecars, an HTTP server and a half-close server in B.  A sends an HTTP
request (curl) and a half-closed raw TCP exchange to B over IPv4 and IPv6,
first with the sidecars off (the control: tcpdump on the bridge sees the
plaintext marker), then through them (the marker is gone, only TLS records
cross); a host without a sidecar is refused, and B's sidecar says why.  It ends with
an excerpt of both sidecars' ``/metrics`` and ``trio-tproxy doctor`` in pod A.

The demo is part of the test lab: ``trio-tproxy demo`` (trio_tproxy/cli.py)
registers the command and imports this module only when it runs, so the
sidecar never loads the lab and an install without the lab (the image) says
where the demo lives instead.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterator

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
            "the demo needs root: it creates network namespaces and nftables rules (run it as root)"
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
            with PodLab(workdir, sidecar_image=getattr(args, "image", None)) as lab:
                return _demo(lab, started)
        except KeyboardInterrupt:
            print("\ninterrupted: everything was torn down")
            return 130


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


def _say(text: str) -> None:
    print(f"    {text}", flush=True)


def _demo(lab: PodLab, started: float) -> int:
    a, b, node = lab.host("a"), lab.host("b"), lab.topology.netns_of("node")
    _step(
        f"pods in network namespaces {a.netns} ({a.ip4}, {a.ip6}) and "
        f"{b.netns} ({b.ip4}, {b.ip6}), bridged in {node}; an 'outside' host without a sidecar"
    )
    _step(f"certificates: A is {spiffe_id('a')}, B is {spiffe_id('b')} (one throwaway CA)")
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
    # The marker is a random string the apps put in every request (an HTTP
    # header, and the raw exchange's payload both ways): if it shows up in a
    # capture of the bridge, plaintext crossed the network.
    marker = f"plaintext-marker-{secrets.token_hex(8)}"
    _step(f"plaintext marker: {marker!r}, carried in every request A sends to B")

    _step("control: sidecars OFF, the same traffic, captured on the bridge")
    with _capture(lab, "control") as control:
        ok = _exchange(lab, marker)
    control_seen = control.wire.count(marker.encode())
    ok &= control_seen > 0
    _say(f"marker seen {control_seen} times on the wire: this is what the sidecars must hide")

    _step("sidecars ON in both pods (nftables TPROXY + policy routes installed)")
    lab.start_sidecar("a")
    lab.start_sidecar("b")
    with _capture(lab, "protected") as protected:
        ok &= _exchange(lab, marker)
        refused_line = _outsider(lab)
    ok &= refused_line is not None
    seen = protected.wire.count(marker.encode())
    tls_records = len(re.findall(rb"\x17\x03[\x03\x04]", protected.wire))

    print()
    print("What each sidecar saw (from their logs):")
    for pod in ("a", "b"):
        for m in _CONN_LINE.finditer(lab.sidecars[pod].log()):
            print(
                f"  {pod.upper()} {m['dir']:7} {m['src']:>26} -> {m['dst']:<24} "
                f"peer {m['peer']}  {m['version']} {m['cipher']}  "
                f"sent {m['sent']} B, received {m['received']} B, {m['outcome']}"
            )
    print(
        "  (A's line shows the app's own source port; B's shows the port A's sidecar dialed "
        "from:\n   the app's connection ends at A's sidecar, a new mTLS connection carries it to B)"
    )
    print()
    print(
        f"Wire, sidecars off: marker seen {control_seen} times (control). "
        f"Sidecars on: {len(protected.wire)} bytes captured, {tls_records} TLS "
        f"application-data records, marker seen {seen} times."
    )
    ok &= _metrics_and_doctor(lab)
    lines = {pod: len(_CONN_LINE.findall(lab.sidecars[pod].log())) for pod in ("a", "b")}
    codes = {pod: lab.stop_sidecar(pod) for pod in ("a", "b")}
    ok &= seen == 0 and tls_records > 0 and lines["a"] >= 4 and lines["b"] >= 4
    ok &= codes == {"a": 0, "b": 0}
    print(
        f"Sidecars stopped with SIGTERM (exit codes {codes['a']}, {codes['b']}), "
        f"rules and routes removed; namespaces removed next."
    )
    print(f"{'OK' if ok else 'FAILED'}: demo took {time.monotonic() - started:.1f}s")
    return 0 if ok else 1


#: The /metrics lines the demo prints (the rest are histograms' buckets and process metrics).
_SHOWN_METRICS = re.compile(
    r"^trio_tproxy_(connections_total|bytes_total|refusals_total|active_connections|"
    r"handshake_duration_seconds_count)\b.*",
    re.M,
)


def _metrics_and_doctor(lab: PodLab) -> bool:
    """A few lines of each sidecar's /metrics, then ``trio-tproxy doctor`` in pod A."""
    print()
    for pod in ("a", "b"):
        scrape = lab.topology.run(pod, ["curl", "-sS", "-m", "5", "http://127.0.0.1:15020/metrics"])
        print(f"{pod.upper()}'s sidecar, curl http://127.0.0.1:15020/metrics (excerpt):")
        for match in _SHOWN_METRICS.finditer(scrape.stdout):
            print(f"  {match.group(0)}")
    files = lab.files["a"]
    b = lab.host("b")
    argv = [sys.executable, "-m", "trio_tproxy", "doctor", "--cert", str(files.cert)]
    argv += ["--key", str(files.key), "--ca-cert", str(files.ca_cert)]
    argv += ["--peer", f"{b.ip4}:{HTTP_PORT}"]
    print()
    print("trio-tproxy doctor --peer B:8080, run inside pod A:")
    doctor = lab.topology.run("a", argv)
    for line in doctor.stdout.splitlines():
        print(f"  {line}")
    return doctor.returncode == 0


def _exchange(lab: PodLab, marker: str) -> bool:
    """A -> B: an HTTP GET and a half-closed raw exchange, over IPv4 and IPv6."""
    b = lab.host("b")
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
        _say(f"A: curl http://{host}:{HTTP_PORT}/ -> HTTP {http.stdout.strip() or http.stderr}")
        message = f"{marker} " * 1000
        raw = lab.topology.run(
            "a", [sys.executable, "-m", "lab.apps", "halfclose-client", ip, str(RAW_PORT), message]
        )
        sent_digest = hashlib.sha256(message.encode()).hexdigest()[:16]
        answer = raw.stdout.strip() or raw.stderr.strip()
        same = raw.stdout.startswith(f"got {len(message)} bytes sha256 {sent_digest}")
        ok &= same
        _say(
            f"A: sent {len(message)} B (sha256 {sent_digest}) to {host}:{RAW_PORT} and shut its "
            f"write side; B answered 0.3 s later with what it read: {answer!r}"
            + (" (identical)" if same else " (DIFFERENT)")
        )
    return ok


def _outsider(lab: PodLab) -> str | None:
    """A host without a sidecar (no certificate) tries B's app: refused, and B says why."""
    b = lab.host("b")
    since = len(lab.sidecars["b"].log())
    attempt = lab.topology.run(
        "outside",
        ["curl", "-sS", "-m", "5", "-o", "/dev/null", f"http://{b.ip4}:{HTTP_PORT}/"],
    )
    failed = attempt.returncode != 0
    _say(
        f"outside (no sidecar, no certificate): curl http://{b.ip4}:{HTTP_PORT}/ -> "
        + (f"refused ({attempt.stderr.strip()})" if failed else "ANSWERED")
    )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in lab.sidecars["b"].log()[since:].splitlines():
            if " refused: " in line:
                _say(f"B's sidecar: {line.split(' ', 3)[-1]}")
                return line if failed else None
        time.sleep(0.05)
    _say("B's sidecar logged no refusal")
    return None


class _Capture:
    wire: bytes = b""


@contextlib.contextmanager
def _capture(lab: PodLab, name: str) -> Iterator[_Capture]:
    """The bridge's TCP while the block runs; ``.wire`` holds the bytes after it."""
    result = _Capture()
    with lab.capture(name) as path:
        yield result
    result.wire = path.read_bytes() if path.exists() else b""
