"""rtnl: packing and parsing rtnetlink messages (pure), one request's reply loop
(against a scripted socket), and a socket opened in a named namespace (root)."""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
from collections.abc import Iterator

import pytest

from lab.netns import next_prefix, scratch_netns
from trio_tproxy import rtnl


def message(kind: int, flags: int, seq: int, payload: bytes) -> bytes:
    """A reply as the kernel sends it: header, payload, padded to 4 bytes."""
    raw = rtnl.NLMSGHDR.pack(rtnl.NLMSGHDR.size + len(payload), kind, flags, seq, 1234) + payload
    return raw + bytes(-len(raw) % 4)


def test_attributes_are_padded_and_parse_back() -> None:
    packed = rtnl.pack_attrs((rtnl.FRA_IIFNAME, b"lo\0"), (rtnl.FRA_FWMARK, rtnl.u32(10)))
    # "lo\0" is 3 bytes: 4 of header + 3 + 1 of padding, then 4 + 4
    assert packed == (
        struct.pack("=HH", 7, rtnl.FRA_IIFNAME) + b"lo\0\0" + struct.pack("=HHI", 8, 10, 10)
    )
    attrs = rtnl.parse_attrs(packed)
    assert rtnl.get_str(attrs, rtnl.FRA_IIFNAME) == "lo"
    assert rtnl.get_u32(attrs, rtnl.FRA_FWMARK) == 10
    assert rtnl.get_u32(attrs, rtnl.FRA_PRIORITY) is None
    # the NLA_F_NESTED / NET_BYTEORDER bits are not part of the type
    assert rtnl.parse_attrs(struct.pack("=HHI", 8, 0x8000 | 15, 7)) == {15: rtnl.u32(7)}


def test_request_header() -> None:
    raw = rtnl.pack_request(rtnl.RTM_GETRULE, rtnl.NLM_F_REQUEST | rtnl.NLM_F_DUMP, 7, b"x" * 12)
    assert rtnl.NLMSGHDR.unpack_from(raw) == (28, 34, 0x301, 7, 0)
    assert raw[16:] == b"x" * 12


def test_messages_of_one_datagram_and_a_truncated_one() -> None:
    data = message(24, 2, 1, b"abcde") + message(rtnl.NLMSG_DONE, 2, 1, rtnl.u32(0))
    assert list(rtnl.parse_messages(data)) == [
        (24, 2, 1, b"abcde"),
        (rtnl.NLMSG_DONE, 2, 1, rtnl.u32(0)),
    ]
    with pytest.raises(OSError) as info:
        list(rtnl.parse_messages(data[:-1] + b""))
    assert info.value.errno == errno.EBADMSG


def error_payload(code: int, request: bytes, msg: str | None, *, capped: bool) -> bytes:
    echoed = request[:16] if capped else request
    payload = struct.pack("=i", code) + echoed
    payload += bytes(-len(payload) % 4)  # the kernel aligns what it echoes
    if msg is not None:
        payload += rtnl.pack_attrs((rtnl.NLMSGERR_ATTR_MSG, msg.encode() + b"\0"))
    return payload


@pytest.mark.parametrize("capped", [True, False])
def test_errors_with_and_without_the_kernels_message(capped: bool) -> None:
    request = rtnl.pack_request(rtnl.RTM_NEWROUTE, 0x605, 3, b"y" * 21)
    flags = rtnl.NLM_F_ACK_TLVS | (rtnl.NLM_F_CAPPED if capped else 0)
    payload = error_payload(-errno.EINVAL, request, "Invalid scope", capped=capped)
    assert rtnl.parse_error(flags, payload) == (errno.EINVAL, "Invalid scope")
    # no TLVs: the errno only
    assert rtnl.parse_error(0, error_payload(-errno.EEXIST, request, None, capped=capped)) == (
        errno.EEXIST,
        "",
    )
    assert rtnl.parse_error(0, error_payload(0, request, None, capped=capped)) == (0, "")


def test_rule_body_and_a_dumped_rule() -> None:
    body = rtnl.rule_body(socket.AF_INET6, fwmark=13, iifname="lo", table=10, priority=None)
    assert rtnl.FIB_RULE_HDR.unpack_from(body) == (
        socket.AF_INET6, 0, 0, 0, 10, 0, 0, rtnl.FR_ACT_TO_TBL, 0,
    )  # fmt: skip
    attrs = rtnl.parse_attrs(body, rtnl.FIB_RULE_HDR.size)
    assert set(attrs) == {rtnl.FRA_TABLE, rtnl.FRA_FWMARK, rtnl.FRA_IIFNAME}  # no priority
    # a table above 255 goes in the attribute; the header says "compat"
    big = rtnl.rule_body(socket.AF_INET, fwmark=10, iifname="lo", table=1000, priority=99)
    assert rtnl.FIB_RULE_HDR.unpack_from(big)[4] == rtnl.RT_TABLE_COMPAT
    rule = rtnl.parse_rule(big)
    assert rule == rtnl.Rule(
        family=socket.AF_INET,
        action=rtnl.FR_ACT_TO_TBL,
        table=1000,
        src_len=0,
        dst_len=0,
        priority=99,
        fwmark=10,
        fwmask=None,
        iifname="lo",
        oifname=None,
    )
    # a dumped rule without FRA_TABLE: the header's table
    bare = rtnl.FIB_RULE_HDR.pack(socket.AF_INET, 0, 0, 0, 254, 0, 0, 1, 0)
    assert rtnl.parse_rule(bare).table == 254


