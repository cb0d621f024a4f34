"""Operability through the kernel (root, network namespaces): issue 9, and issue 8's rules on exit.

* Drain: SIGTERM during a 200 MB transfer lets it finish (checksum equal),
  ``/readyz`` turns 503 at once, exit 0 as soon as nothing is active; one
  that outlasts ``--drain-timeout`` is reset and logged ``outcome=drained``; a
  second SIGTERM ends the drain at once; new connections during the drain
  are carried (``--drain-new accept``) or reset (``refuse``).
* Rules on exit: ``remove`` (default) leaves no table; ``keep`` leaves the
  fail-closed table, so a new connection is refused at once, never carried.
* ``/metrics`` scraped during traffic and parsed with prometheus_client's
  parser: the counters equal the traffic sent, exactly; ``--log-format
  json`` lines carry the same fields.
* The admin port is reachable from a host without a sidecar (excluded from
  interception) and survives malformed requests.
* ``doctor``: a healthy pod exits 0 (also with rp_filter=1, which does not
  matter); each broken condition exits 1 with the right sentence.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab import pki
from lab.netns import next_prefix, socket_in
from lab.pods import PodLab, Sidecar

pytestmark = pytest.mark.netns

SINK = 7300
CLI = [sys.executable, "-m", "trio_tproxy"]
ADMIN = 15020
MB = 1 << 20


class SinkServer:
    """In B: reads a connection to EOF, answers the SHA-256 hex digest of what it read."""

    def __init__(self, lab: PodLab) -> None:
        self.sock = socket_in(lab.host("b").netns, socket.AF_INET6)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.bind(("::", SINK))
        self.sock.listen(64)
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    @staticmethod
    def _one(conn: socket.socket) -> None:
        digest = hashlib.sha256()
        with conn:
            try:
                while data := conn.recv(1 << 18):
                    digest.update(data)
                conn.sendall(digest.hexdigest().encode())
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodLab]:
    with PodLab(tmp_path_factory.mktemp("ops"), prefix=next_prefix()) as lab:
        sink = lab.sink = SinkServer(lab)  # type: ignore[attr-defined]
        lab.start_sidecar("b")
        try:
            yield lab
        finally:
            sink.close()


@pytest.fixture
def sidecar_a(lab: PodLab) -> Iterator[None]:
    """Makes sure A has no sidecar and no table after the test."""
    yield
    if "a" in lab.sidecars:
        lab.stop_sidecar("a", sig=signal.SIGKILL)
    lab.topology.run("a", [*CLI, "rules", "delete"])


def client(lab: PodLab, pod: str = "a", family: int = socket.AF_INET) -> socket.socket:
    sock = socket_in(lab.host(pod).netns, family)
    sock.settimeout(30)
    return sock


def b_addr(lab: PodLab, family: int = socket.AF_INET) -> tuple[str, int]:
    b = lab.host("b")
    return (b.ip4 if family == socket.AF_INET else b.ip6, SINK)


def http_get(lab: PodLab, pod: str, path: str, host: str = "127.0.0.1") -> tuple[int, str]:
    sock = socket_in(lab.host(pod).netns, socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.settimeout(5)
    with sock:
        sock.connect((host, ADMIN))
        sock.sendall(f"GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


#: Where each sidecar's own lines start in its pod's log file (shared by the module's tests).
_OFFSETS: dict[int, int] = {}


def start_a(lab: PodLab, *flags: str) -> Sidecar:
    path = lab.workdir / "sidecar-a.log"
    offset = path.stat().st_size if path.exists() else 0
    sidecar = lab.start_sidecar("a", *flags)
    _OFFSETS[id(sidecar)] = offset
    return sidecar


def log_of(sidecar: Sidecar) -> str:
    return sidecar.log_path.read_bytes()[_OFFSETS.get(id(sidecar), 0) :].decode(errors="replace")


def wait_log(sidecar: Sidecar, pattern: str, timeout: float = 10.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, log_of(sidecar))
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} in the log:\n{log_of(sidecar)[-3000:]}")
        time.sleep(0.02)


def wait_exit(sidecar: Sidecar, timeout: float) -> int:
    try:
        return sidecar.process.wait(timeout)
    except subprocess.TimeoutExpired:
        log = log_of(sidecar)[-3000:]
        raise AssertionError(f"sidecar still running after {timeout}s:\n{log}") from None


def readyz_soon(lab: PodLab, want: int, within: float = 1.0) -> float:
    """Seconds until /readyz answers ``want`` (fails after ``within``)."""
    start = time.monotonic()
    while True:
        status, _ = http_get(lab, "a", "/readyz")
        if status == want:
            return time.monotonic() - start
        assert time.monotonic() - start < within, f"/readyz still {status}"
        time.sleep(0.01)


def table_present(lab: PodLab, pod: str = "a") -> bool:
    run = lab.topology.run(pod, ["nft", "list", "table", "inet", "trio_tproxy"])
    return run.returncode == 0


def open_held(lab: PodLab, payload: bytes = b"held") -> socket.socket:
    """A connection through both sidecars, open: returns once B's app has accepted it."""
    sink: SinkServer = lab.sink  # type: ignore[attr-defined]
    accepted = sink.accepted
    sock = client(lab)
    sock.connect(b_addr(lab))
    sock.sendall(payload)
    deadline = time.monotonic() + 10
    while sink.accepted == accepted:
        assert time.monotonic() < deadline, "the held connection never reached B's app"
        time.sleep(0.01)
    return sock


