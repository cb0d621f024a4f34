"""The one module that talks to the kernel about sockets and routing.

Why one module: every socket option and netlink call the proxy depends on is
here, next to what was verified about it (docs/kernel.md), so the rest of the
program deals in plain calls and one error type per concern.

Sockets: :func:`set_transparent` (bind to / accept for foreign addresses, needed
by TPROXY listeners), :func:`set_mark` (SO_MARK, so the proxy's own sockets
bypass interception), :func:`set_abort_on_close` (close sends RST, so a broken
relay looks broken to the peer) and :func:`original_destination`. They accept a
stdlib or a trio socket.

Routing: :class:`PolicyRoutes` owns the two ``ip rule`` and two ``local
default`` routes that loop marked egress back through ``lo``. Idempotence is by
errno and by comparing netlink attributes, never by matching messages; the
messages themselves are packed and parsed by :mod:`.rtnl`. The
IPv6 local route disappears when ``lo`` goes down and up and never comes back
(egress would then silently bypass the proxy), so :meth:`PolicyRoutes.repair`
is meant to be called periodically. :meth:`PolicyRoutes.remove` tries every
object even after a failure and reports them all in one :class:`RouteError`.
Callers do not use PolicyRoutes alone: :class:`interception.Installer` installs
and removes it together with the nft table, as one unit.

Netlink calls block: from trio, run them with ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from . import rtnl
from .config import Interception

#: Python has no ``socket.IPV6_TRANSPARENT``; it is 75 at level IPPROTO_IPV6.
IPV6_TRANSPARENT: Final = 75
SOL_IP: Final = socket.SOL_IP
IP_TRANSPARENT: Final = socket.IP_TRANSPARENT

_RTN_LOCAL: Final = 2
_RT_SCOPE_HOST: Final = 254
_FR_ACT_TO_TBL: Final = 1
_FAMILIES: Final = (socket.AF_INET, socket.AF_INET6)


class SocketLike(Protocol):
    """What the socket helpers need: a stdlib ``socket.socket`` or a trio socket."""

    @property
    def family(self) -> int: ...

    def setsockopt(self, level: int, optname: int, value: int | bytes, /) -> None: ...

    def getsockname(self) -> Any: ...

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


# --------------------------------------------------------------------------- sockets


def set_transparent(sock: SocketLike) -> None:
    """IP_TRANSPARENT / IPV6_TRANSPARENT, by the socket's family. Needs CAP_NET_ADMIN."""
    if sock.family == socket.AF_INET:
        sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
    elif sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        raise ValueError(f"transparent sockets must be IPv4 or IPv6, not {sock.family!r}")


def set_mark(sock: SocketLike, mark: int) -> None:
    """SO_MARK: every packet this socket sends carries ``mark``. Needs CAP_NET_ADMIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)


def set_abort_on_close(sock: SocketLike) -> None:
    """SO_LINGER {on, 0}: closing the socket sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


#: ``tcpi_state`` of a socket whose connection was reset (or never opened).
TCP_CLOSE = 7


def was_reset(sock: SocketLike) -> bool:
    """Whether a TCP socket that just read EOF was in fact reset.

    A reset is reported once: if a send on the socket collects the error, a
    concurrent recv then returns 0 as if the peer had sent FIN.  The state
    tells them apart: FIN leaves CLOSE_WAIT (or TIME_WAIT), RST leaves CLOSE.
    """
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
    except OSError:
        return False
    return bool(info) and info[0] == TCP_CLOSE


def parse_port_ranges(text: str) -> list[range]:
    """``ip_local_reserved_ports`` syntax: "16384-32767,40000" (empty: none)."""
    ranges = []
    for part in text.replace("\n", ",").split(","):
        part = part.strip()
        if part:
            low, _, high = part.partition("-")
            ranges.append(range(int(low), int(high or low) + 1))
    return ranges