def test_route_body_and_a_dumped_route() -> None:
    body = rtnl.route_body(
        socket.AF_INET, kind=rtnl.RTN_LOCAL, table=10, oif=1, scope=254, protocol=4
    )
    assert rtnl.RTMSG.unpack_from(body) == (socket.AF_INET, 0, 0, 0, 10, 4, 254, 2, 0)
    route = rtnl.parse_route(body)
    assert route == rtnl.Route(socket.AF_INET, type=2, dst_len=0, table=10, oif=1)


def test_addresses_of_both_families() -> None:
    four = rtnl.IFADDRMSG.pack(socket.AF_INET, 24, 0, 0, 2) + rtnl.pack_attrs(
        (rtnl.IFA_ADDRESS, socket.inet_pton(socket.AF_INET, "10.1.2.3"))
    )
    six = rtnl.IFADDRMSG.pack(socket.AF_INET6, 64, 0, 0, 2) + rtnl.pack_attrs(
        (rtnl.IFA_ADDRESS, socket.inet_pton(socket.AF_INET6, "fd00::3"))
    )
    assert rtnl.parse_address(four) == "10.1.2.3"
    assert rtnl.parse_address(six) == "fd00::3"
    assert rtnl.parse_address(rtnl.IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 2)) is None


class ScriptedSocket:
    """Records what is sent; answers each recv with the next scripted datagram."""

    def __init__(self, *datagrams: bytes) -> None:
        self.sent: list[bytes] = []
        self.datagrams = list(datagrams)

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.datagrams.pop(0)

    def close(self) -> None:
        pass


def scripted(*datagrams: bytes) -> rtnl.Rtnl:
    nl = rtnl.Rtnl.__new__(rtnl.Rtnl)
    nl.sock = ScriptedSocket(*datagrams)  # type: ignore[assignment]
    nl._seq = 0
    return nl


def test_a_dump_over_several_datagrams_skipping_an_old_reply() -> None:
    rule = rtnl.rule_body(socket.AF_INET, fwmark=10, iifname="lo", table=10, priority=5)
    nl = scripted(
        message(rtnl.RTM_NEWRULE, rtnl.NLM_F_MULTI, 0, b"stale"),  # an abandoned request's
        message(rtnl.RTM_NEWRULE, rtnl.NLM_F_MULTI, 1, rule),
        message(rtnl.RTM_NEWRULE, rtnl.NLM_F_MULTI, 1, rule)
        + message(rtnl.NLMSG_DONE, rtnl.NLM_F_MULTI, 1, rtnl.u32(0)),
    )
    rules = nl.rules(socket.AF_INET)
    assert [r.priority for r in rules] == [5, 5]
    (sent,) = nl.sock.sent  # type: ignore[attr-defined]
    assert rtnl.NLMSGHDR.unpack_from(sent)[1:4] == (rtnl.RTM_GETRULE, 0x301, 1)


def test_a_dump_that_fails_part_way_and_a_refused_request() -> None:
    nl = scripted(message(rtnl.NLMSG_DONE, rtnl.NLM_F_MULTI, 1, struct.pack("=i", -errno.EINTR)))
    with pytest.raises(OSError) as info:
        nl.routes(socket.AF_INET6)
    assert info.value.errno == errno.EINTR

    request = rtnl.pack_request(rtnl.RTM_NEWROUTE, 0x605, 1, b"")
    refused = error_payload(-errno.EPERM, request, "not allowed here", capped=True)
    nl = scripted(message(rtnl.NLMSG_ERROR, rtnl.NLM_F_ACK_TLVS | rtnl.NLM_F_CAPPED, 1, refused))
    with pytest.raises(OSError) as info:
        nl.add_route(b"")
    assert (info.value.errno, info.value.strerror) == (errno.EPERM, "not allowed here")
    (sent,) = nl.sock.sent  # type: ignore[attr-defined]
    flags = rtnl.NLM_F_REQUEST | rtnl.NLM_F_ACK | rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL
    assert rtnl.NLMSGHDR.unpack_from(sent)[1:3] == (rtnl.RTM_NEWROUTE, flags)

    nl = scripted(message(rtnl.NLMSG_ERROR, 0, 1, error_payload(0, request, None, capped=True)))
    nl.delete_rule(b"")  # an ACK: returns


def ns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


@pytest.fixture
def netns() -> Iterator[str]:
    with scratch_netns() as name:
        yield name


@pytest.mark.netns
def test_a_socket_in_a_named_namespace_and_back(netns: str) -> None:
    """The socket lives in the namespace; the thread is back home; none is created."""
    home = ns_inode()
    subprocess.run(
        ["ip", "-n", netns, "link", "add", "tpt-d0", "type", "veth", "peer", "tpt-d1"], check=True
    )
    with rtnl.Rtnl(netns) as nl:
        assert nl.link("tpt-d0").index > 0
    assert ns_inode() == home
    with rtnl.Rtnl() as nl, pytest.raises(OSError) as info:
        nl.link("tpt-d0")  # only in the other namespace
    assert info.value.errno == errno.ENODEV

    absent = next_prefix()
    with pytest.raises(FileNotFoundError):
        rtnl.open_socket(socket.NETLINK_ROUTE, absent)
    assert not os.path.exists(f"/run/netns/{absent}")
    assert ns_inode() == home
