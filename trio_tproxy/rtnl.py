"""rtnetlink: the few routing messages the sidecar sends, packed and parsed here.

Why our own: the sidecar needs five kinds of request (look up ``lo`` and set it
up; list, add and delete policy rules; list, add and delete routes; list
addresses) and a socket opened in a named network namespace. pyroute2 covers
all of netlink and costs ~12 MB of RSS and ~235 modules at import, a fifth of
an idle sidecar. This module is the one place that speaks rtnetlink
(``man 7 rtnetlink``); :mod:`.kernel` decides what to ask for.

Design:

* **Pure packing and parsing** (:func:`pack_request`, :func:`pack_attrs`,
  :func:`parse_messages`, :func:`parse_attrs`, :func:`parse_error`), tested
  without a kernel; the structs are those of ``linux/netlink.h``,
  ``linux/rtnetlink.h``, ``linux/fib_rules.h`` and ``linux/if_addr.h``, in
  host byte order.
* **One request at a time** (:meth:`Rtnl.request`): send, then read until the
  kernel's ACK (an ``NLMSG_ERROR`` with error 0), its error (→ ``OSError`` with
  the kernel's errno and, with extended ACKs, its message) or, for a dump,
  ``NLMSG_DONE``. Requests carry a sequence number; replies to an earlier,
  abandoned request are skipped.
* **Namespaces** (:func:`open_socket`): a netlink socket belongs to the
  namespace it was created in, so the calling thread enters the named
  namespace (``setns`` on ``/run/netns/NAME``), creates the socket and comes
  back; the process stays where it is. Never creates a namespace.

Calls block (netlink answers at once for these requests): from trio, run them
with ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

# linux/netlink.h
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLM_F_REQUEST: Final = 0x1
NLM_F_MULTI: Final = 0x2
NLM_F_ACK: Final = 0x4
NLM_F_DUMP: Final = 0x300
NLM_F_EXCL: Final = 0x200
NLM_F_CREATE: Final = 0x400
#: In an error message's flags: extended-ACK attributes follow.
NLM_F_ACK_TLVS: Final = 0x200
#: In an error message's flags: the request was not echoed back (NETLINK_CAP_ACK).
NLM_F_CAPPED: Final = 0x100
NLMSGERR_ATTR_MSG: Final = 1
SOL_NETLINK: Final = 270
NETLINK_CAP_ACK: Final = 10
NETLINK_EXT_ACK: Final = 11

# linux/rtnetlink.h
RTM_NEWLINK: Final = 16
RTM_GETLINK: Final = 18
RTM_GETADDR: Final = 22
RTM_NEWROUTE: Final = 24
RTM_DELROUTE: Final = 25
RTM_GETROUTE: Final = 26
RTM_NEWRULE: Final = 32
RTM_DELRULE: Final = 33
RTM_GETRULE: Final = 34
RTN_LOCAL: Final = 2
RTPROT_STATIC: Final = 4
#: rtm_table / fib_rule_hdr.table for a table id above 255 (the id goes in an attribute).
RT_TABLE_COMPAT: Final = 252
RTA_DST: Final = 1
RTA_OIF: Final = 4
RTA_TABLE: Final = 15
IFLA_IFNAME: Final = 3
IFA_ADDRESS: Final = 1
IFF_UP: Final = 0x1

# linux/fib_rules.h
FRA_IIFNAME: Final = 3
FRA_PRIORITY: Final = 6
FRA_FWMARK: Final = 10
FRA_TABLE: Final = 15
FRA_FWMASK: Final = 16
FRA_OIFNAME: Final = 17
FR_ACT_TO_TBL: Final = 1

NLMSGHDR: Final = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
RTATTR: Final = struct.Struct("=HH")  # length, type
IFINFOMSG: Final = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG: Final = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
#: struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
RTMSG: Final = struct.Struct("=BBBBBBBBI")
#: struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags.
FIB_RULE_HDR: Final = struct.Struct("=BBBBBBBBI")
_U32: Final = struct.Struct("=I")
_ERRNO: Final = struct.Struct("=i")
_RECV_SIZE: Final = 65536

Attrs = dict[int, bytes]


# --------------------------------------------------------------------------- pure


def _align(n: int) -> int:
    return (n + 3) & ~3


def pack_attrs(*attrs: tuple[int, bytes]) -> bytes:
    """rtattrs (type, value), each padded to 4 bytes."""
    out = bytearray()
    for kind, value in attrs:
        out += RTATTR.pack(RTATTR.size + len(value), kind) + value
        out += bytes(_align(len(out)) - len(out))
    return bytes(out)


def u32(value: int) -> bytes:
    return _U32.pack(value)


def cstring(text: str) -> bytes:
    return text.encode() + b"\0"


def pack_request(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """One netlink message: nlmsghdr (port id 0: the kernel) + body."""
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def parse_messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, sequence, payload) of each message in one datagram."""
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, flags, seq, _ = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            raise OSError(errno.EBADMSG, f"netlink message of length {length} at {offset}")
        yield kind, flags, seq, data[offset + NLMSGHDR.size : offset + length]
        offset += _align(length)


