"""trio_tproxy.kernel: socket options, policy routes, and interception end to end.

Everything that changes routing or nftables happens in network namespaces made
here (``tpt-<hex>``) and deleted afterwards even on failure; sockets are made
inside them with pyroute2's ``create_socket`` (a forked child enters the
namespace), never by moving the pytest process.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from pyroute2 import netns as pyroute2_netns

from trio_tproxy.config import Interception
from trio_tproxy.kernel import (
    IP_TRANSPARENT,
    IPV6_TRANSPARENT,
    LO_UP,
    SOL_IP,
    PolicyRoutes,
    original_destination,
    set_abort_on_close,
    set_mark,
    set_transparent,
)
from trio_tproxy.nft import Nft

net = ipaddress.ip_network
ROUTE4 = "ip route local 0.0.0.0/0 dev lo table 10"
ROUTE6 = "ip -6 route local ::/0 dev lo table 10"
RULE4 = "ip rule fwmark 10 iif lo lookup 10"
RULE6 = "ip -6 rule fwmark 10 iif lo lookup 10"
#: Seconds to wait for something that must happen / to confirm something did not.
TIMEOUT = 3.0
NOTHING = 0.3


# --------------------------------------------------------------------------- helpers


def require_root(*tools: str) -> None:
    """Skip, or in CI (CI=true) fail, when the kernel tests cannot run here."""
    problems = [f"{tool} is not installed" for tool in ("ip", *tools) if shutil.which(tool) is None]
    if os.geteuid() != 0:
        problems.append("not root: network namespaces, IP_TRANSPARENT and SO_MARK need it")
    if problems:
        message = "; ".join(problems)
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the kernel tests cannot run: {message}")
        pytest.skip(message)


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


@contextmanager
def new_netns() -> Iterator[str]:
    name = f"tpt-{secrets.token_hex(4)}"
    ip("netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


@pytest.fixture
def netns() -> Iterator[str]:
    require_root()
    with new_netns() as name:
        yield name


def our_rules(ns: str, six: bool = False) -> list[str]:
    out = ip("-n", ns, *(["-6"] if six else []), "rule", "show")
    return [line for line in out.splitlines() if "lookup 10" in line or "lookup 100" in line]


def table_routes(ns: str, table: int = 10, six: bool = False) -> list[str]:
    # `ip -6 route show table N` fails when the IPv6 table is empty: read stdout only.
    argv = ["ip", "-n", ns, *(["-6"] if six else []), "route", "show", "table", str(table)]
    out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def lo_is_up(ns: str) -> bool:
    flags = ip("-n", ns, "link", "show", "lo").split("<", 1)[1].split(">", 1)[0]
    return "UP" in flags.split(",")


# --------------------------------------------------------------------------- constants


def test_constants() -> None:
    assert IPV6_TRANSPARENT == 75
    assert IP_TRANSPARENT == 19
    assert SOL_IP == socket.IPPROTO_IP == 0


# --------------------------------------------------------------------------- socket options


@pytest.mark.parametrize(
    ("family", "level", "option"),
    [
        (socket.AF_INET, socket.SOL_IP, 19),
        (socket.AF_INET6, socket.IPPROTO_IPV6, 75),
    ],
)
def test_set_transparent(family: int, level: int, option: int) -> None:
    require_root()
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        assert sock.getsockopt(level, option) == 0
        set_transparent(sock)
        assert sock.getsockopt(level, option) == 1


def test_set_transparent_rejects_other_families() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        with pytest.raises(ValueError, match="IPv4 or IPv6"):
            set_transparent(sock)


def test_set_mark() -> None:
    require_root()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        set_mark(sock, 0x539)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x539


def test_set_abort_on_close_sets_linger_zero() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        set_abort_on_close(sock)
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
        assert struct.unpack("ii", raw) == (1, 0)


@pytest.mark.parametrize("abort", [True, False])
def test_abort_on_close_makes_peer_see_reset(abort: bool) -> None:
    """With trio sockets, over loopback, no root needed."""

    async def main() -> None:
        listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with listener, client:
            await listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            await client.connect(listener.getsockname())
            server, _ = await listener.accept()
            assert original_destination(server) == listener.getsockname()
            if abort:
                set_abort_on_close(server)
            server.close()
            with trio.fail_after(TIMEOUT):
                if abort:
                    with pytest.raises(ConnectionResetError):
                        await client.recv(1)
                else:
                    assert await client.recv(1) == b""  # a plain FIN

    trio.run(main)


# --------------------------------------------------------------------------- original_destination


def test_original_destination_ipv6_is_a_pair() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as listener:
        try:
            listener.bind(("::1", 0))
        except OSError as exc:
            pytest.skip(f"no ::1 here: {exc}")
        listener.listen(1)
        with socket.create_connection(listener.getsockname()[:2], timeout=TIMEOUT):
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockname()[2:] == (0, 0)  # flow info, scope id
                assert original_destination(accepted) == ("::1", listener.getsockname()[1])


def test_original_destination_unmaps_ipv4_mapped() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            listener.bind(("::", 0))
        except OSError as exc:
            pytest.skip(f"no dual-stack socket here: {exc}")
        listener.listen(1)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT):
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockname()[0] == "::ffff:127.0.0.1"
                assert original_destination(accepted) == ("127.0.0.1", port)


@dataclass
class FakeSocket:
    name: Any
    family: int = socket.AF_INET6

    def setsockopt(self, level: int, optname: int, value: int | bytes, /) -> None:
        raise AssertionError("not used")

    def getsockname(self) -> Any:
        return self.name


def test_original_destination_strips_scope() -> None:
    assert original_destination(FakeSocket(("fe80::1%eth0", 443, 7, 2))) == ("fe80::1", 443)
    assert original_destination(FakeSocket(("10.0.0.5", 80), socket.AF_INET)) == ("10.0.0.5", 80)


# --------------------------------------------------------------------------- PolicyRoutes


@pytest.mark.netns
def test_install_is_idempotent_and_creates_the_four_objects(netns: str) -> None:
    routes = PolicyRoutes(Interception(), netns)
    assert not lo_is_up(netns)  # a fresh namespace: install must set it up
    assert routes.missing() == [LO_UP, RULE4, RULE6, ROUTE4, ROUTE6]

    routes.install()
    routes.install()

    assert lo_is_up(netns)
    # The kernel picked the priority; exactly one rule per family all the same.
    assert our_rules(netns) == ["32765:\tfrom all fwmark 0xa iif lo lookup 10"]
    assert our_rules(netns, six=True) == ["32765:\tfrom all fwmark 0xa iif lo lookup 10"]
    assert table_routes(netns) == ["local default dev lo proto static scope host"]
    assert table_routes(netns, six=True) == [
        "local default dev lo proto static metric 1024 pref medium"
    ]
    assert routes.missing() == []


@pytest.mark.netns
def test_install_with_priority_mark_and_table(netns: str) -> None:
    ic = Interception(recirculate_mark=0x539, route_table=100, rule_priority=100)
    routes = PolicyRoutes(ic, netns)
    routes.install()
    routes.install()  # EEXIST from the kernel, tolerated
    assert our_rules(netns) == ["100:\tfrom all fwmark 0x539 iif lo lookup 100"]
    assert our_rules(netns, six=True) == ["100:\tfrom all fwmark 0x539 iif lo lookup 100"]
    assert len(table_routes(netns, 100)) == 1
    assert len(table_routes(netns, 100, six=True)) == 1
    assert table_routes(netns, 10) == []
    assert routes.missing() == []
    routes.remove()
    assert our_rules(netns) == our_rules(netns, six=True) == []


@pytest.mark.netns
def test_lo_down_up_loses_ipv6_route_and_repair_restores_it(netns: str) -> None:
    routes = PolicyRoutes(Interception(), netns)
    routes.install()
    ip("-n", netns, "link", "set", "lo", "down")
    ip("-n", netns, "link", "set", "lo", "up")

    # Only the IPv6 local route is gone; the IPv4 one and both rules survive.
    assert table_routes(netns, six=True) == []
    assert len(table_routes(netns)) == 1
    assert routes.missing() == [ROUTE6]

    assert routes.repair() == [ROUTE6]
    assert len(table_routes(netns, six=True)) == 1
    assert routes.missing() == []
    assert routes.repair() == []


@pytest.mark.netns
def test_repair_sets_lo_up_first(netns: str) -> None:
    routes = PolicyRoutes(Interception(), netns)
    routes.install()
    ip("-n", netns, "link", "set", "lo", "down")
    assert routes.missing() == [LO_UP, ROUTE6]
    # The IPv6 route cannot be added while lo is down ("Nexthop device is not up").
    assert routes.repair() == [LO_UP, ROUTE6]
    assert lo_is_up(netns)
    assert routes.missing() == []


@pytest.mark.netns
def test_repair_restores_deleted_rules(netns: str) -> None:
    routes = PolicyRoutes(Interception(), netns)
    routes.install()
    ip("-n", netns, "rule", "del", "fwmark", "10", "iif", "lo", "lookup", "10")
    ip("-n", netns, "route", "del", "local", "0.0.0.0/0", "dev", "lo", "table", "10")
    assert routes.missing() == [RULE4, ROUTE4]
    assert routes.repair() == [RULE4, ROUTE4]
    assert len(our_rules(netns)) == 1
    assert len(table_routes(netns)) == 1


@pytest.mark.netns
def test_remove_deletes_exactly_what_install_added(netns: str) -> None:
    # Lookalikes that are not ours: other mark, no iif, other route in our table.
    ip("-n", netns, "link", "set", "lo", "up")
    ip("-n", netns, "rule", "add", "fwmark", "11", "iif", "lo", "lookup", "10")
    ip("-n", netns, "-6", "rule", "add", "fwmark", "10", "lookup", "10")
    ip("-n", netns, "route", "add", "local", "10.0.0.0/8", "dev", "lo", "table", "10")
    foreign = (our_rules(netns), our_rules(netns, six=True), table_routes(netns))

    routes = PolicyRoutes(Interception(), netns)
    routes.install()
    assert routes.missing() == []
    routes.remove()
    routes.remove()  # ENOENT / ESRCH tolerated

    assert (our_rules(netns), our_rules(netns, six=True), table_routes(netns)) == foreign
    assert table_routes(netns, six=True) == []
    assert routes.missing() == [RULE4, RULE6, ROUTE4, ROUTE6]
    assert lo_is_up(netns)  # lo is not ours to take down


@pytest.mark.netns
def test_remove_on_a_clean_namespace_is_fine(netns: str) -> None:
    PolicyRoutes(Interception(), netns).remove()
    assert our_rules(netns) == our_rules(netns, six=True) == []


def test_missing_netns_is_not_created() -> None:
    require_root()
    name = f"tpt-{secrets.token_hex(4)}"
    with pytest.raises(FileNotFoundError):
        PolicyRoutes(Interception(), name).missing()
    assert name not in ip("netns", "list")


# --------------------------------------------------------------------------- end to end

POD4, PEER4 = "10.2.0.1", "10.2.0.2"
POD6, PEER6 = "fd00:2::1", "fd00:2::2"


@dataclass
class Topology:
    """A "pod" namespace (interception installed) and a "peer" one, linked by a veth."""

    pod: str
    peer: str
    stack: ExitStack

    def new_socket(self, ns: str, family: int) -> socket.socket:
        sock: socket.socket = pyroute2_netns.create_socket(ns, family, socket.SOCK_STREAM, flags=0)
        self.stack.callback(sock.close)
        sock.settimeout(TIMEOUT)
        return sock

    def listen(
        self, ns: str, address: tuple[str, int], *, transparent: bool = False, mark: int = 0
    ) -> socket.socket:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = self.new_socket(ns, family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            set_transparent(sock)
        if mark:
            set_mark(sock, mark)
        sock.bind(address)
        sock.listen(8)
        return sock

    def dial(self, ns: str, address: tuple[str, int]) -> socket.socket:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = self.new_socket(ns, family)
        sock.connect(address)
        return sock

    def intercept(self, ic: Interception) -> None:
        Nft(netns=self.pod).apply(ic)
        PolicyRoutes(ic, self.pod).install()

    def proxy_listeners(
        self, ic: Interception, family: int, *, bypass: bool = True
    ) -> tuple[socket.socket, socket.socket]:
        """(egress plaintext listener, ingress TLS listener), as the proxy makes them."""
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        egress = self.listen(self.pod, (host, ic.tcp_port), transparent=True)
        # The proxy gives its TLS listener the bypass mark (KERNEL-NOTES); the
        # output chain's `ct direction reply return` makes it belt and braces.
        mark = ic.bypass_mark if bypass else 0
        ingress = self.listen(self.pod, (host, ic.tls_port), transparent=True, mark=mark)
        return egress, ingress


@pytest.fixture
def topo() -> Iterator[Topology]:
    require_root("nft")
    with ExitStack() as stack:
        pod = stack.enter_context(new_netns())
        peer = stack.enter_context(new_netns())
        sockets = stack.enter_context(ExitStack())  # closed before the namespaces go
        ip("-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", peer)
        for ns, v4, v6 in ((pod, POD4, POD6), (peer, PEER4, PEER6)):
            ip("-n", ns, "addr", "add", f"{v4}/24", "dev", "eth0")
            ip("-n", ns, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield Topology(pod, peer, sockets)


def expect_nothing(listener: socket.socket) -> None:
    listener.settimeout(NOTHING)
    with pytest.raises(TimeoutError):
        conn, _ = listener.accept()
        conn.close()


FAMILIES = pytest.mark.parametrize(
    ("family", "pod_ip", "peer_ip"),
    [(socket.AF_INET, POD4, PEER4), (socket.AF_INET6, POD6, PEER6)],
    ids=["ipv4", "ipv6"],
)


@pytest.mark.netns
@FAMILIES
def test_egress_reaches_the_plaintext_listener(
    topo: Topology, family: int, pod_ip: str, peer_ip: str
) -> None:
    ic = Interception()
    topo.intercept(ic)
    egress, ingress = topo.proxy_listeners(ic, family)
    server = topo.listen(topo.peer, (peer_ip, 80))

    client = topo.dial(topo.pod, (peer_ip, 80))
    accepted, peer = egress.accept()
    with accepted:
        assert original_destination(accepted) == (peer_ip, 80)
        assert peer[:2] == client.getsockname()[:2]
        assert peer[0] == pod_ip
    expect_nothing(server)  # the real destination never saw it
    expect_nothing(ingress)


@pytest.mark.netns
@FAMILIES
@pytest.mark.parametrize("bypass", [True, False], ids=["bypass-mark", "no-mark"])
def test_ingress_reaches_the_tls_listener(
    topo: Topology, family: int, pod_ip: str, peer_ip: str, bypass: bool
) -> None:
    ic = Interception()
    topo.intercept(ic)
    egress, ingress = topo.proxy_listeners(ic, family, bypass=bypass)
    app = topo.listen(topo.pod, (pod_ip, 8080))

    client = topo.dial(topo.peer, (pod_ip, 8080))
    accepted, peer = ingress.accept()
    with accepted:
        assert original_destination(accepted) == (pod_ip, 8080)
        assert peer[:2] == client.getsockname()[:2]
        # Data flows both ways: the SYN-ACK and replies were not recirculated.
        client.sendall(b"ping")
        assert accepted.recv(4) == b"ping"
        accepted.sendall(b"pong")
        assert client.recv(4) == b"pong"
    expect_nothing(app)
    expect_nothing(egress)


@pytest.mark.netns
@FAMILIES
@pytest.mark.parametrize("exclusion", ["port", "cidr"])
def test_excluded_egress_goes_direct(
    topo: Topology, family: int, pod_ip: str, peer_ip: str, exclusion: str
) -> None:
    if exclusion == "port":
        ic = Interception(exclude_outbound_ports=(8443,))
    else:
        ic = Interception(
            exclude_cidrs=(net(f"{peer_ip}/{32 if family == socket.AF_INET else 128}"),)
        )
    topo.intercept(ic)
    egress, _ = topo.proxy_listeners(ic, family)
    server = topo.listen(topo.peer, (peer_ip, 8443))

    topo.dial(topo.pod, (peer_ip, 8443))
    accepted, peer = server.accept()
    accepted.close()
    assert peer[0] == pod_ip
    expect_nothing(egress)


@pytest.mark.netns
@FAMILIES
@pytest.mark.parametrize("exclusion", ["port", "cidr"])
def test_excluded_ingress_goes_direct(
    topo: Topology, family: int, pod_ip: str, peer_ip: str, exclusion: str
) -> None:
    if exclusion == "port":
        ic = Interception(exclude_inbound_ports=(15021,))
    else:
        ic = Interception(
            exclude_cidrs=(net(f"{peer_ip}/{32 if family == socket.AF_INET else 128}"),)
        )
    topo.intercept(ic)
    _, ingress = topo.proxy_listeners(ic, family)
    app = topo.listen(topo.pod, (pod_ip, 15021))

    topo.dial(topo.peer, (pod_ip, 15021))
    accepted, peer = app.accept()
    accepted.close()
    assert peer[0] == peer_ip
    expect_nothing(ingress)


@pytest.mark.netns
def test_lo_flap_stops_ipv6_egress_until_repair(topo: Topology) -> None:
    """The reason repair() exists: after lo flaps, IPv6 egress is no longer looped back.
    The table's postrouting guard drops it (it would go direct, unproxied, without it)."""
    ic = Interception()
    topo.intercept(ic)
    egress, _ = topo.proxy_listeners(ic, socket.AF_INET6)
    server = topo.listen(topo.peer, (PEER6, 80))
    ip("-n", topo.pod, "link", "set", "lo", "down")
    ip("-n", topo.pod, "link", "set", "lo", "up")

    with pytest.raises(TimeoutError):
        topo.dial(topo.pod, (PEER6, 80))  # dropped before it leaves
    expect_nothing(server)
    expect_nothing(egress)

    assert PolicyRoutes(ic, topo.pod).repair() == [ROUTE6]
    egress.settimeout(TIMEOUT)
    topo.dial(topo.pod, (PEER6, 80))
    accepted, _ = egress.accept()
    with accepted:
        assert original_destination(accepted) == (PEER6, 80)
    expect_nothing(server)


def test_netlink_errno_is_kept() -> None:
    """RouteError is an OSError carrying the netlink errno and naming the object."""
    from pyroute2.netlink.exceptions import NetlinkError

    from trio_tproxy.kernel import RouteError, _error

    err = _error(NetlinkError(errno.EPERM, "Operation not permitted"), RULE4)
    assert isinstance(err, RouteError) and isinstance(err, OSError)
    assert err.errno == errno.EPERM
    assert str(err) == f"[Errno 1] {RULE4}: Operation not permitted (needs CAP_NET_ADMIN)"
