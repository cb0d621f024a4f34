"""Ingress fidelity, through the kernel path (root, network namespaces).

What the app in pod B experiences, for IPv4 and IPv6:

* its ``getpeername()`` is the client pod's address (client-IP preservation:
  IP_TRANSPARENT + the preserve mark + the ct-mark rules and fwmark 13 ip
  rules), and the sidecar's own address with ``--preserve-client-ip=false``;
* the sidecar dials the address the client dialed: an app bound only to the
  pod IP is reachable, a listener bound only to localhost is not (from A, or
  from outside in permissive mode), unless ``--inbound-to-loopback``;
* permissive mode (or one ``--permissive-port``) lets plaintext and the app's
  own TLS through untouched (half-close and reset included), still gives a
  sidecar mutual TLS, and strict mode refuses both others with one line each;
* a "kubelet" in the outside namespace gets 200/503 from the probe port as
  the HTTP, TCP and gRPC apps' health flips, while the app port stays mTLS.

Mutations each test was seen to catch (once, by hand): no client-address
source, either ct-mark rule or the fwmark 13 ip rules missing, the dial to
loopback, --inbound-to-loopback or --preserve-client-ip=false ignored, the
scope dropped, every ClientHello taken for a sidecar, the client not offering
ALPN, permissive mode or --permissive-port ignored, strict treated as
permissive, the probe-port exemption missing, gRPC NOT_SERVING taken as healthy.

Proof is always in B's sidecar log (its connection lines) and in what the app
itself answered (the peer address it saw), not only in whether bytes arrived.
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from lab.netns import next_prefix, probe, socket_in
from lab.pods import PodLab, spiffe_id, wait_for_log

pytestmark = pytest.mark.netns

PEER, PODIP, LOCAL, APPTLS = 7100, 7101, 7102, 7103
HEALTH_HTTP, HEALTH_TCP, HEALTH_GRPC, PROBE_PORT = 7110, 7111, 7112, 15021
#: B always runs with these: the kubelet probes of its three apps.
B_FLAGS = (
    "--app-probe",
    f"web=http://127.0.0.1:{HEALTH_HTTP}/healthz",
    "--app-probe",
    f"db=tcp://127.0.0.1:{HEALTH_TCP}",
    "--app-probe",
    f"rpc=grpc://[::1]:{HEALTH_GRPC}",
)
FAMILIES = ["ipv4", "ipv6"]


def addr(host, family: str) -> str:
    return host.ip4 if family == "ipv4" else host.ip6


def fmt(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def start_bound_app(lab: PodLab, pod: str, port: int, *hosts: str) -> None:
    """The peer server in ``pod`` bound only to ``hosts``; wait until each listens."""
    log = open(lab.workdir / f"app-{pod}-{port}.log", "ab")  # noqa: SIM115 - owned by proc
    proc = lab.topology.popen(
        pod,
        [sys.executable, "-m", "lab.apps", "peer-server", str(port), *hosts],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    for host in hosts:
        lab.topology.wait_port(pod, host, port, timeout=10, proc=proc)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodLab]:
    with PodLab(tmp_path_factory.mktemp("ingress"), prefix=next_prefix()) as lab:
        lab.start_sidecar("a")
        lab.start_sidecar("b", *B_FLAGS)
        b = lab.host("b")
        py = sys.executable
        lab.start_app("b", py, "-m", "lab.apps", "peer-server", str(PEER), port=PEER)
        start_bound_app(lab, "b", PODIP, b.ip4, b.ip6)
        start_bound_app(lab, "b", LOCAL, "127.0.0.1", "::1")
        files = lab.files["b"]
        lab.start_app(
            "b",
            py,
            "-m",
            "lab.apps",
            "tls-echo-server",
            str(APPTLS),
            str(files.cert),
            str(files.key),
            port=APPTLS,
        )
        yield lab


def since(lab: PodLab, pod: str) -> int:
    return len(lab.sidecars[pod].log())


def restart_b(lab: PodLab, *flags: str) -> None:
    assert lab.stop_sidecar("b") == 0
    lab.start_sidecar("b", *B_FLAGS, *flags)


@pytest.fixture
def b_flags(lab: PodLab) -> Iterator[object]:
    """Restart B with other flags inside a test; B is back to the defaults after it."""
    changed = []

    def use(*flags: str) -> None:
        restart_b(lab, *flags)
        changed.append(flags)

    yield use
    if changed:
        restart_b(lab)


def peer_of(answer: bytes) -> str:
    m = re.fullmatch(rb"peer (\S+) (\d+)\n", answer)
    assert m, f"the app did not answer with its peer: {answer!r}"
    return m.group(1).decode()


# -- client address ------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_app_sees_the_client_pods_address(lab, family):
    a, b = addr(lab.host("a"), family), addr(lab.host("b"), family)
    offset = since(lab, "b")
    answer, end = probe(lab.host("a").netns, b, PEER, b"hello")
    assert end == "eof"
    assert peer_of(answer) == a
    # Through B's sidecar, with A's identity, and the port pairing logged.
    line = wait_for_log(
        lab,
        "b",
        rf"ingress {re.escape(fmt(a, 0))[:-1]}\d+ -> "
        rf"{re.escape(fmt(b, PEER))} peer=",
        offset,
    )
    assert f"peer={spiffe_id('a')}" in line and "outcome=ok" in line
    assert "alpn=trio-tproxy/1" in line
    pairing = wait_for_log(lab, "b", r"<-> app leg .* \(client address kept\)", offset)
    assert fmt(a, 0)[:-1] in pairing


@pytest.mark.parametrize("family", FAMILIES)
def test_without_preservation_the_app_sees_its_own_pod_address(lab, b_flags, family):
    b_flags("--preserve-client-ip=false")
    b = addr(lab.host("b"), family)
    answer, end = probe(lab.host("a").netns, b, PEER, b"hello")
    assert end == "eof"
    # The original destination, never loopback: the dial comes from B's own address.
    assert peer_of(answer) == b


@pytest.mark.parametrize("family", FAMILIES)
def test_an_app_bound_only_to_the_pod_ip_is_reachable(lab, family):
    a, b = addr(lab.host("a"), family), addr(lab.host("b"), family)
    answer, end = probe(lab.host("a").netns, b, PODIP, b"hello")
    assert end == "eof"
    assert peer_of(answer) == a


@pytest.mark.parametrize("family", FAMILIES)
def test_a_localhost_only_listener_is_not_reachable_from_the_mesh(lab, family):
    b = addr(lab.host("b"), family)
    offset = since(lab, "b")
    answer, end = probe(lab.host("a").netns, b, LOCAL, b"hello")
    assert b"peer" not in answer, answer
    assert end in ("reset", "eof"), end
    line = wait_for_log(lab, "b", rf"-> {re.escape(fmt(b, LOCAL))} refused: ", offset)
    assert "ECONNREFUSED" in line


@pytest.mark.parametrize("family", FAMILIES)
def test_inbound_to_loopback_opt_in_reaches_a_localhost_only_listener(lab, b_flags, family):
    b_flags("--inbound-to-loopback")
    b = addr(lab.host("b"), family)
    answer, end = probe(lab.host("a").netns, b, LOCAL, b"hello")
    assert end == "eof"
    assert peer_of(answer) == ("127.0.0.1" if family == "ipv4" else "::1")


def link_local(lab: PodLab, pod: str) -> str:
    deadline = time.monotonic() + 10
    while True:  # DAD: the address is tentative for a moment after the link comes up
        out = lab.topology.run(
            pod, ["ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"]
        )
        m = re.search(r"inet6 (fe80::[0-9a-f:]+)/64 scope link\s*(\S*)", out.stdout)
        if m and "tentative" not in m.group(2):
            return m.group(1)
        assert time.monotonic() < deadline, out.stdout
        time.sleep(0.1)


def test_link_local_destination_keeps_its_scope(lab, b_flags):
    # The sidecar must dial fe80::b%eth0 (from fe80::a%eth0): without the
    # scope both the bind and the connect fail with EINVAL.  A's egress to
    # fe80:: is not intercepted (outside the cluster CIDRs), so B takes it in
    # permissive mode: the plaintext path uses the same dial.
    b_flags("--inbound-mode", "permissive")
    a, b = link_local(lab, "a"), link_local(lab, "b")
    offset = since(lab, "b")
    # Python takes the scope from the 4-tuple only (a "%eth0" suffix is overridden).
    index = int(lab.topology.run("a", ["cat", "/sys/class/net/eth0/ifindex"]).stdout)
    with socket_in(lab.host("a").netns, socket.AF_INET6) as sock:
        sock.settimeout(10)
        sock.connect((b, PEER, 0, index))
        sock.sendall(b"hello")
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while data := sock.recv(4096):
            answer += data
    assert answer, lab.sidecars["b"].log()[offset:]
    # A link-local client's address is not kept (docs/kernel.md): the app sees B's own.
    assert peer_of(answer).split("%")[0] == b
    line = wait_for_log(lab, "b", rf"ingress \S+ -> \[{re.escape(b)}%eth0\]:{PEER} peer", offset)
    assert "outcome=ok" in line and f"[{a}%eth0]" in line


# -- inbound mode ----------------------------------------------------------------


def s_client(lab: PodLab, host: str, port: int) -> str:
    """openssl s_client from outside with its own TLS (ALPN h2, no client certificate):
    send a line, return what came back until the echo or the end (stdin held open)."""
    proc = lab.topology.popen(
        "outside",
        [
            "openssl",
            "s_client",
            "-connect",
            fmt(host, port),
            "-alpn",
            "h2",
            "-CAfile",
            str(lab.files["b"].ca_cert),
            "-quiet",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"app-tls-marker\n")
        proc.stdin.flush()
        # readline ends at the echo, or at EOF when the connection was refused.
        return proc.stdout.readline().decode(errors="replace")
    finally:
        lab.topology.stop(proc, timeout=5)


@pytest.mark.parametrize("family", FAMILIES)
def test_permissive_lets_plaintext_and_foreign_tls_through_and_keeps_mtls(lab, b_flags, family):
    b_flags("--inbound-mode", "permissive")
    out_ip, a, b = (
        addr(lab.host("outside"), family),
        addr(lab.host("a"), family),
        addr(lab.host("b"), family),
    )
    # plaintext from a namespace without a sidecar
    offset = since(lab, "b")
    answer, end = probe(lab.host("outside").netns, b, PEER, b"hello")
    assert end == "eof"
    assert peer_of(answer) == out_ip
    line = wait_for_log(lab, "b", r"plaintext accepted \(permissive\): not TLS", offset)
    assert fmt(out_ip, 0)[:-1] in line
    # the app's own TLS, untouched: s_client talks to the app's server
    offset = since(lab, "b")
    assert s_client(lab, b, APPTLS) == "app-tls-marker\n"
    wait_for_log(lab, "b", r"plaintext accepted \(permissive\): TLS without our ALPN", offset)
    # a sidecar still gets mutual TLS
    offset = since(lab, "b")
    answer, end = probe(lab.host("a").netns, b, PEER, b"hello")
    assert end == "eof" and peer_of(answer) == a
    # peer=spiffe: the outside connection's own line (peer=-) may be logged late
    line = wait_for_log(lab, "b", rf"-> {re.escape(fmt(b, PEER))} peer=spiffe://", offset)
    assert f"peer={spiffe_id('a')}" in line and "alpn=trio-tproxy/1" in line
    # and a localhost-only listener stays unreachable from outside
    offset = since(lab, "b")
    answer, _ = probe(lab.host("outside").netns, b, LOCAL, b"hello")
    assert b"peer" not in answer
    assert "ECONNREFUSED" in wait_for_log(
        lab, "b", rf"-> {re.escape(fmt(b, LOCAL))} refused", offset
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_strict_refuses_plaintext_and_foreign_tls_with_one_line_each(lab, family):
    b = addr(lab.host("b"), family)
    out_ip = addr(lab.host("outside"), family)
    offset = since(lab, "b")
    answer, _ = probe(lab.host("outside").netns, b, PEER, b"GET / HTTP/1.0\r\n\r\n")
    assert b"peer" not in answer
    assert "app-tls-marker" not in s_client(lab, b, APPTLS)
    wait_for_log(lab, "b", rf"-> {re.escape(fmt(b, PEER))} refused", offset)
    wait_for_log(lab, "b", rf"-> {re.escape(fmt(b, APPTLS))} refused", offset)
    refused = [
        line
        for line in lab.sidecars["b"].log()[offset:].splitlines()
        if f"ingress {fmt(out_ip, 0)[:-1]}" in line and "refused" in line
    ]
    assert len(refused) == 2, refused
    assert "plaintext accepted" not in lab.sidecars["b"].log()[offset:]


# -- kubelet probes ----------------------------------------------------------------


def kubelet(lab: PodLab, host: str, name: str) -> str:
    """curl from outside (the node's kubelet has no mesh certificate)."""
    url_host = f"[{host}]" if ":" in host else host
    out = lab.topology.run(
        "outside",
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            f"http://{url_host}:{PROBE_PORT}/app-health/{name}",
        ],
    )
    return out.stdout