def parse_attrs(data: bytes, offset: int = 0) -> Attrs:
    """The rtattrs from ``offset`` on: {type: value} (nested/flag bits masked off)."""
    attrs: Attrs = {}
    while offset + RTATTR.size <= len(data):
        length, kind = RTATTR.unpack_from(data, offset)
        if length < RTATTR.size:
            break
        attrs[kind & 0x3FFF] = data[offset + RTATTR.size : offset + length]
        offset += _align(length)
    return attrs


def parse_error(flags: int, payload: bytes) -> tuple[int, str]:
    """(errno, the kernel's message or "") of an NLMSG_ERROR payload; errno 0 is an ACK."""
    (code,) = _ERRNO.unpack_from(payload)
    message = ""
    if code and flags & NLM_F_ACK_TLVS:
        # nlmsgerr: error, then the request's header (and its body unless capped).
        echoed = NLMSGHDR.size
        if not flags & NLM_F_CAPPED and len(payload) >= _ERRNO.size + NLMSGHDR.size:
            (echoed,) = _U32.unpack_from(payload, _ERRNO.size)
        text = parse_attrs(payload, _align(_ERRNO.size + echoed)).get(NLMSGERR_ATTR_MSG)
        if text:
            message = text.rstrip(b"\0").decode(errors="replace")
    return -code, message


def get_u32(attrs: Attrs, kind: int) -> int | None:
    value = attrs.get(kind)
    return _U32.unpack_from(value)[0] if value is not None and len(value) >= 4 else None


def get_str(attrs: Attrs, kind: int) -> str | None:
    value = attrs.get(kind)
    return value.split(b"\0", 1)[0].decode(errors="replace") if value is not None else None


@dataclass(frozen=True)
class Link:
    index: int
    flags: int


@dataclass(frozen=True)
class Rule:
    family: int
    action: int
    table: int
    src_len: int
    dst_len: int
    priority: int | None
    fwmark: int | None
    fwmask: int | None
    iifname: str | None
    oifname: str | None


@dataclass(frozen=True)
class Route:
    family: int
    type: int
    dst_len: int
    table: int
    oif: int | None


def parse_link(payload: bytes) -> Link:
    _, _, index, flags, _ = IFINFOMSG.unpack_from(payload)
    return Link(index, flags)


def parse_rule(payload: bytes) -> Rule:
    family, dst_len, src_len, _, table, _, _, action, _ = FIB_RULE_HDR.unpack_from(payload)
    attrs = parse_attrs(payload, FIB_RULE_HDR.size)
    return Rule(
        family=family,
        action=action,
        table=get_u32(attrs, FRA_TABLE) or table,
        src_len=src_len,
        dst_len=dst_len,
        priority=get_u32(attrs, FRA_PRIORITY),
        fwmark=get_u32(attrs, FRA_FWMARK),
        fwmask=get_u32(attrs, FRA_FWMASK),
        iifname=get_str(attrs, FRA_IIFNAME),
        oifname=get_str(attrs, FRA_OIFNAME),
    )


def parse_route(payload: bytes) -> Route:
    family, dst_len, _, _, table, _, _, kind, _ = RTMSG.unpack_from(payload)
    attrs = parse_attrs(payload, RTMSG.size)
    return Route(
        family=family,
        type=kind,
        dst_len=dst_len,
        table=get_u32(attrs, RTA_TABLE) or table,
        oif=get_u32(attrs, RTA_OIF),
    )


def parse_address(payload: bytes) -> str | None:
    family = payload[0]
    value = parse_attrs(payload, IFADDRMSG.size).get(IFA_ADDRESS)
    if value is None or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return socket.inet_ntop(family, value)


def _table_field(table: int) -> int:
    return table if table <= 255 else RT_TABLE_COMPAT


def rule_body(family: int, *, fwmark: int, iifname: str, table: int, priority: int | None) -> bytes:
    """fib_rule_hdr + attributes of ``fwmark <mark> iif <iifname> lookup <table> [priority]``.

    No priority: the kernel picks one (below the last rule's)."""
    attrs = [
        (FRA_TABLE, u32(table)),
        (FRA_FWMARK, u32(fwmark)),
        (FRA_IIFNAME, cstring(iifname)),
    ]
    if priority is not None:
        attrs.append((FRA_PRIORITY, u32(priority)))
    header = FIB_RULE_HDR.pack(family, 0, 0, 0, _table_field(table), 0, 0, FR_ACT_TO_TBL, 0)
    return header + pack_attrs(*attrs)