def finish(sock: socket.socket) -> str:
    """Half-close, read B's digest to EOF."""
    sock.shutdown(socket.SHUT_WR)
    answer = b""
    while data := sock.recv(65536):
        answer += data
    sock.close()
    return answer.decode()


# --------------------------------------------------------------------------- drain


def test_sigterm_drain_lets_a_200mb_transfer_finish_and_removes_the_rules(lab, sidecar_a):
    a = start_a(lab)  # defaults: --drain-timeout 20, --on-exit remove
    readyz_soon(lab, 200)
    block = os.urandom(MB)
    total = 200
    expected = hashlib.sha256()
    for _ in range(total):
        expected.update(block)
    sent = [0]
    sock = client(lab)
    sock.connect(b_addr(lab))
    result: list[str] = []

    def transfer() -> None:
        for _ in range(total):
            sock.sendall(block)
            sent[0] += 1
        result.append(finish(sock))

    thread = threading.Thread(target=transfer)
    thread.start()
    while sent[0] < 20 and thread.is_alive():
        time.sleep(0.005)
    assert sent[0] < total, "the transfer ended before the signal: make it longer"
    a.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert readyz_soon(lab, 503) < 1.0  # readiness false at once
    thread.join(60)
    assert result == [expected.hexdigest()], "the transfer was cut or corrupted"
    assert wait_exit(a, 20) == 0
    assert time.monotonic() - signalled < 20
    log = log_of(a)
    assert re.search(r"egress \S+ -> \S+:7300 .* sent=209715200 .*outcome=ok", log), log
    assert "drained: no connection active" in log and "outcome=drained" not in log
    lab.sidecars.pop("a")
    assert not table_present(lab)  # --on-exit remove: nothing left behind


def test_drain_timeout_resets_the_rest_and_on_exit_keep_fails_closed(lab, sidecar_a):
    a = start_a(lab, "--drain-timeout", "1", "--on-exit", "keep")
    held = open_held(lab)
    wait_log(a, r"ready:")
    a.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    wait_log(a, r"draining 1 connections active")
    with pytest.raises(ConnectionResetError):
        held.settimeout(10)
        while held.recv(65536):
            pass
    held.close()
    assert wait_exit(a, 10) == 0
    assert 1.0 <= time.monotonic() - signalled < 5.0
    log = log_of(a)
    assert re.search(r"egress \S+ -> \S+:7300 .*outcome=drained", log), log
    assert "drain timeout: resetting the 1 connections still open" in log
    assert "'egress/drained': 1" in log
    lab.sidecars.pop("a")
    # --on-exit keep: the table stays and fails closed: refused at once, not carried.
    assert table_present(lab)
    accepted = lab.sink.accepted  # type: ignore[attr-defined]
    sock = client(lab)
    start = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        sock.connect(b_addr(lab))
    sock.close()
    assert time.monotonic() - start < 1.0
    assert lab.sink.accepted == accepted  # type: ignore[attr-defined]