@pytest.mark.parametrize("family", FAMILIES)
def test_kubelet_probes_follow_the_apps_health_and_app_ports_stay_mtls(lab, family, tmp_path):
    b = addr(lab.host("b"), family)
    flag = tmp_path / "healthy"
    flag.touch()
    py = sys.executable
    web = lab.start_app(
        "b", py, "-m", "lab.apps", "health-server", str(HEALTH_HTTP), str(flag), port=HEALTH_HTTP
    )
    rpc = lab.start_app(
        "b", py, "-m", "lab.grpchealth", str(HEALTH_GRPC), str(flag), port=HEALTH_GRPC
    )
    db = lab.start_app("b", py, "-m", "lab.apps", "echo-server", str(HEALTH_TCP), port=HEALTH_TCP)
    try:
        assert {n: kubelet(lab, b, n) for n in ("web", "db", "rpc")} == {
            "web": "200",
            "db": "200",
            "rpc": "200",
        }
        flag.unlink()
        lab.topology.stop(db)
        assert {n: kubelet(lab, b, n) for n in ("web", "db", "rpc")} == {
            "web": "503",
            "db": "503",
            "rpc": "503",
        }
        assert kubelet(lab, b, "nope") == "404"
        # The app's own port is still mutual-TLS only for the same client.
        offset = since(lab, "b")
        answer, _ = probe(
            lab.host("outside").netns, b, HEALTH_HTTP, b"GET /healthz HTTP/1.0\r\n\r\n"
        )
        assert b"HTTP/1" not in answer
        wait_for_log(
            lab, "b", rf"-> {re.escape(fmt(b, HEALTH_HTTP))} refused: TLS handshake", offset
        )
    finally:
        for proc in (web, rpc, db):
            lab.topology.stop(proc)