def ephemeral_ports(
    proc: str = "/proc/sys/net/ipv4",
) -> tuple[range, list[range]] | None:
    """This network namespace's ephemeral range and reserved ports; None if unreadable."""
    try:
        with open(f"{proc}/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        with open(f"{proc}/ip_local_reserved_ports") as f:
            reserved = parse_port_ranges(f.read())
    except (OSError, ValueError):
        return None
    return range(low, high + 1), reserved


def original_destination(sock: SocketLike) -> tuple[str, int]:
    """Where the client meant to connect, for a socket accepted from a TPROXY listener.

    TPROXY keeps the original destination as the accepted socket's local
    address. IPv6 flow info and scope are dropped; an IPv4-mapped IPv6 address
    (a dual-stack socket) is returned as plain IPv4.
    """
    return _destination(sock.getsockname())


def ingress_addresses(
    sock: SocketLike, peer: tuple[str, int]
) -> tuple[tuple[str, int], tuple[str, int]]:
    """(client, original destination) of an accepted ingress socket, link-local
    IPv6 addresses with their scope (``fe80::1%eth0``).

    Without the scope a link-local address can be neither dialed nor bound
    (EINVAL), and a log line naming it is ambiguous.  The accepted socket's
    local name carries the scope id (the interface the SYN came in on); the
    client of a link-local destination is on that same link.  One getsockname,
    as :func:`original_destination`.
    """
    name = sock.getsockname()
    dst = _destination(name)
    scope = name[3] if len(name) == 4 else 0
    if not scope:
        return peer, dst
    try:
        suffix = "%" + socket.if_indextoname(scope)
    except OSError:
        suffix = f"%{scope}"

    def scoped(host: str) -> str:
        if "%" in host or not ipaddress.ip_address(host).is_link_local:
            return host
        return host + suffix

    return (scoped(peer[0]), peer[1]), (scoped(dst[0]), dst[1])


def _destination(name: Any) -> tuple[str, int]:
    if len(name) == 2:
        # AF_INET: the kernel's dotted quad is already canonical (no parse per connection).
        return str(name[0]), int(name[1])
    host = str(name[0]).split("%", 1)[0]
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), int(name[1])


# --------------------------------------------------------------------------- UDP

# Python's socket module has none of these (linux/in.h, linux/in6.h).
#: IP_RECVORIGDSTADDR (= IP_ORIGDSTADDR, the cmsg type): recvmsg reports each
#: datagram's destination before TPROXY, as a struct sockaddr_in.
IP_RECVORIGDSTADDR: Final = 20
#: IPV6_RECVORIGDSTADDR (= IPV6_ORIGDSTADDR): the same, struct sockaddr_in6.
IPV6_RECVORIGDSTADDR: Final = 74
#: IP_PKTINFO: sendmsg with a struct in_pktinfo chooses the source address.
IP_PKTINFO: Final = 8
#: Room for one IP(V6)_ORIGDSTADDR message (a sockaddr_in6 is the larger).
ORIGDST_CMSG_SPACE: Final = socket.CMSG_SPACE(28)
_SOCKADDR_IN: Final = struct.Struct("=H2s4s8x")  # family, port (network order), address
_SOCKADDR_IN6: Final = struct.Struct("=H2s4x16s4x")  # family, port, flowinfo, address, scope


def set_recv_original_destination(sock: SocketLike) -> None:
    """Have ``recvmsg`` report each datagram's original destination (TPROXY'd UDP)."""
    if sock.family == socket.AF_INET:
        sock.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)


def original_destination_of_datagram(
    ancdata: list[tuple[int, int, bytes]],
) -> tuple[str, int] | None:
    """The original destination in ``recvmsg``'s ancillary data, or None if absent."""
    for level, kind, data in ancdata:
        if level == SOL_IP and kind == IP_RECVORIGDSTADDR and len(data) >= _SOCKADDR_IN.size:
            _, port, addr = _SOCKADDR_IN.unpack_from(data)
            return socket.inet_ntop(socket.AF_INET, addr), int.from_bytes(port, "big")
        if (
            level == socket.IPPROTO_IPV6
            and kind == IPV6_RECVORIGDSTADDR
            and len(data) >= _SOCKADDR_IN6.size
        ):
            _, port, addr = _SOCKADDR_IN6.unpack_from(data)
            return socket.inet_ntop(socket.AF_INET6, addr), int.from_bytes(port, "big")
    return None