def test_second_signal_ends_the_drain_at_once(lab, sidecar_a):
    a = start_a(lab, "--drain-timeout", "30")
    held = open_held(lab)
    a.process.send_signal(signal.SIGTERM)
    wait_log(a, r"draining 1 connections active")
    assert http_get(lab, "a", "/readyz")[0] == 503
    a.process.send_signal(signal.SIGINT)
    second = time.monotonic()
    assert wait_exit(a, 5) == 0
    assert time.monotonic() - second < 3.0
    held.close()
    log = log_of(a)
    assert "SIGINT received: ending the drain now" in log
    assert re.search(r"second signal: resetting the 1 connections", log)
    assert re.search(r"outcome=drained", log), log
    lab.sidecars.pop("a")


@pytest.mark.parametrize("mode", ["accept", "refuse"])
def test_new_connections_during_the_drain(lab, sidecar_a, mode):
    a = start_a(lab, "--drain-timeout", "15", "--drain-new", mode)
    held = open_held(lab, b"keeps the drain going")
    a.process.send_signal(signal.SIGTERM)
    wait_log(a, r"draining 1 connections active")
    payload = b"new during the drain"
    sock = client(lab)
    if mode == "accept":
        # Classic sidecar: the app, still shutting down, can still call out.
        sock.connect(b_addr(lab))
        sock.sendall(payload)
        assert finish(sock) == hashlib.sha256(payload).hexdigest()
    else:
        # Native sidecar: the app has exited; what still arrives is reset at once.
        with pytest.raises((ConnectionResetError, ConnectionRefusedError, BrokenPipeError)):
            sock.connect(b_addr(lab))
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            if not sock.recv(65536):
                raise ConnectionResetError("closed without an answer")
        sock.close()
        wait_log(a, r"egress \S+ -> \S+:7300 refused: draining")
    # Exit as soon as the last connection is done (not at the timeout).
    assert finish(held) == hashlib.sha256(b"keeps the drain going").hexdigest()
    done = time.monotonic()
    assert wait_exit(a, 10) == 0
    assert time.monotonic() - done < 2.0
    assert "drained: no connection active" in log_of(a)
    lab.sidecars.pop("a")


# --------------------------------------------------------------------------- metrics