def route_body(family: int, *, kind: int, table: int, oif: int, scope: int, protocol: int) -> bytes:
    """rtmsg + attributes of a default route (``dst_len`` 0) of type ``kind`` via ``oif``."""
    header = RTMSG.pack(family, 0, 0, 0, _table_field(table), protocol, scope, kind, 0)
    return header + pack_attrs((RTA_TABLE, u32(table)), (RTA_OIF, u32(oif)))


# --------------------------------------------------------------------------- sockets

CLONE_NEWNET: Final = 0x40000000


def _setns(fd: int) -> None:
    """setns(fd, CLONE_NEWNET) for the calling thread (``os.setns`` from Python 3.12)."""
    setns = getattr(os, "setns", None)
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    import ctypes  # Python 3.11; only callers naming a namespace (tests) get here

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def open_socket(protocol: int, netns: str | None = None) -> socket.socket:
    """A netlink socket of ``protocol``, in namespace ``netns`` (``/run/netns/NAME``) if given.

    The thread enters the namespace only to create the socket, and always
    comes back; a namespace that does not exist is ENOENT, never created.
    """
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
    target = os.open(os.path.join("/run/netns", netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
            finally:
                _setns(home)
        finally:
            os.close(home)
    finally:
        os.close(target)


class Rtnl:
    """An rtnetlink socket for requests (no notifications): ``with Rtnl(netns) as rtnl:``."""

    def __init__(self, netns: str | None = None) -> None:
        self.sock = open_socket(socket.NETLINK_ROUTE, netns)
        self._seq = 0
        try:
            self.sock.bind((0, 0))
            for option in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):
                try:  # the kernel's error message, and no echo of our request
                    self.sock.setsockopt(SOL_NETLINK, option, 1)
                except OSError:
                    pass  # older kernels: errno only
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, kind: int, body: bytes, flags: int = NLM_F_ACK) -> list[bytes]:
        """Send one request; the payloads of the replies (a dump's, or [] for an ACK).

        Raises OSError with the kernel's errno (and message) if it refuses.
        """
        self._seq += 1
        seq = self._seq
        self.sock.send(pack_request(kind, NLM_F_REQUEST | flags, seq, body))
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        replies: list[bytes] = []
        while True:
            data = self.sock.recv(_RECV_SIZE)
            for rkind, rflags, rseq, payload in parse_messages(data):
                if rseq != seq:
                    continue  # a late reply to an earlier request
                if rkind == NLMSG_ERROR:
                    code, message = parse_error(rflags, payload)
                    if code:
                        raise OSError(code, message or os.strerror(code))
                    return replies  # ACK
                if rkind == NLMSG_DONE:
                    # A dump that failed part-way ends with its errno here.
                    code = -_ERRNO.unpack_from(payload)[0] if len(payload) >= 4 else 0
                    if code > 0:
                        raise OSError(code, os.strerror(code))
                    return replies
                replies.append(payload)
                if not dump and not rflags & NLM_F_MULTI and not flags & NLM_F_ACK:
                    return replies

    # -- the requests the sidecar makes

    def link(self, name: str) -> Link:
        """The interface called ``name`` (ENODEV if there is none)."""
        body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + pack_attrs(
            (IFLA_IFNAME, cstring(name))
        )
        replies = self.request(RTM_GETLINK, body, flags=0)
        if not replies:
            raise OSError(errno.ENODEV, f"no interface {name!r}")
        return parse_link(replies[0])

    def set_up(self, index: int) -> None:
        body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP)
        self.request(RTM_NEWLINK, body)

    def rules(self, family: int) -> list[Rule]:
        body = FIB_RULE_HDR.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        return [parse_rule(p) for p in self.request(RTM_GETRULE, body, NLM_F_DUMP)]

    def routes(self, family: int) -> list[Route]:
        body = RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        return [parse_route(p) for p in self.request(RTM_GETROUTE, body, NLM_F_DUMP)]

    def addresses(self) -> list[str]:
        """Every address of every interface, both families."""
        body = IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        found = (parse_address(p) for p in self.request(RTM_GETADDR, body, NLM_F_DUMP))
        return [a for a in found if a is not None]

    def add_rule(self, body: bytes) -> None:
        self.request(RTM_NEWRULE, body, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)

    def delete_rule(self, body: bytes) -> None:
        self.request(RTM_DELRULE, body)

    def add_route(self, body: bytes) -> None:
        self.request(RTM_NEWROUTE, body, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)

    def delete_route(self, body: bytes) -> None:
        self.request(RTM_DELROUTE, body)