def source_address_cmsg(host: str) -> tuple[int, int, bytes]:
    """Ancillary data for ``sendmsg`` that sends from ``host`` (IP_PKTINFO / IPV6_PKTINFO).

    The port is the socket's own. Lets one listener answer from whichever
    address a datagram was sent to (the DTLS cookie exchange, before a flow
    has a socket of its own).
    """
    if ":" in host:
        # struct in6_pktinfo: address, interface index (0: any)
        return (
            socket.IPPROTO_IPV6,
            socket.IPV6_PKTINFO,
            struct.pack("=16si", socket.inet_pton(socket.AF_INET6, host), 0),
        )
    # struct in_pktinfo: interface index, source ("spec_dst"), header destination (unused)
    return SOL_IP, IP_PKTINFO, struct.pack("=i4s4x", 0, socket.inet_pton(socket.AF_INET, host))


#: IPV6_CHECKSUM: the kernel computes a raw IPv6 socket's checksum at this offset.
IPV6_CHECKSUM: Final = getattr(socket, "IPV6_CHECKSUM", 7)
_UDP_HEADER: Final = struct.Struct("!HHHH")  # source port, destination port, length, checksum
_UDP_PORTS: Final = struct.Struct("!HH")
_UDP_TAIL: Final = struct.Struct("!HH")
_UDP_CHECKSUM_OFFSET: Final = 6


def raw_udp_socket(family: int, mark: int) -> socket.socket:
    """A raw UDP socket that sends datagrams with any source address and port.

    For a flow whose reply socket cannot bind the original destination: the
    app itself holds a wildcard socket on that port number, and a bind
    conflicts whatever the address. The source address comes from IP(V6)_PKTINFO
    (IP_TRANSPARENT lets it be a foreign one), the source port from the UDP
    header we write. IPv4's UDP checksum is left 0 ("none", RFC 768); IPv6
    requires one and the kernel computes it (IPV6_CHECKSUM). It never reads:
    a raw socket gets a copy of every UDP datagram, so its buffer is the
    smallest the kernel allows.
    """
    sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_UDP)
    try:
        set_transparent(sock)
        set_mark(sock, mark)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 0)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_CHECKSUM, _UDP_CHECKSUM_OFFSET)
    except BaseException:
        sock.close()
        raise
    return sock


def raw_udp_ports(src_port: int, dst_port: int) -> bytes:
    """The first half of a UDP header (the same for every datagram of a flow)."""
    return _UDP_PORTS.pack(src_port, dst_port)


def raw_udp_tail(payload_length: int) -> bytes:
    """The second half of a UDP header: length, and checksum 0 (IPv4: none; IPv6: the kernel's)."""
    return _UDP_TAIL.pack(_UDP_HEADER.size + payload_length, 0)


# --------------------------------------------------------------------------- routing


class RouteError(OSError):
    """Adding or removing a policy rule or route failed. ``str()`` names the object.

    :meth:`PolicyRoutes.remove` tries every object and raises one RouteError
    whose ``failures`` holds each failure (one element for a single failure).
    """

    failures: tuple[OSError, ...] = ()


@dataclass(frozen=True)
class _Wanted:
    kind: Literal["rule", "route"]
    family: int
    #: The fwmark of a rule (0 for a route).
    mark: int = 0


def _wanted(ic: Interception) -> tuple[_Wanted, ...]:
    """Two rules per family (recirculated egress; replies to a preserved client
    address) and one local route per family."""
    return (
        *(_Wanted("rule", family, ic.recirculate_mark) for family in _FAMILIES),
        *(_Wanted("rule", family, ic.preserve_mark) for family in _FAMILIES),
        *(_Wanted("route", family) for family in _FAMILIES),
    )


#: How :meth:`PolicyRoutes.missing` and :meth:`PolicyRoutes.repair` name a down ``lo``.
LO_UP: Final = "link lo up"