@pytest.mark.parametrize("family", FAMILIES)
def test_permissive_port_only_opens_that_port_and_keeps_half_close_and_reset(lab, b_flags, family):
    b_flags("--permissive-port", str(PEER))
    b, out_ip = addr(lab.host("b"), family), addr(lab.host("outside"), family)
    # half-close on the plaintext path: the app answers after our EOF
    answer, end = probe(lab.host("outside").netns, b, PEER, b"x" * 100_000)
    assert end == "eof" and peer_of(answer) == out_ip
    # the other ports stay strict
    offset = since(lab, "b")
    answer, _ = probe(lab.host("outside").netns, b, PODIP, b"hello")
    assert b"peer" not in answer
    wait_for_log(lab, "b", rf"-> {re.escape(fmt(b, PODIP))} refused: TLS handshake", offset)
    # a reset by the client reaches the relay as a reset, not as an end of data
    offset = since(lab, "b")
    with socket_in(lab.host("outside").netns, socket.AF_INET6 if ":" in b else socket.AF_INET) as s:
        s.settimeout(10)
        s.connect((b, PEER))
        # This connection's lines only: the first probe's line may be logged late.
        me = re.escape(fmt(out_ip, s.getsockname()[1]))
        s.sendall(b"partial request")
        wait_for_log(lab, "b", rf"{me} -> \S+ plaintext accepted \(permissive\)", offset)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    line = wait_for_log(
        lab, "b", rf"{me} -> {re.escape(fmt(b, PEER))} peer=- permissive-plaintext", offset
    )
    assert "outcome=reset" in line, line