def scrape(lab: PodLab, pod: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = http_get(lab, pod, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_the_traffic_exactly_and_json_logs(lab, sidecar_a):
    a = start_a(lab, "--log-format", "json")
    b_before = scrape(lab, "b")
    sizes = [1, 70_000, 3 * MB]
    held = [open_held(lab, b"x" * n) for n in sizes]
    # During the traffic: three active, none ended yet.
    deadline = time.monotonic() + 5
    while (
        value(during := scrape(lab, "a"), "trio_tproxy_active_connections") != 3
        or value(during, "trio_tproxy_pending_handshakes") != 0
    ):
        assert time.monotonic() < deadline, during
        time.sleep(0.02)
    assert value(during, "trio_tproxy_connections_total", direction="egress", outcome="ok") == 0
    assert value(during, "trio_tproxy_pending_handshakes") == 0
    for sock, n in zip(held, sizes, strict=True):
        assert finish(sock) == hashlib.sha256(b"x" * n).hexdigest()
    # Two refusals: the "outside" host has no sidecar (nothing listens there).
    for _ in range(2):
        sock = client(lab)
        try:
            sock.connect((lab.host("outside").ip4, SINK))
            sock.recv(1)
        except OSError:
            pass
        sock.close()
    deadline = time.monotonic() + 5
    while log_of(a).count('"outcome": "refused"') < 2:
        assert time.monotonic() < deadline, log_of(a)
        time.sleep(0.02)
    deadline = time.monotonic() + 5
    while value(after := scrape(lab, "a"), "trio_tproxy_active_connections"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    ok = value(after, "trio_tproxy_connections_total", direction="egress", outcome="ok")
    assert ok == 3
    assert value(after, "trio_tproxy_connections_total", direction="egress", outcome="refused") == 2
    assert sum(v for (n, _), v in after.items() if n == "trio_tproxy_refusals_total") == 2
    assert value(after, "trio_tproxy_bytes_total", direction="egress", flow="sent") == sum(sizes)
    assert value(after, "trio_tproxy_bytes_total", direction="egress", flow="received") == 3 * 64
    handshakes = sum(
        v
        for (n, labels), v in after.items()
        if n == "trio_tproxy_handshake_duration_seconds_count" and ("direction", "egress") in labels
    )
    assert handshakes == 3
    assert value(after, "trio_tproxy_connection_duration_seconds_count", direction="egress") == 3
    assert value(after, "trio_tproxy_credential_expiry_timestamp_seconds") > time.time()
    assert value(after, "process_open_fds") > 0
    b_after = scrape(lab, "b")
    for labels, expected in (({"direction": "ingress", "outcome": "ok"}, 3),):
        key = ("trio_tproxy_connections_total", tuple(sorted(labels.items())))
        assert b_after.get(key, 0) - b_before.get(key, 0) == expected
    recv_key = ("trio_tproxy_bytes_total", (("direction", "ingress"), ("flow", "received")))
    assert b_after[recv_key] - b_before.get(recv_key, 0) == sum(sizes)
    # --log-format json: one object per line, the same fields as the text line.
    lines = [json.loads(line) for line in log_of(a).splitlines() if line.startswith("{")]
    conns = [obj for obj in lines if obj.get("logger") == "trio_tproxy.conn"]
    assert sorted(obj["sent"] for obj in conns) == sorted(sizes)
    for obj in conns:
        assert obj["direction"] == "egress" and obj["outcome"] == "ok"
        assert obj["dst"].endswith(":7300") and obj["peer"].startswith("spiffe://")
        assert obj["src"].startswith(lab.host("a").ip4)
        assert f"sent={obj['sent']} " in obj["message"]
    refusals = [obj for obj in lines if obj.get("outcome") == "refused"]
    assert len(refusals) == 2 and all(obj["direction"] == "egress" for obj in refusals)


def test_admin_port_is_not_intercepted_and_survives_bad_requests(lab, sidecar_a):
    start_a(lab)
    a = lab.host("a")
    for host in (a.ip4, a.ip6):  # from a host without a sidecar, to the pod's addresses
        run = lab.topology.run(
            "outside",
            [
                "curl",
                "-sS",
                "-m",
                "5",
                f"http://{host if ':' not in host else f'[{host}]'}:{ADMIN}/healthz",
            ],
        )
        assert run.stdout == "ok\n", run.stderr
    for bad, status in (
        (b"NOT HTTP\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\nhost: x\r\nx: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
    ):
        sock = client(lab, "outside")
        sock.connect((a.ip4, ADMIN))
        try:
            sock.sendall(bad)
        except OSError:
            pass
        answer = sock.recv(100)
        sock.close()
        assert answer.split()[1] == status, answer
    # A slow client does not hold the server: others are answered meanwhile.
    slow = client(lab, "outside")
    slow.connect((a.ip4, ADMIN))
    slow.sendall(b"GET /healthz HTTP/1.1\r\n")
    assert http_get(lab, "a", "/healthz") == (200, "ok\n")
    slow.close()
    # /connections is for loopback clients only.
    run = lab.topology.run(
        "outside",
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            f"http://{a.ip4}:{ADMIN}/connections",
        ],
    )
    assert run.stdout == "403"


# --------------------------------------------------------------------------- doctor


def doctor(lab: PodLab, *flags: str, identity: str = "a") -> tuple[int, str]:
    files = lab.files[identity]
    run = lab.topology.run(
        "a",
        [
            *CLI,
            "doctor",
            "--cert",
            str(files.cert),
            "--key",
            str(files.key),
            "--ca-cert",
            str(files.ca_cert),
            *flags,
        ],
    )
    assert run.returncode in (0, 1), run.stderr
    return run.returncode, run.stdout


def test_doctor_healthy_pod_also_with_rp_filter_1(lab, sidecar_a):
    start_a(lab)
    b = lab.host("b")
    code, out = doctor(lab, "--peer", f"{b.ip4}:{SINK}", "--conn", f"{b.ip4}:{SINK}")
    assert code == 0, out
    assert out.rstrip().endswith("healthy")
    # conntrack: its entries when the tool is there, else how to get them (not a finding).
    assert re.search(r"info conntrack +(conntrack entries for|conntrack is not installed)", out)
    assert "peer spiffe://cluster.local/ns/demo/sa/b, outcome ok" in out
    # rp_filter=1 (strict) everywhere: interception still works, and doctor says so.
    for pod in ("a", "b"):
        for conf in ("all", "default", "eth0", "lo"):
            lab.topology.run(
                pod, ["sysctl", "-qw", f"net.ipv4.conf.{conf}.rp_filter=1"], check=True
            )
    try:
        code, out = doctor(lab, "--peer", f"{b.ip4}:{SINK}", "--json")
        report = json.loads(out)
        assert code == 0 and report["healthy"], out
        sysctl = [r for r in report["results"] if r["check"] == "sysctl"]
        assert "eth0=1" in sysctl[0]["text"] and "no effect on interception" in sysctl[0]["text"]
        assert any(r["check"] == "peer" and r["status"] == "ok" for r in report["results"])
    finally:
        for pod in ("a", "b"):
            for conf in ("all", "default", "eth0", "lo"):
                lab.topology.run(pod, ["sysctl", "-qw", f"net.ipv4.conf.{conf}.rp_filter=0"])


def test_doctor_findings(lab, sidecar_a, tmp_path: Path):
    # No sidecar, rules as an init container applies them: table and routes OK,
    # listeners and admin endpoint missing.
    lab.topology.run("a", [*CLI, "rules", "apply"], check=True)
    code, out = doctor(lab)
    assert code == 1
    assert "ok   table" in out and "ok   routes" in out
    assert "Nothing listens on 127.0.0.1:1 (the egress listener)" in out
    assert "admin endpoint 127.0.0.1:15020 does not answer" in out
    # Route deleted.
    lab.topology.run(
        "a", ["ip", "rule", "del", "fwmark", "10", "iif", "lo", "lookup", "10"], check=True
    )
    code, out = doctor(lab)
    assert "Missing: ip rule fwmark 10 iif lo lookup 10" in out
    assert "fix: ip rule add fwmark 10 iif lo lookup 10" in out
    # Table deleted (no sidecar, so no drift watcher repairs it).
    lab.topology.run("a", ["nft", "delete", "table", "inet", "trio_tproxy"], check=True)
    code, out = doctor(lab)
    assert code == 1 and "The nft table inet trio_tproxy is missing" in out
    assert "fix: trio-tproxy rules apply" in out
    # A table rendered for other flags: the diff names the rule.
    lab.topology.run("a", [*CLI, "rules", "apply", "--admin-port", "0"], check=True)
    code, out = doctor(lab)
    assert "differs from what these flags render" in out
    assert "(fingerprint)" in out and "(same rules, other values)" in out
    # Key/cert mismatch, and an expired certificate.
    code, out = doctor(lab, "--key", str(lab.files["b"].key))
    assert code == 1 and "does not match certificate" in out
    ca = pki.PKI(tmp_path)
    now = datetime.now(UTC)
    expired = ca.issue(
        "old",
        spiffe_ids=[pki.spiffe_id("a", "demo")],
        not_before=now - timedelta(days=2),
        not_after=now - timedelta(days=1),
    )
    run = lab.topology.run(
        "a",
        [
            *CLI,
            "doctor",
            "--cert",
            str(expired.cert),
            "--key",
            str(expired.key),
            "--ca-cert",
            str(expired.ca_cert),
        ],
    )
    assert run.returncode == 1 and "certificate expired on" in run.stdout, run.stdout


def test_admin_port_in_use_is_one_line_and_exit_2(lab, sidecar_a):
    holder = socket_in(lab.host("a").netns, socket.AF_INET)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # earlier tests' TIME_WAIT
    holder.bind(("127.0.0.1", ADMIN))
    holder.listen(1)
    try:
        run = lab.topology.run("a", [*lab.sidecar_command("a")], timeout=30)
    finally:
        holder.close()
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1, run.stderr
    assert "admin server: cannot listen on port 15020" in run.stderr
    assert not table_present(lab)  # nothing left behind