class PolicyRoutes:
    """``ip rule fwmark <mark> iif lo lookup <table>`` (the recirculate mark and the
    preserve mark) and ``local default dev lo``, both families.

    With ``netns``, every call works in that named network namespace (tests);
    the namespace must exist, it is never created.
    """

    def __init__(self, ic: Interception, netns: str | None = None) -> None:
        self.ic = ic
        self.netns = netns
        self._wanted = _wanted(ic)

    # -- public

    def install(self) -> None:
        """Set ``lo`` up and add the rules and routes; adding what exists is a no-op."""
        with self._rtnl() as nl:
            lo = self._lo(nl)
            if not lo.flags & rtnl.IFF_UP:
                self._set_lo_up(nl, lo.index)
            for want in self._wanted:
                if want.kind == "rule" and not self.ic.rule_priority:
                    # Without a priority the kernel picks a new one each time
                    # and never answers EEXIST: look before adding.
                    if self._find_rules(nl, want):
                        continue
                self._add(nl, want, lo.index)

    def remove(self) -> None:
        """Delete what :meth:`install` adds (nothing else); absent objects are fine.

        Tries every object even when one fails (a partial removal is worse than
        a slow one), then raises one :class:`RouteError` listing each failure.
        """
        failures: list[OSError] = []
        with self._rtnl() as nl:
            lo = self._lo(nl).index
            for want in self._wanted:
                try:
                    if want.kind == "rule":
                        try:
                            priorities = self._find_rules(nl, want)
                        except OSError as exc:  # the dump failed
                            raise _error(exc, f"list {self._describe(want)}") from exc
                        for priority in priorities:
                            self._tolerate(nl, want, self._rule_body(want, priority))
                    else:
                        self._tolerate(nl, want, self._route_body(want.family, lo, delete=True))
                except OSError as exc:
                    failures.append(exc)
        if failures:
            first = failures[0]
            error = RouteError(first.errno, "; ".join(_strip_errno(f) for f in failures))
            error.failures = tuple(failures)
            raise error

    def commands(self) -> list[str]:
        """What :meth:`install` does, as the equivalent iproute2 commands."""
        lines = ["ip link set lo up"]
        for want in self._wanted:
            six, _, rest = self._describe(want).partition(" rule ")
            if rest:
                lines.append(f"{six} rule add {rest}")
            else:
                six, _, rest = self._describe(want).partition(" route ")
                lines.append(f"{six} route add {rest}")
        return lines

    def missing(self) -> list[str]:
        """What is not in place now, each as a short description (empty: all good)."""
        with self._rtnl() as nl:
            lo = self._lo(nl)
            down = [] if lo.flags & rtnl.IFF_UP else [LO_UP]
            return down + [self._describe(w) for w in self._missing(nl, lo.index)]

    def repair(self) -> list[str]:
        """Set ``lo`` up and re-add whatever is missing; say what was restored."""
        restored: list[str] = []
        with self._rtnl() as nl:
            lo = self._lo(nl)
            if not lo.flags & rtnl.IFF_UP:
                self._set_lo_up(nl, lo.index)
                restored.append(LO_UP)
            for want in self._missing(nl, lo.index):
                self._add(nl, want, lo.index)
                restored.append(self._describe(want))
        return restored

    def _describe(self, want: _Wanted) -> str:
        ic = self.ic
        six = " -6" if want.family == socket.AF_INET6 else ""
        if want.kind == "rule":
            prio = f" priority {ic.rule_priority}" if ic.rule_priority else ""
            return f"ip{six} rule fwmark {want.mark} iif lo lookup {ic.route_table}{prio}"
        dst = "::/0" if want.family == socket.AF_INET6 else "0.0.0.0/0"
        return f"ip{six} route local {dst} dev lo table {ic.route_table}"

    # -- netlink

    @contextmanager
    def _rtnl(self) -> Iterator[rtnl.Rtnl]:
        where = self.netns or "this namespace"
        nl = rtnl.Rtnl(self.netns)  # a namespace that does not exist: FileNotFoundError
        try:
            yield nl
        except RouteError:
            raise
        except OSError as exc:  # a dump or lookup; adds and deletes say more
            raise _error(exc, f"netlink request in {where}") from exc
        finally:
            nl.close()

    def _lo(self, nl: rtnl.Rtnl) -> rtnl.Link:
        try:
            return nl.link("lo")
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                raise RouteError(errno.ENODEV, "no loopback interface 'lo'") from exc
            raise

    def _set_lo_up(self, nl: rtnl.Rtnl, lo: int) -> None:
        try:
            nl.set_up(lo)
        except OSError as exc:
            raise _error(exc, "ip link set lo up") from exc

    def _find_rules(self, nl: rtnl.Rtnl, want: _Wanted) -> list[int]:
        """Priorities of the rules like ``want`` that are ours (duplicates included)."""
        ic = self.ic
        found = []
        for rule in nl.rules(want.family):
            priority = rule.priority or 0
            if (
                rule.action == _FR_ACT_TO_TBL
                and rule.table == ic.route_table
                and rule.fwmark == want.mark
                and rule.fwmask in (None, 0xFFFFFFFF)
                and rule.iifname == "lo"
                and rule.oifname is None
                and rule.src_len == 0
                and rule.dst_len == 0
                and (not ic.rule_priority or priority == ic.rule_priority)
            ):
                found.append(priority)
        return found

    def _has_route(self, nl: rtnl.Rtnl, family: int, lo: int) -> bool:
        return any(
            route.type == _RTN_LOCAL
            and route.dst_len == 0
            and route.oif == lo
            and route.table == self.ic.route_table
            for route in nl.routes(family)
        )

    def _missing(self, nl: rtnl.Rtnl, lo: int) -> list[_Wanted]:
        return [
            want
            for want in self._wanted
            if not (
                self._find_rules(nl, want)
                if want.kind == "rule"
                else self._has_route(nl, want.family, lo)
            )
        ]

    def _add(self, nl: rtnl.Rtnl, want: _Wanted, lo: int) -> None:
        try:
            if want.kind == "rule":
                # No priority: no FRA_PRIORITY, the kernel chooses.
                nl.add_rule(self._rule_body(want, self.ic.rule_priority or None))
            else:
                nl.add_route(self._route_body(want.family, lo, delete=False))
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise _error(exc, self._describe(want)) from exc

    def _rule_body(self, want: _Wanted, priority: int | None) -> bytes:
        return rtnl.rule_body(
            want.family,
            fwmark=want.mark,
            iifname="lo",
            table=self.ic.route_table,
            priority=priority or None,
        )

    def _route_body(self, family: int, lo: int, *, delete: bool) -> bytes:
        return rtnl.route_body(
            family,
            kind=_RTN_LOCAL,
            table=self.ic.route_table,
            oif=lo,
            # iproute2 infers scope host for IPv4 local routes; the kernel
            # rejects scope universe with EINVAL ("Invalid scope").
            scope=_RT_SCOPE_HOST if family == socket.AF_INET else 0,
            # Added as "proto static"; deleted whatever its protocol (0: any).
            protocol=0 if delete else rtnl.RTPROT_STATIC,
        )

    def _tolerate(self, nl: rtnl.Rtnl, want: _Wanted, body: bytes) -> None:
        try:
            if want.kind == "rule":
                nl.delete_rule(body)
            else:
                nl.delete_route(body)
        except OSError as exc:
            # Already gone: ENOENT (rules, IPv6 routes) or ESRCH (IPv4 routes).
            if exc.errno not in (errno.ENOENT, errno.ESRCH):
                raise _error(exc, f"delete {self._describe(want)}") from exc


def _strip_errno(exc: OSError) -> str:
    return exc.strerror if exc.strerror is not None else str(exc)


def _error(exc: OSError, what: str) -> RouteError:
    """A RouteError naming ``what``, with the kernel's errno and its message."""
    code = exc.errno or 0
    hint = " (needs CAP_NET_ADMIN)" if code == errno.EPERM else ""
    message = exc.strerror or errno.errorcode.get(code, "")
    return RouteError(code, f"{what}: {message}{hint}")
