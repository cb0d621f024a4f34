"""UDP over DTLS through the kernel path, in network namespaces (root).

Pods A and B run ``trio-tproxy run --intercept-udp``; B runs a UDP echo
server and a stand-in DNS resolver (lab.apps). Clients are sockets created in
A's namespace and ``dig``. Proof of interception is the sidecars' per-flow
log lines (with the peer's SPIFFE ID), and the bridge capture, where the
payload never appears.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from collections.abc import Iterator

import pytest

from lab.netns import next_prefix, socket_in
from lab.pods import PodLab, spiffe_id

pytestmark = pytest.mark.netns

ECHO, DNS = 7200, 5353
FAMILIES = ["ipv4", "ipv6"]
#: Short, so flow expiry is quick to see.
IDLE = 1.5
UDP_FLAGS = ("--intercept-udp", "--udp-idle-timeout", str(IDLE))


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
        lab.start_app(
            "b", py, "-m", "lab.apps", "udp-echo-server", str(ECHO), port=ECHO, protocol="udp"
        )
        lab.start_app("b", py, "-m", "lab.apps", "dns-server", str(DNS), port=DNS, protocol="udp")
        yield lab


def wait_for_log(lab: PodLab, pod: str, pattern: str, since: int = 0, timeout: float = 10) -> str:
    """The first log line of ``pod``'s sidecar after offset ``since`` matching ``pattern``."""
    deadline = time.monotonic() + timeout
    while True:
        log = lab.sidecars[pod].log()[since:]
        m = re.search(pattern, log)
        if m:
            return log[log.rfind("\n", 0, m.start()) + 1 : log.find("\n", m.end())]
        if time.monotonic() > deadline:
            raise AssertionError(f"no line /{pattern}/ in sidecar {pod}'s log:\n{log[-3000:]}")
        time.sleep(0.05)


def offsets(lab: PodLab) -> dict[str, int]:
    return {pod: len(s.log()) for pod, s in lab.sidecars.items()}


def client(lab: PodLab, family: str, timeout: float = 5.0) -> socket.socket:
    sock = socket_in(lab.host("a").netns, family_of(family), socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    return sock


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
