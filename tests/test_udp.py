"""UDP over DTLS through the kernel path, in network namespaces (root).

Pods A and B run ``trio-tproxy run --intercept-udp``; both run a UDP echo
server, B also a stand-in DNS resolver (lab.apps). Clients are sockets
created in the pods' namespaces, and ``dig``. Proof of interception is the
sidecars' per-flow log lines (with the peer's SPIFFE ID), and the bridge
capture, where the payload never appears. Every case runs over IPv4 and IPv6.

Loss is injected with an nft ``numgen random`` drop in B's namespace, not
``tc netem``: this kernel has no sch_netem ("Specified qdisc kind is
unknown") and cannot load it. Reordering is therefore shown on the DTLS
association itself (tests/test_dtls.py): records opened in any order,
delivered as they come.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from lab.netns import next_prefix, socket_in
from lab.pods import PodLab, offsets, spiffe_id, wait_for_log
from trio_tproxy.config import TLSFiles

pytestmark = pytest.mark.netns

ECHO, DNS = 7200, 5353
#: A's echo server (for B -> A): another port, so that A's own flows to B's
#: echo server use a reply socket (see the same-port test for the other case).
ECHO_A = 7201
FAMILIES = ["ipv4", "ipv6"]
#: Short, so flow expiry is quick to see.
IDLE = 1.5
UDP_FLAGS = ("--intercept-udp", "--udp-idle-timeout", str(IDLE))
DTLS_PORT = 2
#: Largest app datagram at the default --udp-mtu 1500: the IP and UDP headers,
#: then a DTLS 1.2 AES-GCM record's 13-byte header, 8-byte nonce, 16-byte tag.
MAX_DATAGRAM = {"ipv4": 1500 - 28 - 37, "ipv6": 1500 - 48 - 37}


def addr(host, family: str) -> str:
    return host.ip4 if family == "ipv4" else host.ip6


def fmt(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def family_of(family: str) -> int:
    return socket.AF_INET if family == "ipv4" else socket.AF_INET6


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodLab]:
    with PodLab(tmp_path_factory.mktemp("udplab"), prefix=next_prefix()) as lab:
        lab.start_sidecar("a", *UDP_FLAGS)
        lab.start_sidecar("b", *UDP_FLAGS)
        py = sys.executable
        for pod, port in (("a", ECHO_A), ("b", ECHO)):
            lab.start_app(
                pod, py, "-m", "lab.apps", "udp-echo-server", str(port), port=port, protocol="udp"
            )
        lab.start_app("b", py, "-m", "lab.apps", "dns-server", str(DNS), port=DNS, protocol="udp")
        yield lab


def client(lab: PodLab, family: str, timeout: float = 5.0, pod: str = "a") -> socket.socket:
    sock = socket_in(lab.host(pod).netns, family_of(family), socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    return sock


def echo(sock: socket.socket, message: bytes) -> bytes:
    sock.send(message)
    while True:
        data = sock.recv(65535)
        if data == message:
            return data
        # an echo of an earlier, timed-out datagram: keep reading


def restart(lab: PodLab, pod: str, *flags: str, identity: str | None = None) -> None:
    assert lab.stop_sidecar(pod) == 0
    lab.start_sidecar(pod, *flags, identity=identity)


def udp_payloads(pcap: Path) -> list[tuple[str, str, int, int, bytes]]:
    """(source, destination, source port, destination port, payload) of each UDP
    datagram in an Ethernet pcap (IPv4 and IPv6 without extension headers)."""
    data = pcap.read_bytes()
    out = []
    pos = 24  # global header
    while pos + 16 <= len(data):
        incl = struct.unpack_from("=I", data, pos + 8)[0]
        frame = data[pos + 16 : pos + 16 + incl]
        pos += 16 + incl
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        ip = frame[14:]
        if ethertype == 0x0800 and ip[9] == 17:
            header = (ip[0] & 0xF) * 4
            src, dst = (
                socket.inet_ntop(socket.AF_INET, ip[12:16]),
                socket.inet_ntop(socket.AF_INET, ip[16:20]),
            )
        elif ethertype == 0x86DD and ip[6] == 17:
            header = 40
            src, dst = (
                socket.inet_ntop(socket.AF_INET6, ip[8:24]),
                socket.inet_ntop(socket.AF_INET6, ip[24:40]),
            )
        else:
            continue
        sport, dport = struct.unpack_from("!HH", ip, header)
        out.append((src, dst, sport, dport, ip[header + 8 :]))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_udp_echo_through_both_sidecars(lab, family):
    b = addr(lab.host("b"), family)
    since = offsets(lab)
    with client(lab, family) as sock:
        sock.connect((b, ECHO))
        messages = [os.urandom(n) for n in (1, 100, 1000)]
        for message in messages:
            sock.send(message)
            data, peer = sock.recvfrom(65535)
            assert data == message
            # the answer comes from B's real address and port, as without a sidecar
            assert peer[:2] == (b, ECHO)
        src = sock.getsockname()[:2]
    egress = wait_for_log(
        lab,
        "a",
        rf"udp egress {re.escape(fmt(*src))} -> {re.escape(fmt(b, ECHO))} ",
        since["a"],
        timeout=IDLE + 10,
    )
    ingress = wait_for_log(
        lab, "b", rf"udp ingress \S+ -> {re.escape(fmt(b, ECHO))} ", since["b"], timeout=IDLE + 10
    )
    assert f"peer={spiffe_id('b')}" in egress and "DTLSv1.2" in egress
    assert "sent=3p/1101B received=3p/1101B" in egress
    assert f"peer={spiffe_id('a')}" in ingress
    assert "sent=3p/1101B received=3p/1101B" in ingress
    # Whichever side idles out first tells the other with close_notify.
    outcomes = {re.search(r"outcome=(\w+)", line).group(1) for line in (egress, ingress)}
    assert outcomes in ({"idle"}, {"idle", "closed"}), (egress, ingress)


@pytest.mark.parametrize("family", FAMILIES)
def test_dns_query_with_dig_through_both_sidecars(lab, family):
    b = addr(lab.host("b"), family)
    since = offsets(lab)
    out = lab.topology.run(
        "a", ["dig", f"@{b}", "-p", str(DNS), "+short", "+tries=1", "+time=5", "svc.test", "A"]
    )
    assert out.stdout.strip() == "192.0.2.53", (out.stdout, out.stderr)
    egress = wait_for_log(
        lab, "a", rf"udp egress \S+ -> {re.escape(fmt(b, DNS))} ", since["a"], timeout=IDLE + 10
    )
    ingress = wait_for_log(
        lab, "b", rf"udp ingress \S+ -> {re.escape(fmt(b, DNS))} ", since["b"], timeout=IDLE + 10
    )
    assert f"peer={spiffe_id('b')}" in egress and "sent=1p/" in egress and "received=1p/" in egress
    assert f"peer={spiffe_id('a')}" in ingress


@pytest.mark.parametrize("family", FAMILIES)
def test_the_wire_carries_dtls_records_only(lab, family):
    a, b, outside = (addr(lab.host(n), family) for n in ("a", "b", "outside"))
    marker = b"UDP-MARKER-" + os.urandom(8).hex().encode()
    with lab.capture(f"udp-wire-{family}", "udp") as pcap:
        with client(lab, family) as sock:
            sock.connect((b, ECHO))
            for _ in range(5):
                assert echo(sock, marker) == marker
        # control: the same marker in plaintext from a host without a sidecar
        # crosses the bridge (and B refuses it)
        with client(lab, family, pod="outside", timeout=2) as plain:
            plain.connect((b, ECHO))
            plain.send(marker)
            with pytest.raises(ConnectionRefusedError):
                plain.recv(100)
    datagrams = udp_payloads(pcap)
    between = [d for d in datagrams if {d[0], d[1]} == {a, b}]
    assert len(between) >= 10 + 4  # 5 echoes each way, plus the handshake
    for src, dst, sport, dport, payload in between:
        assert DTLS_PORT in (sport, dport), (src, dst, sport, dport)
        # a DTLS 1.2 record: content type 20..23, version 0xfefd (or 0xfeff in a ClientHello)
        assert payload[0] in (20, 21, 22, 23) and payload[1:3] in (b"\xfe\xfd", b"\xfe\xff")
        assert marker not in payload
    assert any(marker in d[4] for d in datagrams if d[0] == outside), "control: marker not seen"


def test_a_peer_with_a_rogue_certificate_is_refused(lab):
    """A sidecar that trusts our CA but holds a certificate from a rogue CA."""
    rogue = lab.files["rogue"]
    lab.files["rogue-trusting"] = TLSFiles(rogue.cert, rogue.key, lab.files["a"].ca_cert)
    b = lab.host("b").ip4
    since = offsets(lab)
    lab.start_sidecar("outside", *UDP_FLAGS, identity="rogue-trusting")
    try:
        since["outside"] = 0
        with client(lab, "ipv4", pod="outside", timeout=3) as sock:
            sock.connect((b, ECHO))
            sock.send(b"from a rogue")
            with pytest.raises(TimeoutError):
                sock.recv(100)
        refused = wait_for_log(lab, "b", r"udp ingress \S+ -> \S+ refused: ", since["b"])
        assert "unknown CA" in refused and "issuer CN='rogue CA'" in refused, refused
        assert lab.host("outside").ip4 in refused
        wait_for_log(lab, "outside", r"udp egress \S+ -> \S+ refused: .*unknown ca", 0)
    finally:
        lab.stop_sidecar("outside")


@pytest.mark.parametrize("family", FAMILIES)
def test_plaintext_udp_to_the_pod_is_refused_with_port_unreachable(lab, family):
    b = addr(lab.host("b"), family)
    with client(lab, family, pod="outside", timeout=3) as sock:
        sock.connect((b, ECHO))
        sock.send(b"plaintext")
        with pytest.raises(ConnectionRefusedError):
            sock.recv(100)


@pytest.mark.parametrize("family", FAMILIES)
def test_egress_udp_no_listener_takes_is_refused_not_sent(lab, family):
    """The rules without a sidecar (an init container installed them, the sidecar died).

    IPv6: the app gets ICMP port unreachable (ECONNREFUSED). IPv4: nothing,
    the datagram is dropped: the kernel sources the ICMP error from the
    original destination, which is not a local address, and will not route
    it (docs/kernel.md). Either way nothing leaves the pod."""
    py = sys.executable
    b = addr(lab.host("b"), family)
    rules = [py, "-m", "trio_tproxy", "rules"]
    out = lab.topology.run("outside", [*rules, "apply", "--intercept-udp"])
    assert out.returncode == 0, out.stderr
    # an app in the same pod on that port must not get the datagram either
    local = socket_in(lab.host("outside").netns, socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        local.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        local.bind(("::", ECHO))
        local.setblocking(False)
        marker = b"must-not-leave-" + os.urandom(4).hex().encode()
        with lab.capture(f"udp-noleave-{family}", "udp") as pcap:
            with client(lab, family, pod="outside", timeout=3) as sock:
                sock.connect((b, ECHO))
                sock.send(marker)
                refused = ConnectionRefusedError if family == "ipv6" else TimeoutError
                with pytest.raises(refused):
                    sock.recv(100)
        assert not any(marker in d[4] for d in udp_payloads(pcap))
        with pytest.raises(BlockingIOError):
            local.recv(100)
    finally:
        local.close()
        out = lab.topology.run("outside", [*rules, "delete", "--intercept-udp"])
        assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("family", FAMILIES)
def test_ten_thousand_datagrams_of_mixed_sizes_arrive_whole(lab, family):
    """Sizes from 40 bytes to the largest a record carries; each carries its own digest.
    One more byte than that is dropped and counted, never cut."""
    b = addr(lab.host("b"), family)
    biggest = MAX_DATAGRAM[family]
    rng = random.Random(14)
    sizes = [40, biggest] + [rng.randint(40, biggest) for _ in range(9998)]
    window, timeout = 16, 5.0
    since = offsets(lab)
    with client(lab, family, timeout=timeout) as sock:
        sock.connect((b, ECHO))
        pending: dict[int, bytes] = {}
        received = corrupted = 0
        for i, size in enumerate(sizes):
            body = i.to_bytes(4, "big") + rng.randbytes(size - 36)
            message = body + hashlib.sha256(body).digest()
            pending[i] = message
            sock.send(message)
            while len(pending) >= window or (i == len(sizes) - 1 and pending):
                data = sock.recv(65535)
                body, digest = data[:-32], data[-32:]
                index = int.from_bytes(body[:4], "big")
                if hashlib.sha256(body).digest() != digest or pending.pop(index, None) != data:
                    corrupted += 1
                received += 1
        assert (received, corrupted) == (len(sizes), 0)
        # one byte too many: no echo, and the flow's line counts the drop
        sock.send(b"z" * (biggest + 1))
        sock.settimeout(1)
        with pytest.raises(TimeoutError):
            sock.recv(65535)
        src = sock.getsockname()[:2]
    line = wait_for_log(
        lab, "a", rf"udp egress {re.escape(fmt(*src))} -> ", since["a"], timeout=IDLE + 10
    )
    assert f"sent={len(sizes)}p/" in line and "drops=too_big:1" in line, line


@pytest.mark.parametrize("family", FAMILIES)
def test_lost_datagrams_stay_lost_and_what_arrives_is_unchanged(lab, family):
    """20% of the DTLS datagrams into B are dropped (nft numgen): the handshake
    gets through on OpenSSL's retransmissions; each echo that arrives is one we
    sent, unchanged, once; nothing is resent."""
    b = addr(lab.host("b"), family)
    loss = (
        "table inet udploss {\n"
        "  chain pre {\n"
        "    type filter hook prerouting priority -400; policy accept;\n"
        f"    udp dport {DTLS_PORT} numgen random mod 10 < 2 drop\n"
        "  }\n"
        "}\n"
    )
    out = lab.topology.run("b", ["nft", "-f", "-"], input=loss)
    assert out.returncode == 0, out.stderr
    try:
        sent = [b"%04d-" % i + os.urandom(100) for i in range(300)]
        with client(lab, family, timeout=2) as sock:
            sock.connect((b, ECHO))
            # the first datagram waits for the handshake, which may take retransmissions
            # (a handshake whose flights are lost four times fails after 10 s; then another)
            deadline = time.monotonic() + 25
            while True:
                sock.send(b"hello")
                try:
                    if sock.recv(100) == b"hello":
                        break
                except TimeoutError:
                    assert time.monotonic() < deadline, "no echo through the lossy link"
            for message in sent:
                sock.send(message)
                time.sleep(0.001)
            got = []
            try:
                while True:
                    data = sock.recv(65535)
                    if data != b"hello":
                        got.append(data)
            except TimeoutError:
                pass
    finally:
        lab.topology.run("b", ["nft", "delete", "table", "inet", "udploss"])
    assert len(got) == len(set(got)), "a datagram arrived twice"
    assert set(got) <= set(sent), "a datagram arrived changed"
    assert 0.6 * len(sent) < len(got) < 0.97 * len(sent), len(got)


def test_flow_table_bound_and_idle_expiry(lab):
    b = lab.host("b").ip4
    restart(lab, "a", *UDP_FLAGS, "--udp-max-flows", "2")
    try:
        since = offsets(lab)
        socks = [client(lab, "ipv4", timeout=2) for _ in range(3)]
        try:
            for sock in socks:
                sock.connect((b, ECHO))
            assert echo(socks[0], b"one") == b"one"
            assert echo(socks[1], b"two") == b"two"
            socks[2].send(b"three")
            with pytest.raises(TimeoutError):
                socks[2].recv(100)
            wait_for_log(lab, "a", r"udp flow table full \(2 flows", since["a"])
            # both flows end after IDLE s of silence; then the third gets in
            for sock in socks[:2]:
                src = fmt(*sock.getsockname()[:2])
                line = wait_for_log(
                    lab, "a", rf"udp egress {re.escape(src)} -> ", since["a"], timeout=IDLE + 10
                )
                assert re.search(r"outcome=(idle|closed)", line), line
            socks[2].settimeout(5)
            assert echo(socks[2], b"three again") == b"three again"
        finally:
            for sock in socks:
                sock.close()
    finally:
        restart(lab, "a", *UDP_FLAGS)


STEPS = st.lists(
    st.tuples(
        st.sampled_from(["a->b", "b->a"]),
        # small ones, large ones near the limit, and the extremes, all often
        st.one_of(
            st.integers(min_value=1, max_value=64),
            st.integers(min_value=1000, max_value=MAX_DATAGRAM["ipv6"]),
            st.sampled_from([1, MAX_DATAGRAM["ipv6"]]),
        ),
        st.sampled_from([0.0, 0.0, 0.02, 0.2, IDLE + 0.3]),
    ),
    min_size=1,
    max_size=8,
).filter(lambda steps: sum(p for *_, p in steps) < 2 * IDLE + 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_property_any_datagram_sequence_arrives_unchanged(lab, family):
    """Sizes, directions and pauses (some longer than the idle timeout, so flows
    end and start again mid-sequence): every datagram comes back unchanged,
    from the real address of the pod it was sent to."""
    hosts = {"a": addr(lab.host("a"), family), "b": addr(lab.host("b"), family)}
    ports = {"a": ECHO_A, "b": ECHO}

    @settings(
        max_examples=10,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        phases=[Phase.generate],  # no shrinking: each step may wait seconds
    )
    @given(steps=STEPS)
    def run(steps):
        socks = {}
        try:
            for pod, peer in (("a", "b"), ("b", "a")):
                socks[pod] = client(lab, family, pod=pod, timeout=5)
                socks[pod].connect((hosts[peer], ports[peer]))
            for n, (direction, size, pause) in enumerate(steps):
                pod, peer = direction.split("->")
                message = (b"%03d" % n + os.urandom(size))[:size] if size >= 3 else os.urandom(size)
                socks[pod].send(message)
                data, source = socks[pod].recvfrom(65535)
                assert data == message
                assert source[:2] == (hosts[peer], ports[peer])
                time.sleep(pause)
        finally:
            for sock in socks.values():
                sock.close()

    run()


@pytest.mark.parametrize("family", FAMILIES)
def test_an_app_sending_from_the_port_it_sends_to(lab, family):
    """Symmetric-port protocols (NTP, gossip) bind the port they send to, e.g. [::]:7200
    to reach B's 7200: the flow cannot bind B's address on that port number,
    so its answers are written by the raw socket, with the same source."""
    b = addr(lab.host("b"), family)
    sock = socket_in(lab.host("a").netns, socket.AF_INET6, socket.SOCK_DGRAM)
    with sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", ECHO))
        sock.settimeout(5)
        target = b if family == "ipv6" else f"::ffff:{b}"
        for n in (1, 700, MAX_DATAGRAM[family]):
            message = os.urandom(n)
            sock.sendto(message, (target, ECHO))
            data, source = sock.recvfrom(65535)
            assert data == message and source[:2] == (target, ECHO)


def test_a_peer_outside_the_trust_domain_is_refused(lab):
    """Chain-valid (our CA), identity-invalid: refused by the identity check, as for TCP."""
    b = lab.host("b").ip4
    since = offsets(lab)
    lab.start_sidecar("outside", *UDP_FLAGS, identity="b-evil-domain")
    try:
        with client(lab, "ipv4", pod="outside", timeout=3) as sock:
            sock.connect((b, ECHO))
            sock.send(b"from another trust domain")
            with pytest.raises(TimeoutError):
                sock.recv(100)
        refused = wait_for_log(lab, "b", r"udp ingress \S+ -> \S+ refused: ", since["b"])
        assert "identity rejected" in refused and "evil.example" in refused, refused
    finally:
        lab.stop_sidecar("outside")


def test_udp_counters_are_in_the_metrics(lab):
    """Stats.udp reaches /metrics on the admin port (flows, packets, drops)."""
    b = lab.host("b").ip4
    with client(lab, "ipv4") as sock:
        sock.connect((b, ECHO))
        assert echo(sock, b"counted") == b"counted"
        src = fmt(*sock.getsockname()[:2])
    wait_for_log(lab, "a", rf"udp egress {re.escape(src)} -> ", 0, timeout=IDLE + 10)
    sock = socket_in(lab.host("a").netns, socket.AF_INET)
    sock.settimeout(5)
    with sock:
        sock.connect(("127.0.0.1", 15020))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    metrics = data.decode()
    sent = re.search(r'trio_tproxy_udp_events_total\{event="egress_sent_packets"\} (\S+)', metrics)
    assert sent is not None and float(sent.group(1)) >= 1, metrics[-2000:]
    # the flow's end is counted by outcome (whichever side idled out first)
    assert re.search(r'trio_tproxy_udp_events_total\{event="egress_(idle|closed)"\} [1-9]', metrics)
